"""Published numbers from the methods' papers, and their comparison with a leaderboard.

`results/published/published.csv` holds numbers transcribed by hand from the papers' tables
(only numbers printed in the papers' text; nothing recomputed), one row per
(source table, model, task, metric, method, variant, rank):

| column | meaning |
|---|---|
| source | paper, arXiv id and version, table number and subject |
| model | paper's model, as a family key of `MODEL_FAMILIES` (e.g. `roberta-large`) |
| task | this project's task id (`glue/cola`, `commonsense170k`, `metamathqa`, `vision/dtd`, ...) |
| metric | this project's metric key (`accuracy`, `mcc`, `pearson`, `pass@1`, `boolq/accuracy`) |
| method | this project's method registry id (`lora`, `lora_sb`, `cg_lora`, ...) |
| variant | a named variant of the method in the paper (CG-LoRA `shift` / `no shift`), else empty |
| rank | adapter rank of the row (empty for full FT, or where the paper's text lost it) |
| value | the published number on this project's 0-1 scale (the paper's percentage / 100) |
| std | published standard deviation, same scale, where the paper gives one |
| reported | the cell as printed in the paper (percent), for checking the transcription |
| setting | protocol notes: training data, epochs, targets, scaling, what the paper leaves unsaid |

Matching (`compare`): a leaderboard row and a published row match when all of
- model family: the leaderboard's `model_id` maps to the published `model` through
  `MODEL_FAMILIES` (exact hub ids, case-insensitive; a local folder matches through its
  trailing `<org>/<name>` or `<name>` path components). Anything not listed - MiniLM, a
  random-init model, `roberta-large-mnli` - matches nothing.
- task: identical task id, or one listed in `TASK_ALIASES` for ours (our
  `metamathqa_full_math` reports the same GSM8K test as `metamathqa`).
- method: identical registry id.
- metric: the published metric is the leaderboard's headline `test_metric` or one of the
  keys of its `test_metrics_mean`.
- data: rows whose data is a labelled stand-in or subset (`data_source` has a `stand_in` or
  `subset` entry, or the protocol says `stand-in`; e.g. `commonsense_offline`, the 10-class
  DTD mirror) are never compared: they are not the dataset the paper used.
Rank is reported beside each match (`rank_match`: True, False, or None where the published
rank is unknown); it does not decide the match, the report separates the two cases.
Training budget and data never match a paper's exactly: compare our `protocol` with the
published `setting` before reading a delta as a reproduction.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "results" / "published" / "published.csv"

COLUMNS = [
    "source", "model", "task", "metric", "method", "variant", "rank", "value", "std",
    "reported", "setting",
]  # fmt: skip

# Registry ids of the methods this project has or tracks (cg_lora, sds_lora may be in progress).
KNOWN_METHODS = {
    "full_ft", "lora", "rslora", "lora_plus", "pissa", "dora", "lora_ga", "lora_one",
    "lora_sb", "cg_lora", "cg_lora_shift", "sds_lora",
}  # fmt: skip

# Metric name -> allowed value range on the 0-1 scale. A metric key may carry a test-set
# prefix, as multi-test-set tasks write them: "boolq/accuracy", "gsm8k/accuracy".
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "matched/accuracy": (0.0, 1.0),
    "mismatched/accuracy": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "pass@1": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "average": (0.0, 1.0),
    "mcc": (-1.0, 1.0),
    "pearson": (-1.0, 1.0),
    "spearman": (-1.0, 1.0),
}

# Published model family -> the model ids (hub ids; lower-case) that are that model.
MODEL_FAMILIES: dict[str, tuple[str, ...]] = {
    "roberta-base": ("facebookai/roberta-base", "roberta-base"),
    "roberta-large": ("facebookai/roberta-large", "roberta-large"),
    "t5-base": ("google-t5/t5-base", "t5-base"),
    "gemma-2b": ("google/gemma-2b",),
    "llama-3-8b": ("meta-llama/meta-llama-3-8b", "meta-llama/llama-3-8b"),
    # SDS-LoRA: "ViT-Base/ViT-Large, 224 px, 16 px patches"; the pretraining checkpoint is
    # not stated, so both common hub checkpoints of that shape count as the family.
    "vit-base": ("google/vit-base-patch16-224-in21k", "google/vit-base-patch16-224"),
    "vit-large": ("google/vit-large-patch16-224-in21k", "google/vit-large-patch16-224"),
}

# Our task id -> further published task ids it is compared with.
TASK_ALIASES: dict[str, tuple[str, ...]] = {"metamathqa_full_math": ("metamathqa",)}

_TASK_RE = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)?$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_STAND_IN_RE = re.compile(r'\\?"(stand_in|subset)\\?"\s*:')


def metric_range(metric: str) -> tuple[float, float] | None:
    """Allowed range of a metric key ("accuracy", "boolq/accuracy"), None if unknown."""
    if metric in METRIC_RANGES:
        return METRIC_RANGES[metric]
    prefix, _, base = metric.rpartition("/")
    if prefix and _PREFIX_RE.match(prefix) and base in METRIC_RANGES:
        return METRIC_RANGES[base]
    return None


def stand_in_reason(row: dict) -> str | None:
    """Why a leaderboard row's data is not the named dataset, or None."""
    source = "" if _is_blank(row.get("data_source")) else str(row.get("data_source"))
    found = _STAND_IN_RE.search(source)
    if found:
        return f"data_source has a {found.group(1)!r} entry"
    for col in ("protocol", "data_kind"):
        text = "" if _is_blank(row.get(col)) else str(row.get(col))
        if re.search(r"stand[-_ ]?in", text, re.IGNORECASE):
            return f"{col} says stand-in"
    return None


class PublishedDataError(ValueError):
    """published.csv (or a table passed to `validate`) has a bad row; the message says which."""


def model_family(model_id: object) -> str | None:
    """The published family a model id belongs to, or None (see MODEL_FAMILIES)."""
    if model_id is None or (isinstance(model_id, float) and math.isnan(model_id)):
        return None
    text = str(model_id).strip().rstrip("/").lower()
    if not text:
        return None
    parts = [p for p in text.split("/") if p]
    candidates = {text, "/".join(parts[-2:]), parts[-1]}
    for family, ids in MODEL_FAMILIES.items():
        if candidates & set(ids):
            return family
    return None


def _is_blank(v: object) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return str(v).strip() == ""


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check every row; return a typed copy (value/std float, rank nullable Int64).

    Raises PublishedDataError naming the CSV line (header = line 1) and the problem.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise PublishedDataError(f"published table lacks columns {missing}")
    problems = []
    for i, row in enumerate(df.to_dict("records")):
        where = f"line {i + 2} ({row.get('source')!s:.40} | {row.get('model')} | {row.get('task')})"

        def bad(msg: str, where: str = where) -> None:
            problems.append(f"{where}: {msg}")

        for col in ("source", "model", "task", "metric", "method", "value"):
            if _is_blank(row[col]):
                bad(f"empty {col}")
        if _is_blank(row["model"]) or _is_blank(row["metric"]) or _is_blank(row["value"]):
            continue
        if row["model"] not in MODEL_FAMILIES:
            bad(f"unknown model family {row['model']!r} (known: {sorted(MODEL_FAMILIES)})")
        if not _TASK_RE.match(str(row["task"])):
            bad(f"task {row['task']!r} is not a task id like glue/cola")
        if row["method"] not in KNOWN_METHODS:
            bad(f"unknown method {row['method']!r} (known: {sorted(KNOWN_METHODS)})")
        metric = str(row["metric"])
        bounds = metric_range(metric)
        if bounds is None:
            bad(
                f"unknown metric {metric!r} (known: {sorted(METRIC_RANGES)}, optionally "
                "prefixed by a test-set name: boolq/accuracy)"
            )
            continue
        lo, hi = bounds
        try:
            value = float(row["value"])
        except (TypeError, ValueError):
            bad(f"value {row['value']!r} is not a number")
            continue
        if not (lo <= value <= hi):
            bad(
                f"{metric} value {value} outside [{lo}, {hi}] "
                "(values are on the 0-1 scale: divide a percentage by 100)"
            )
        if not _is_blank(row["std"]):
            try:
                std = float(row["std"])
            except (TypeError, ValueError):
                bad(f"std {row['std']!r} is not a number")
            else:
                if not (0.0 <= std <= hi - lo):
                    bad(f"std {std} outside [0, {hi - lo}]")
        if not _is_blank(row["rank"]):
            try:
                rank = float(row["rank"])
            except (TypeError, ValueError):
                rank = -1.0
            if rank < 1 or rank != int(rank):
                bad(f"rank {row['rank']!r} is not a positive integer")
        if row["method"] == "full_ft" and not _is_blank(row["rank"]):
            bad("full_ft has no rank")
    key = ["source", "model", "task", "metric", "method", "variant", "rank"]
    dup = df.astype(str).duplicated(subset=key, keep=False)
    if dup.any():
        lines = [str(i + 2) for i in df.index[dup]]
        problems.append(f"duplicate rows (same {key}) at lines {', '.join(lines[:10])}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PublishedDataError(
            f"{len(problems)} problem(s) in published numbers:\n  {shown}{more}"
        )
    out = df[COLUMNS].copy()
    for col in ("source", "model", "task", "metric", "method", "variant", "reported", "setting"):
        out[col] = out[col].map(lambda v: "" if _is_blank(v) else str(v))
    out["value"] = out["value"].astype(float)
    out["std"] = pd.to_numeric(out["std"].map(lambda v: None if _is_blank(v) else v))
    out["std"] = out["std"].astype(float)
    out["rank"] = pd.array(
        [None if _is_blank(v) else int(float(v)) for v in out["rank"]], dtype="Int64"
    )
    return out.reset_index(drop=True)


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate published.csv (default: the copy in results/published/)."""
    path = Path(path) if path is not None else PUBLISHED_CSV
    if not path.is_file():
        raise PublishedDataError(f"no published numbers file at {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return validate(df)


def _our_rank(method_config: object) -> int | None:
    if _is_blank(method_config):
        return None
    try:
        cfg = json.loads(str(method_config))
    except json.JSONDecodeError:
        return None
    if isinstance(cfg, dict) and isinstance(cfg.get("rank"), int | float):
        return int(cfg["rank"])
    return None


def _our_metrics(row: dict) -> dict[str, tuple[float, float]]:
    """metric -> (mean, std) of a leaderboard row; std only for the headline metric."""
    out: dict[str, tuple[float, float]] = {}
    if not _is_blank(row.get("test_metrics_mean")):
        try:
            extra = json.loads(str(row["test_metrics_mean"]))
        except json.JSONDecodeError:
            extra = {}
        for k, v in (extra or {}).items():
            if isinstance(v, int | float):
                out[str(k)] = (float(v), float("nan"))
    headline = row.get("test_metric")
    mean = row.get("test_mean")
    if not _is_blank(headline) and not _is_blank(mean):
        std = row.get("test_std")
        out[str(headline)] = (float(mean), float("nan") if _is_blank(std) else float(std))
    return out


COMPARE_COLUMNS = [
    "method", "task", "model_id", "model_family", "metric", "our_mean", "our_std",
    "our_n_seeds", "our_rank", "published_value", "published_std", "published_rank",
    "rank_match", "variant", "delta", "source", "setting", "our_protocol",
]  # fmt: skip


def compare(leaderboard_df: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (leaderboard row, matching published row); delta = ours - published.

    Empty (with COMPARE_COLUMNS) when nothing matches. See the module docstring for the rules.
    """
    pub = load_published() if published is None else validate(published)
    rows = []
    for lb in leaderboard_df.to_dict("records"):
        family = model_family(lb.get("model_id"))
        if family is None or stand_in_reason(lb) is not None:
            continue
        ours = _our_metrics(lb)
        if not ours:
            continue
        cand = pub[
            (pub["model"] == family)
            & pub["task"].isin([lb.get("task"), *TASK_ALIASES.get(str(lb.get("task")), ())])
            & (pub["method"] == lb.get("method")) & pub["metric"].isin(list(ours))
        ]  # fmt: skip
        our_rank = _our_rank(lb.get("method_config"))
        for p in cand.to_dict("records"):
            mean, std = ours[p["metric"]]
            prank = None if pd.isna(p["rank"]) else int(p["rank"])
            if lb.get("method") == "full_ft":
                rank_match = True if prank is None else None
            elif prank is None or our_rank is None:
                rank_match = None
            else:
                rank_match = prank == our_rank
            n_seeds = lb.get("n_seeds")
            rows.append(
                {
                    "method": lb.get("method"),
                    "task": lb.get("task"),
                    "model_id": lb.get("model_id"),
                    "model_family": family,
                    "metric": p["metric"],
                    "our_mean": mean,
                    "our_std": std,
                    "our_n_seeds": None if _is_blank(n_seeds) else int(n_seeds),
                    "our_rank": our_rank,
                    "published_value": p["value"],
                    "published_std": p["std"],
                    "published_rank": prank,
                    "rank_match": rank_match,
                    "variant": p["variant"],
                    "delta": mean - p["value"],
                    "source": p["source"],
                    "setting": p["setting"],
                    "our_protocol": lb.get("protocol"),
                }
            )
    out = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    out["rank_match"] = out["rank_match"].astype("boolean")  # True / False / <NA> (unknown)
    return out
