"""Reading a split from the hub or from a local mirror in hub-id layout, with provenance.

Hub datasets are read at a pinned commit: the sweep's `data_revisions` (hub id -> branch,
tag or commit), else the dataset's current commit, resolved once by the driver
(`hub_revision`, through huggingface_hub) and handed to every trial (`pinned_revisions`),
so a dataset updated mid-sweep is never mixed in. Every source's fingerprint is a sha256
of its content (the mirror file's bytes, or the loaded Arrow table), not a cache id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def manifest_entry(data_dir: Path, rel: str) -> dict[str, Any] | None:
    manifest = data_dir / "MANIFEST.json"
    if not manifest.is_file():
        return None
    for entry in json.loads(manifest.read_text()):
        if entry.get("path") == rel:
            return entry
    return None


# Hub id -> the revision this process reads it at (set around a trial's data reads), and
# revisions resolved to a commit here, so one process asks the hub once per dataset.
_pinned: dict[str, str] = {}
_resolved: dict[tuple[str, str | None], str | None] = {}
HUB_TIMEOUT_S = 10.0  # an unreachable hub costs seconds, not a hung driver


@contextlib.contextmanager
def pinned_revisions(revisions: Mapping[str, str] | None) -> Iterator[None]:
    """Read the named hub datasets at these revisions inside the block."""
    before = dict(_pinned)
    _pinned.update(revisions or {})
    try:
        yield
    finally:
        _pinned.clear()
        _pinned.update(before)


def hub_revision(hub_id: str) -> str | None:
    """The commit to read `hub_id` at: its pinned revision resolved to a commit sha
    (huggingface_hub's dataset_info), once per process; None when the hub is unreachable
    and nothing is pinned (datasets then reads its cache; the row records None)."""
    requested = _pinned.get(hub_id)
    if (hub_id, requested) not in _resolved:
        from huggingface_hub import HfApi

        try:
            info = HfApi().dataset_info(hub_id, revision=requested, timeout=HUB_TIMEOUT_S)
            sha = info.sha
        except Exception:  # noqa: BLE001 - offline, rate-limited: keep what was asked
            sha = None
        _resolved[(hub_id, requested)] = sha or requested
    return _resolved[(hub_id, requested)]


class _HashingSink:
    """A write-only file that feeds sha256 (so hashing a large table keeps no copy)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


FINGERPRINT_WINDOW_ROWS = 4096


def table_fingerprint(table: Any) -> str:
    """sha256 of an Arrow table's schema and content (16 hex digits), independent of how
    it is chunked or sliced in memory: it is serialised (Arrow IPC) in fixed windows of
    rows, each window copied into fresh compact buffers first (`take`; a zero-copy slice
    serialises differently), so the same rows give the same fingerprint."""
    import numpy as np
    import pyarrow as pa

    sink = _HashingSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        for start in range(0, table.num_rows, FINGERPRINT_WINDOW_ROWS):
            window = table.slice(start, FINGERPRINT_WINDOW_ROWS)
            window = window.take(pa.array(np.arange(window.num_rows))).combine_chunks()
            for batch in window.to_batches():
                writer.write_batch(batch)
    return sink.digest.hexdigest()[:16]


def dataset_fingerprint(ds: Any) -> str:
    """A `datasets.Dataset`'s content fingerprint, through its public Arrow table."""
    return table_fingerprint(ds.with_format("arrow")[:])


def load_hub_dataset(hub_id: str, config: str | None, split: str) -> tuple[Any, str | None]:
    """`datasets.load_dataset` at the pinned revision; returns (dataset, revision)."""
    import datasets

    revision = hub_revision(hub_id)
    return datasets.load_dataset(hub_id, config, split=split, revision=revision), revision


def hub_revisions(provenance: Any) -> dict[str, str]:
    """hub id -> the revision every hub source in a task's provenance was read at."""
    found: dict[str, str] = {}
    if isinstance(provenance, dict):
        if provenance.get("source") == "hub" and provenance.get("revision"):
            found[str(provenance["hub_id"])] = str(provenance["revision"])
        for value in provenance.values():
            found.update(hub_revisions(value))
    elif isinstance(provenance, list):
        for value in provenance:
            found.update(hub_revisions(value))
    return found


def load_split(
    hub_id: str, config: str | None, split: str, data_dir: str | None, url: str | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One split as a DataFrame plus where it came from.

    With `data_dir`, reads `<data_dir>/<hub_id>/<config or default>/<split>.parquet`; without,
    calls `datasets.load_dataset` on the hub, or on `url` (a JSON file published outside the
    hub, e.g. LLM-Adapters' test sets on GitHub) when the data has no hub dataset.
    """
    if data_dir:
        root = Path(data_dir)
        rel = f"{hub_id}/{config or 'default'}/{split}.parquet"
        path = root / rel
        if not path.is_file():
            folder = path.parent
            have = sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []
            raise FileNotFoundError(
                f"{hub_id} ({config}) split {split!r} is not in the data mirror: {path} is "
                f"missing; splits there: {have or 'none'} (unset HARNESS_DATA_DIR to use the hub)"
            )
        df = pd.read_parquet(path)
        prov: dict[str, Any] = {
            "source": "mirror",
            "path": rel,
            "rows": len(df),
            "fingerprint": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        }
        entry = manifest_entry(root, rel)
        if entry:
            prov.update(origin=entry.get("source"), license=entry.get("license"))
        return df, prov

    if url:
        import datasets

        ds = datasets.load_dataset("json", data_files=url, split="train")
        fingerprint = dataset_fingerprint(ds)
        prov = {"source": "url", "url": url, "rows": len(ds), "fingerprint": fingerprint}
        return ds.to_pandas(), prov
    ds, revision = load_hub_dataset(hub_id, config, split)
    prov = {
        "source": "hub",
        "hub_id": hub_id,
        "config": config,
        "split": split,
        "revision": revision,  # the commit read (None: offline, from the datasets cache)
        "rows": len(ds),
        "fingerprint": dataset_fingerprint(ds),
    }
    return ds.to_pandas(), prov


def carve_selection(
    train: pd.DataFrame, selection_rows: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split train into (train pool, selection) by a fixed permutation; disjoint, deterministic.

    The seed belongs to the protocol, not the trial, so every trial selects on the same rows.
    """
    if not 0 < selection_rows < len(train):
        raise ValueError(f"selection_rows={selection_rows} must be in (0, {len(train)})")
    order = np.random.default_rng(seed).permutation(len(train))
    selection = train.iloc[order[:selection_rows]].reset_index(drop=True)
    pool = train.iloc[order[selection_rows:]].reset_index(drop=True)
    return pool, selection


def subsample(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """A fixed seeded subset of n rows (all rows when n is None or >= len)."""
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(df))[:n]
    return df.iloc[np.sort(order)].reset_index(drop=True)


def split_roles(
    train_full: pd.DataFrame,
    *,
    train_rows: int | None,
    selection_rows: int | None,
    selection_cap: int,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pool, selection, train): the protocol's selection split, min(10% of train, cap) rows
    unless the budget says otherwise, carved with a fixed seed; train is a fixed subset of
    the remaining pool. Every task family selects its LR on rows chosen this way."""
    n_select = selection_rows or min(len(train_full) // 10, selection_cap)
    pool, selection = carve_selection(train_full, n_select, seed=seed)
    return pool, selection, subsample(pool, train_rows, seed=seed)


def roles_provenance(
    train_prov: dict[str, Any],
    test_prov: dict[str, Any],
    pool: pd.DataFrame,
    train: pd.DataFrame,
    selection: pd.DataFrame,
    test: dict[str, pd.DataFrame],
    **extra: Any,
) -> dict[str, Any]:
    """The provenance block every task's DataSplits carries (sources, sizes, extras)."""
    return {
        "train": train_prov,
        "test": test_prov,
        "train_pool_rows": len(pool),
        "train_rows": len(train),
        "selection_rows": len(selection),
        "test_rows": {k: len(v) for k, v in test.items()},
        **extra,
    }
