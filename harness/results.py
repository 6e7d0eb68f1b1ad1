"""runs.parquet (one row per trial) and leaderboard.parquet (one row per method x task).

Both are written atomically (temp file in the same folder + rename), so a crash mid-write
never leaves a truncated file, and the leaderboard is a pure function of runs.parquet.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

RUNS_FILE = "runs.parquet"
LEADERBOARD_FILE = "leaderboard.parquet"

# Columns every runs.parquet has, in this order (missing values are null); see README.
RUN_COLUMNS = [
    "key", "sweep", "status", "error", "method", "method_config", "task", "protocol",
    "model_id", "model_revision", "model_source", "data_kind", "data_source", "train_rows",
    "selection_rows", "test_rows", "seed", "lr", "budget", "trainable_params", "total_params",
    "expected_trainable_params", "init_time_s", "train_time_s", "eval_time_s", "wall_time_s",
    "peak_memory_mb", "peak_memory_kind", "steps", "samples_per_s", "tokens_per_s",
    "final_train_loss", "selection_metric", "selection_score", "selection_metrics",
    "test_metric", "test_score", "test_metrics", "majority_baseline", "loss_curve",
    "eval_curve", "packages", "git_commit", "hostname", "device", "threads", "started_at",
    "traceback",
]  # fmt: skip

LEADERBOARD_COLUMNS = [
    "method", "task", "model_id", "test_metric", "test_mean", "test_std", "n_seeds",
    "chosen_lr", "selection_metric", "selection_mean", "lrs_tried", "n_runs", "n_failed",
    "n_diverged", "majority_baseline", "test_metrics_mean", "trainable_params",
    "init_time_s", "train_time_s", "peak_memory_mb", "samples_per_s", "method_config",
    "protocol", "model_revision", "data_kind", "data_source", "seeds", "packages",
    "git_commit", "device",
]  # fmt: skip


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normalise_runs(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in RUN_COLUMNS]
    df = df[RUN_COLUMNS + extra]
    # Stable dtypes so appends of partial rows never change the schema.
    for col in ("trainable_params", "total_params", "expected_trainable_params", "steps",
                "train_rows", "selection_rows", "seed"):  # fmt: skip
        df[col] = pd.array(df[col], dtype="Int64")
    for col in ("lr", "init_time_s", "train_time_s", "eval_time_s", "wall_time_s",
                "peak_memory_mb", "samples_per_s", "tokens_per_s", "final_train_loss",
                "selection_score", "test_score", "majority_baseline"):  # fmt: skip
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in RUN_COLUMNS:
        if df[col].dtype == object:
            df[col] = df[col].astype("string")
    return df


def read_runs(out_dir: str | Path) -> pd.DataFrame:
    path = Path(out_dir) / RUNS_FILE
    if not path.exists():
        return normalise_runs([])
    return pd.read_parquet(path)


def append_runs(out_dir: str | Path, rows: list[dict]) -> pd.DataFrame:
    """Add rows; a key already present is replaced (a rerun of a failed trial)."""
    existing = read_runs(out_dir)
    new = normalise_runs(rows)
    keep = existing[~existing["key"].isin(new["key"])] if len(existing) else existing
    combined = normalise_runs(
        keep.astype(object).where(keep.notna(), None).to_dict("records")
        + new.astype(object).where(new.notna(), None).to_dict("records")
    )
    atomic_write_parquet(combined, Path(out_dir) / RUNS_FILE)
    return combined


def _unique(series: pd.Series) -> str:
    values = sorted({str(v) for v in series.dropna()})
    return values[0] if len(values) == 1 else json.dumps(values)


def build_leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method x task: choose the LR by mean selection score over ok seeds, report test.

    Failed and diverged runs never enter a mean; they are counted. An LR is eligible only
    if every one of its seeds finished ok, so a diverging seed cannot be hidden by dropping it.
    """
    rows = []
    for (method, task), group in runs.groupby(["method", "task"], sort=True):
        ok = group[group["status"] == "ok"]
        complete = [
            lr for lr, g in group.groupby("lr") if (g["status"] == "ok").all() and len(g) > 0
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
        }
        if by_lr.notna().any():
            chosen = float(by_lr.idxmax())
            best = ok[ok["lr"] == chosen]
            test_metrics = [json.loads(s) for s in best["test_metrics"]]
            row.update(
                chosen_lr=chosen,
                selection_mean=float(by_lr.max()),
                test_mean=float(best["test_score"].mean()),
                test_std=float(best["test_score"].std(ddof=1)) if len(best) > 1 else float("nan"),
                n_seeds=len(best),
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
    if len(board):
        board = board.sort_values(
            ["task", "test_mean"], ascending=[True, False], na_position="last"
        )
    return board.reset_index(drop=True)


def write_leaderboard(out_dir: str | Path) -> pd.DataFrame:
    board = build_leaderboard(read_runs(out_dir))
    atomic_write_parquet(board, Path(out_dir) / LEADERBOARD_FILE)
    return board


def format_leaderboard(board: pd.DataFrame) -> str:
    from tabulate import tabulate

    if board.empty:
        return "(no runs)"
    shown = pd.DataFrame(
        {
            "task": board["task"],
            "method": board["method"],
            "metric": board["test_metric"],
            "test mean": board["test_mean"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "± std": board["test_std"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "seeds": board["n_seeds"],
            "lr": board["chosen_lr"].map(lambda v: f"{v:.0e}" if pd.notna(v) else "-"),
            "select": board["selection_mean"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
            "majority": board["majority_baseline"].map(
                lambda v: f"{v:.4f}" if pd.notna(v) else "-"
            ),
            "trainable": board["trainable_params"],
            "train s": board["train_time_s"].map(lambda v: f"{v:.1f}" if pd.notna(v) else "-"),
            "fail/div": board["n_failed"].astype(str) + "/" + board["n_diverged"].astype(str),
        }
    )
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False)
