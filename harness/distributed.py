"""Multi-GPU trials: a Tune driver per trial runs a Ray Train `TorchTrainer` under DeepSpeed.

Ray 2.60 (Train V2) no longer accepts a Trainer inside `Tuner`; each trial is a Tune function
trainable (`driver`) that builds and fits a `TorchTrainer` itself:

    Tune trial `driver` (0.1 CPU)  ->  TorchTrainer(num_workers = world size)
                                        -> `_worker_loop` on every rank -> rank 0's row

Every rank runs the trial of `harness.trial.run_trial` with the same pieces (task splits,
pipeline, method, sanity checks, evaluators, result row), distributed:

- data: each optimizer step consumes one global batch (`budget.batch_size`) drawn in the
  same seeded order as the single-device loop (incomplete last batches are dropped); rank r
  takes its contiguous share and splits it into `accumulation` micro-batches;
- init: the model is loaded (bf16 when training in bf16: `load_dtype`) and the method
  prepared on every rank *before* DeepSpeed partitions it, so methods read base weights as
  on one device (gradient accumulators optionally in host memory:
  `offload_init_statistics`); data-informed inits see this
  rank's share of the init batches and the shared estimator all-reduces the gradient sums
  and counts, so every rank computes the same initialisation (the random state is restored
  after the rank-specific init batches; the row records a bitwise digest of the adapter per
  rank, and differing digests fail the trial);
- training: `deepspeed.initialize` with the rendered ZeRO-2/3 config around the prepared
  model and the method's own optimizer (LoRA+ param groups kept); each micro-batch's loss is
  weighted by its share of the global batch's loss terms, so the gradient and the logged
  loss are the whole batch's mean as on one device (`global_batch_step`); a
  method's gradient transform (LoRA-One's preconditioners) runs at the accumulation
  boundary on the assembled full gradients, after the harness clips them (`ClipAndTransform`:
  the single-device order; DeepSpeed's own clipping is then off, as it clips inside
  `step()`, after any transform);
- after partitioning, base weights are read only under `deepspeed.zero.GatheredParameters`
  (the merge check), and the adapter is saved by gathering only the trainable parameters;
- evaluation: sharded over the ranks (harness.sharding; equal numbers of model calls under
  ZeRO-3, whose forwards are collective), gathered in order; rank 0 reports.

Failures: `FailureConfig(max_failures)` at the Train level restarts the worker group (from
the latest DeepSpeed checkpoint when `checkpoint_every_steps` is set), and
`FailureConfig(trial_max_failures)` at the Tune level restarts a lost driver. The Train run
is named after the trial's content key, so any restart - a retry, or rerunning the sweep
command - finds and restores the same run in storage.

Reuse: `_run_rank` runs a trial with the same functions as `harness.trial._run`
(`load_data_and_model`, `prepare_method` with this rank's init batches, `sanity`
incl. `CheckedCallbacks`, `memory`, `base_row`, `evaluate_into_row`); what differs is
DeepSpeed: the engine, its training loop, ZeroParamAccess, checkpoints and sharded eval.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness.config import ConfigError, DistributedConfig, SweepConfig, TrialSpec
from harness.trial import STATUS_DIVERGED, STATUS_FAILED, base_row

DRIVER_CPUS = 0.1  # a Tune driver only waits on its TorchTrainer; Ray refuses 0
# Remote or shared storage every node reaches; anything else is one machine's disk.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")
SHARED_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.juicefs", "fuse.mountpoint-s3",
    "fuse.cephfs", "efs", "wekafs", "panfs",
}  # fmt: skip
# Test hook: a worker raises at this step once (not after a restore), to exercise restarts.
FAIL_ONCE_ENV = "HARNESS_TEST_FAIL_ONCE_AT_STEP"
# What a DeepSpeed checkpoint carries besides the weights, optimizer and scheduler.
CLIENT_STATE = ("step", "losses", "curve", "eval_curve", "train_time", "tokens")


# ---------------------------------------------------------------- driver side (the sweep)


def is_distributed(cfg: SweepConfig) -> bool:
    return cfg.distributed is not None and cfg.distributed.enabled


def storage_path(cfg: SweepConfig, out_dir: Path) -> str:
    """Where Ray Tune and Ray Train persist: config/env, else <output_dir>/ray."""
    return cfg.resolved_storage_path() or str(out_dir / "ray")


def is_shared_storage(path: str) -> bool:
    """A cloud URI, or a folder on a network filesystem (from /proc/mounts)."""
    if path.startswith(REMOTE_SCHEMES):
        return True
    if "://" in path:  # other fsspec/pyarrow schemes (e.g. file://) are not known shared
        return False
    return mount_fstype(path) in SHARED_FILESYSTEMS


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount holding `path` (its nearest existing parent)."""
    target = Path(path).expanduser().absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, fstype = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def check_storage(path: str, alive_nodes: int, declared_shared: bool = False) -> None:
    """Refuse node-local storage on a multi-node cluster (trials would write where the
    driver and the other nodes cannot read, and restoring would find nothing)."""
    if alive_nodes <= 1 or declared_shared or is_shared_storage(path):
        return
    raise ConfigError(
        f"the Ray cluster has {alive_nodes} nodes but the storage path {path!r} is on local "
        f"disk ({mount_fstype(path) or 'unknown filesystem'}), which the other nodes cannot "
        "read: set ray.storage_path (or $HARNESS_STORAGE_PATH) to s3://bucket/prefix, "
        "gs://bucket/prefix or a folder on a filesystem every node mounts (NFS); if that "
        "folder is shared but not recognised, also set ray.shared_storage: true"
    )


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def derived_max_concurrent(dist: DistributedConfig, cluster: dict[str, float]) -> int:
    """Trials that fit at once: cluster GPUs / GPUs per trial (and CPUs for the workers)."""
    per_trial_cpus = DRIVER_CPUS + dist.world_size * dist.cpus_per_worker
    fit = int(cluster.get("CPU", 0) // per_trial_cpus)
    if dist.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // dist.gpus_per_trial))
    return max(1, fit)


def train_run_name(spec: TrialSpec) -> str:
    """Stable per trial (content key), so a restart finds the same Train run in storage."""
    task = spec.task.replace("/", "-")
    return f"{spec.method}_{task}_lr{spec.lr:g}_s{spec.seed}_{spec.key()}"


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

    from harness.tracking import final_report

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
    `adapters_dir`, rank 0's adapter (see `_report_adapter`) is also copied to
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
            _worker_loop,
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
                callbacks=_live_callbacks(live),
            ),
        )
        result = trainer.fit()
        row = result.return_value
        if not isinstance(row, dict):
            raise RuntimeError(f"rank 0 returned no result row (got {type(row).__name__})")
        if result.checkpoint is not None and dist.save_adapter:
            row["adapter_path"] = result.checkpoint.path
            if adapters_dir:
                row.update(_copy_adapter(result.checkpoint, Path(adapters_dir) / spec.key()))
    except Exception as err:  # noqa: BLE001 - a row, never a lost trial
        row = base_row(spec, status=STATUS_FAILED, error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc(limit=20)
    row["wall_time_s"] = time.perf_counter() - started
    return row


# ---------------------------------------------------------------- data: per-rank shares


class RankShares:
    """This rank's micro-batches of each global batch, in the single-device loop's order.

    A DataLoader over the row indices with the same seeded generator draws the same
    permutation as `pipeline.loader(global_batch, seed)`; incomplete global batches are
    dropped so every rank has `accumulation` full micro-batches every step.
    """

    def __init__(self, pipeline, plan, rank: int, device) -> None:
        if len(pipeline.train_rows) < plan.global_batch:
            raise ValueError(
                f"{len(pipeline.train_rows)} train rows cannot fill one global batch of "
                f"{plan.global_batch}"
            )
        self.pipeline, self.plan, self.rank, self.device = pipeline, plan, rank, device

    def steps(self, seed: int) -> Iterator[list[list[int]]]:
        """Endless: per optimizer step, this rank's micro-batches as row-index lists."""
        from torch.utils.data import DataLoader

        plan = self.plan
        generator = torch.Generator().manual_seed(seed)
        order = DataLoader(
            range(len(self.pipeline.train_rows)),
            batch_size=plan.global_batch,
            shuffle=True,
            generator=generator,
            drop_last=True,
            collate_fn=list,
        )
        lo = self.rank * plan.per_rank
        while True:
            for indices in order:
                mine = indices[lo : lo + plan.per_rank]
                yield [
                    mine[i * plan.micro_batch : (i + 1) * plan.micro_batch]
                    for i in range(plan.accumulation)
                ]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.pipeline.train_rows[i] for i in indices]
        return {k: v.to(self.device) for k, v in self.pipeline.collate(rows).items()}

    def init_batches(self, seed: int):
        """`ctx.init_batches` for data-informed inits: this rank's micro-batches of the
        first n global batches (the estimator all-reduces sums and counts over ranks), as
        `WeightedBatch`es weighted by their share of the global batch's loss terms x the
        micro-batches per global batch - so the estimators' average over micro-batches is
        the single-device average over whole batches, for token-level losses too.

        The random state is put back when the batches are used up: forward passes over
        different micro-batches draw different amounts of randomness (dropout masks of
        different shapes), and an init that draws after them (peft's LoRA-GA randomized SVD)
        would otherwise start from a different state on every rank.
        """
        import torch.distributed as tdist

        from methods.base import WeightedBatch

        world = tdist.get_world_size() if tdist.is_initialized() else 1

        def batches(n: int):
            saved = _rng_state()
            try:
                for step in itertools.islice(self.steps(seed), n):
                    micro = [WeightedBatch(self.collate(indices)) for indices in step]
                    terms = [float(self.pipeline.loss_terms(b)) for b in micro]
                    total = torch.tensor(sum(terms), dtype=torch.float64, device=self.device)
                    if world > 1:
                        tdist.all_reduce(total)  # every rank draws the same n global batches
                    if float(total) <= 0:
                        raise ValueError("an init batch has no loss terms (every label ignored)")
                    for batch, count in zip(micro, terms, strict=True):
                        batch.loss_weight = count * len(micro) * world / float(total)
                        yield batch
            finally:
                _set_rng_state(saved)

        return batches


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- worker side


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function; rank 0 returns the result row."""
    report_every = config.get("report_every") if config.get("live") else 0
    return rank_trial(TrialSpec(**config["spec"]), report_every)


def rank_trial(spec: TrialSpec, report_every: int | None = 0) -> dict[str, Any] | None:
    """One trial on this rank of the current Ray Train worker group (inside a Train loop);
    rank 0 returns the result row, the others None. `report_every` as `_run_rank`'s."""
    import ray.train

    from harness.sanity import SanityError
    from harness.train import Diverged

    rank = ray.train.get_context().get_world_rank()
    row = base_row(spec)
    try:
        _run_rank(spec, row, rank, report_every)
    except Diverged as err:  # the loss is all-reduced first: every rank raises together
        row.update(status=STATUS_DIVERGED, error=str(err))
    except SanityError as err:  # computed identically on every rank
        row.update(status=STATUS_FAILED, error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc(limit=20)
    # Anything else propagates: Ray Train tears the group down and retries (max_failures);
    # catching it on one rank could leave the others waiting in a collective.
    return row if rank == 0 else None


def _run_rank(
    spec: TrialSpec, row: dict[str, Any], rank: int, report_every: int | None = 0
) -> None:
    """`report_every`: live reports every N steps (None: the default interval; 0: none)."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as tdist

    from harness import memory, provenance, sanity
    from harness.deepspeed_config import (
        batch_plan,
        render,
        resolve_load_dtype,
        resolve_precision,
    )
    from harness.sharding import Shard
    from harness.train import SCHEDULES
    from harness.trial import (
        evaluate_into_row,
        load_data_and_model,
        planned_steps,
        prepare_method,
        seed_everything,
    )

    dist = spec.distributed
    assert dist is not None
    world = tdist.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)  # object collectives over NCCL use the current device
    torch.set_num_threads(max(1, int(dist.cpus_per_worker)))
    if not on_gpu:
        _no_shm_comm(deepspeed)
    row.update(provenance.hardware(device))
    seed_everything(spec.seed)
    budget = spec.budget
    plan = batch_plan(budget.batch_size, world, dist.micro_batch_size)
    precision = resolve_precision(dist, on_gpu)
    load_dtype = resolve_load_dtype(dist, on_gpu)
    torch_dtype = torch.bfloat16 if load_dtype == "bf16" else torch.float32

    task, splits, pipeline = load_data_and_model(spec, row, device, torch_dtype)
    model = pipeline.model
    if dist.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shares = RankShares(pipeline, plan, rank, device)

    # Method: prepared on the full (not yet partitioned) model on every rank.
    method, hp, model, probe = prepare_method(
        spec,
        pipeline,
        row,
        device,
        shares.init_batches(spec.seed + 1),
        dtype=torch_dtype,
        offload_statistics=dist.offloads_init_statistics,
    )
    digests = _all_gather_object(adapter_digest(model), world)
    if len(set(digests)) != 1:
        raise sanity.SanityError(
            f"sanity check: the ranks initialised different adapters (digests {digests}); "
            "ZeRO would assemble one model from their parts"
        )

    # DeepSpeed: ZeRO partitions the prepared model, wraps the method's optimizer.
    total_steps = planned_steps(budget, len(pipeline.train_rows))
    schedule = SCHEDULES[budget.schedule or "linear"]
    grad_transform = method.gradient_transform(hp)
    # With a gradient transform the harness clips, before it (as train_step does on one
    # device); DeepSpeed would clip inside step(), after it.
    deepspeed_clips = grad_transform is None
    ds_config = render(
        dist,
        global_batch=budget.batch_size,
        max_grad_norm=budget.max_grad_norm if deepspeed_clips else None,
        on_gpu=on_gpu,
    )
    optimizer = method.build_optimizer(model, spec.lr, hp, budget.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: schedule(opt, total_steps, budget.warmup_ratio),
    )
    pipeline.loaded.model = engine.module  # evaluators run the partitioned model
    # Each rank evaluates its share of the items; ZeRO-3 forwards are collective, so there
    # every rank also makes the same number of model calls (harness.sharding).
    pipeline.shard = Shard(rank, world, synced=dist.zero_stage == 3)

    restored = _restore(engine)
    restored_step = restored["step"] if restored else None
    state = restored or {"step": 0, "losses": [], "curve": [], "eval_curve": [],
                         "train_time": 0.0, "tokens": 0}  # fmt: skip
    callbacks = sanity.CheckedCallbacks(method.callbacks(hp, total_steps), probe, torch_dtype)
    if restored_step:  # e.g. SDS-LoRA: which form the restored adapter is in
        callbacks.on_restore(restored_step, engine.module)
    access = ZeroParamAccess(engine, dist.zero_stage)
    on_boundary = None
    if grad_transform is not None:
        on_boundary = ClipAndTransform(engine.module, access, grad_transform, budget.max_grad_norm)
    result = _train(
        engine, shares, spec, state, total_steps, pipeline, task, callbacks, access, on_boundary,
        report_every=report_every,
    )
    row["sanity_callbacks"] = callbacks.summary()
    # Callbacks may rewrite replicated buffers (SDS-LoRA's bases): every rank must agree.
    buffer_digests = _all_gather_object(_state_digest(dict(engine.module.named_buffers())), world)
    if len(set(buffer_digests)) != 1:
        raise sanity.SanityError(
            f"sanity check: the ranks hold different module buffers after training "
            f"(digests {buffer_digests})"
        )
    peak, kind = memory.peak_mb(device)
    row["peak_memory_mb"] = _all_reduce_max(peak, device)
    row["peak_memory_kind"] = f"{kind} (max over {world} ranks)"
    samples = total_steps * plan.global_batch
    row.update(
        steps=total_steps,
        train_time_s=result["train_time"],
        samples_per_s=samples / result["train_time"],
        tokens_per_s=result["tokens"] / result["train_time"],
        final_train_loss=result["final_loss"],
        loss_curve=json.dumps(result["curve"]),
        eval_curve=json.dumps(result["eval_curve"]),
    )

    # Every rank evaluates its shard; results are gathered, so rank 0's row has them all.
    evaluate_into_row(task, splits, pipeline, row)

    adapter = None
    if dist.save_adapter:  # gathers the trainable parameters only (all of them for full FT)
        adapter = gathered_trainable_state(engine, rank)
        _report_adapter(engine.module, adapter, spec, rank)
    row["sanity_merge"] = _merge_check(engine, method, probe, dist.zero_stage, precision)
    row["distributed"] = json.dumps(
        {
            "world_size": world,
            "zero_stage": dist.zero_stage,
            "precision": precision,
            "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation,
            "global_batch": plan.global_batch,
            "offload_optimizer": dist.offload_optimizer,
            "offload_params": dist.offload_params,
            "gradient_checkpointing": dist.gradient_checkpointing,
            "grad_clipping": "deepspeed" if deepspeed_clips else "harness, before the transform",
            "schedule": budget.schedule or "linear",
            "init_digests": digests,
            "init_identical": len(set(digests)) == 1,
            "load_dtype": load_dtype,
            "eval_sharded_over": world,
            "buffer_digests": buffer_digests,
            "callback_events": [list(e) for e in callbacks.events],
            "adapter_digest": _state_digest(adapter) if adapter else None,
            "restored_from_step": restored_step,
            "train_run": train_run_name(spec),
            "deepspeed": deepspeed.__version__,
            "deepspeed_config": ds_config,
        },
        sort_keys=True,
        default=str,
    )


def _train(
    engine,
    shares,
    spec,
    state,
    total_steps,
    pipeline,
    task,
    callbacks=(),
    access=None,
    on_boundary=None,
    report_every: int | None = 0,
) -> dict[str, Any]:
    """Optimizer steps from `state["step"] + 1`; DeepSpeed accumulates (and clips, unless
    `on_boundary` does). The method's callbacks run after each optimizer step, through
    `access` (ZeroParamAccess). The losses follow harness.train's `LossHistory`, as on one
    device. Every rank calls the live reports (`ray.train.report` is collective); rank 0's
    reach Tune (harness.tracking's fields, as on one device)."""
    import ray.train
    import torch.distributed as tdist

    from harness.tracking import FINAL, STEP, report_interval
    from harness.train import LossHistory

    interval = report_interval(report_every, total_steps) if report_every != 0 else 0

    def report(metrics: dict[str, Any]) -> None:
        ray.train.report({**metrics, STEP: metrics["step"], FINAL: False})

    dist = spec.distributed
    history = LossHistory(total_steps, state["losses"], state["curve"])
    eval_curve = state["eval_curve"]
    train_time, tokens = state["train_time"], state["tokens"]
    steps = shares.steps(spec.seed)
    for _ in range(state["step"]):  # a restored run skips the global batches already seen
        next(steps)
    fail_at = int(os.environ.get(FAIL_ONCE_ENV) or 0) if not state.get("restored") else 0
    engine.train()
    for step in range(state["step"] + 1, total_steps + 1):
        micro = [shares.collate(indices) for indices in next(steps)]
        started = time.perf_counter()
        loss_value = global_batch_step(engine, micro, pipeline.loss_terms, on_boundary)
        step_tokens = torch.zeros((), device=engine.device, dtype=torch.float64)
        for batch in micro:
            if "attention_mask" in batch:
                step_tokens += batch["attention_mask"].sum()
        tdist.all_reduce(step_tokens)
        for cb in callbacks:
            cb.on_step_end(step, engine.module, engine.optimizer, access)
        train_time += time.perf_counter() - started
        if step == fail_at:
            raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")
        history.record(step, loss_value)  # the loss is all-reduced: every rank agrees
        tokens += int(step_tokens)
        if interval and step % interval == 0:
            norm = engine.get_global_grad_norm()
            report({"step": step, "train_loss": loss_value, "lr": float(engine.get_lr()[0]),
                    **({"grad_norm": float(norm)} if norm is not None else {})})  # fmt: skip
        if spec.eval.every_steps and step % spec.eval.every_steps == 0 and step < total_steps:
            eval_curve.append((step, pipeline.evaluate("selection")[task.selection_metric]))
            engine.train()
            if interval:
                report({"step": step, "selection_score": eval_curve[-1][1]})
        if dist.checkpoint_every_steps and step % dist.checkpoint_every_steps == 0:
            if step < total_steps:
                state.update(step=step, losses=history.losses, curve=history.curve,
                             eval_curve=eval_curve, train_time=train_time,
                             tokens=tokens)  # fmt: skip
                _save_checkpoint(engine, state, {"step": step, "loss": loss_value})
    return {"losses": history.losses, "curve": history.curve, "final_loss": history.final_loss,
            "eval_curve": eval_curve, "train_time": train_time, "tokens": tokens}  # fmt: skip


def global_batch_step(engine, micro: list, loss_terms, on_boundary=None) -> float:
    """One optimizer step over this rank's micro-batches of the global batch; returns the
    global batch's loss, identical on every rank.

    The gradient is the single-device one, the mean over all loss terms (examples, or a
    causal LM's labelled tokens) of the global batch: DeepSpeed averages the micro-batch
    losses over accumulation steps and ranks, so each micro-batch's mean is weighted by its
    share of the terms (x micro-batches x ranks). A plain average of micro-batch means would
    over-weight the tokens of micro-batches with short answers.
    """
    import torch.distributed as tdist

    world = tdist.get_world_size()
    terms = [float(loss_terms(batch)) for batch in micro]
    total = torch.tensor(sum(terms), device=engine.device, dtype=torch.float64)
    tdist.all_reduce(total)
    if float(total) <= 0:
        raise ValueError("the global batch has no loss terms (every label is ignored)")
    weighted = torch.zeros((), device=engine.device, dtype=torch.float64)
    for batch, count in zip(micro, terms, strict=True):
        share = count * len(micro) * world / float(total)
        loss = micro_step(engine, batch, on_boundary, weight=share)
        weighted += loss.detach().double() * count
    tdist.all_reduce(weighted)
    return float(weighted / total)


def micro_step(
    engine, batch: dict[str, torch.Tensor], on_boundary=None, weight: float = 1.0
) -> torch.Tensor:
    """One micro-batch through the engine, its loss scaled by `weight` for the backward.
    Once the step's gradients are complete (reduced over ranks and micro-batches),
    `on_boundary(engine.step)` takes the boundary step (`ClipAndTransform`); otherwise
    `engine.step()` only counts the micro-batch, or at the boundary clips (DeepSpeed's own)
    and steps. Returns the unscaled loss."""
    loss = engine(**batch).loss
    engine.backward(loss * weight if weight != 1.0 else loss)
    if on_boundary is not None and engine.is_gradient_accumulation_boundary():
        on_boundary(engine.step)
    else:
        engine.step()
    return loss


class ClipAndTransform:
    """harness.train's `boundary_step` at ZeRO's accumulation boundary: clip the full
    gradients of the trainable parameters by their global norm, apply the method's gradient
    transform, then `update` (`engine.step()`) - the single-device step's code and order.
    Reads and writes go through ZeroParamAccess (collective), so the transform sees whole
    matrices although the optimizer holds flat partitions."""

    def __init__(self, module, access, transform, max_grad_norm: float | None) -> None:
        named = trainable_parameters(module)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.access = access
        self.transform = transform
        self.max_grad_norm = max_grad_norm

    def __call__(self, update: Callable[[], None]) -> None:
        from harness.train import boundary_step

        boundary_step(
            self.params, self.access, update, max_grad_norm=self.max_grad_norm,
            transform=self.transform, names=self.names,
        )  # fmt: skip


class ZeroParamAccess:
    """methods.base.ParamAccess under DeepSpeed ZeRO-2/3 (every rank calls it alike).

    ZeRO keeps the parameters' fp32 masters in the optimizer's flat partitions, and under
    ZeRO-3 the module's own parameters are partitioned too. `read` assembles the full fp32
    master (collective); `write` sets the master partition and the module parameter (ZeRO-2:
    each rank's full replica; ZeRO-3: gathered, rewritten on rank 0, re-partitioned on exit);
    `reset_optimizer_state` zeroes every state tensor in place (AdamW: moments and step, i.e.
    a fresh optimizer; in place so DeepSpeed's views into the state stay valid).
    """

    def __init__(self, engine, zero_stage: int) -> None:
        self.engine = engine
        self.zero_stage = zero_stage

    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is None:
            raise ValueError("parameter is not managed by the ZeRO optimizer (frozen?)")
        return value.reshape(self.shape(param))

    @torch.no_grad()
    def write(self, updates: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for param, value in updates:
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's slice (see _zero3_slice)
                safe_set_local_fp32_param(param, _zero3_slice(param, value))
            else:
                safe_set_full_fp32_param(param, value.to(torch.float32))
            # Read back: a master copy the optimizer does not see would be lost at its next
            # step (and the rewrite silently undone).
            stored = self.read(param)
            if not torch.equal(
                stored, value.to(stored.device, torch.float32).reshape(stored.shape)
            ):
                raise RuntimeError("ZeRO fp32 master copy did not take the new parameter value")
        params = [param for param, _ in updates]
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=0)
            if self.zero_stage == 3
            else _nullcontext()
        )
        with gather:
            for param, value in updates:
                param.data.copy_(value.reshape(param.shape).to(param.dtype))

    def read_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full gradient of this step (between the boundary backward and step())."""
        from deepspeed.utils import safe_get_full_grad

        value = safe_get_full_grad(param)
        if value is None:
            raise ValueError("parameter has no gradient in the ZeRO optimizer (frozen?)")
        return value.reshape(self.shape(param))

    def write_grad(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set the full gradient; each rank keeps its partition for the optimizer step."""
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        if hasattr(param, "ds_tensor"):
            safe_set_local_grad(param, _zero3_slice(param, value))
        else:
            safe_set_full_grad(param, value)

    def reset_optimizer_state(self) -> None:
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = 0

    def shape(self, param: torch.nn.Parameter) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)


def _zero3_slice(param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full fp32 value, zero-padded at the end.

    DeepSpeed's own full setters (`safe_set_full_fp32_param` / `_grad`) slice without the
    padding, so they fail for a parameter whose size does not divide by the world size (a
    1-element bias on 2 ranks); setting the local partition ourselves avoids that."""
    import torch.distributed as tdist

    size = param.ds_tensor.numel()
    rank = tdist.get_rank(group=getattr(param, "ds_process_group", None))
    flat = value.detach().flatten().to(torch.float32)
    part = flat[rank * size : (rank + 1) * size]
    return torch.cat([part, part.new_zeros(size - part.numel())])


# ---------------------------------------------------------------- checkpoints and adapters


def _save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """A DeepSpeed checkpoint of the trainable state (frozen base weights excluded), every
    rank's shard uploaded by Ray Train into one checkpoint folder of the run."""
    import ray.train

    client = {k: state[k] for k in CLIENT_STATE}
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state=client, exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine) -> dict[str, Any] | None:
    """Resume from the run's latest DeepSpeed checkpoint (a Train or Tune restart, or a rerun
    of the sweep): trainable weights, optimizer and scheduler state, step, loss history."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / "ds").is_dir():
            return None  # the final adapter of a finished run: train again from the start
        _, client = engine.load_checkpoint(
            folder, tag="ds", load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )  # fmt: skip
    # DeepSpeed hands back its own metadata with the client state; keep only ours.
    return {k: client[k] for k in CLIENT_STATE if k in (client or {})} | {"restored": True}


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gathered_trainable_state(engine, rank: int) -> dict[str, torch.Tensor]:
    """The trainable parameters (adapter + head) in full on rank 0, gathering only them -
    never the frozen base weights (ZeRO-3); {} on the other ranks."""
    import deepspeed

    named = trainable_parameters(engine.module)
    params = [p for _, p in named]
    partitioned = any(hasattr(p, "ds_id") for p in params)
    state: dict[str, torch.Tensor] = {}
    context = deepspeed.zero.GatheredParameters(params) if partitioned else _nullcontext()
    with context:
        if rank == 0:
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    return state


def _report_adapter(module, state: dict[str, torch.Tensor], spec: TrialSpec, rank: int) -> None:
    """Rank 0 writes the adapter (peft layout when the model is a peft model) and Ray Train
    uploads it to the run's storage; the other ranks join the report empty-handed."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            if hasattr(module, "peft_config") and hasattr(module, "save_pretrained"):
                module.save_pretrained(folder, state_dict=state, safe_serialization=True)
            else:
                save_file({k: v.contiguous() for k, v in state.items()},
                          str(folder / "trainable_params.safetensors"))  # fmt: skip
            (folder / "harness_trial.json").write_text(
                json.dumps(
                    {"key": spec.key(), "method": spec.method, "model_id": spec.model_id,
                     "model_revision": spec.model_revision, "overrides": spec.method_overrides,
                     "lr": spec.lr, "seed": spec.seed, "task": spec.task},
                    indent=2, sort_keys=True, default=str,
                )
            )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"adapter": rank == 0}, checkpoint=checkpoint)


def _live_callbacks(live: bool) -> list[Any]:
    """Ray's TuneReportCallback forwards rank 0's `ray.train.report` metrics to the Tune
    trial (live tracking); it exists only inside a Tune trial."""
    if not live:
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _copy_adapter(checkpoint, folder: Path) -> dict[str, Any]:
    """The adapter Ray Train stored, copied beside the single-device trials' adapters
    (harness.adapters layout: `adapter/` + `harness_adapter.json`; no probe file and no
    stock-base conversion on this path yet)."""
    import shutil

    from harness.adapters import FORMAT_PEFT, META_FILE, folder_bytes

    if folder.exists():
        shutil.rmtree(folder)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.to_directory(tmp)
        shutil.copytree(Path(tmp) / "adapter", folder / "adapter")
    adapter = folder / "adapter"
    meta = json.loads((adapter / "harness_trial.json").read_text())
    peft_format = (adapter / "adapter_config.json").is_file()
    meta |= {
        "format": FORMAT_PEFT if peft_format else "trainable parameters (safetensors)",
        "applies_to": "adapter/: the base model as the method's init left it",
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return {"adapter_path": str(folder), "adapter_bytes": folder_bytes(adapter)}


def _merge_check(engine, method, probe, zero_stage: int, precision: str) -> str:
    """Merged == unmerged outputs, as in harness.trial, where it is meaningful.

    The check's tolerance is for fp32; with bf16 weights the merge itself rounds. Under
    ZeRO-3 it gathers the whole model on every rank (GatheredParameters) for the merge.
    """
    from harness import sanity
    from methods.base import Method

    if type(method).merge is Method.merge:
        return "not mergeable"
    if precision != "fp32":
        return f"not checked: {precision} weights (the merge check needs fp32)"
    module = engine.module
    unmerged = sanity.outputs(module, probe)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            merged = _without_zero_hooks(module, lambda: _merged_outputs(method, module, probe))
    else:
        merged = _merged_outputs(method, module, probe)
    if merged is None:
        return "not mergeable"
    return sanity.check_merge(unmerged, merged)


def _merged_outputs(method, module, probe) -> torch.Tensor | None:
    """Merges in place: the trial's last use of the model (evaluated and saved before)."""
    from harness import sanity

    merged = method.merge(module)
    return None if merged is None else sanity.outputs(merged, probe)


def _without_zero_hooks(module, fn):
    """Run `fn` on a ZeRO-3 module whose parameters are gathered, with the ZeRO forward
    hooks removed (they would release the gathered parameters after each module) and
    restored after."""
    saved = []
    for sub in module.modules():
        saved.append((sub, dict(sub._forward_pre_hooks), dict(sub._forward_hooks)))
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()
    try:
        return fn()
    finally:
        for sub, pre, post in saved:
            sub._forward_pre_hooks.update(pre)
            sub._forward_hooks.update(post)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- small collectives


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus every adapter tensor (`lora_` params and buffers)."""
    tensors = {n: p for n, p in module.named_parameters() if p.requires_grad or "lora_" in n}
    tensors |= {n: b for n, b in module.named_buffers() if "lora_" in n}
    return tensors


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_digest(module: torch.nn.Module) -> str:
    """Bitwise digest of the adapter tensors: equal digests = identical initialisations."""
    return _state_digest(adapter_tensors(module))


def _all_gather_object(value: Any, world: int) -> list[Any]:
    import torch.distributed as tdist

    gathered: list[Any] = [None] * world
    tdist.all_gather_object(gathered, value)
    return gathered


def _all_reduce_max(value: float, device) -> float:
    import torch.distributed as tdist

    tensor = torch.tensor(float(value), device=device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return float(tensor)


def _no_shm_comm(deepspeed) -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op on first use (minutes of
    g++ per fresh machine); gloo alone is enough for the CPU path (tests, CI)."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: the package's `torch` attribute is
    # the torch module itself, which that statement would return (and patch).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None
