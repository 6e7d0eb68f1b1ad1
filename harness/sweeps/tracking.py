"""Live experiment tracking: trials report while they train, Ray's logger callbacks forward it.

A single-device trial calls `tune.report` every `tracking.report_every` optimizer steps
({step, train_loss, lr, grad_norm}) and after each intermediate evaluation ({step,
selection_score}); its last report carries the result row and `final: True`. The sweep's
collector (harness.sweeps.sweep) records only final reports, so an intermediate one can never be
taken for a row. Ray Tune's logger callbacks (MLflow, Weights & Biases, TensorBoard) and
schedulers see every report: `tracking.early_stop: asha` stops weak LR candidates early,
within each (method, task, seed), and such trials are recorded with status `stopped`.

Nothing here changes a trial's numbers, so no tracking option enters a run's key.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.spec.config import ConfigError, SweepConfig, TrackingConfig
from harness.spec.identity import TrialSpec

FINAL = "final"  # the report that carries the result row
STATUS_STOPPED = "stopped"  # ended early by the scheduler; never eligible for the leaderboard
STEP = "timesteps_total"  # Tune's name for progress: MLflow/TensorBoard plot against it
# MLflow 3 keeps its file store in maintenance mode, usable when this is "true".
MLFLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
REPORTS_PER_TRIAL = 10  # the default report_every gives about this many training reports


def report_interval(tracking_every: int | None, total_steps: int) -> int:
    """Steps between training reports: the configured value, else steps // 10 (>= 1)."""
    return tracking_every or max(1, total_steps // REPORTS_PER_TRIAL)


@dataclass(frozen=True)
class LiveReport:
    """What a trial needs to report while it trains: the reporting function (Ray Tune's
    `tune.report` inside a sweep, any callable in tests) and the configured interval."""

    report: Callable[[dict[str, Any]], None]
    every: int | None = None

    def interval(self, total_steps: int) -> int:
        return report_interval(self.every, total_steps)

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.report({**metrics, STEP: metrics["step"], FINAL: False})


def final_report(row: dict[str, Any], record: str) -> dict[str, Any]:
    """The last report of a trial: the whole row (`record`, JSON) and its headline numbers.
    It has no `step`, so a scheduler never acts on it."""
    return {
        "record": record,
        FINAL: True,
        "status": row["status"],
        "selection_score": row.get("selection_score"),
        "test_score": row.get("test_score"),
    }


def is_final(result: dict[str, Any]) -> bool:
    return bool(result.get(FINAL)) and "record" in result


# ---------------------------------------------------------------- driver side


def default_logger() -> str:
    """The offline default: an MLflow file store if mlflow is installed, else TensorBoard."""
    return "mlflow" if importlib.util.find_spec("mlflow") is not None else "tensorboard"


def chosen_loggers(tracking: TrackingConfig) -> list[str]:
    """The loggers the config asks for; none named = the offline default."""
    named = {
        "mlflow": tracking.mlflow, "wandb": tracking.wandb, "tensorboard": tracking.tensorboard
    }  # fmt: skip
    if all(value is None for value in named.values()):
        return [default_logger()]
    return [name for name, value in named.items() if value not in (None, False)]


def mlflow_store(cfg: SweepConfig, out_dir: Path) -> str:
    """The MLflow tracking URI: the configured one, else a file store in <output_dir>/mlruns."""
    settings = cfg.tracking.mlflow
    uri = settings.tracking_uri if not isinstance(settings, bool | None) else None
    return uri or (out_dir / "mlruns").resolve().as_uri()


def logger_callbacks(cfg: SweepConfig, out_dir: Path) -> tuple[list[Any], list[str]]:
    """Ray's logger callbacks for the config, and one line describing each."""
    callbacks: list[Any] = []
    described: list[str] = []
    for name in chosen_loggers(cfg.tracking):
        if name == "mlflow":
            if importlib.util.find_spec("mlflow") is None:
                raise ConfigError(
                    "tracking.mlflow needs mlflow: pip install -e '.[tracking]'"
                )
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            settings = cfg.tracking.mlflow
            experiment = settings.experiment_name if not isinstance(settings, bool | None) else None
            uri = mlflow_store(cfg, out_dir)
            if uri.startswith("file:"):  # MLflow 3 refuses its file store unless told to
                os.environ.setdefault(MLFLOW_FILE_STORE_ENV, "true")
            callbacks.append(
                MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment or cfg.name)
            )
            described.append(f"MLflow at {uri}, experiment {experiment or cfg.name!r}")
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("tracking.wandb needs wandb: pip install wandb")
            from ray.air.integrations.wandb import WandbLoggerCallback

            settings = cfg.tracking.wandb
            project = settings.project if not isinstance(settings, bool | None) else None
            mode = settings.mode if not isinstance(settings, bool | None) else "offline"
            group = settings.group if not isinstance(settings, bool | None) else None
            callbacks.append(
                WandbLoggerCallback(project=project or cfg.name, group=group, mode=mode,
                                    dir=str(out_dir))
            )  # fmt: skip
            described.append(f"Weights & Biases ({mode}), project {project or cfg.name!r}")
        else:
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
            described.append("TensorBoard event files in each trial's folder under the storage")
    return callbacks, described


def trial_params(todo: list[TrialSpec]) -> dict[str, Any]:
    """Tune's param space: the trial index (what the trainables read) plus what each trial
    is (method, task, lr, seed, key), so logger callbacks record them as run parameters."""
    from ray import tune

    described = [
        {"method": s.method, "task": s.task, "lr": s.lr, "seed": s.seed, "key": s.key()}
        for s in todo
    ]
    space: dict[str, Any] = {"index": tune.grid_search(list(range(len(todo))))}
    for name in ("method", "task", "lr", "seed", "key"):
        space[name] = tune.sample_from(
            lambda spec, name=name: described[spec.config.index][name]
        )
    return space


def scheduler(cfg: SweepConfig, todo: list[TrialSpec]):
    """None (Tune's FIFO order), or ASHA within each (method, task, seed) group."""
    if cfg.tracking.early_stop != "asha" or not todo:
        return None
    from harness.training.train import planned_steps

    # ASHA's horizon: the longest task's steps (task_budgets may differ per task).
    horizons = [
        b.max_steps or (planned_steps(b, b.train_rows) if b.train_rows else None)
        for b in cfg.budgets().values()
    ]
    steps = None if None in horizons else max(horizons)
    if steps is None:
        raise ConfigError("tracking.early_stop: asha needs budget.max_steps or train_rows")
    if cfg.eval.every_steps:  # the selection metric, when there are intermediate evals
        metric, mode = "selection_score", "max"
    else:
        metric, mode = "train_loss", "min"
    grace = cfg.tracking.asha_grace_steps or max(1, steps // 4)
    groups = [(s.method, s.task, s.seed) for s in todo]
    return _grouped_asha(groups, metric, mode, steps, grace, cfg.tracking.asha_reduction_factor)


def _grouped_asha(groups, metric, mode, max_t, grace, reduction_factor):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    class GroupedASHA(FIFOScheduler):
        """ASHA per group of trials that differ only in LR: comparing an SST-2 loss with
        an STS-B one, or one method with another, would stop trials for the wrong reason.
        Its own `metric` stays unset, so Tune does not require it in every report."""

        def __init__(self) -> None:
            super().__init__()
            self.metric_name = metric
            self.per_group: dict[Any, AsyncHyperBandScheduler] = {}

        def _asha(self, trial) -> AsyncHyperBandScheduler:
            group = groups[trial.config["index"]]
            if group not in self.per_group:
                self.per_group[group] = AsyncHyperBandScheduler(
                    time_attr=STEP, metric=metric, mode=mode, max_t=max_t,
                    grace_period=min(grace, max_t), reduction_factor=reduction_factor,
                    stop_last_trials=False,
                )  # fmt: skip
            return self.per_group[group]

        def on_trial_add(self, tune_controller, trial) -> None:
            self._asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result) -> str:
            if result.get(FINAL):
                return TrialScheduler.CONTINUE
            return self._asha(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result) -> None:
            self.on_trial_remove(tune_controller, trial)

        def on_trial_remove(self, tune_controller, trial) -> None:
            try:  # ASHA forgets the trial (its final report has no step to rank)
                self._asha(trial).on_trial_remove(tune_controller, trial)
            except KeyError:
                pass

        def debug_string(self) -> str:
            return f"ASHA on {metric} per (method, task, seed) group"

    return GroupedASHA()
