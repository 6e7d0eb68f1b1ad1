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

from harness.stats import ci95, paired_bootstrap

RUNS_FILE = "runs.parquet"
REFERENCE = "lora"  # every method is compared with plain LoRA, paired by seed and item
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
    "eval_curve", "test_items", "sanity_init", "sanity_merge", "sanity_callbacks", "packages",
    "git_commit", "hostname", "device", "threads", "started_at", "traceback", "key_version",
    "setting_key", "data_fingerprint", "legacy_key",
]  # fmt: skip

LEADERBOARD_COLUMNS = [
    "method", "task", "model_id", "test_metric", "test_mean", "test_std", "test_ci_low",
    "test_ci_high", "n_seeds", "chosen_lr", "vs_lora_delta", "vs_lora_ci_low",
    "vs_lora_ci_high", "vs_lora_within_noise", "selection_metric", "selection_mean",
    "lrs_tried", "n_runs", "n_failed", "n_diverged", "majority_baseline", "test_metrics_mean",
    "trainable_params",
    "init_time_s", "train_time_s", "peak_memory_mb", "samples_per_s", "method_config",
    "protocol", "model_revision", "data_kind", "data_source", "seeds", "packages",
    "git_commit", "device", "setting_key",
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
                "train_rows", "selection_rows", "seed", "key_version"):  # fmt: skip
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
    runs = pd.read_parquet(path)
    for col in RUN_COLUMNS:  # files written before a column existed
        if col not in runs.columns:
            runs[col] = pd.Series(
                pd.NA, index=runs.index, dtype="Int64" if col == "key_version" else "string"
            )
    return runs


def write_runs(out_dir: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Replace runs.parquet as a whole (atomically), e.g. after re-keying old rows."""
    combined = normalise_runs(runs.astype(object).where(runs.notna(), None).to_dict("records"))
    atomic_write_parquet(combined, Path(out_dir) / RUNS_FILE)
    return combined


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
    if not values:
        return None
    return values[0] if len(values) == 1 else json.dumps(values)


def build_leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method x task: choose the LR by mean selection score over ok seeds, report test.

    Failed and diverged runs never enter a mean; they are counted. An LR is eligible only
    if it has an ok run with finite selection and test scores for every seed the (method,
    task) was run with: a diverging, missing (interrupted) or NaN-scoring seed can neither
    be hidden by dropping it nor let a noisier mean over fewer seeds win. A tie on the
    selection mean goes to the smallest LR.
    """
    rows = []
    if "setting_key" not in runs.columns:  # rows from before key version 2
        runs = runs.assign(setting_key=pd.Series(pd.NA, index=runs.index, dtype="string"))
    for (method, task), group in runs.groupby(["method", "task"], sort=True):
        settings = set(group["setting_key"].fillna("recorded before key version 2"))
        if len(settings) > 1:  # a sweep refuses this; only hand-merged run files get here
            raise ValueError(
                f"{method} on {task}: runs of {len(settings)} different settings "
                f"({sorted(settings)}); one leaderboard row never averages across settings"
            )
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
                **dict(zip(("test_ci_low", "test_ci_high"), ci95(best["test_score"]), strict=True)),
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
    _compare_with_reference(runs, board)
    if len(board):
        board = board.sort_values(
            ["task", "test_mean"], ascending=[True, False], na_position="last"
        )
    return board.reset_index(drop=True)


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


def _metric_fn(task_id: str, metric: str):
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


def _compare_with_reference(runs: pd.DataFrame, board: pd.DataFrame, ref: str = REFERENCE):
    """Paired bootstrap of each method against `ref` at both chosen LRs, same seeds/items."""
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
        seeds = sorted(set(mine.index) & set(theirs.index))
        a = [_headline_items(mine.loc[s]) for s in seeds]
        b = [_headline_items(theirs.loc[s]) for s in seeds]
        if not seeds or any(x is None for x in a + b):
            continue  # runs from before per-item outcomes were recorded
        if any(
            len(x[0]) != len(y[0]) or (x[1] is not None and not np.array_equal(x[1], y[1]))
            for x, y in zip(a, b, strict=True)
        ):
            continue  # not the same test items (labels differ): no paired comparison
        result = paired_bootstrap(a, b, _metric_fn(row["task"], row["test_metric"]))
        board.loc[i, ["vs_lora_delta", "vs_lora_ci_low", "vs_lora_ci_high"]] = [
            result["delta"],
            result["ci_low"],
            result["ci_high"],
        ]
        board.loc[i, "vs_lora_within_noise"] = result["within_noise"]


# What must be equal for a paired comparison with the reference method to mean anything.
COMPARABLE_COLUMNS = (
    "model_id", "model_revision", "protocol", "data_fingerprint", "budget", "test_rows",
)  # fmt: skip


def _same_evaluation(mine: pd.DataFrame, theirs: pd.DataFrame) -> bool:
    for column in COMPARABLE_COLUMNS:
        if column in mine.columns and column in theirs.columns:
            values = set(mine[column].astype(str)) | set(theirs[column].astype(str))
            if len(values) > 1:
                return False
    return True


def write_leaderboard(out_dir: str | Path) -> pd.DataFrame:
    board = build_leaderboard(read_runs(out_dir))
    atomic_write_parquet(board, Path(out_dir) / LEADERBOARD_FILE)
    return board


def _vs_lora(row) -> str:
    if pd.isna(row.vs_lora_delta):
        return "-"
    noise = " (noise)" if row.vs_lora_within_noise else ""
    return f"{row.vs_lora_delta:+.3f}{noise}"


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
            "95% CI": [
                f"[{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "-"
                for lo, hi in zip(board["test_ci_low"], board["test_ci_high"], strict=True)
            ],
            "vs lora": [_vs_lora(r) for r in board.itertuples()],
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
