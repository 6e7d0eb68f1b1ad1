"""What a sweep will do and how far it got: the resolved grid against an output dir.

`sweep_plan` resolves a config's grid and matches it with the runs already recorded (the
same checks a sweep makes before it runs anything); `harness sweep --dry-run` prints it
(`format_dry_run`) and writes nothing. A real sweep records its plan in
`OUTPUT_DIR/sweep_plan.json` (`write_plan`: every key of the config, the driver's pid and
Ray's experiment dir), which `harness status OUT` (`format_status`) reads with the runs:
done / pending / failed / diverged counts, the trials running now and an ETA.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness.reporting.results import (
    JOURNAL_DIR,
    RUNS_FILE,
    ResultsError,
    atomic_write_text,
    read_runs,
    write_runs,
)
from harness.spec import identity
from harness.spec.config import ConfigError, SweepConfig
from harness.spec.identity import TrialSpec, expand

PLAN_FILE = "sweep_plan.json"
RUNNING_FILE = "sweep_running.json"  # keys of the trials started and not yet recorded
STATUS_OK = "ok"


@dataclass
class SweepPlan:
    """A config's resolved grid matched with an output dir's recorded runs."""

    specs: list[TrialSpec]
    runs: pd.DataFrame  # recorded runs, earlier key versions re-keyed (in memory)
    migrated: int  # rows re-keyed from an earlier key version
    todo: list[TrialSpec]  # keys with no ok row yet: what a sweep runs


def key_statuses(runs: pd.DataFrame) -> dict[str, str]:
    """Each recorded key's status: ok (any ok row) is `done`, else the last row's status."""
    found: dict[str, str] = {}
    if runs.empty:
        return found
    for key, status in zip(runs["key"], runs["status"], strict=True):
        if pd.isna(key):
            continue
        if found.get(key) != "done":
            found[key] = "done" if status == STATUS_OK else str(status)
    return found


def check_recorded(runs: pd.DataFrame, specs: list[TrialSpec], out_dir: Path) -> None:
    """Refuse a sweep whose output dir holds another setting of one of its (method, task)
    pairs, or runs made with other versions of a number-changing package."""
    conflicts = identity.setting_conflicts(runs, specs)
    if conflicts:
        shown = "\n".join(f"  - {c}" for c in conflicts[:10])
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise ConfigError(
            f"{out_dir / RUNS_FILE} holds runs of a different setting (method config, "
            f"protocol, data, model or budget) than this sweep:\n{shown}{more}\n"
            "Write to a new output_dir (nothing was run or changed)."
        )
    from harness.spec import provenance  # imports torch: not needed by `harness status`

    versions = identity.version_conflicts(runs, specs, provenance.package_versions())
    if versions:
        raise ConfigError(
            f"{out_dir / RUNS_FILE} holds runs made with other package versions than "
            "this environment, and one leaderboard row never mixes them:\n"
            + "\n".join(f"  - {v}" for v in versions)
            + "\nWrite to a new output_dir, or install the recorded versions (nothing was run "
            "or changed)."
        )


def sweep_plan(cfg: SweepConfig, out_dir: Path, *, write: bool = True) -> SweepPlan:
    """The resolved grid minus keys that already finished ok in `out_dir`.

    Runs recorded under earlier key versions are re-keyed where they provably are this
    setting (written back only with `write`); runs of another setting are an error."""
    specs = identity.resolve(expand(cfg))
    runs = read_runs(out_dir, write_nothing=not write)
    runs, migrated = identity.migrate_runs(runs, specs)
    check_recorded(runs, specs, out_dir)
    if migrated and write:
        runs = write_runs(out_dir, runs)
        print(
            f"re-keyed {migrated} runs recorded under an earlier key version (same setting)",
            flush=True,
        )
    finished = set(runs.loc[runs["status"] == STATUS_OK, "key"]) if len(runs) else set()
    todo = [s for s in specs if s.key() not in finished]
    return SweepPlan(specs=specs, runs=runs, migrated=migrated, todo=todo)


# ------------------------------------------------------------------------------ dry run


def trial_seconds(runs: pd.DataFrame) -> list[float]:
    """Wall times of the recorded ok trials (seconds), for cost estimates."""
    if runs.empty or "wall_time_s" not in runs.columns:
        return []
    ok = runs[(runs["status"] == STATUS_OK) & runs["wall_time_s"].notna()]
    return [float(t) for t in ok["wall_time_s"] if float(t) > 0]


def steps_per_trial(cfg: SweepConfig, task: str | None = None) -> int | None:
    """Optimizer steps a trial of `task` takes (default: the sweep's `budget`; None: an
    epoch budget without a fixed train_rows)."""
    budget = cfg.budget if task is None else cfg.budget_for(task)
    if budget.max_steps:
        return budget.max_steps
    if budget.train_rows:
        return math.ceil(budget.epochs * (budget.train_rows // budget.batch_size))
    return None


def _journal_keys(out_dir: Path) -> set[str]:
    keys = set()
    for path in sorted((out_dir / JOURNAL_DIR).glob("*.json")):
        try:
            keys.add(json.loads(path.read_text(encoding="utf-8")).get("key"))
        except (OSError, ValueError, AttributeError):
            continue  # read_runs has already refused an unreadable entry
    return keys


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_dry_run(cfg: SweepConfig, plan: SweepPlan, out_dir: Path) -> str:
    """The grid with each trial's resolved key and whether it is done, and the cost."""
    n_lrs = sorted({len(m.lrs) for m in cfg.methods.values()})
    lrs = str(n_lrs[0]) if len(n_lrs) == 1 else "(" + "/".join(map(str, n_lrs)) + ")"
    lines = [
        f"sweep {cfg.name!r} (dry run: nothing is run or written)",
        f"grid: {len(cfg.methods)} methods x {len(cfg.tasks)} tasks x {lrs} LRs x "
        f"{len(cfg.seeds)} seeds = {len(plan.specs)} trials; output {out_dir}",
        f"{'task':18s} {'method':12s} {'lr':>9s} {'seed':>5s}  {'key':16s}  status",
    ]
    in_journal = _journal_keys(out_dir)
    statuses = key_statuses(plan.runs)  # done / failed / diverged (rerun) / pending
    for spec in plan.specs:
        status = statuses.get(spec.key(), "pending")
        if status in ("failed", "diverged"):
            status = f"{status}: rerun"
        if spec.key() in in_journal:
            status += " (in runs.journal)"
        lines.append(
            f"{spec.task:18s} {spec.method:12s} {spec.lr:9.3g} {spec.seed:5d}  {spec.key()}  "
            f"{status}"
        )
    done = len(plan.specs) - len(plan.todo)
    lines.append(f"done: {done}, to run: {len(plan.todo)}")
    if plan.migrated:
        lines.append(f"{plan.migrated} runs of an earlier key version would be re-keyed")
    task_steps = {task: steps_per_trial(cfg, task) for task in cfg.tasks}
    steps = task_steps[cfg.tasks[0]] if len(set(task_steps.values())) == 1 else None
    if steps:
        per_trial = f"{steps} steps"
    elif len(set(task_steps.values())) > 1 and None not in task_steps.values():
        per_trial = "(" + ", ".join(f"{t}: {n}" for t, n in task_steps.items()) + ") steps"
    else:
        per_trial = f"{cfg.budget.epochs:g} epochs"
    cost = f"estimated cost: {len(plan.todo)} trials x {per_trial}"
    if None not in task_steps.values():
        total = sum(task_steps[spec.task] for spec in plan.todo)
        cost += f" = {total} optimizer steps"
    seconds = trial_seconds(plan.runs)
    if seconds and plan.todo:
        median = statistics.median(seconds)
        cost += (
            f"; ~{_duration(median * len(plan.todo))} of trial time (median "
            f"{median:.1f} s/trial over {len(seconds)} recorded trials; divide by the "
            "trials that run at once)"
        )
    elif plan.todo:
        cost += "; no recorded trials here to time"
    lines.append(cost)
    return "\n".join(lines)


# ------------------------------------------------------------------- plan file, status


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_plan(out_dir: Path, cfg: SweepConfig, specs: list[TrialSpec]) -> None:
    """Record what this sweep runs (every key of its config) and who runs it, for
    `harness status`; a previous driver's list of running trials is cleared."""
    plan = {
        "sweep": cfg.name,
        "written_at": _now(),
        "driver": {"pid": os.getpid(), "hostname": socket.gethostname()},
        "trials": [
            {"key": s.key(), "method": s.method, "task": s.task, "lr": s.lr, "seed": s.seed}
            for s in specs
        ],
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_text(json.dumps(plan, indent=1), out_dir / PLAN_FILE)
    (out_dir / RUNNING_FILE).unlink(missing_ok=True)


class RunningTrials:
    """The sweep driver's list of started, unrecorded trials (`sweep_running.json`,
    rewritten atomically on each start and finish; a few hundred bytes)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RUNNING_FILE
        self.started_at: dict[str, str] = {}

    def _write(self) -> None:
        try:
            atomic_write_text(json.dumps(self.started_at), self.path)
        except OSError:
            pass  # status information only: never stops a sweep

    def start(self, key: str) -> None:
        self.started_at[key] = _now()
        self._write()

    def finish(self, key: str) -> None:
        if self.started_at.pop(key, None) is not None:
            self._write()


def read_plan(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / PLAN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ResultsError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        plan = json.loads(text)
        if not isinstance(plan, dict) or not isinstance(plan.get("trials"), list):
            raise ValueError("not a sweep plan")
    except ValueError as err:
        raise ResultsError(f"{path} is not a readable sweep plan ({err})") from err
    return plan


def driver_state(plan: dict[str, Any]) -> str:
    """`running`, `exited`, or `unknown` (the driver ran on another host)."""
    driver = plan.get("driver") or {}
    if driver.get("hostname") != socket.gethostname() or not driver.get("pid"):
        return "unknown"
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return "exited"
    except PermissionError:
        return "running"  # alive, another user's
    return "running"


def running_trials(
    out_dir: Path, plan: dict[str, Any], recorded: set[str]
) -> list[tuple[dict, float]]:
    """Planned trials the driver started and has not recorded, with seconds since start."""
    try:
        started = json.loads((out_dir / RUNNING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    now = datetime.now(timezone.utc)
    found = []
    for trial in plan["trials"]:
        key = trial.get("key")
        if key in started and key not in recorded:
            age = (now - datetime.fromisoformat(started[key])).total_seconds()
            found.append((trial, age))
    return found


def format_status(out_dir: Path) -> str:
    """Counts, running trials and an ETA for an output dir (finished, partial or empty)."""
    if not out_dir.is_dir():
        return f"{out_dir}: no such folder (no sweep has written here)"
    runs = read_runs(out_dir, write_nothing=True)
    plan = read_plan(out_dir)
    statuses = key_statuses(runs)
    counts = {name: 0 for name in ("done", "failed", "diverged")}
    planned = [t["key"] for t in plan["trials"]] if plan else list(statuses)
    if plan:
        for key in planned:
            if key in statuses:
                counts[statuses[key]] = counts.get(statuses[key], 0) + 1
        pending = sum(key not in statuses for key in planned)
    else:
        for value in statuses.values():
            counts[value] = counts.get(value, 0) + 1
        pending = None
    head = f"{out_dir}: " + (f"sweep {plan['sweep']!r}, " if plan else "")
    parts = [f"{n} {name}" for name, n in counts.items()]
    if pending is not None:
        parts.insert(1, f"{pending} pending")
    lines = [head + ", ".join(parts) + (f" of {len(planned)} trials" if plan else "")]
    if plan is None:
        lines.append(
            f"no {PLAN_FILE} here (no sweep ran here since status existed): pending unknown; "
            "`harness sweep CONFIG --dry-run` lists a config's pending keys"
        )
        if not statuses:
            lines[0] = f"{out_dir}: empty (no runs recorded)"
        return "\n".join(lines)
    state = driver_state(plan)
    running = running_trials(out_dir, plan, set(statuses)) if state != "exited" else []
    if state == "exited":
        lines.append(f"no sweep running (driver pid {plan['driver']['pid']} has exited)")
    elif state == "unknown":
        lines.append(f"driver on host {plan['driver'].get('hostname')}: liveness not checkable")
    else:
        lines.append(f"driver pid {plan['driver']['pid']} running")
    for trial, age in running:
        lines.append(
            f"  running: {trial['task']} {trial['method']} lr={trial['lr']:g} "
            f"seed={trial['seed']} ({_duration(age)})"
        )
    remaining = pending + counts["failed"] + counts["diverged"]
    seconds = trial_seconds(runs[runs["key"].isin(planned)]) if len(runs) else []
    if not remaining:
        lines.append("ETA: complete")
    elif seconds and state != "exited":
        median = statistics.median(seconds)
        at_once = max(1, len(running))
        lines.append(
            f"ETA: ~{_duration(median * remaining / at_once)} ({remaining} trials left x "
            f"median {median:.1f} s/trial / {at_once} running at once)"
        )
    elif seconds:
        median = statistics.median(seconds)
        lines.append(
            f"ETA: not running; the {remaining} trials left take ~"
            f"{_duration(median * remaining)} of trial time (median {median:.1f} s/trial); "
            "rerun the sweep to finish"
        )
    else:
        lines.append(f"ETA: unknown (no finished trial to time); {remaining} trials left")
    return "\n".join(lines)


def planned_keys(out_dir: Path) -> dict[tuple[str, str], set[str]] | None:
    """The last sweep's keys per (method, task) in `out_dir` (None: no plan recorded), so a
    leaderboard can say which rows are partial."""
    plan = read_plan(out_dir)
    if plan is None:
        return None
    keys: dict[tuple[str, str], set[str]] = {}
    for trial in plan["trials"]:
        keys.setdefault((trial["method"], trial["task"]), set()).add(trial["key"])
    return keys
