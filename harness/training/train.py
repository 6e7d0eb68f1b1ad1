"""The training step and the one training loop, and batched evaluation, shared by trials
and the benchmark.

What one optimizer step is lives here once, for one device and under DeepSpeed ZeRO alike:
the boundary step (`boundary_step`: clip the step's full gradients, apply the method's
gradient transform, then the optimizer and LR-schedule step, through a `GradientAccess`),
the rules the losses are reported by (`LossHistory`: divergence, the loss curve, the final
loss), and the loop (`train_loop`) over a `Stepper`. What is distributed (micro-batches
through the DeepSpeed engine, all-reduced losses, ZeRO's parameter access, checkpoints) is
harness.deepspeed.engine's `EngineStepper`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.sweeps.progress import progress_bar
from methods.base import GradientTransform, ParamAccess


class Diverged(RuntimeError):
    """The loss became NaN/inf or exploded; the run is recorded as diverged, never averaged in."""


# A loss above EXPLODE_FACTOR x max(1, the first step's loss) has exploded. The first loss
# is computed before any update, so an explosion early in training cannot raise its own
# reference; the factor is far outside small-batch noise, so a healthy run never trips it.
EXPLODE_FACTOR = 10.0


def check_divergence(step: int, loss: float, losses: list[float]) -> None:
    """Raise Diverged for a non-finite or exploded loss (`losses` = earlier steps' losses)."""
    if not math.isfinite(loss):
        raise Diverged(f"loss is {loss} at step {step}")
    if losses and loss > EXPLODE_FACTOR * max(1.0, losses[0]):
        raise Diverged(
            f"loss exploded to {loss:.4g} at step {step} (> {EXPLODE_FACTOR:g} x max(1, "
            f"initial loss {losses[0]:.4g}))"
        )


@dataclass
class LossHistory:
    """A run's training losses, step by step, and the rules both loops report them by.

    `record` raises Diverged (`check_divergence`), else keeps the loss; every `curve_every`
    steps, and at the last, the loss curve gets the mean of the latest `curve_every` losses;
    `final_loss` is the mean over the last 10% of steps (at least 1). A restored run
    (harness.deepspeed) passes its checkpoint's lists, extended in place."""

    total_steps: int
    losses: list[float] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def curve_every(self) -> int:
        return max(1, self.total_steps // 50)

    def record(self, step: int, loss: float) -> None:
        check_divergence(step, loss, self.losses)
        self.losses.append(loss)
        if step % self.curve_every == 0 or step == self.total_steps:
            self.curve.append((step, _mean(self.losses[-self.curve_every :])))

    @property
    def final_loss(self) -> float:
        return _mean(self.losses[-max(1, len(self.losses) // 10) :])


def _mean(values: list[float]) -> float:
    # Left to right in float64. One device's float32 losses sum exactly while they span
    # less than ~5 orders of magnitude, so any summation order gives the same mean; the ZeRO
    # loop's float64 losses (all-reduced quotients) round, so the order is part of the value.
    return sum(values) / len(values)


def planned_steps(budget, train_rows: int) -> int:
    """Optimizer steps of a trial: `max_steps`, else `epochs` x full batches per epoch (the
    loaders drop an epoch's incomplete last batch, on one device and distributed alike)."""
    if train_rows < budget.batch_size:
        raise ValueError(f"{train_rows} train rows cannot fill one batch of {budget.batch_size}")
    if budget.max_steps:
        return budget.max_steps
    return math.ceil(budget.epochs * (train_rows // budget.batch_size))


class GradientAccess(Protocol):
    """How the boundary step reaches the trainable parameters and their gradients, as full
    tensors: the tensors themselves on one device (`LocalGradients`); under ZeRO, assembled
    from and scattered back to the optimizer's partitions (harness.deepspeed.zero_access's
    ZeroParamAccess, whose every call is collective)."""

    def read(self, param: nn.Parameter) -> torch.Tensor:
        """The full parameter value."""
        ...

    def read_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The full gradient of this step (after the backward, before the optimizer step)."""
        ...

    def write_grad(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Make `value` the gradient the optimizer steps with."""
        ...


class LocalGradients:
    """GradientAccess on one device: `read_grad` is `.grad` itself, so clipping scales it in
    place and only the gradients the transform replaced are copied back."""

    def read(self, param: nn.Parameter) -> torch.Tensor:
        return param.detach()

    def read_grad(self, param: nn.Parameter) -> torch.Tensor:
        return param.grad

    def write_grad(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if value is not param.grad:
            param.grad.copy_(value)


class _BareGradient:
    """A gradient as torch's clipping helpers take it: they scale the `.grad` of what they
    are given, and ZeRO's assembled gradients belong to no parameter."""

    __slots__ = ("grad",)

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad


@torch.no_grad()
def clip_then_transform(
    params: Sequence[nn.Parameter],
    access: GradientAccess,
    max_grad_norm: float | None,
    transform: GradientTransform | None = None,
    names: Sequence[str] | None = None,
    measure_norm: bool = False,
) -> torch.Tensor | None:
    """Clip the step's full gradients of `params` to `max_grad_norm` by their global norm
    (torch's `clip_grad_norm_`: its norm, formula and kernels), then run the method's
    `transform` on the clipped gradients, keyed by `names`, and write back every gradient
    through `access`. Returns the global norm before clipping when it clips or
    `measure_norm` asks for it, else None."""
    grads = [access.read_grad(p) for p in params]
    norm = None
    if max_grad_norm is not None or measure_norm:
        norm = torch.nn.utils.get_total_norm(grads)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([_BareGradient(g) for g in grads], max_grad_norm, norm)
    if transform is not None:
        if names is None:
            raise ValueError("a gradient transform needs the parameters' names")
        rewritten = transform(
            {name: access.read(p) for name, p in zip(names, params, strict=True)},
            dict(zip(names, grads, strict=True)),
        )
        grads = [rewritten.get(name, grad) for name, grad in zip(names, grads, strict=True)]
    for param, grad in zip(params, grads, strict=True):
        access.write_grad(param, grad)
    return norm


def boundary_step(
    params: Sequence[nn.Parameter],
    access: GradientAccess,
    update: Callable[[], None],
    *,
    max_grad_norm: float | None,
    transform: GradientTransform | None = None,
    names: Sequence[str] | None = None,
    measure_norm: bool = False,
) -> torch.Tensor | None:
    """The step once a batch's gradients are complete: clip, then the method's transform
    (`clip_then_transform`), then `update()` - the optimizer step and the LR schedule's
    (DeepSpeed's `engine.step()` under ZeRO). Clipping before the transform is the methods'
    order (LoRA-One preconditions clipped gradients). With nothing to clip, transform or
    measure, no gradient is read (under ZeRO a read is a collective). Returns the norm as
    `clip_then_transform` does."""
    norm = None
    if max_grad_norm is not None or transform is not None or measure_norm:
        norm = clip_then_transform(params, access, max_grad_norm, transform, names, measure_norm)
    update()
    return norm


def parameter_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """The names `model` gives `params` (a gradient transform finds LoRA pairs by name)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_grad_norm: float | None,
    grad_transform: GradientTransform | None = None,
    stats: dict[str, float] | None = None,
) -> float:
    """One optimizer step; returns the loss. The benchmark times exactly this function.

    Forward and backward of the one batch, then `boundary_step` over the optimizer's
    parameters: the step harness.deepspeed takes at ZeRO's accumulation boundary. With
    `stats`, it also records the gradient norm before clipping (`grad_norm`) and the first
    param group's LR of this step (`lr`); only asked on reporting steps (`.item()` syncs a
    GPU)."""
    loss = model(**batch).loss
    loss.backward()
    # The optimizer's order (LoRA+ groups): the order the global norm sums the gradients in.
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if stats is not None:
        stats["lr"] = float(optimizer.param_groups[0]["lr"])

    def update() -> None:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    norm = boundary_step(
        params,
        LocalGradients(),
        update,
        max_grad_norm=max_grad_norm,
        transform=grad_transform,
        # Named only for a transform: naming walks every module, on every step.
        names=parameter_names(model, params) if grad_transform is not None else None,
        measure_norm=stats is not None,
    )
    if stats is not None:
        stats["grad_norm"] = float(norm)
    return loss.item()


def apply_gradient_transform(model: nn.Module, grad_transform: GradientTransform) -> None:
    """Run the transform on the trainable parameters' gradients; write back what it returns."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    clip_then_transform(
        [p for _, p in named], LocalGradients(), None, grad_transform, [n for n, _ in named]
    )


def linear_warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up as `linear_warmup_decay`, then cosine decay to 0 at `total_steps`."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


SCHEDULES = {"linear": linear_warmup_decay, "cosine": cosine_warmup}


def cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; each pass reshuffles with the loader's own seeded generator, and a
    dataset with `set_epoch` (augmented images) draws fresh, seeded augmentations."""
    epoch = 0
    while True:
        if hasattr(getattr(loader, "dataset", None), "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


@dataclass
class TrainResult:
    steps: int
    train_time_s: float  # optimizer steps only, evaluation excluded
    samples: int
    tokens: int
    final_loss: float  # mean over the last 10% of steps (at least 1)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TrainState:
    """Where a run stands after `step` optimizer steps: what a checkpoint carries besides
    the weights, optimizer and schedule (harness.deepspeed.checkpoint), so a restored run
    continues its losses, curves, time and counts in place."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    train_time: float = 0.0
    tokens: int = 0
    samples: int = 0
    restored: bool = False


Batch = dict[str, torch.Tensor]


class Stepper(Protocol):
    """What the one training loop (`train_loop`) needs of a backend: one optimizer step over
    this process's micro-batches of a batch, and what the method's callbacks are handed.
    `LocalStepper` on one device; harness.deepspeed.engine's `EngineStepper` under ZeRO."""

    module: nn.Module  # the model the callbacks (and evaluators) see
    optimizer: torch.optim.Optimizer
    access: ParamAccess | None  # None: the callbacks' own local access

    def step(self, micro: list[Batch], stats: dict[str, float] | None) -> float:
        """One optimizer step (and LR-schedule step); returns the whole batch's loss, the
        same on every rank. With `stats`, also fills in `lr` and `grad_norm`."""
        ...

    def count(self, micro: list[Batch]) -> tuple[int, int]:
        """(examples, attention-mask tokens) of the whole batch, over all ranks."""
        ...

    def train_mode(self) -> None: ...

    def end_of_step(self, step: int, state: TrainState, loss: float) -> None:
        """After a step is recorded in `state` (under ZeRO: checkpoints)."""
        ...


class LocalStepper:
    """Stepper on one device: one micro-batch per step, `train_step` on it."""

    access = None

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        max_grad_norm: float | None,
        grad_transform: GradientTransform | None = None,
    ) -> None:
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.grad_transform = max_grad_norm, grad_transform

    def step(self, micro: list[Batch], stats: dict[str, float] | None) -> float:
        (batch,) = micro
        return train_step(self.module, batch, self.optimizer, self.scheduler,
                          self.max_grad_norm, self.grad_transform, stats)  # fmt: skip

    def count(self, micro: list[Batch]) -> tuple[int, int]:
        (batch,) = micro
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        return int(batch["labels"].shape[0]), tokens

    def train_mode(self) -> None:
        self.module.train()

    def end_of_step(self, step: int, state: TrainState, loss: float) -> None:
        pass


def local_steps(loader, device: torch.device | str) -> Iterator[list[Batch]]:
    """Endless single-micro-batch steps from `loader` (`cycle`), on `device`."""
    for batch in cycle(loader):
        yield [{k: v.to(device) for k, v in batch.items()}]


def train_loop(
    stepper: Stepper,
    steps: Iterator[list[Batch]],
    total_steps: int,
    *,
    state: TrainState | None = None,
    callbacks: Sequence = (),
    evaluate_every: int | None = None,
    evaluate: Callable[[], float] | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    on_report: Callable[[dict[str, float]], None] | None = None,
    report_every: int | None = None,
) -> TrainResult:
    """The one training loop, on one device and under ZeRO alike: optimizer steps from
    `state.step + 1` (a restored run's `steps` resume after the batches it has seen), the
    method's callbacks after each, the losses by `LossHistory`'s rules, intermediate
    selection scores every `evaluate_every` steps. `on_report` (live tracking) gets
    {step, train_loss, lr, grad_norm} every `report_every` steps and {step, selection_score}
    after each intermediate evaluation; reporting and evaluation are outside the timed
    step."""
    state = state if state is not None else TrainState()
    history = LossHistory(total_steps, state.losses, state.curve)
    stepper.train_mode()
    for step in range(state.step + 1, total_steps + 1):
        micro = next(steps)
        reporting = on_report is not None and bool(report_every) and step % report_every == 0
        stats: dict[str, float] | None = {} if reporting else None
        started = time.perf_counter()
        loss = stepper.step(micro, stats)
        for cb in callbacks:
            if stepper.access is None:  # on one device a callback finds its own access
                cb.on_step_end(step, stepper.module, stepper.optimizer)
            else:
                cb.on_step_end(step, stepper.module, stepper.optimizer, stepper.access)
        state.train_time += time.perf_counter() - started
        history.record(step, loss)  # every rank has the same loss: all raise together
        examples, tokens = stepper.count(micro)
        state.step = step
        state.samples += examples
        state.tokens += tokens
        if stats is not None:
            on_report({"step": step, "train_loss": loss, **stats})
        if evaluate and evaluate_every and step % evaluate_every == 0 and step < total_steps:
            state.eval_curve.append((step, evaluate()))
            stepper.train_mode()
            if on_report is not None:
                on_report({"step": step, "selection_score": state.eval_curve[-1][1]})
        stepper.end_of_step(step, state, loss)
        if on_progress:
            on_progress(step, loss)
    return TrainResult(
        steps=total_steps,
        train_time_s=state.train_time,
        samples=state.samples,
        tokens=state.tokens,
        final_loss=history.final_loss,
        loss_curve=history.curve,
        eval_curve=state.eval_curve,
    )


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    total_steps: int,
    *,
    warmup_ratio: float,
    max_grad_norm: float | None,
    schedule: str = "linear",
    callbacks: Sequence = (),
    grad_transform: GradientTransform | None = None,
    evaluate_every: int | None = None,
    evaluate: Callable[[], float] | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    device: torch.device | str = "cpu",
    on_report: Callable[[dict[str, float]], None] | None = None,
    report_every: int | None = None,
) -> TrainResult:
    """`train_loop` on one device over `loader` (the benchmark's and the tests' entry; a
    trial reaches the same loop through harness.training.backend's LocalBackend)."""
    scheduler = SCHEDULES[schedule](optimizer, total_steps, warmup_ratio)
    return train_loop(
        LocalStepper(model, optimizer, scheduler, max_grad_norm, grad_transform),
        local_steps(loader, device),
        total_steps,
        callbacks=callbacks,
        evaluate_every=evaluate_every,
        evaluate=evaluate,
        on_progress=on_progress,
        on_report=on_report,
        report_every=report_every,
    )


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> np.ndarray:
    """Logits for every example, in loader order (the loader must not shuffle)."""
    model.eval()
    outputs = []
    for batch in progress_bar(loader, total=len(loader), desc="evaluate"):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        outputs.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(outputs, axis=0)
