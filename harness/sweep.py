"""Run a sweep's grid as Ray Tune trials and keep runs.parquet / leaderboard.parquet current.

Single-device trials are a Tune function trainable; each calls `run_trial`. The driver
records every finished trial into runs.parquet as it arrives (so a killed driver loses
nothing finished), and skips trials whose content key already finished ok (rerunning the
same command completes a sweep; adding seeds or LRs runs only the new keys).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness import distributed, identity, provenance
from harness.config import ConfigError, SweepConfig, TrialSpec, expand
from harness.results import (
    append_runs,
    format_leaderboard,
    read_runs,
    write_leaderboard,
    write_runs,
)
from harness.trial import STATUS_FAILED, base_row, run_trial


def _trainable(config: dict[str, Any], specs: list[dict[str, Any]]) -> None:
    from ray import tune

    row = run_trial(specs[config["index"]])
    if specs[config["index"]].get("smoke"):  # a GPU shared by fractional trials
        row = _smoke_row(row)
    tune.report(
        {
            "record": json.dumps(row, default=str),
            "status": row["status"],
            "selection_score": row.get("selection_score"),
            "test_score": row.get("test_score"),
        }
    )


# Smoke rows: fractional GPUs give no timing or memory numbers.
SMOKE_NULLED = ("train_time_s", "samples_per_s", "tokens_per_s", "peak_memory_mb",
                "init_time_s", "eval_time_s")  # fmt: skip


def _smoke_row(row: dict[str, Any]) -> dict[str, Any]:
    """Fractional GPUs (`resources.smoke`): the GPU was shared, so no timing/memory numbers."""
    row = {**row, **dict.fromkeys(SMOKE_NULLED)}
    row["peak_memory_kind"] = "not measured: smoke run on a shared GPU"
    return row


def _crash_row(spec: TrialSpec, error: str) -> dict[str, Any]:
    """A trial whose worker died before reporting (OOM-kill, segfault) is still a row."""
    return base_row(spec, status=STATUS_FAILED, error=error)


def _make_callback(out_dir: Path, specs: list[TrialSpec]):
    from ray.tune import Callback

    class RecordRuns(Callback):
        """Append each finished trial to runs.parquet and print one progress line."""

        def __init__(self) -> None:
            self.done = 0
            self.started = time.perf_counter()

        def _progress(self, row: dict[str, Any]) -> None:
            self.done += 1
            score = row.get("test_score")
            tail = (
                f"select {row.get('selection_metric')}={row.get('selection_score'):.4f} "
                f"test {row.get('test_metric')}={score:.4f}"
                if row["status"] == "ok"
                else f"{row['status'].upper()}: {str(row.get('error'))[:160]}"
            )
            print(
                f"[{self.done}/{len(specs)} {time.perf_counter() - self.started:6.0f}s] "
                f"{row['task']} {row['method']} lr={row['lr']:g} seed={row['seed']}: {tail}",
                flush=True,
            )

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "record" in result:
                row = json.loads(result["record"])
                append_runs(out_dir, [row])
                self._progress(row)

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = specs[trial.config["index"]]
            row = _crash_row(spec, f"trial process failed: {trial.error_file or 'unknown'}")
            append_runs(out_dir, [row])
            self._progress(row)

    return RecordRuns()


def pending_specs(cfg: SweepConfig, out_dir: Path) -> tuple[list[TrialSpec], int]:
    """The resolved grid minus keys that already finished ok in this output dir.

    Runs recorded under key version 1 are re-keyed first where they provably are this
    setting; runs of another setting for one of this sweep's (method, task) pairs are an
    error (one output dir, one setting per pair: the leaderboard never averages across
    settings)."""
    specs = identity.resolve(expand(cfg))
    runs = read_runs(out_dir)
    runs, migrated = identity.migrate_runs(runs, specs)
    conflicts = identity.setting_conflicts(runs, specs)
    if conflicts:
        shown = "\n".join(f"  - {c}" for c in conflicts[:10])
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise ConfigError(
            f"{out_dir / 'runs.parquet'} holds runs of a different setting (method config, "
            f"protocol, data, model or budget) than this sweep:\n{shown}{more}\n"
            "Write to a new output_dir (nothing was run or changed)."
        )
    versions = identity.version_conflicts(runs, specs, provenance.package_versions())
    if versions:
        raise ConfigError(
            f"{out_dir / 'runs.parquet'} holds runs made with other package versions than "
            "this environment, and one leaderboard row never mixes them:\n"
            + "\n".join(f"  - {v}" for v in versions)
            + "\nWrite to a new output_dir, or install the recorded versions (nothing was run "
            "or changed)."
        )
    if migrated:
        runs = write_runs(out_dir, runs)
        print(
            f"re-keyed {migrated} runs recorded under an earlier key version (same setting)",
            flush=True,
        )
    finished = set(runs.loc[runs["status"] == "ok", "key"]) if len(runs) else set()
    todo = [s for s in specs if s.key() not in finished]
    return todo, len(specs) - len(todo)


def run_sweep(cfg: SweepConfig, address: str | None = None) -> pd.DataFrame:
    import ray
    from ray import tune

    out_dir = Path(cfg.output_dir).resolve()
    # Workers may run elsewhere: hand them absolute paths and the driver's code version.
    cfg = cfg.model_copy(
        update={
            "data_dir": _absolute(cfg.resolved_data_dir()),
            "model_dir": _absolute(cfg.resolved_model_dir()),
        }
    )
    todo, skipped = pending_specs(cfg, out_dir)
    budget = cfg.budget
    print(
        f"sweep {cfg.name!r}: {len(todo)} trials to run ({skipped} already done) = "
        f"{len(cfg.methods)} methods x {len(cfg.tasks)} tasks x LRs x {len(cfg.seeds)} seeds; "
        f"model {cfg.model.id}; budget: {budget.max_steps or budget.epochs} "
        f"{'steps' if budget.max_steps else 'epochs'}, batch {budget.batch_size}, "
        f"max_length {budget.max_length}, train_rows {budget.train_rows}, "
        f"selection_rows {budget.selection_rows}, test_rows {budget.test_rows or 'all'}; "
        f"output {out_dir}",
        flush=True,
    )
    if todo:
        address = address or cfg.ray.address
        env = {"HARNESS_GIT_COMMIT": provenance.git_commit(), "TOKENIZERS_PARALLELISM": "false"}
        env["RAY_TRAIN_V2_ENABLED"] = "1"  # distributed trials use Train V2
        ray.init(
            address=address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            payload = [s.model_dump(mode="json") for s in todo]
            # Refuse node-local storage across nodes; multi-GPU trials drive a TorchTrainer.
            storage = distributed.storage_path(cfg, out_dir)
            distributed.check_storage(storage, distributed.alive_nodes(), cfg.ray.shared_storage)
            if distributed.is_distributed(cfg):
                trainable, max_concurrent, failure = distributed.tune_setup(cfg, payload, storage)
            else:
                res = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
                trainable = tune.with_resources(
                    tune.with_parameters(_trainable, specs=payload), res
                )
                max_concurrent, failure = cfg.ray.max_concurrent_trials, None
            tuner = tune.Tuner(
                trainable,
                param_space={"index": tune.grid_search(list(range(len(todo))))},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=max_concurrent,
                    # Reusing workers saves re-importing torch/transformers per trial; peak
                    # memory is reset per trial (harness.memory), seeds are set per trial.
                    reuse_actors=True,
                    trial_name_creator=lambda t: _trial_name(todo[t.config["index"]]),
                    trial_dirname_creator=lambda t: _trial_name(todo[t.config["index"]]),
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=storage,
                    failure_config=failure,  # Tune-level retries of a driver
                    callbacks=[_make_callback(out_dir, todo)],
                    verbose=0,
                ),
            )
            tuner.fit()
        finally:
            ray.shutdown()
    board = write_leaderboard(out_dir)
    print(format_leaderboard(board), flush=True)
    print(f"wrote {out_dir / 'runs.parquet'} and {out_dir / 'leaderboard.parquet'}", flush=True)
    return board


def _trial_name(spec: TrialSpec) -> str:
    return (
        f"{spec.method}_{spec.task.replace('/', '-')}_lr{spec.lr:g}_s{spec.seed}_{spec.key()[:6]}"
    )


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None
