"""Reading a split from the hub or from a local mirror in hub-id layout, with provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _manifest_entry(data_dir: Path, rel: str) -> dict[str, Any] | None:
    manifest = data_dir / "MANIFEST.json"
    if not manifest.is_file():
        return None
    for entry in json.loads(manifest.read_text()):
        if entry.get("path") == rel:
            return entry
    return None


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
        entry = _manifest_entry(root, rel)
        if entry:
            prov.update(origin=entry.get("source"), license=entry.get("license"))
        return df, prov

    import datasets

    if url:
        ds = datasets.load_dataset("json", data_files=url, split="train")
        prov = {"source": "url", "url": url, "rows": len(ds), "fingerprint": ds._fingerprint}
        return ds.to_pandas(), prov
    ds = datasets.load_dataset(hub_id, config, split=split)
    prov = {
        "source": "hub",
        "hub_id": hub_id,
        "config": config,
        "split": split,
        # datasets does not expose the hub commit; its content fingerprint identifies the data.
        "revision": None,
        "rows": len(ds),
        "fingerprint": ds._fingerprint,
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
