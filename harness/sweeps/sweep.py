"""Run a sweep's grid as Ray Tune trials and keep runs.parquet / leaderboard.parquet current.

Single-device trials are a Tune function trainable; each calls `run_trial`. The driver
records every finished trial into runs.parquet as it arrives (so a killed driver loses
nothing finished), and skips trials whose content key already finished ok (rerunning the
same command completes a sweep; adding seeds or LRs runs only the new keys).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness.deepspeed import launch, storage
from harness.reporting.results import (
    RunRecorder,
    format_leaderboard,
    read_runs,
    write_leaderboard,
)
from harness.spec import provenance
from harness.spec.config import ConfigError, SweepConfig
from harness.spec.identity import TrialSpec
from harness.sweeps import tracking
from harness.sweeps.crash_witness import crash_witness, read_witness
from harness.sweeps.plan import RunningTrials, sweep_plan, write_plan
from harness.training import adapters
from harness.training.trial import STATUS_FAILED, base_row, run_trial


def _trainable(
    config: dict[str, Any], specs: list[dict[str, Any]], options: dict[str, Any] | None = None
) -> None:
    from ray import tune

    options = options or {}
    live = tracking.LiveReport(tune.report, options.get("report_every"))
    # The witness tells the driver which signal killed this worker, if one does.
    with crash_witness(Path(tune.get_context().get_trial_dir())):
        row = run_trial(specs[config["index"]], live=live, adapters_dir=options.get("adapters_dir"))
    row.update(ray_node())  # which node of a cluster ran it (hostname alone may not tell)
    if specs[config["index"]].get("smoke"):  # a GPU shared by fractional trials
        row = _smoke_row(row)
    tune.report(tracking.final_report(row, json.dumps(row, default=str)))


def ray_node() -> dict[str, str]:
    """The Ray node this process runs on: its IP and node id (extra run columns)."""
    import ray

    return {
        "ray_node_ip": ray.util.get_node_ip_address(),
        "ray_node_id": ray.get_runtime_context().get_node_id(),
    }


# Smoke rows: fractional GPUs give no timing or memory numbers.
SMOKE_NULLED = ("train_time_s", "samples_per_s", "tokens_per_s", "peak_memory_mb",
                "init_time_s", "eval_time_s")  # fmt: skip


def _smoke_row(row: dict[str, Any]) -> dict[str, Any]:
    """Fractional GPUs (`resources.smoke`): the GPU was shared, so no timing/memory numbers."""
    row = {**row, **dict.fromkeys(SMOKE_NULLED)}
    row["peak_memory_kind"] = "not measured: smoke run on a shared GPU"
    return row


def _stopped_row(spec: TrialSpec, last: dict[str, Any], early_stop: bool) -> dict[str, Any]:
    """A trial that ended without its final report: stopped early by the scheduler (never
    eligible for the leaderboard), with the last live numbers it reported."""
    if not early_stop:
        return base_row(spec, status=STATUS_FAILED, error="trial ended without a result row")
    seen = ", ".join(
        f"{k}={last[k]:.4g}" for k in ("train_loss", "selection_score") if last.get(k) is not None
    )
    row = base_row(
        spec,
        status=tracking.STATUS_STOPPED,
        error=f"stopped early by ASHA after step {last.get('step', '?')}"
        + (f" ({seen})" if seen else ""),
    )
    row["steps"] = last.get("step")
    return row


def _crash_row(spec: TrialSpec, error: str) -> dict[str, Any]:
    """A trial whose worker died before reporting (OOM-kill, segfault) is still a row."""
    return base_row(spec, status=STATUS_FAILED, error=error)


# Lines of Ray's error file that say why a worker died (the rest is Ray's own traceback).
_CAUSE_LINE = re.compile(
    r"^\S*(Error|Exception|Exit)\b.*|.*\b(signal|SIG[A-Z]+|exit (type|detail|code)|killed|"
    r"OOM|out of memory|segmentation)\b.*",
    re.IGNORECASE,
)
CAUSE_CHARS = 1500


def trial_error_cause(trial: Any) -> str:
    """What a failed trial's error file says (the exception, the worker's exit signal),
    not only its path: that path is in Ray's temporary session folder, gone after the run."""
    path = getattr(trial, "error_file", None)
    witness = read_witness(_trial_dir(trial))
    text = ""
    if path:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = ""
    if not text:
        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - remote storage, no error recorded
            error = None
        text = str(error or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause_lines = [line for line in lines if _CAUSE_LINE.match(line)]
    cause = " | ".join(dict.fromkeys(cause_lines or lines[-3:]))
    if len(cause) > CAUSE_CHARS:
        cause = cause[: CAUSE_CHARS - 3] + "..."
    where = f" (error file: {path})" if path else ""
    if witness:
        cause = f"{witness}. Ray says: {cause}" if cause else witness
    return f"trial process failed: {cause or 'no error recorded'}{where}"


def _trial_dir(trial: Any) -> Path | None:
    """The trial's directory as the driver sees it (None: not reachable from here)."""
    for attribute in ("local_path", "path"):
        try:
            value = getattr(trial, attribute)
        except Exception:  # noqa: BLE001 - Ray raises when a trial has no storage yet
            continue
        if value and Path(value).is_dir():
            return Path(value)
    return None


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM mid-sweep: finished trials are recorded, the rest run when rerun."""


ADDRESS_TIMEOUT_S = 5.0


def check_address(address: str | None) -> None:
    """An unreachable Ray address is one error within seconds (ray.init retries for
    minutes). `auto`/`local`/None are left to Ray, which answers those at once."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), ADDRESS_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"ray address {address!r} is unreachable ({err or type(err).__name__}, "
            f"{ADDRESS_TIMEOUT_S:g} s timeout); start the cluster or fix ray.address / --address"
        ) from err


def check_cluster_fits(cfg: SweepConfig, nodes: list[dict[str, Any]]) -> None:
    """A trial that no node (or the whole cluster) can hold would wait forever, with Ray
    warning every 60 s: refuse it. `nodes` is ray.nodes()."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    total = {k: sum(n.get(k, 0) for n in alive) for k in ("CPU", "GPU")}
    have = f"cluster: {total['CPU']:g} CPUs, {total['GPU']:g} GPUs on {len(alive)} nodes"
    if launch.is_distributed(cfg):
        dist = cfg.distributed
        assert dist is not None
        worker = {"CPU": dist.cpus_per_worker, "GPU": 1.0 if dist.use_gpu else 0.0}
        need = {k: v * dist.world_size for k, v in worker.items()}
        need["CPU"] += launch.DRIVER_CPUS
        what = f"a distributed trial ({dist.world_size} workers of {_fmt(worker)} + its driver)"
    else:
        res = cfg.resources
        worker = need = {"CPU": res.cpus_per_trial, "GPU": res.gpus_per_trial}
        what = f"a trial ({_fmt(need)}, from resources.cpus_per_trial/gpus_per_trial)"
    fits_node = any(all(n.get(k, 0) >= v for k, v in worker.items() if v) for n in alive)
    if not fits_node or any(total[k] < v for k, v in need.items() if v):
        raise ConfigError(
            f"{what} cannot be scheduled on this Ray cluster ({have}); it would wait forever. "
            "Lower the request or add the resources."
        )


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v) or "nothing"


def record_runs_callback(out_dir: Path, specs: list[TrialSpec], early_stop: bool = False):
    """The Ray Tune callback that records the trials of `specs` (by their config's `index`)
    in `out_dir`; `early_stop` (ASHA on): a trial ended without its final report is
    `stopped`, not failed."""
    from ray.tune import Callback

    class RecordRuns(Callback):
        """Record each finished trial (journal at once, runs.parquet in batches; see
        harness.reporting.results.RunRecorder) and print one progress line."""

        def __init__(self) -> None:
            self.recorder = RunRecorder(out_dir)
            self.running = RunningTrials(out_dir)  # for `harness status`
            self.finished: set[str] = set()  # trial ids whose final row arrived
            self.last_report: dict[str, dict[str, Any]] = {}  # latest live report per trial
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
            # Only a trial's final report is a row; the others are live tracking.
            if tracking.is_final(result):
                row = json.loads(result["record"])
                self.recorder.record(row)
                self._progress(row)
                self.finished.add(trial.trial_id)
            else:
                self.last_report[trial.trial_id] = result

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = specs[trial.config["index"]]
            row = _crash_row(spec, trial_error_cause(trial))
            self.recorder.record(row)
            self._progress(row)
            self.running.finish(spec.key())

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.start(specs[trial.config["index"]].key())

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = specs[trial.config["index"]]
            self.running.finish(spec.key())
            if trial.trial_id not in self.finished:  # ended by the scheduler (ASHA)
                self.finished.add(trial.trial_id)
                row = _stopped_row(spec, self.last_report.pop(trial.trial_id, {}), early_stop)
                self.recorder.record(row)
                self._progress(row)

    return RecordRuns()


def pending_specs(cfg: SweepConfig, out_dir: Path) -> tuple[list[TrialSpec], int]:
    """The resolved grid minus keys that already finished ok in this output dir.

    Runs recorded under earlier key versions are re-keyed first where they provably are
    this setting; runs of another setting for one of this sweep's (method, task) pairs are
    an error (one output dir, one setting per pair: the leaderboard never averages across
    settings). See harness.sweeps.plan.sweep_plan."""
    plan = sweep_plan(cfg, out_dir)
    return plan.todo, len(plan.specs) - len(plan.todo)


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
    plan = sweep_plan(cfg, out_dir)
    todo, skipped = plan.todo, len(plan.specs) - len(plan.todo)
    budget = cfg.budget
    print(
        f"sweep {cfg.name!r}: {len(todo)} trials to run ({skipped} already done) = "
        f"{len(cfg.methods)} methods x {len(cfg.tasks)} tasks x LRs x {len(cfg.seeds)} seeds; "
        f"model {cfg.model.id}; budget: {budget.max_steps or budget.epochs} "
        f"{'steps' if budget.max_steps else 'epochs'}, batch {budget.batch_size}, "
        f"max_length {budget.max_length}, train_rows {budget.train_rows}, "
        f"selection_rows {budget.selection_rows}, test_rows {budget.test_rows or 'all'}"
        + "".join(f"; {task}: {changes}" for task, changes in cfg.task_budgets.items())
        + f"; output {out_dir}",
        flush=True,
    )
    interrupted = None
    if todo:
        address = address or cfg.ray.address
        check_address(address)  # seconds, not ray.init's minutes of retries
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
            storage_dir = storage.storage_path(cfg, out_dir)
            storage.check_storage(storage_dir, storage.alive_nodes(), cfg.ray.shared_storage)
            check_cluster_fits(cfg, ray.nodes())  # else trials wait forever for resources
            write_plan(out_dir, cfg, plan.specs)  # every key and this driver, for `status`
            # Tracking and adapter options reach the trials beside their specs, never in
            # them: they change no numbers, so no key.
            options = {
                "report_every": cfg.tracking.report_every,
                "adapters_dir": (
                    str(adapters.adapters_root(out_dir)) if cfg.save_adapters != "none" else None
                ),
            }
            loggers, described = tracking.logger_callbacks(cfg, out_dir)
            print("tracking: " + "; ".join(described), flush=True)
            if launch.is_distributed(cfg):
                trainable, max_concurrent, failure = launch.tune_setup(
                    cfg, payload, storage_dir, adapters_dir=options["adapters_dir"]
                )
            else:
                res = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
                trainable = tune.with_resources(
                    tune.with_parameters(_trainable, specs=payload, options=options), res
                )
                max_concurrent, failure = cfg.ray.max_concurrent_trials, None
            tuner = tune.Tuner(
                trainable,
                param_space=tracking.trial_params(todo),
                tune_config=tune.TuneConfig(
                    scheduler=tracking.scheduler(cfg, todo),
                    max_concurrent_trials=max_concurrent,
                    # Reusing workers saves re-importing torch/transformers per trial; peak
                    # memory is reset per trial (harness.training.memory), seeds are set per trial.
                    reuse_actors=True,
                    trial_name_creator=lambda t: trial_name(todo[t.config["index"]]),
                    trial_dirname_creator=lambda t: trial_name(todo[t.config["index"]]),
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=storage_dir,
                    failure_config=failure,  # Tune-level retries of a driver
                    callbacks=[
                        recorder := record_runs_callback(
                            out_dir, todo, cfg.tracking.early_stop == "asha"
                        ),
                        *loggers,
                    ],
                    verbose=0,
                ),
            )
            try:
                interrupted = _fit(tuner, recorder, len(todo))
            finally:
                recorder.recorder.close()  # fold the journal into runs.parquet
        finally:
            ray.shutdown()
    planned: dict[tuple[str, str], set[str]] = {}
    for spec in plan.specs:
        planned.setdefault((spec.method, spec.task), set()).add(spec.key())
    board = write_leaderboard(out_dir, planned)
    if cfg.save_adapters == "chosen" and not interrupted:
        deleted = adapters.prune_to_chosen(read_runs(out_dir), board)
        print(f"save_adapters: chosen: deleted {deleted} adapters of LRs not chosen", flush=True)
    if interrupted:
        print(f"PARTIAL leaderboard ({interrupted}; the missing trials have not run):", flush=True)
    print(format_leaderboard(board), flush=True)
    print(f"wrote {out_dir / 'runs.parquet'} and {out_dir / 'leaderboard.parquet'}", flush=True)
    if interrupted:
        raise SweepInterrupted(interrupted)
    return board


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _fit(tuner: Any, recorder: Any, n_trials: int) -> str | None:
    """Run the Tuner; on Ctrl-C or SIGTERM stop at once and say how far it got (None:
    finished).

    Tune's own SIGINT handler is switched off: it would end the run as if complete and
    advise Tuner.restore, which this harness does not use (rerunning the sweep resumes it).
    SIGTERM (`kill PID`) stops the driver the same way, so a sweep started in the background
    (`nohup ... &`, where the shell makes it ignore SIGINT) can still be stopped with its
    partial leaderboard written."""
    previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Python sets handlers on the main thread only; None = one installed outside Python.
    on_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main else None
    try:
        tuner.fit()
    except KeyboardInterrupt:
        return f"{recorder.done} of {n_trials} trials finished before the interrupt"
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous_term or signal.SIG_DFL)
        if previous is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
    if recorder.done < n_trials:
        return f"only {recorder.done} of {n_trials} trials reported"
    return None


def trial_name(spec: TrialSpec) -> str:
    """The trial's Ray Tune name and folder: readable, and unique by its key's start."""
    return (
        f"{spec.method}_{spec.task.replace('/', '-')}_lr{spec.lr:g}_s{spec.seed}_{spec.key()[:6]}"
    )


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None
