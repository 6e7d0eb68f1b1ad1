"""The training loop and batched evaluation, shared by trials and the benchmark."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.progress import progress_bar
from methods.base import GradientTransform


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


def planned_steps(budget, train_rows: int) -> int:
    """Optimizer steps of a trial: `max_steps`, else `epochs` x full batches per epoch (the
    loaders drop an epoch's incomplete last batch, on one device and distributed alike)."""
    if train_rows < budget.batch_size:
        raise ValueError(f"{train_rows} train rows cannot fill one batch of {budget.batch_size}")
    if budget.max_steps:
        return budget.max_steps
    return math.ceil(budget.epochs * (train_rows // budget.batch_size))


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

    Order: backward, clip, the method's gradient transform (LoRA-One's preconditioners),
    optimizer step - the order harness.distributed reproduces under ZeRO. With `stats`, it
    also records the gradient norm before clipping (`grad_norm`) and the first param
    group's LR of this step (`lr`); only asked on reporting steps (`.item()` syncs a GPU)."""
    loss = model(**batch).loss
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    elif stats is not None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if stats is not None:
        stats["grad_norm"] = float(norm)
        stats["lr"] = float(optimizer.param_groups[0]["lr"])
    if grad_transform is not None:
        apply_gradient_transform(model, grad_transform)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def apply_gradient_transform(model: nn.Module, grad_transform: GradientTransform) -> None:
    """Run the transform on the trainable parameters' gradients; write back what it returns."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    rewritten = grad_transform(
        {n: p.detach() for n, p in named.items()}, {n: p.grad for n, p in named.items()}
    )
    for name, grad in rewritten.items():
        named[name].grad.copy_(grad)


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


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    total_steps: int,
    *,
    warmup_ratio: float,
    max_grad_norm: float | None,
    schedule: str = "linear",
    callbacks: list = (),
    grad_transform: GradientTransform | None = None,
    evaluate_every: int | None = None,
    evaluate: Callable[[], float] | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    device: torch.device | str = "cpu",
    on_report: Callable[[dict[str, float]], None] | None = None,
    report_every: int | None = None,
) -> TrainResult:
    """`on_report` (live tracking) gets {step, train_loss, lr, grad_norm} every
    `report_every` steps and {step, selection_score} after each intermediate evaluation;
    reporting is outside the timed step."""
    scheduler = SCHEDULES[schedule](optimizer, total_steps, warmup_ratio)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    eval_curve: list[tuple[int, float]] = []
    samples = tokens = 0
    train_time = 0.0
    batches = cycle(loader)
    model.train()
    for step in range(1, total_steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        reporting = on_report is not None and bool(report_every) and step % report_every == 0
        stats: dict[str, float] | None = {} if reporting else None
        started = time.perf_counter()
        loss = train_step(
            model, batch, optimizer, scheduler, max_grad_norm, grad_transform, stats
        )
        for cb in callbacks:
            cb.on_step_end(step, model, optimizer)
        train_time += time.perf_counter() - started
        check_divergence(step, loss, losses)
        losses.append(loss)
        samples += int(batch["labels"].shape[0])
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        if step % max(1, total_steps // 50) == 0 or step == total_steps:
            curve.append((step, float(np.mean(losses[-max(1, total_steps // 50) :]))))
        if stats is not None:
            on_report({"step": step, "train_loss": loss, **stats})
        if evaluate and evaluate_every and step % evaluate_every == 0 and step < total_steps:
            eval_curve.append((step, evaluate()))
            model.train()
            if on_report is not None:
                on_report({"step": step, "selection_score": eval_curve[-1][1]})
        if on_progress:
            on_progress(step, loss)
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainResult(
        steps=total_steps,
        train_time_s=train_time,
        samples=samples,
        tokens=tokens,
        final_loss=float(np.mean(tail)),
        loss_curve=curve,
        eval_curve=eval_curve,
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
