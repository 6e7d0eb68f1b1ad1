"""runs.parquet (one row per trial) and leaderboard.parquet (one row per method x task).

Writing runs (`append_runs`, `write_runs`, `compact_runs`, `RunRecorder`):
- Every appended row is first written durably (temp file, fsync, rename) as one JSON file
  in `runs.journal/` beside runs.parquet; only then is runs.parquet rewritten with the
  journal folded in ("compaction") and the folded entries deleted. A failed rewrite (disk
  full, read-only folder, an unreadable runs.parquet) therefore loses nothing: the row
  stays in the journal, every reader merges it, and the next write compacts it.
- Writers hold an exclusive `fcntl.flock` on `.runs.lock` beside runs.parquet around every
  read-modify-write; readers (`read_runs`) hold a shared one, so concurrent processes
  never lose rows and a reader never sees half of a compaction. runs.parquet itself is
  always replaced atomically (os.replace) and read through a single open, so even a
  reader that takes no lock (pandas directly) sees one whole version.
- A sweep records each trial in the journal only (a small file, no rewrite of the whole
  table) and compacts at most every `RunRecorder.compact_every_s` seconds and at the end.
- Files are created with mode 0666 minus the umask (no 0600 temp files), like any file.
- An unreadable runs.parquet (truncated, garbage) is one `ResultsError` naming the file and
  how to recover; it is never overwritten.
- The columns, their order and their types are the run record's (harness.reporting.run_record): a
  row with an unknown column or a value of the wrong type is refused before anything is
  written, and runs.parquet is always written with the run record's Arrow schema.

The leaderboard is a pure function of the runs: rows sharing a key are one run (the last
ok one is kept, the others dropped and counted in `n_duplicate_rows`), and `n_seeds`
counts distinct seeds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import itertools
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reporting.run_record import (
    FIELDS_BY_NAME,
    RUN_COLUMNS,
    RunRecordError,
    arrow_schema,
    validate_row,
)
from harness.reporting.stats import ci95, clip_interval, paired_bootstrap
from harness.spec.config import ConfigError
from harness.spec.identity import mixed_versions

RUNS_FILE = "runs.parquet"
REFERENCE = "lora"  # every method is compared with plain LoRA, paired by seed and item
LEADERBOARD_FILE = "leaderboard.parquet"
JOURNAL_DIR = "runs.journal"  # one JSON file per appended row not yet in runs.parquet
LOCK_FILE = ".runs.lock"

# RUN_COLUMNS (imported above from harness.reporting.run_record, still importable from here): the
# columns every runs.parquet has, in this order (missing values are null).

LEADERBOARD_COLUMNS = [
    "method", "task", "model_id", "test_metric", "test_mean", "test_std", "test_ci_low",
    "test_ci_high", "ci_clipped", "few_seeds", "n_seeds", "chosen_lr", "vs_lora_delta",
    "vs_lora_ci_low", "vs_lora_ci_high", "vs_lora_within_noise", "selection_metric",
    "selection_mean", "lrs_tried", "n_runs", "n_failed", "n_diverged", "majority_baseline",
    "test_metrics_mean", "trainable_params",
    "init_time_s", "train_time_s", "peak_memory_mb", "samples_per_s", "method_config",
    "protocol", "model_revision", "data_kind", "data_source", "seeds", "packages",
    "git_commit", "device", "setting_key", "n_duplicate_rows", "lr_at_grid_edge",
    "n_planned", "n_missing", "partial", "doubted_defaults",
]  # fmt: skip
PARTIAL_MARK = "PARTIAL"
# Below this many seeds a t-interval is too unstable to read: the row says `few_seeds`, and
# the printed table and the report mark its interval with FEW_SEEDS_MARK and a footnote.
MIN_RELIABLE_SEEDS = 3
FEW_SEEDS_MARK = "*"
FEW_SEEDS_NOTE = (  # not "* ..." at a line's start: Markdown would read a bullet
    f"Intervals marked {FEW_SEEDS_MARK}: n < {MIN_RELIABLE_SEEDS} seeds: interval unreliable"
)
DOUBT_MARK = "†"
DOUBT_NOTE = (
    f"Methods marked {DOUBT_MARK} ran with a default that methods/DEFAULTS.md doubts is the "
    f"authors' ({LEADERBOARD_FILE} column doubted_defaults says which, and why)"
)
CLIPPED_NOTE = (
    "95% CI: the Student-t interval over seeds, cut to the values the metric can take; "
    f"where the raw interval was wider, {LEADERBOARD_FILE} has ci_clipped"
)
Planned = Mapping[tuple[str, str], set[str]]  # a sweep's keys per (method, task)


class ResultsError(ConfigError):
    """A runs/leaderboard file that cannot be read or written; the message says what to do."""


class NotCompactedError(ResultsError):
    """The rows are safe in the journal, but runs.parquet could not be rewritten (yet)."""


class RowRefusedError(ResultsError):
    """A row that does not fit the run record (harness.reporting.run_record); nothing was
    written."""


_counter = itertools.count()


def _create(path: Path) -> int:
    """A new file, mode 0666 minus the umask (mkstemp would make it 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through `write(file)` to a fsynced temp file beside `path`; return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = _create(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_files_atomically(files: list[tuple[Path, Callable[[Any], None]]]) -> None:
    """Stage every file first, then rename them all into place: when any write fails
    (disk full, read-only folder) no existing file has been touched."""
    for path, _ in files:  # a rename over a folder would fail after others were replaced
        if Path(path).is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            staged.append((_stage(Path(path), write), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    write_files_atomically([(path, write)])


def atomic_write_parquet(data: Any, path: Path) -> None:
    """`data`: a DataFrame, or a pyarrow Table (written with its own schema)."""
    if isinstance(data, pd.DataFrame):
        _atomic_write(Path(path), lambda f: data.to_parquet(f, index=False))
    else:
        import pyarrow.parquet as pq

        _atomic_write(Path(path), lambda f: pq.write_table(data, f))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def _locked(out: Path, exclusive: bool, create: bool = True) -> Iterator[None]:
    """flock on out/.runs.lock: exclusive for writers, shared for readers.

    A reader in a folder it cannot write to, where no lock file exists yet, reads unlocked
    (no writer of this code has used the folder); so does a reader told not to `create` it."""
    path = out / LOCK_FILE
    fd: int | None = None
    try:
        if exclusive:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        else:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not create:
                    raise
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if exclusive:
            raise ResultsError(f"cannot lock {path} for writing: {err.strerror or err}") from err
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _recover_hint(out: Path) -> str:
    return (
        f"it was left untouched. To recover, restore it from a backup or version control, or "
        f"move it aside (rows appended since are kept in {out / JOURNAL_DIR} and are merged "
        "into a fresh runs.parquet by the next write)"
    )


def read_parquet_file(path: Path, what: str = "file") -> pd.DataFrame | None:
    """Read a whole Parquet file through one open (a consistent version even if it is being
    replaced); None if it does not exist; ResultsError if it is not readable Parquet."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ResultsError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        hint = _recover_hint(path.parent) if what == "runs" else "it was left untouched"
        raise ResultsError(
            f"{path} is not a readable Parquet file ({len(data)} bytes; {first}); {hint}"
        ) from err


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _records(df: pd.DataFrame) -> list[dict]:
    return df.astype(object).where(df.notna(), None).to_dict("records")


def _journal_entries(out: Path) -> list[tuple[Path, dict]]:
    folder = out / JOURNAL_DIR
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.glob("*.json")):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            raise ResultsError(
                f"{path} is not a valid journal entry ({err}); it was left untouched: move it "
                "aside after checking whether its row is in runs.parquet"
            ) from err
        entries.append((path, row))
    return entries


def _journal_write(out: Path, rows: list[dict]) -> list[Path]:
    folder = out / JOURNAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for row in rows:
            text = json.dumps(row, default=_json_default)
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(_counter):06d}.json"
            atomic_write_text(text, folder / name)
            written.append(folder / name)
    except BaseException:
        for path in written:  # all or nothing, so a retry never duplicates
            path.unlink(missing_ok=True)
        raise
    return written


def _merge(existing: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """existing with `rows` appended; a key already present is replaced by the later row."""
    if not rows:
        return existing
    new = normalise_runs(rows)
    keyed = new["key"].notna()
    new = pd.concat([new[keyed].drop_duplicates("key", keep="last"), new[~keyed]])
    keep = existing[~existing["key"].isin(new["key"].dropna())] if len(existing) else existing
    return normalise_runs(_records(keep) + _records(new))


def normalise_runs(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in FIELDS_BY_NAME]
    df = df[RUN_COLUMNS + extra]
    return _typed(df)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Every run column in its run-record dtype, so appends of partial rows (or an all-null
    column) never change the schema; columns the run record lacks (only in files or journal
    entries written by older code) keep their values, as strings when they were objects."""
    for col in df.columns:
        field = FIELDS_BY_NAME.get(col)
        values = df[col]
        if field is None or field.kind in ("str", "json"):
            if field is not None and not isinstance(values.dtype, pd.StringDtype):
                values = values.astype(object).where(values.notna(), None)
            if values.dtype == object:
                df[col] = values.astype("string")
        elif field.kind == "int":
            df[col] = pd.array(values, dtype="Int64")
        elif field.kind == "float":
            df[col] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            df[col] = values.astype(field.pandas_dtype)
    return df


def _fill_columns(runs: pd.DataFrame) -> pd.DataFrame:
    for col in RUN_COLUMNS:  # files written before a column existed
        if col not in runs.columns:
            dtype = FIELDS_BY_NAME[col].pandas_dtype
            runs[col] = pd.Series(None, index=runs.index, dtype=dtype)
    return runs


def _runs_table(runs: pd.DataFrame) -> Any:
    """runs as a pyarrow Table with the run record's schema: every run column in its order
    and type (then any column older code wrote, as it is), whatever the frame's dtypes."""
    import pyarrow as pa

    runs = _typed(_fill_columns(runs.copy()))
    extra = [c for c in runs.columns if c not in FIELDS_BY_NAME]
    runs = runs[RUN_COLUMNS + extra]
    schema = arrow_schema(RUN_COLUMNS)
    if extra:
        inferred = pa.Schema.from_pandas(runs[extra], preserve_index=False)
        schema = pa.schema([*schema, *(inferred.field(c) for c in extra)])
    return pa.Table.from_pandas(runs, schema=schema, preserve_index=False)


def _read_unlocked(out: Path) -> tuple[pd.DataFrame, list[tuple[Path, dict]]]:
    entries = _journal_entries(out)
    existing = read_parquet_file(out / RUNS_FILE, what="runs")
    if existing is None:
        existing = normalise_runs([])
    return _fill_columns(_merge(existing, [row for _, row in entries])), entries


def has_runs(out_dir: str | Path) -> bool:
    """Whether the folder holds runs (runs.parquet, or journal rows not yet compacted)."""
    out = Path(out_dir)
    return (out / RUNS_FILE).is_file() or any((out / JOURNAL_DIR).glob("*.json"))


def read_runs(out_dir: str | Path, *, write_nothing: bool = False) -> pd.DataFrame:
    """runs.parquet with the journal's rows merged in (under a shared lock). With
    `write_nothing` (dry runs, `harness status`) a missing lock file is not created."""
    out = Path(out_dir)
    if not out.is_dir():
        return normalise_runs([])
    with _locked(out, exclusive=False, create=not write_nothing):
        return _read_unlocked(out)[0]


def _compact_locked(out: Path, runs: pd.DataFrame, entries: list[tuple[Path, dict]]) -> None:
    import pyarrow as pa

    try:
        table = _runs_table(runs)
    except (pa.ArrowException, ValueError, TypeError) as err:  # e.g. an old row with no key
        raise NotCompactedError(
            f"could not rewrite {out / RUNS_FILE} with the run record's column types ({err}); "
            f"{len(entries)} row(s) are kept in {out / JOURNAL_DIR} and the file is unchanged"
        ) from err
    try:
        atomic_write_parquet(table, out / RUNS_FILE)
    except OSError as err:
        raise NotCompactedError(
            f"could not rewrite {out / RUNS_FILE} ({err.strerror or err}); "
            f"{len(entries)} row(s) are kept in {out / JOURNAL_DIR}, read with runs.parquet "
            "by every reader and folded into it by the next write"
        ) from err
    for path, _ in entries:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty; we hold the exclusive lock
        (out / JOURNAL_DIR).rmdir()


def compact_runs(out_dir: str | Path) -> pd.DataFrame:
    """Fold the journal into runs.parquet (no-op when the journal is empty)."""
    out = Path(out_dir)
    with _locked(out, exclusive=True):
        runs, entries = _read_unlocked(out)
        if entries:
            _compact_locked(out, runs, entries)
        return runs


def write_runs(out_dir: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Replace runs.parquet as a whole (atomically), e.g. after re-keying old rows.

    Journal rows whose key (or legacy key) `runs` lacks are kept, never dropped."""
    out = Path(out_dir)
    with _locked(out, exclusive=True):
        entries = _journal_entries(out)
        known = set(runs["key"].dropna()) if "key" in runs.columns else set()
        if "legacy_key" in runs.columns:
            known |= set(runs["legacy_key"].dropna())
        extra = [row for _, row in entries if row.get("key") not in known]
        combined = normalise_runs(_records(runs) + extra)
        _compact_locked(out, combined, entries)
        return combined


def check_rows(rows: list[Mapping[str, Any]]) -> list[dict]:
    """Each row with every run column and plain values (harness.reporting.run_record.validate_row);
    RowRefusedError, naming the row and the column, for the first that does not fit."""
    checked = []
    for number, row in enumerate(rows, start=1):
        try:
            checked.append(validate_row(row))
        except RunRecordError as err:
            raise RowRefusedError(
                f"row {number} of {len(rows)} (key {row.get('key')!r}) was refused: {err}; "
                "no row was written"
            ) from err
    return checked


def append_runs(out_dir: str | Path, rows: list[dict], *, compact: bool = True) -> pd.DataFrame:
    """Add rows; a key already present is replaced (a rerun of a failed trial).

    The rows are durable in the journal before anything else; with `compact` runs.parquet
    is then rewritten with them (NotCompactedError if that fails: the rows are kept). Every
    row is first checked against the run record: if any is refused (RowRefusedError),
    nothing at all is written."""
    out = Path(out_dir)
    rows = check_rows(rows)
    with _locked(out, exclusive=True):
        try:
            _journal_write(out, rows)
        except OSError as err:
            raise ResultsError(
                f"could not record {len(rows)} row(s) in {out / JOURNAL_DIR}: "
                f"{err.strerror or err}; they were NOT saved"
            ) from err
        if not compact:
            return normalise_runs(rows)
        try:
            runs, entries = _read_unlocked(out)
        except ResultsError as err:
            raise NotCompactedError(
                f"{err} [the {len(rows)} new row(s) are kept in {out / JOURNAL_DIR}]"
            ) from err
        _compact_locked(out, runs, entries)
        return runs


class RunRecorder:
    """Records a sweep's finished trials: each row goes to the journal at once (small, fast,
    durable); runs.parquet is rewritten only when the time since the last rewrite is at
    least that rewrite's cost / `overhead` (so rewrites take at most ~5% of the sweep's
    wall time and a small table stays current), at the latest after `compact_every_s`
    seconds, and on close.

    Errors never stop the sweep: rows safe in the journal give one warning line; rows that
    could not be written anywhere (e.g. a full disk) are retried with the next trial and,
    if still unsaved on close, printed as JSON lines to stderr so the log holds them. A row
    the run record refuses (unknown column, wrong type) is never retried, so it cannot hold
    up the rows after it: its error and the row as a JSON line are logged at once."""

    def __init__(
        self,
        out_dir: str | Path,
        compact_every_s: float = 30.0,
        log: Callable[[str], None] | None = None,
        overhead: float = 0.05,
    ) -> None:
        self.out = Path(out_dir)
        self.compact_every_s = compact_every_s
        self.overhead = overhead
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.unsaved: list[dict] = []
        self.refused: list[Mapping[str, Any]] = []  # rows that do not fit the run record
        self.last_compact = time.monotonic()
        self.last_cost = 0.0  # seconds the last rewrite took

    def _due(self) -> bool:
        wait = self.compact_every_s
        if self.overhead > 0:
            wait = min(wait, self.last_cost / self.overhead)
        return time.monotonic() - self.last_compact >= wait

    def record(self, row: Mapping[str, Any]) -> None:
        try:
            row = validate_row(row)
        except RunRecordError as err:
            self.refused.append(row)
            self.log(f"error: a trial's row was refused and not saved: {err}")
            self.log("refused row: " + json.dumps(row, default=_json_default))
            return
        rows = [*self.unsaved, row]
        due = self._due()
        started = time.monotonic()
        try:
            append_runs(self.out, rows, compact=due)
            self.unsaved = []
        except NotCompactedError as err:
            self.unsaved = []
            self.log(f"warning: {err}")
        except ResultsError as err:
            self.unsaved = rows
            self.log(f"error: {err}; kept in memory and retried with the next trial")
        if due:
            self.last_compact = time.monotonic()
            self.last_cost = self.last_compact - started

    def close(self) -> bool:
        """Save what is unsaved and compact; True if runs.parquet holds every row (False
        too when a row was refused)."""
        if self.unsaved:
            rows, self.unsaved = self.unsaved, []
            for row in rows:
                self.record(row)
        try:
            compact_runs(self.out)
        except ResultsError as err:
            self.log(f"warning: {err}")
            return False
        if self.unsaved:
            for row in self.unsaved:
                self.log("unsaved row: " + json.dumps(row, default=_json_default))
            return False
        return not self.refused


def run_doubts(method: str, configs: pd.Series) -> list[str]:
    """The doubted defaults (`methods.defaults.doubted_defaults`) any of these runs' method
    configs (JSON) carries, each once, in order."""
    from methods.defaults import doubted_defaults  # here: importing methods loads torch

    found: list[str] = []
    for text in configs.dropna().unique():
        try:
            config = json.loads(text)
        except ValueError:
            continue  # not JSON: carries no recorded default
        for doubt in doubted_defaults(method, config) if isinstance(config, dict) else []:
            if doubt not in found:
                found.append(doubt)
    return found


def board_doubts(cell: Any) -> list[str]:
    """A leaderboard row's `doubted_defaults` cell as a list; none for a board written
    before the column (no cell, or NA)."""
    return json.loads(cell) if isinstance(cell, str) and cell else []


def _unique(series: pd.Series) -> str:
    values = sorted({str(v) for v in series.dropna()})
    if not values:
        return None
    return values[0] if len(values) == 1 else json.dumps(values)


def dedupe_runs(runs: pd.DataFrame, by: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """One row per `by` value (the last ok one, else the last); rows with a null in `by` are
    all kept. Returns the rows kept (in their order) and the count dropped per (method, task).
    """
    empty = pd.Series(dtype="int64")
    if runs.empty or any(c not in runs.columns for c in by):
        return runs, empty
    r = runs.reset_index(drop=True)
    ok = (r["status"] == "ok").fillna(False).astype(int) if "status" in r.columns else 0
    ranked = r.assign(_ok=ok, _pos=np.arange(len(r))).sort_values(["_ok", "_pos"], kind="stable")
    complete = ranked[by].notna().all(axis=1)
    kept = pd.concat([ranked[complete].drop_duplicates(by, keep="last"), ranked[~complete]])
    dropped = r.loc[~r.index.isin(kept["_pos"])]
    kept = kept.sort_values("_pos").drop(columns=["_ok", "_pos"]).reset_index(drop=True)
    if dropped.empty or not {"method", "task"} <= set(dropped.columns):
        return kept, empty
    return kept, dropped.groupby(["method", "task"]).size()


def leaderboard_warnings(board: pd.DataFrame) -> list[str]:
    """Lines to show beside a leaderboard: dropped duplicate rows, skipped comparisons."""
    notes = list(board.attrs.get("warnings", []))
    if "n_duplicate_rows" in board.columns:
        for r in board[board["n_duplicate_rows"].fillna(0) > 0].itertuples():
            notes.append(
                f"{r.method} on {r.task}: {int(r.n_duplicate_rows)} duplicate run row(s) "
                "(same key, or same LR and seed) were counted once"
            )
    return notes


# Selection scores are means over a finite item set: equal counts can differ in the last
# bit (mean(0.805, 0.81, 0.815) = 0.81 but mean(0.78, 0.82, 0.83) = 0.8099999999999999).
SELECTION_TIE_TOLERANCE = 1e-9


def tied_smallest_best(by_lr: pd.Series) -> float:
    """The LR with the best mean selection score; a tie (within SELECTION_TIE_TOLERANCE,
    so float round-off never breaks one) goes to the smallest LR."""
    top = by_lr.max()
    return float(min(lr for lr, score in by_lr.items() if score >= top - SELECTION_TIE_TOLERANCE))


def build_leaderboard(
    runs: pd.DataFrame,
    *,
    compare: bool = True,
    planned: Planned | None = None,
) -> pd.DataFrame:
    """Per method x task: choose the LR by mean selection score over ok seeds, report test.

    Failed and diverged runs never enter a mean; they are counted. An LR is eligible only
    if it has an ok run with finite selection and test scores for every seed the (method,
    task) was run with: a diverging, missing (interrupted) or NaN-scoring seed can neither
    be hidden by dropping it nor let a noisier mean over fewer seeds win. A tie on the
    selection mean goes to the smallest LR. Rows sharing a key (or an LR and seed) are one
    run: the last ok one counts, the others are dropped and counted in n_duplicate_rows.
    `compare=False` skips the (slow) paired bootstrap against LoRA. `planned` (the sweep's
    keys per (method, task)) marks a row `partial` while any planned key has no finished
    run (ok, failed or diverged): an interrupted sweep's leaderboard says so in the file.
    `doubted_defaults` (a JSON list) names each default the rows ran with that
    methods/DEFAULTS.md doubts is the authors'. `lr_at_grid_edge` says the chosen LR is the
    grid's smallest or largest (of >= 2): the best LR may lie outside the grid.
    test_ci_low/high is cut to the values the headline metric can take (tasks/ declares
    them) and `ci_clipped` says it was; `few_seeds` marks n_seeds < MIN_RELIABLE_SEEDS, whose
    interval is unreliable.
    """
    rows = []
    if "setting_key" not in runs.columns:  # rows from before key version 2
        runs = runs.assign(setting_key=pd.Series(pd.NA, index=runs.index, dtype="string"))
    runs, dup_keys = dedupe_runs(runs, ["key"])
    for (method, task), group in runs.groupby(["method", "task"], sort=True):
        settings = set(group["setting_key"].fillna("recorded before key version 2"))
        if len(settings) > 1:  # a sweep refuses this; only hand-merged run files get here
            raise ResultsError(
                f"{method} on {task}: runs of {len(settings)} different settings "
                f"({sorted(settings)}); one leaderboard row never averages across settings"
            )
        ok_packages = group.loc[group["status"] == "ok", "packages"] if "packages" in group else []
        mixed = mixed_versions(ok_packages)
        if mixed:  # a sweep refuses this too (harness.spec.identity.version_conflicts)
            described = ", ".join(f"{name} {sorted(v)}" for name, v in sorted(mixed.items()))
            raise ResultsError(
                f"{method} on {task}: runs made with different package versions "
                f"({described}); one leaderboard row never mixes them"
            )
    runs, dup_seeds = dedupe_runs(runs, ["method", "task", "lr", "seed"])
    duplicates: dict = {}
    for counts in (dup_keys, dup_seeds):
        for group, n in counts.items():
            duplicates[group] = duplicates.get(group, 0) + int(n)
    for (method, task), group in runs.groupby(["method", "task"], sort=True):
        ok = group[group["status"] == "ok"]
        all_seeds = set(group["seed"])
        complete = [
            lr
            for lr, g in group.groupby("lr")
            if (g["status"] == "ok").all()
            and set(g["seed"]) == all_seeds
            and np.isfinite(g["selection_score"].astype(float)).all()
            and np.isfinite(g["test_score"].astype(float)).all()
        ]
        by_lr = ok[ok["lr"].isin(complete)].groupby("lr")["selection_score"].mean()
        row = {
            "method": method,
            "task": task,
            "model_id": _unique(group["model_id"]),
            "lrs_tried": json.dumps(sorted(float(x) for x in group["lr"].unique())),
            "n_runs": len(group),
            "n_failed": int((group["status"] == "failed").sum()),
            "n_diverged": int((group["status"] == "diverged").sum()),
            "protocol": _unique(group["protocol"]),
            "git_commit": _unique(group["git_commit"]),
            "packages": _unique(group["packages"]),
            "device": _unique(group["device"]),
            "data_kind": _unique(group["data_kind"]),
            "data_source": _unique(group["data_source"]),
            "model_revision": _unique(group["model_revision"]),
            "method_config": _unique(group["method_config"]),
            "test_metric": _unique(group["test_metric"]),
            "selection_metric": _unique(group["selection_metric"]),
            "setting_key": _unique(group["setting_key"]),
            "n_duplicate_rows": int(duplicates.get((method, task), 0)),
            "doubted_defaults": json.dumps(run_doubts(str(method), group["method_config"])),
        }
        if planned is not None and (method, task) in planned:  # else: not this sweep's
            keys = planned[(method, task)]
            missing = len(keys - set(group["key"]))
            row.update(n_planned=len(keys), n_missing=missing, partial=missing > 0)
        if by_lr.notna().any():
            chosen = tied_smallest_best(by_lr)
            grid = sorted(float(x) for x in group["lr"].unique())
            row["lr_at_grid_edge"] = len(grid) >= 2 and chosen in (grid[0], grid[-1])
            best = ok[ok["lr"] == chosen]
            test_metrics = [json.loads(s) for s in best["test_metrics"]]
            row.update(
                chosen_lr=chosen,
                selection_mean=float(by_lr[chosen]),
                test_mean=float(best["test_score"].mean()),
                test_std=float(best["test_score"].std(ddof=1)) if len(best) > 1 else float("nan"),
                **seed_interval(task, row["test_metric"], best["test_score"]),
                n_seeds=int(best["seed"].nunique()),
                seeds=json.dumps(sorted(int(s) for s in best["seed"])),
                majority_baseline=float(best["majority_baseline"].mean()),
                test_metrics_mean=json.dumps(
                    {k: float(np.mean([m[k] for m in test_metrics])) for k in test_metrics[0]},
                    sort_keys=True,
                ),
                trainable_params=int(best["trainable_params"].iloc[0]),
                init_time_s=float(best["init_time_s"].mean()),
                train_time_s=float(best["train_time_s"].mean()),
                peak_memory_mb=float(best["peak_memory_mb"].mean()),
                samples_per_s=float(best["samples_per_s"].mean()),
            )
        else:
            row.update(n_seeds=0)
        rows.append(row)
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    notes = _compare_with_reference(runs, board) if compare else []
    board["n_duplicate_rows"] = board["n_duplicate_rows"].fillna(0).astype("int64")
    board["ci_clipped"] = board["ci_clipped"].astype("boolean")  # NA: no interval
    board["few_seeds"] = (board["n_seeds"] < MIN_RELIABLE_SEEDS).astype(bool)
    board["partial"] = board["partial"].astype("boolean")  # NA: no plan known
    board["lr_at_grid_edge"] = board["lr_at_grid_edge"].astype("boolean")
    for column in ("n_planned", "n_missing"):
        board[column] = board[column].astype("Int64")
    if len(board):
        board = board.sort_values(
            ["task", "test_mean"], ascending=[True, False], na_position="last"
        )
    board = board.reset_index(drop=True)
    board.attrs["warnings"] = notes
    return board


def metric_value_range(task_id: str, metric: str | None) -> tuple[float, float]:
    """The values a task's headline metric can take, as tasks/ declares them (by the
    metric's name alone for a task this checkout does not know); unbounded if undeclared."""
    import tasks  # here, not at the top: importing every task family is slow
    from tasks.base import UNBOUNDED, metric_range

    if metric is None:
        return UNBOUNDED
    try:
        task = tasks.get_task(task_id)
    except KeyError:
        return metric_range(metric)
    return task.metric_range(metric)


def seed_interval(task_id: str, metric: str | None, scores: pd.Series) -> dict[str, Any]:
    """test_ci_low/high: the t-interval over seeds cut to the metric's range; ci_clipped:
    whether the raw interval was wider than the metric allows (absent: no interval)."""
    low, high = ci95(scores)
    if not np.isfinite([low, high]).all():
        return {"test_ci_low": low, "test_ci_high": high}
    low, high, clipped = clip_interval(low, high, metric_value_range(task_id, metric))
    return {"test_ci_low": low, "test_ci_high": high, "ci_clipped": clipped}


def _headline_items(run: pd.Series) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The per-item outcomes of a run's headline test split, or None if not recorded."""
    if pd.isna(run.get("test_items")) or not run["test_items"]:
        return None
    items = json.loads(run["test_items"])
    split = run["test_metric"].split("/")[0] if "/" in run["test_metric"] else None
    key = f"test/{split}" if split else (next(iter(items)) if len(items) == 1 else None)
    if key not in items:
        return None
    record = items[key]
    if "correct" in record:
        return np.asarray(record["correct"], dtype=float), None
    return np.asarray(record["pred"]), np.asarray(record["label"])


Items = tuple[np.ndarray, np.ndarray | None]


def paired_items(
    mine: pd.DataFrame, theirs: pd.DataFrame
) -> tuple[list[Items], list[Items], list[int]] | str:
    """Per-seed headline outcomes of two sets of runs (each indexed by seed, one LR), paired by
    seed on the same test items: (a, b, seeds), or why they cannot be paired."""
    seeds = sorted(set(mine.index) & set(theirs.index))
    if not seeds:
        return "no seed in common"
    a = [_headline_items(mine.loc[s]) for s in seeds]
    b = [_headline_items(theirs.loc[s]) for s in seeds]
    if any(x is None for x in a + b):
        return "per-item test outcomes not recorded"
    if any(
        len(x[0]) != len(y[0]) or (x[1] is not None and not np.array_equal(x[1], y[1]))
        for x, y in zip(a, b, strict=True)
    ):
        return "not the same test items (count or labels differ)"
    return a, b, [int(s) for s in seeds]


def metric_fn(task_id: str, metric: str):
    """Recomputes the headline metric on a resample of items."""
    name = metric.split("/")[-1]

    def score(predictions: np.ndarray, labels: np.ndarray | None) -> float:
        if labels is None:  # per-item correctness
            return float(predictions.mean())
        if name == "accuracy":  # the common case, without a metrics call per replicate
            return float((predictions == labels).mean())
        import tasks

        return tasks.get_task(task_id).metrics(predictions, labels)[name]

    return score


def known_task(task_id: str) -> bool:
    import tasks

    try:
        tasks.get_task(task_id)
    except KeyError:
        return False
    return True


def _compare_with_reference(
    runs: pd.DataFrame, board: pd.DataFrame, ref: str = REFERENCE
) -> list[str]:
    """Paired bootstrap of each method against `ref` at both chosen LRs, same seeds/items.

    Returns notes on comparisons skipped (a task this checkout no longer knows, whose
    metric cannot be recomputed on resamples)."""
    notes: list[str] = []
    for col in ("vs_lora_delta", "vs_lora_ci_low", "vs_lora_ci_high"):
        board[col] = board[col].astype("float64")
    board["vs_lora_within_noise"] = board["vs_lora_within_noise"].astype("boolean")
    chosen = {(r.method, r.task): r.chosen_lr for r in board.itertuples()}
    ok = runs[runs["status"] == "ok"]
    for i, row in board.iterrows():
        ref_lr = chosen.get((ref, row["task"]))
        if row["method"] == ref or pd.isna(row["chosen_lr"]) or ref_lr is None or pd.isna(ref_lr):
            continue
        mine = ok[(ok["method"] == row["method"]) & (ok["task"] == row["task"])]
        theirs = ok[(ok["method"] == ref) & (ok["task"] == row["task"])]
        mine = mine[mine["lr"] == row["chosen_lr"]].set_index("seed")
        theirs = theirs[theirs["lr"] == ref_lr].set_index("seed")
        if not _same_evaluation(mine, theirs):
            continue  # another model, data, protocol, budget or test set: not comparable
        paired = paired_items(mine, theirs)
        if isinstance(paired, str):
            continue  # no common seeds, no per-item outcomes, or not the same test items
        a, b, _ = paired
        needs_task = any(x[1] is not None for x in a + b) and (
            str(row["test_metric"]).split("/")[-1] != "accuracy"
        )
        if needs_task and not known_task(row["task"]):
            notes.append(
                f"{row['method']} on {row['task']}: no paired comparison with {ref}: task "
                f"{row['task']!r} is not known to this checkout (its metric cannot be recomputed)"
            )
            continue
        result = paired_bootstrap(a, b, metric_fn(row["task"], row["test_metric"]))
        board.loc[i, ["vs_lora_delta", "vs_lora_ci_low", "vs_lora_ci_high"]] = [
            result["delta"],
            result["ci_low"],
            result["ci_high"],
        ]
        board.loc[i, "vs_lora_within_noise"] = result["within_noise"]
    return notes


# What must be equal for a paired comparison with the reference method to mean anything.
COMPARABLE_COLUMNS = (
    "model_id", "model_revision", "protocol", "data_fingerprint", "budget", "test_rows",
)  # fmt: skip


def setting_differences(mine: pd.DataFrame, theirs: pd.DataFrame) -> list[str]:
    """The COMPARABLE_COLUMNS on which two sets of runs do not all agree (empty: comparable).

    The one rule for "settings match": the leaderboard's vs-LoRA column and the claims check
    (harness.reporting.claims) both use it."""
    differ = []
    for column in COMPARABLE_COLUMNS:
        if column in mine.columns and column in theirs.columns:
            values = set(mine[column].astype(str)) | set(theirs[column].astype(str))
            if len(values) > 1:
                differ.append(column)
    return differ


def _same_evaluation(mine: pd.DataFrame, theirs: pd.DataFrame) -> bool:
    return not setting_differences(mine, theirs)


def write_leaderboard(out_dir: str | Path, planned: Planned | None = None) -> pd.DataFrame:
    board = build_leaderboard(read_runs(out_dir), planned=planned)
    path = Path(out_dir) / LEADERBOARD_FILE
    try:
        atomic_write_parquet(board, path)
    except OSError as err:
        raise ResultsError(f"cannot write {path}: {err.strerror or err}") from err
    return board


def _writable(path: Path, what: str) -> None:
    parent = path.parent
    if path.is_dir():
        raise ResultsError(f"cannot write the {what} {path}: it is a directory")
    if not parent.is_dir():
        raise ResultsError(f"cannot write the {what} {path}: no folder {parent}")
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise ResultsError(f"cannot write the {what} {path}: {os.strerror(errno.EROFS)}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ResultsError(f"cannot write the {what} {path}: {os.strerror(errno.EACCES)}")


def save_leaderboard(
    out_dir: str | Path, markdown: str | Path | None = None, planned: Planned | None = None
) -> tuple[pd.DataFrame, str]:
    """`harness leaderboard`: rebuild leaderboard.parquet from the runs (and the Markdown
    table); ResultsError, with no output file changed, if any of it cannot be written."""
    out = Path(out_dir)
    if not has_runs(out):
        raise ResultsError(f"no {RUNS_FILE} in {out}")
    board = build_leaderboard(read_runs(out), planned=planned)
    table = format_leaderboard(board)
    files: list[tuple[Path, Callable[[Any], None]]] = [
        (out / LEADERBOARD_FILE, lambda f: board.to_parquet(f, index=False))
    ]
    if markdown:
        files.append((Path(markdown), lambda f: f.write((table + "\n").encode("utf-8"))))
    for path, what in zip((p for p, _ in files), ("leaderboard", "Markdown file"), strict=False):
        _writable(path, what)
    try:
        write_files_atomically(files)
    except OSError as err:
        where = err.filename or out
        raise ResultsError(
            f"cannot write {where}: {err.strerror or err} (no output file was changed)"
        ) from err
    return board, table


def _vs_lora(row) -> str:
    if pd.isna(row.vs_lora_delta):
        return "-"
    noise = " (noise)" if row.vs_lora_within_noise else ""
    return f"{row.vs_lora_delta:+.3f}{noise}"


def _flag(value: Any) -> bool:
    """A nullable boolean cell: NA (not known) is False."""
    return bool(pd.notna(value) and value)


def format_leaderboard(board: pd.DataFrame) -> str:
    from tabulate import tabulate

    if board.empty:
        return "(no runs)"
    shown = pd.DataFrame(
        {
            "task": board["task"],
            "method": [
                f"{r.method} {DOUBT_MARK}" if _doubted(r) else r.method for r in board.itertuples()
            ],
            "metric": board["test_metric"],
            "test mean": board["test_mean"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "± std": board["test_std"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "95% CI": [_ci_cell(r) for r in board.itertuples()],
            "vs lora": [_vs_lora(r) for r in board.itertuples()],
            "seeds": board["n_seeds"],
            "lr": [
                f"{v:.0e}{' (edge)' if _flag(edge) else ''}" if pd.notna(v) else "-"
                for v, edge in zip(board["chosen_lr"], board["lr_at_grid_edge"], strict=True)
            ],
            "select": board["selection_mean"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "majority": board["majority_baseline"].map(
                lambda v: f"{v:.4f}" if pd.notna(v) else "-"
            ),
            "trainable": board["trainable_params"],
            "train s": board["train_time_s"].map(lambda v: f"{v:.1f}" if pd.notna(v) else "-"),
            "fail/div": board["n_failed"].astype(str) + "/" + board["n_diverged"].astype(str),
        }
    )
    if board["partial"].fillna(False).any():  # only then: finished boards keep their look
        shown["complete"] = [
            f"{PARTIAL_MARK} {r.n_missing}/{r.n_planned} missing" if _flag(r.partial) else "yes"
            for r in board.itertuples()
        ]
    table = tabulate(shown, headers="keys", tablefmt="github", showindex=False)
    notes = []  # after a blank line: Markdown would read a line right below as a table row
    if any(_few_seeds(r) and pd.notna(r.test_ci_low) for r in board.itertuples()):
        notes.append(FEW_SEEDS_NOTE)
    if "ci_clipped" in board.columns and board["ci_clipped"].fillna(False).astype(bool).any():
        notes.append(CLIPPED_NOTE)
    if any(_doubted(r) for r in board.itertuples()):
        notes.append(DOUBT_NOTE)
    return "\n\n".join([table, *notes])


def _doubted(row) -> bool:
    return bool(board_doubts(getattr(row, "doubted_defaults", None)))


def _few_seeds(row) -> bool:
    """A row's few_seeds flag; from n_seeds for a board written before the column."""
    flag = getattr(row, "few_seeds", None)
    if flag is None or pd.isna(flag):
        return bool(pd.notna(row.n_seeds) and row.n_seeds < MIN_RELIABLE_SEEDS)
    return bool(flag)


def _ci_cell(row) -> str:
    """`[low, high]`, marked `* (n=2)` when too few seeds stand behind it."""
    if pd.isna(row.test_ci_low):
        return "-"
    cell = f"[{row.test_ci_low:.3f}, {row.test_ci_high:.3f}]"
    return f"{cell}{FEW_SEEDS_MARK} (n={int(row.n_seeds)})" if _few_seeds(row) else cell
