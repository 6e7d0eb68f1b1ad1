"""Ray Train / Tune orchestration of distributed trials.

Ray 2.60 (Train V2) no longer accepts a Trainer inside `Tuner`; each trial is a Tune function
trainable (`driver`) that builds and fits a `TorchTrainer` itself:

    Tune trial `driver` (0.1 CPU)  ->  TorchTrainer(num_workers = world size)
                                        -> `worker_loop` on every rank -> rank 0's row

Every rank runs harness.training.trial's one recipe (`run_recipe`) on a harness.deepspeed.engine
`DeepSpeedBackend` (`rank_trial`). Failures: `FailureConfig(max_failures)` at the Train
level restarts the worker group (from the latest DeepSpeed checkpoint when
`checkpoint_every_steps` is set: harness.deepspeed.checkpoint), and
`FailureConfig(trial_max_failures)` at the Tune level restarts a lost driver.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from harness.deepspeed.checkpoint import copy_adapter
from harness.deepspeed.engine import DeepSpeedBackend
from harness.deepspeed.storage import train_run_name
from harness.spec.config import DistributedConfig, SweepConfig
from harness.spec.identity import TrialSpec
from harness.training.sanity import SanityError
from harness.training.train import Diverged
from harness.training.trial import STATUS_DIVERGED, STATUS_FAILED, base_row, run_recipe

DRIVER_CPUS = 0.1  # a Tune driver only waits on its TorchTrainer; Ray refuses 0


# ---------------------------------------------------------------- driver side (the sweep)


def is_distributed(cfg: SweepConfig) -> bool:
    return cfg.distributed is not None and cfg.distributed.enabled


def derived_max_concurrent(dist: DistributedConfig, cluster: dict[str, float]) -> int:
    """Trials that fit at once: cluster GPUs / GPUs per trial (and CPUs for the workers)."""
    per_trial_cpus = DRIVER_CPUS + dist.world_size * dist.cpus_per_worker
    fit = int(cluster.get("CPU", 0) // per_trial_cpus)
    if dist.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // dist.gpus_per_trial))
    return max(1, fit)


def tune_setup(
    cfg: SweepConfig, payload: list[dict[str, Any]], storage: str, adapters_dir: str | None = None
):
    """(trainable, max_concurrent_trials, tune FailureConfig) for a distributed sweep;
    `adapters_dir`: copy each trial's saved adapter to `<adapters_dir>/<run key>/`."""
    import ray
    from ray import tune

    dist = cfg.distributed
    assert dist is not None and dist.enabled
    max_concurrent = cfg.ray.max_concurrent_trials or derived_max_concurrent(
        dist, ray.cluster_resources()
    )
    train_storage = storage.rstrip("/") + f"/{cfg.name}_train"
    trainable = tune.with_resources(
        tune.with_parameters(
            driver, specs=payload, train_storage=train_storage, adapters_dir=adapters_dir,
            report_every=cfg.tracking.report_every,
        ),  # fmt: skip
        {"cpu": DRIVER_CPUS},
    )
    failure = tune.FailureConfig(max_failures=dist.trial_max_failures)
    return trainable, max_concurrent, failure


def driver(
    config: dict[str, Any],
    specs: list[dict[str, Any]],
    train_storage: str,
    adapters_dir: str | None = None,
    report_every: int | None = None,
) -> None:
    """The Tune function trainable of one distributed trial: fit a TorchTrainer (whose
    rank 0 reports live through Ray's TuneReportCallback), report the row."""
    from ray import tune

    from harness.sweeps.tracking import final_report

    spec = TrialSpec(**specs[config["index"]])
    # Live reports only when asked for (`tracking.report_every`): under Train V2 each
    # `ray.train.report` can wait for the controller's ~2 s poll, on every rank.
    row = run_distributed_trial(spec, train_storage, adapters_dir, live=report_every is not None,
                                report_every=report_every)  # fmt: skip
    tune.report(final_report(row, json.dumps(row, default=str)))


def run_distributed_trial(
    spec: TrialSpec,
    train_storage: str,
    adapters_dir: str | None = None,
    *,
    live: bool = False,
    report_every: int | None = None,
) -> dict[str, Any]:
    """One trial on `spec.distributed.world_size` Ray Train workers; never raises. With
    `adapters_dir`, rank 0's adapter (harness.deepspeed.checkpoint) is also copied to
    `<adapters_dir>/<run key>/adapter/` (`save_adapter` is not in the key)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = spec.distributed
    assert dist is not None
    if adapters_dir and not dist.save_adapter:
        dist = dist.model_copy(update={"save_adapter": True})
        spec = spec.model_copy(update={"distributed": dist})
    started = time.perf_counter()
    try:
        resources = {"CPU": dist.cpus_per_worker} | ({"GPU": 1} if dist.use_gpu else {})
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "spec": spec.model_dump(mode="json"),
                "live": live,
                "report_every": report_every,
            },
            torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=dist.world_size,
                use_gpu=dist.use_gpu,
                resources_per_worker=resources,
            ),
            run_config=RunConfig(
                name=train_run_name(spec),
                storage_path=train_storage,
                failure_config=FailureConfig(max_failures=dist.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=live_callbacks(live),
            ),
        )
        result = trainer.fit()
        row = result.return_value
        if not isinstance(row, dict):
            raise RuntimeError(f"rank 0 returned no result row (got {type(row).__name__})")
        if result.checkpoint is not None and dist.save_adapter:
            row["adapter_path"] = result.checkpoint.path
            if adapters_dir:
                row.update(copy_adapter(result.checkpoint, Path(adapters_dir) / spec.key()))
    except Exception as err:  # noqa: BLE001 - a row, never a lost trial
        row = base_row(spec, status=STATUS_FAILED, error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc(limit=20)
    row["wall_time_s"] = time.perf_counter() - started
    return row


# ---------------------------------------------------------------- worker side


def worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function; rank 0 returns the result row."""
    report_every = config.get("report_every") if config.get("live") else 0
    return rank_trial(TrialSpec(**config["spec"]), report_every)


def rank_trial(spec: TrialSpec, report_every: int | None = 0) -> dict[str, Any] | None:
    """One trial on this rank of the current Ray Train worker group (inside a Train loop):
    the recipe on this rank's DeepSpeed backend. Rank 0 returns the result row, the others
    None. `report_every`: live reports every N steps (None: the default interval; 0: none)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    row = base_row(spec)
    try:
        run_recipe(spec, row, DeepSpeedBackend(spec, rank, report_every))
    except Diverged as err:  # the loss is all-reduced first: every rank raises together
        row.update(status=STATUS_DIVERGED, error=str(err))
    except SanityError as err:  # computed identically on every rank
        row.update(status=STATUS_FAILED, error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc(limit=20)
    # Anything else propagates: Ray Train tears the group down and retries (max_failures);
    # catching it on one rank could leave the others waiting in a collective.
    return row if rank == 0 else None


def live_callbacks(live: bool) -> list[Any]:
    """Ray's TuneReportCallback forwards rank 0's `ray.train.report` metrics to the Tune
    trial (live tracking); it exists only inside a Tune trial."""
    if not live:
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]
