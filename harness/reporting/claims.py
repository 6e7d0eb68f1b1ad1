"""The seed papers' claims as data (results/published/claims.yaml), checked against runs.

`load_claims()` reads and validates the registry (its header documents every field).
`evaluate_claims(runs, claims)` gives one row per (claim, task) with a verdict:

- **supported**: the paired 95% bootstrap interval of the claimed difference excludes 0 on
  the claimed side (A above B for `beats`; A below B for the loss, std and LR-spread forms);
- **contradicted**: it excludes 0 on the other side;
- **within noise**: it contains 0;
- **not testable here**, with why: a side has no ok runs on the task in this runs table; the
  two sides' settings differ (`harness.reporting.results.setting_differences`, the rule
  the leaderboard's vs-LoRA column uses: model id and revision, protocol, data fingerprint,
  budget, test rows),
  or the test items differ, or a method-config field the claim holds equal (`same`) differs;
  fewer than 2 paired seeds; fewer than 2 LRs in common (LR sensitivity); no common loss
  steps; the claim has no machine-checkable form (`check: none`).

A claim is checked only within one task and only between runs whose settings match: never
across models, data, protocols or budgets. Each side is a method id with optional
method-config filters (`cg_lora[variant=shift]`): a run belongs to it when its `method` is
the id and its `method_config` JSON has each filtered field at that value.

How each form is computed (delta is always A - B):

- `beats`: each side at the LR the leaderboard would choose for it (`build_leaderboard` on
  that side's runs: best mean selection score among LRs whose every seed finished ok); the
  headline test metric, paired by seed and test item (`harness.reporting.stats.paired_bootstrap`:
  seeds and items resampled).
- `loss_auc`: per seed, the area under the training-loss curve over the steps both sides
  recorded (every run of both), divided by the step range: the mean loss over training,
  trapezoid rule. Both sides at their chosen LR; paired by seed; bootstrap over seeds only
  (`harness.reporting.stats.paired_seed_bootstrap`).
- `loss_at_step`: per seed, the mean recorded loss over the common steps in
  (k - max(1, k // 10), k] (one batch's loss is noisy); `step: last` is the last common step.
  Chosen LRs, paired seeds, bootstrap over seeds.
- `seed_std`: std (ddof 1) over seeds of the test score at the chosen LR; bootstrap over
  paired seeds.
- `lr_sensitivity`: on the LRs both sides ran with every common seed ok, the spread
  (max - min) over LRs of the mean test score over seeds (CG-LoRA Figure 3's reading);
  bootstrap over paired seeds (a replicate resamples seeds and recomputes every LR's mean).

A row's `caveat` names each default that methods/DEFAULTS.md doubts is the authors' and that
the ok runs of either side on the task ran with (`harness.reporting.results.run_doubts`): its
verdict is about our reconstruction of that method, not necessarily the paper's.

`mean_ranks(runs, board)` ranks the methods on each task (1 = best mean test score at the
chosen LR) and averages over tasks, with a 95% interval from the bootstrap over seeds and
test items the leaderboard uses.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.stats import rankdata

from harness.reporting.results import (
    ResultsError,
    build_leaderboard,
    known_task,
    metric_fn,
    paired_items,
    run_doubts,
    setting_differences,
)
from harness.reporting.stats import direction_verdict, paired_bootstrap, paired_seed_bootstrap
from harness.spec.config import ConfigError

CLAIMS_YAML = Path(__file__).resolve().parents[2] / "results" / "published" / "claims.yaml"

CHECKS = ("beats", "loss_at_step", "loss_auc", "seed_std", "lr_sensitivity", "none")
ABOUT = ("accuracy", "training speed")
PAPERS = ("CG-LoRA", "LoRA-One", "LoRA-SB", "SDS-LoRA", "LoRA-GA")
FIELDS = {
    "id", "paper", "source", "claim", "about", "check", "a", "b", "tasks", "same", "step",
    "metric", "why", "note",
}  # fmt: skip
REQUIRED = ("id", "paper", "source", "claim", "about", "check", "a", "b", "tasks")

SUPPORTED, CONTRADICTED, NOISE, UNTESTABLE = (
    "supported", "contradicted", "within noise", "not testable here",
)  # fmt: skip
# The sign of A - B that the claim asserts: + for "A beats B", - for "A's loss/std/spread is
# below B's".
CLAIMED_SIGN = {"beats": 1, "loss_at_step": -1, "loss_auc": -1, "seed_std": -1,
                "lr_sensitivity": -1}  # fmt: skip
MIN_SEEDS = 2

CLAIM_COLUMNS = [
    "claim_id", "paper", "source", "claim", "about", "check", "form", "task", "a", "b",
    "verdict", "why", "delta", "ci_low", "ci_high", "n_seeds", "detail", "caveat",
]  # fmt: skip

_SIDE_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*$")


class ClaimsError(ConfigError):
    """An invalid claims registry; the message names the claim and the field."""


@dataclass(frozen=True)
class Side:
    """One side of a claim: a method id plus method-config fields that must hold."""

    method: str
    filters: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Side:
        m = _SIDE_RE.match(str(text))
        if not m:
            raise ValueError(f"not a claim side: {text!r} (want method or method[field=value,...])")
        filters = []
        for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip():
                raise ValueError(f"not a field=value filter: {part!r} in {text!r}")
            filters.append((name.strip(), yaml.safe_load(value.strip())))
        return cls(m.group(1), tuple(filters))

    def __str__(self) -> str:
        if not self.filters:
            return self.method
        return f"{self.method}[{','.join(f'{k}={v}' for k, v in self.filters)}]"

    def matches(self, method: Any, method_config: Any) -> bool:
        if str(method) != self.method:
            return False
        if not self.filters:
            return True
        config = _config(method_config)
        return all(k in config and config[k] == v for k, v in self.filters)


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    source: str
    claim: str
    about: str
    check: str
    a: Side
    b: Side
    tasks: tuple[str, ...] | None  # None: any task of the runs table
    same: tuple[str, ...] = ()
    step: int | str | None = None
    metric: str | None = None
    why: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def form(self) -> str:
        """The machine-checkable form, in words."""
        a, b = str(self.a), str(self.b)
        scope = "any task here" if self.tasks is None else ", ".join(self.tasks)
        metric = self.metric or "the headline test metric"
        text = {
            "beats": f"{a} beats {b} on {scope} by {metric}",
            "loss_auc": f"{a}'s area under the training-loss curve is below {b}'s on {scope}",
            "loss_at_step": f"{a}'s training loss at step {self.step} is below {b}'s on {scope}",
            "seed_std": f"{a}'s std of the test score over seeds is below {b}'s on {scope}",
            "lr_sensitivity": (
                f"{a}'s spread of mean test score across the LR grid is below {b}'s on {scope}"
            ),
            "none": f"no machine-checkable form ({a} vs {b})",
        }[self.check]
        if self.same:
            text += f", at equal {', '.join(self.same)}"
        return text


def _config(text: Any) -> dict[str, Any]:
    if text is None or (isinstance(text, float) and math.isnan(text)) or text is pd.NA:
        return {}
    try:
        parsed = json.loads(str(text))
    except (json.JSONDecodeError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def parse_claims(entries: Any, where: str = "claims") -> list[Claim]:
    """Validate the registry's entries (a YAML list of mappings) into Claims."""
    if not isinstance(entries, list) or not entries:
        raise ClaimsError(f"{where}: expected a non-empty list of claims")
    claims: list[Claim] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        label = f"{where}: claim #{i + 1}"
        if not isinstance(entry, dict):
            raise ClaimsError(f"{label}: not a mapping")
        label = f"{where}: claim {entry.get('id', '#' + str(i + 1))!r}"
        unknown = set(entry) - FIELDS
        if unknown:
            raise ClaimsError(f"{label}: unknown field(s) {sorted(unknown)}")
        missing = [k for k in REQUIRED if entry.get(k) in (None, "", [])]
        if missing:
            raise ClaimsError(f"{label}: missing {', '.join(missing)}")
        if entry["id"] in seen:
            raise ClaimsError(f"{label}: duplicate id")
        seen.add(str(entry["id"]))
        for key, allowed in (("check", CHECKS), ("about", ABOUT), ("paper", PAPERS)):
            if entry[key] not in allowed:
                raise ClaimsError(f"{label}: {key} {entry[key]!r} is not one of {list(allowed)}")
        try:
            a, b = Side.parse(entry["a"]), Side.parse(entry["b"])
        except ValueError as err:
            raise ClaimsError(f"{label}: {err}") from err
        if a == b:
            raise ClaimsError(f"{label}: both sides are {a}")
        tasks = entry["tasks"]
        if tasks == "any":
            tasks = None
        elif isinstance(tasks, list) and all(isinstance(t, str) and t for t in tasks):
            tasks = tuple(tasks)
        else:
            raise ClaimsError(f"{label}: tasks must be `any` or a list of task ids")
        same = entry.get("same") or []
        if not isinstance(same, list) or not all(isinstance(s, str) for s in same):
            raise ClaimsError(f"{label}: same must be a list of method-config field names")
        step = entry.get("step")
        if entry["check"] == "loss_at_step":
            if not (step == "last" or (isinstance(step, int) and step > 0)):
                raise ClaimsError(f"{label}: loss_at_step needs step: a positive int or `last`")
        elif step is not None:
            raise ClaimsError(f"{label}: step is only for loss_at_step")
        if entry["check"] == "none" and not entry.get("why"):
            raise ClaimsError(f"{label}: check none needs why")
        claims.append(
            Claim(
                id=str(entry["id"]),
                paper=entry["paper"],
                source=str(entry["source"]),
                claim=str(entry["claim"]),
                about=entry["about"],
                check=entry["check"],
                a=a,
                b=b,
                tasks=tasks,
                same=tuple(same),
                step=step,
                metric=entry.get("metric"),
                why=entry.get("why"),
                note=entry.get("note"),
            )
        )
    return claims


def load_claims(path: str | Path = CLAIMS_YAML) -> list[Claim]:
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ClaimsError(f"cannot read the claims registry {path}: {err}") from err
    return parse_claims(entries, where=str(path.name))


# -- evaluation -----------------------------------------------------------------------------
@dataclass
class _Outcome:
    verdict: str
    why: str = ""
    delta: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n_seeds: int = 0
    detail: str = ""


def _untestable(why: str, **kw: Any) -> _Outcome:
    return _Outcome(UNTESTABLE, why, **kw)


def side_runs(runs: pd.DataFrame, side: Side, task: str | None = None) -> pd.DataFrame:
    """The rows of `runs` (any status) on `side`, on `task` when given."""
    if runs.empty or "method" not in runs.columns:
        return runs.iloc[0:0]
    rows = runs if task is None else runs[runs["task"] == task]
    configs = rows["method_config"] if "method_config" in rows else pd.Series(None, rows.index)
    mask = [side.matches(m, c) for m, c in zip(rows["method"], configs, strict=True)]
    return rows[np.asarray(mask, dtype=bool)] if len(rows) else rows


def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"] == "ok"] if "status" in rows.columns else rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _chosen(rows: pd.DataFrame, side: Side) -> tuple[pd.DataFrame, float] | str:
    """(ok runs at the LR the leaderboard chooses for this side, indexed by seed, that LR)."""
    try:
        board = build_leaderboard(rows, compare=False)
    except ResultsError as err:
        return f"{side}: {err}"
    if len(board) != 1:
        return f"{side}: runs of {len(board)} methods/tasks"
    lr = board["chosen_lr"].iloc[0]
    if pd.isna(lr):
        return f"{side}: no LR has every seed ok with finite scores"
    at = _ok(rows)
    at = at[at["lr"] == lr].drop_duplicates("seed", keep="last").set_index("seed")
    return at, float(lr)


def _curve(text: Any) -> dict[float, float]:
    try:
        points = json.loads(str(text))
    except (json.JSONDecodeError, TypeError):
        return {}
    out = {}
    for p in points or []:
        if isinstance(p, list | tuple) and len(p) >= 2 and p[1] is not None:
            if math.isfinite(float(p[1])):
                out[float(p[0])] = float(p[1])
    return out


def _loss_values(claim: Claim, a: pd.DataFrame, b: pd.DataFrame, seeds: list) -> tuple | str:
    """Per-seed loss statistics of both sides on their common steps, or why not."""
    curves = {
        (side, s): _curve(df.loc[s, "loss_curve"] if "loss_curve" in df.columns else None)
        for side, df in (("a", a), ("b", b))
        for s in seeds
    }
    if any(not c for c in curves.values()):
        return "a run has no recorded loss curve"
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not common:
        return "the two sides' loss curves share no step"
    if claim.check == "loss_auc":
        steps = np.asarray(common)

        def stat(c: dict[float, float]) -> float:
            y = np.asarray([c[s] for s in common])
            if len(steps) == 1:
                return float(y[0])
            area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(steps)))
            return area / float(steps[-1] - steps[0])

        detail = f"mean loss over steps {_fmt(common[0])}-{_fmt(common[-1])} ({len(common)} common)"
    else:
        k = common[-1] if claim.step == "last" else float(claim.step)
        if k > common[-1]:
            return f"step {_fmt(k)} is past the last common step {_fmt(common[-1])}"
        window = [s for s in common if k - max(1.0, k // 10) < s <= k]
        if not window:
            return f"no common step in ({_fmt(k - max(1.0, k // 10))}, {_fmt(k)}]"

        def stat(c: dict[float, float]) -> float:
            return float(np.mean([c[s] for s in window]))

        detail = f"mean loss over common steps {_fmt(window[0])}-{_fmt(window[-1])}"
    la = np.asarray([stat(curves[("a", s)]) for s in seeds])
    lb = np.asarray([stat(curves[("b", s)]) for s in seeds])
    return la, lb, detail


def _lr_matrix(ok: pd.DataFrame, lrs: list[float], seeds: list) -> np.ndarray:
    by = ok.drop_duplicates(["lr", "seed"], keep="last").set_index(["lr", "seed"])["test_score"]
    return np.asarray([[float(by.loc[(lr, s)]) for lr in lrs] for s in seeds])


def _complete_lrs(ok: pd.DataFrame) -> dict[float, set]:
    fin = ok[np.isfinite(ok["test_score"].astype(float))]
    return {float(lr): set(g["seed"]) for lr, g in fin.groupby("lr")}


def _spread(m: np.ndarray) -> float:
    means = m.mean(axis=0)
    return float(means.max() - means.min())


def _evaluate_one(
    claim: Claim, runs: pd.DataFrame, task: str, replicates: int, seed: int
) -> _Outcome:
    if claim.check == "none":
        return _untestable(f"no machine-checkable form: {claim.why}")
    rows_a, rows_b = side_runs(runs, claim.a, task), side_runs(runs, claim.b, task)
    missing = [str(s) for s, r in ((claim.a, rows_a), (claim.b, rows_b)) if _ok(r).empty]
    if missing:
        return _untestable(f"no ok runs of {' or '.join(missing)} on {task} in this output")
    rows_a, rows_b = _ok(rows_a), _ok(rows_b)  # failed rows may lack fields: not compared
    differ = setting_differences(rows_a, rows_b)
    if differ:
        shown = "; ".join(
            f"{c}: {sorted(set(rows_a[c].astype(str)))} vs {sorted(set(rows_b[c].astype(str)))}"
            for c in differ
        )
        return _untestable(f"settings differ ({', '.join(differ)}): {shown}")
    for name in claim.same:
        va = {json.dumps(_config(c).get(name)) for c in rows_a.get("method_config", [])}
        vb = {json.dumps(_config(c).get(name)) for c in rows_b.get("method_config", [])}
        if len(va | vb) != 1 or "null" in va | vb:
            return _untestable(f"method config {name} differs or is missing: {va} vs {vb}")
    for side, rows in ((claim.a, rows_a), (claim.b, rows_b)):
        if "setting_key" in rows.columns and rows["setting_key"].astype(str).nunique() > 1:
            return _untestable(
                f"{side}: runs of several settings on {task}; name the setting with a "
                "method-config filter"
            )
    chosen_a, chosen_b = _chosen(rows_a, claim.a), _chosen(rows_b, claim.b)
    for c in (chosen_a, chosen_b):
        if isinstance(c, str):
            return _untestable(c)
    (a, lr_a), (b, lr_b) = chosen_a, chosen_b  # type: ignore[misc]
    lrs = f"LR {claim.a}: {lr_a:.3g}, {claim.b}: {lr_b:.3g}"
    sign = CLAIMED_SIGN[claim.check]
    if claim.check == "lr_sensitivity":
        ok_a, ok_b = _complete_lrs(rows_a), _complete_lrs(rows_b)
        common_lrs = sorted(set(ok_a) & set(ok_b))
        at_every = [ok_a[x] for x in common_lrs] + [ok_b[x] for x in common_lrs]
        seeds = sorted(set.intersection(*at_every)) if at_every else []
        if len(common_lrs) < 2:
            return _untestable(
                f"fewer than 2 LRs in common ({claim.a}: {sorted(ok_a)}, {claim.b}: {sorted(ok_b)})"
            )
        if len(seeds) < MIN_SEEDS:
            return _untestable(f"too few seeds ok at every common LR ({len(seeds)} < {MIN_SEEDS})")
        ma, mb = _lr_matrix(rows_a, common_lrs, seeds), _lr_matrix(rows_b, common_lrs, seeds)
        result = paired_seed_bootstrap(ma, mb, _spread, replicates=replicates, seed=seed)
        detail = (
            f"spread {_spread(ma):.4f} vs {_spread(mb):.4f} over LRs "
            f"{', '.join(f'{x:.3g}' for x in common_lrs)}; bootstrap over seeds"
        )
        return _finish(result, sign, len(seeds), detail)
    seeds = sorted(set(a.index) & set(b.index))
    if len(seeds) < MIN_SEEDS:
        return _untestable(f"too few paired seeds at the chosen LRs ({len(seeds)} < {MIN_SEEDS})")
    if claim.check == "beats":
        metrics = set(a["test_metric"].astype(str)) | set(b["test_metric"].astype(str))
        if len(metrics) != 1:
            return _untestable(f"different test metrics {sorted(metrics)}")
        metric = metrics.pop()
        if claim.metric and claim.metric != metric:
            return _untestable(f"metric {claim.metric} is not the headline {metric} (no items)")
        paired = paired_items(a.loc[seeds], b.loc[seeds])
        if isinstance(paired, str):
            return _untestable(paired)
        xa, xb, _ = paired
        if any(x[1] is not None for x in xa + xb) and metric.split("/")[-1] != "accuracy":
            if not known_task(task):
                return _untestable(f"task {task} is unknown here (metric not recomputable)")
        result = paired_bootstrap(
            xa, xb, metric_fn(task, metric), replicates=replicates, seed=seed
        )
        detail = f"{metric}; {lrs}; bootstrap over seeds and test items"
        params = [pd.to_numeric(d["trainable_params"], errors="coerce").mean() for d in (a, b)]
        if all(np.isfinite(params)) and params[0] > 0:
            detail += f"; trainable params {params[0]:,.0f} vs {params[1]:,.0f}"
        return _finish(result, sign, len(seeds), detail)
    if claim.check == "seed_std":
        sa = a.loc[seeds, "test_score"].astype(float).to_numpy()
        sb = b.loc[seeds, "test_score"].astype(float).to_numpy()
        result = paired_seed_bootstrap(
            sa, sb, lambda x: float(np.std(x, ddof=1)), replicates=replicates, seed=seed
        )
        detail = f"std {np.std(sa, ddof=1):.4f} vs {np.std(sb, ddof=1):.4f}; {lrs}"
        if len(seeds) ** (1 - len(seeds)) > 0.025:  # resamples of one seed: std 0 both sides
            detail += f"; with {len(seeds)} seeds this interval always contains 0"
        return _finish(result, sign, len(seeds), detail + "; bootstrap over seeds")
    values = _loss_values(claim, a, b, seeds)
    if isinstance(values, str):
        return _untestable(values)
    la, lb, detail = values
    result = paired_seed_bootstrap(la, lb, np.mean, replicates=replicates, seed=seed)
    detail += f"; {lrs}; bootstrap over seeds"
    return _finish(result, sign, len(seeds), detail)


def _finish(result: dict[str, float], sign: int, n_seeds: int, detail: str) -> _Outcome:
    verdict = direction_verdict(result["ci_low"], result["ci_high"], sign)
    out = _Outcome(
        verdict or UNTESTABLE,
        "" if verdict else "the interval is undefined (metric undefined on a resample)",
        result["delta"], result["ci_low"], result["ci_high"], n_seeds, detail,
    )  # fmt: skip
    return out


def evaluate_claims(
    runs: pd.DataFrame,
    claims: list[Claim] | None = None,
    *,
    replicates: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (claim, task) with its verdict (CLAIM_COLUMNS); see the module docstring."""
    claims = load_claims() if claims is None else claims
    rows = []
    for claim in claims:
        if claim.check == "none":
            tasks: list[str | None] = [None]
        elif claim.tasks is not None:
            tasks = list(claim.tasks)
        else:
            present = set()
            for side in (claim.a, claim.b):
                present |= set(side_runs(runs, side)["task"].astype(str)) if len(runs) else set()
            tasks = sorted(present) or [None]
        for task in tasks:
            if task is None:
                absent = [str(s) for s in (claim.a, claim.b) if side_runs(runs, s).empty]
                outcome = (
                    _untestable(f"no machine-checkable form: {claim.why}")
                    if claim.check == "none"
                    else _untestable(f"no runs of {' or '.join(absent)} in this output")
                )
            else:
                outcome = _evaluate_one(claim, runs, task, replicates, seed)
            rows.append(
                {
                    "claim_id": claim.id,
                    "paper": claim.paper,
                    "source": claim.source,
                    "claim": claim.claim,
                    "about": claim.about,
                    "check": claim.check,
                    "form": claim.form(),
                    "task": task or "-",
                    "a": str(claim.a),
                    "b": str(claim.b),
                    "verdict": outcome.verdict,
                    "why": outcome.why,
                    "delta": outcome.delta,
                    "ci_low": outcome.ci_low,
                    "ci_high": outcome.ci_high,
                    "n_seeds": outcome.n_seeds,
                    "detail": outcome.detail,
                    "caveat": _caveat(claim, runs, task),
                }
            )
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _caveat(claim: Claim, runs: pd.DataFrame, task: str | None) -> str:
    """The doubted defaults the ok runs of either side on `task` ran with ("" if none)."""
    if task is None:
        return ""
    doubts: list[str] = []
    for side in (claim.a, claim.b):
        ok = _ok(side_runs(runs, side, task))
        if "method_config" in ok.columns:
            doubts += [d for d in run_doubts(side.method, ok["method_config"]) if d not in doubts]
    return "; ".join(doubts)


# -- mean rank over tasks -------------------------------------------------------------------
def mean_ranks(
    runs: pd.DataFrame, board: pd.DataFrame, *, replicates: int = 200, seed: int = 0
) -> tuple[pd.DataFrame, list[str]]:
    """Each method's rank per task (1 = best mean test score at its chosen LR; ties share the
    average rank) and its mean over tasks, with a 95% bootstrap interval: each replicate
    resamples, per task, the seeds (common to all methods) and the test items (the same for
    every method), recomputes every method's mean score and re-ranks.

    Only tasks where every method of the study has a chosen LR, per-item outcomes on the
    same items, matching settings and >= 2 common seeds enter; the notes say which did not.
    Returns (one row per method: method, one rank column per task, mean_rank, ci_low,
    ci_high, n_tasks), notes."""
    notes: list[str] = []
    if board.empty or runs.empty:
        return pd.DataFrame(), notes
    methods = sorted({str(m) for m in board["method"]})
    ok = _ok(runs)
    per_task: list[tuple[str, dict[str, list], Any]] = []
    for task in list(dict.fromkeys(str(t) for t in board["task"])):
        rows = board[board["task"] == task].set_index("method")
        lacking = [m for m in methods if m not in rows.index or pd.isna(rows.loc[m, "chosen_lr"])]
        if lacking:
            notes.append(f"{task}: left out (no chosen LR for {', '.join(lacking)})")
            continue
        here = ok[ok["task"] == task]
        chosen = {
            m: here[(here["method"] == m) & (here["lr"] == rows.loc[m, "chosen_lr"])]
            .drop_duplicates("seed", keep="last")
            .set_index("seed")
            for m in methods
        }
        ref = chosen[methods[0]]
        bad = [m for m in methods[1:] if setting_differences(ref, chosen[m])]
        if bad:
            notes.append(f"{task}: left out (settings differ for {', '.join(bad)})")
            continue
        seeds = sorted(set.intersection(*(set(c.index) for c in chosen.values())))
        if len(seeds) < MIN_SEEDS:
            notes.append(f"{task}: left out (fewer than {MIN_SEEDS} seeds common to all methods)")
            continue
        items: dict[str, list] = {}
        for m in methods:
            paired = paired_items(chosen[m].loc[seeds], ref.loc[seeds])
            if isinstance(paired, str):
                break
            items[m] = paired[0]
        if len(items) != len(methods):
            notes.append(f"{task}: left out ({paired})")
            continue
        metric = str(ref["test_metric"].iloc[0])
        per_task.append((task, items, metric_fn(task, metric)))
    if not per_task:
        return pd.DataFrame(), notes

    def ranks(seed_idx: list[np.ndarray] | None, item_idx: list[np.ndarray] | None) -> np.ndarray:
        out = np.empty((len(per_task), len(methods)))
        for t, (_, items, fn) in enumerate(per_task):
            n_seeds = len(items[methods[0]])
            s_idx = np.arange(n_seeds) if seed_idx is None else seed_idx[t]
            scores = []
            for m in methods:
                vals = []
                for s in s_idx:
                    pred, lab = items[m][s]
                    if item_idx is not None:
                        pred = pred[item_idx[t]]
                        lab = None if lab is None else lab[item_idx[t]]
                    vals.append(fn(pred, lab))
                scores.append(np.mean(vals))
            out[t] = rankdata(-np.nan_to_num(np.asarray(scores), nan=-np.inf))
        return out

    observed = ranks(None, None)
    rng = np.random.default_rng(seed)
    boot = np.empty((replicates, len(methods)))
    for r in range(replicates):
        s_idx = [rng.integers(0, len(i[methods[0]]), len(i[methods[0]])) for _, i, _ in per_task]
        n_items = [len(i[methods[0]][0][0]) for _, i, _ in per_task]
        i_idx = [rng.integers(0, n, n) for n in n_items]
        boot[r] = ranks(s_idx, i_idx).mean(axis=0)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    table = pd.DataFrame({"method": methods})
    for t, (task, _, _) in enumerate(per_task):
        table[f"rank {task}"] = observed[t]
    table["mean_rank"] = observed.mean(axis=0)
    table["ci_low"], table["ci_high"] = low, high
    table["n_tasks"] = len(per_task)
    return table.sort_values(["mean_rank", "method"]).reset_index(drop=True), notes
