"""The DeepSpeed backend: one rank of a ZeRO-2/3 trial (harness.training.backend's `Backend`), and
its optimizer step over this rank's micro-batches (harness.training.train's `Stepper`).

- init: the model is loaded (bf16 when training in bf16: `load_dtype`) and the method
  prepared on every rank *before* DeepSpeed partitions it, so methods read base weights as
  on one device (gradient accumulators optionally in host memory:
  `offload_init_statistics`); data-informed inits see this rank's share of the init
  batches (harness.deepspeed.rank_data) and the shared estimator all-reduces the gradient
  sums and counts, so every rank computes the same initialisation (the row records a
  bitwise digest of the adapter per rank, and differing digests fail the trial);
- training: `deepspeed.initialize` with the rendered ZeRO-2/3 config around the prepared
  model and the method's own optimizer (LoRA+ param groups kept); each micro-batch's loss
  is weighted by its share of the global batch's loss terms, so the gradient and the logged
  loss are the whole batch's mean as on one device (`global_batch_step`); a method's
  gradient transform (LoRA-One's preconditioners) runs at the accumulation boundary on the
  assembled full gradients, after the harness clips them (`ClipAndTransform`: the
  single-device order; DeepSpeed's own clipping is then off, as it clips inside `step()`,
  after any transform);
- evaluation: sharded over the ranks (harness.heads.sharding; equal numbers of model calls under
  ZeRO-3, whose forwards are collective), gathered in order; rank 0 reports.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from harness.deepspeed import checkpoint
from harness.deepspeed.collectives import (
    adapter_digest,
    all_gather_object,
    all_reduce_max,
    state_digest,
)
from harness.deepspeed.config import render, resolve_load_dtype, resolve_precision
from harness.deepspeed.rank_data import RankShares
from harness.deepspeed.storage import train_run_name
from harness.deepspeed.zero_access import ZeroParamAccess, merged_outputs, trainable_parameters
from harness.heads.sharding import Shard
from harness.spec.identity import TrialSpec
from harness.sweeps.tracking import FINAL, STEP, report_interval
from harness.training import memory, sanity
from harness.training.batching import batch_plan
from harness.training.train import SCHEDULES, Batch, TrainState, boundary_step
from methods.base import GradientTransform, Method


class DeepSpeedBackend:
    """One rank of the current Ray Train worker group (every rank calls each hook alike).

    What it learns along the way (digests, the rendered config, the restored step) goes
    into the row's `distributed` record (`record`)."""

    probes_forgetting = False  # the forgetting probe is not run on a partitioned model

    def __init__(self, spec: TrialSpec, rank: int, report_every: int | None = 0) -> None:
        """`report_every`: live reports every N steps (None: the default interval; 0: none)."""
        import ray.train.torch
        import torch.distributed as tdist

        assert spec.distributed is not None
        self.spec, self.rank, self.report_every = spec, rank, report_every
        self.dist = spec.distributed
        self.world_size = tdist.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type == "cuda"
        self.plan = batch_plan(spec.budget.batch_size, self.world_size, self.dist.micro_batch_size)
        self.precision = resolve_precision(self.dist, self.on_gpu)
        self.load_dtype = resolve_load_dtype(self.dist, self.on_gpu)
        self.weights_dtype = torch.bfloat16 if self.load_dtype == "bf16" else torch.float32
        self.checks_dtype = self.weights_dtype  # DeepSpeed's own bf16, no autocast
        self.offload_init_statistics = self.dist.offloads_init_statistics
        self.shares: RankShares | None = None
        self.engine = None
        self.saver: checkpoint.RankAdapterSaver | None = None
        self.facts: dict[str, Any] = {}  # for `record`

    def compute(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def start(self) -> None:
        import deepspeed

        if self.on_gpu:
            torch.cuda.set_device(self.device)  # object collectives over NCCL use it
        torch.set_num_threads(max(1, int(self.dist.cpus_per_worker)))
        if not self.on_gpu:
            disable_shm_comm(deepspeed)

    def adapt_model(self, model: nn.Module) -> None:
        if self.dist.gradient_checkpointing and getattr(
            model, "supports_gradient_checkpointing", False
        ):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def init_batches(self, pipeline):
        self.shares = RankShares(pipeline, self.plan, self.rank, self.device)
        return self.shares.init_batches(self.spec.seed + 1)

    def check_init(self, model: nn.Module) -> None:
        digests = all_gather_object(adapter_digest(model), self.world_size)
        self.facts["init_digests"] = digests
        if len(set(digests)) != 1:
            raise sanity.SanityError(
                f"sanity check: the ranks initialised different adapters (digests {digests}); "
                "ZeRO would assemble one model from their parts"
            )

    def adapter_saver(self) -> checkpoint.RankAdapterSaver | None:
        if self.dist.save_adapter:  # gathers the trainable parameters only
            self.saver = checkpoint.RankAdapterSaver(self.rank)
        return self.saver

    def wrap(
        self,
        pipeline,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_transform: GradientTransform | None,
        total_steps: int,
    ) -> EngineStepper:
        """ZeRO partitions the prepared model and wraps the method's optimizer."""
        import deepspeed

        budget = self.spec.budget
        schedule = SCHEDULES[budget.schedule or "linear"]
        # With a gradient transform the harness clips, before it (as train_step does on one
        # device); DeepSpeed would clip inside step(), after it.
        self.facts["deepspeed_clips"] = deepspeed_clips = grad_transform is None
        self.facts["deepspeed_config"] = ds_config = render(
            self.dist,
            global_batch=budget.batch_size,
            max_grad_norm=budget.max_grad_norm if deepspeed_clips else None,
            on_gpu=self.on_gpu,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: schedule(opt, total_steps, budget.warmup_ratio),
        )
        self.engine = engine
        access = ZeroParamAccess(engine, self.dist.zero_stage)
        on_boundary = None
        if grad_transform is not None:
            on_boundary = ClipAndTransform(engine.module, access, grad_transform,
                                           budget.max_grad_norm)  # fmt: skip
        return EngineStepper(engine, access, on_boundary, pipeline.loss_terms, self.plan,
                             self.dist.checkpoint_every_steps, total_steps)  # fmt: skip

    def eval_shard(self) -> Shard:
        # ZeRO-3 forwards are collective: there every rank also makes the same number of
        # model calls (harness.heads.sharding).
        return Shard(self.rank, self.world_size, synced=self.dist.zero_stage == 3)

    def restore(self) -> TrainState:
        state = checkpoint.restore(self.engine, self.plan.global_batch)
        self.facts["restored_from_step"] = state.step if state is not None else None
        return state if state is not None else TrainState()

    def training_batches(self, pipeline, state: TrainState) -> Iterator[list[Batch]]:
        assert self.shares is not None
        steps = self.shares.steps(self.spec.seed)
        for _ in range(state.step):  # a restored run skips the global batches already seen
            next(steps)
        return ([self.shares.collate(indices) for indices in step] for step in steps)

    def live_reporting(self, total_steps: int):
        """Every rank reports (`ray.train.report` is collective); rank 0's reach Tune
        (harness.sweeps.tracking's fields, as on one device)."""
        import ray.train

        if self.report_every == 0:
            return None, None

        def report(metrics: dict[str, Any]) -> None:
            ray.train.report({**metrics, STEP: metrics["step"], FINAL: False})

        return report, report_interval(self.report_every, total_steps)

    def check_after_training(self, model: nn.Module) -> None:
        # Callbacks may rewrite replicated buffers (SDS-LoRA's bases): every rank must agree.
        digests = all_gather_object(state_digest(dict(model.named_buffers())), self.world_size)
        self.facts["buffer_digests"] = digests
        if len(set(digests)) != 1:
            raise sanity.SanityError(
                f"sanity check: the ranks hold different module buffers after training "
                f"(digests {digests})"
            )

    def peak_memory(self) -> tuple[float, str]:
        peak, kind = memory.peak_mb(self.device)
        return all_reduce_max(peak, self.device), f"{kind} (max over {self.world_size} ranks)"

    def merge_check(self, method: Method, model: nn.Module, probe: Batch,
                    unmerged: torch.Tensor) -> str:  # fmt: skip
        """As on one device, where it is meaningful: the check's tolerance is for fp32, and
        with bf16 weights the merge itself rounds."""
        if type(method).merge is Method.merge:
            return "not mergeable"
        if self.precision != "fp32":
            return f"not checked: {self.precision} weights (the merge check needs fp32)"
        merged = merged_outputs(method, model, probe, self.dist.zero_stage)
        if merged is None:
            return "not mergeable"
        return sanity.check_merge(unmerged, merged)

    def record(self, row: dict[str, Any], callbacks: sanity.CheckedCallbacks) -> None:
        import deepspeed

        dist, plan, facts = self.dist, self.plan, self.facts
        digests = facts["init_digests"]
        row["distributed"] = json.dumps(
            {
                "world_size": self.world_size,
                "zero_stage": dist.zero_stage,
                "precision": self.precision,
                "micro_batch": plan.micro_batch,
                "accumulation": plan.accumulation,
                "global_batch": plan.global_batch,
                "offload_optimizer": dist.offload_optimizer,
                "offload_params": dist.offload_params,
                "gradient_checkpointing": dist.gradient_checkpointing,
                "grad_clipping": "deepspeed" if facts["deepspeed_clips"]
                else "harness, before the transform",
                "schedule": self.spec.budget.schedule or "linear",
                "init_digests": digests,
                "init_identical": len(set(digests)) == 1,
                "load_dtype": self.load_dtype,
                "eval_sharded_over": self.world_size,
                "buffer_digests": facts["buffer_digests"],
                "callback_events": [list(e) for e in callbacks.events],
                "adapter_digest": self.saver.digest if self.saver is not None else None,
                "restored_from_step": facts["restored_from_step"],
                "train_run": train_run_name(self.spec),
                "deepspeed": deepspeed.__version__,
                "deepspeed_config": facts["deepspeed_config"],
            },
            sort_keys=True,
            default=str,
        )


class EngineStepper:
    """harness.training.train's Stepper on a DeepSpeed engine: one optimizer step over this rank's
    micro-batches (`global_batch_step`), the callbacks' access through ZeroParamAccess, and
    checkpoints every `checkpoint_every` steps (not at the last)."""

    def __init__(self, engine, access: ZeroParamAccess, on_boundary, loss_terms, plan,
                 checkpoint_every: int | None, total_steps: int) -> None:  # fmt: skip
        self.engine, self.access, self.on_boundary = engine, access, on_boundary
        self.module, self.optimizer = engine.module, engine.optimizer
        self.loss_terms, self.plan = loss_terms, plan
        self.checkpoint_every, self.total_steps = checkpoint_every, total_steps

    def step(self, micro: list[Batch], stats: dict[str, float] | None) -> float:
        loss = global_batch_step(self.engine, micro, self.loss_terms, self.on_boundary)
        if stats is not None:
            stats["lr"] = float(self.engine.get_lr()[0])
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                stats["grad_norm"] = float(norm)
        return loss

    def count(self, micro: list[Batch]) -> tuple[int, int]:
        import torch.distributed as tdist

        tokens = torch.zeros((), device=self.engine.device, dtype=torch.float64)
        for batch in micro:
            if "attention_mask" in batch:
                tokens += batch["attention_mask"].sum()
        tdist.all_reduce(tokens)
        return self.plan.global_batch, int(tokens)

    def train_mode(self) -> None:
        self.engine.train()

    def end_of_step(self, step: int, state: TrainState, loss: float) -> None:
        if step == checkpoint.fail_once_step(state):
            raise RuntimeError(f"injected failure at step {step} ({checkpoint.FAIL_ONCE_ENV})")
        every = self.checkpoint_every
        if every and step % every == 0 and step < self.total_steps:
            checkpoint.save_checkpoint(self.engine, state, {"step": step, "loss": loss})


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
    """harness.training.train's `boundary_step` at ZeRO's accumulation boundary: clip the full
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
        boundary_step(
            self.params, self.access, update, max_grad_norm=self.max_grad_norm,
            transform=self.transform, names=self.names,
        )  # fmt: skip


def disable_shm_comm(deepspeed) -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op on first use (minutes of
    g++ per fresh machine); gloo alone is enough for the CPU path (tests, CI)."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: the package's `torch` attribute is
    # the torch module itself, which that statement would return (and patch).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None
