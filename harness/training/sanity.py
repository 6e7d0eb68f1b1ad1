"""Checks every trial runs on a fixed probe batch; a failed check fails the run loudly.

- init: a method that promises to start at the base function (LoRA's B = 0, PiSSA's
  residual, LoRA-GA's offset) must reproduce the base model's outputs; one that starts
  elsewhere on purpose (LoRA-One, LoRA-SB, CG-LoRA without shift) must actually move them.
- merge: after training, a mergeable adapter folded into plain weights computes the same
  outputs as the unmerged model.
The trainable-parameter count is checked against the method's formula in `harness.training.trial`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from methods.base import TrainCallback


class SanityError(AssertionError):
    """A method broke one of its promises; the run is recorded as failed."""


@torch.no_grad()
def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.detach().float().clone()
    finally:
        model.train(was_training)


# Relative tolerance by weight dtype. fp32 round-off through a deep network grows with the
# output scale; 1e-4 is far above it and far below any real change of function. With bf16
# weights (8 significant bits) an init that rewrites the base weights (PiSSA's residual,
# LoRA-GA's offset) rounds each of them by up to 2^-9 relative: 5e-2 leaves room for that
# through a deep network and still catches an init that moves the function by O(1).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _tolerance(reference: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    return RELATIVE_TOLERANCE[dtype] * (1.0 + float(reference.abs().max()))


def check_init(
    base: torch.Tensor,
    prepared: torch.Tensor,
    starts_at_base: bool,
    dtype: torch.dtype = torch.float32,
) -> str:
    """A one-line record of the init check; raises SanityError when it fails. `dtype`: the
    base weights' dtype, which sets the tolerance."""
    gap = float((prepared - base).abs().max())
    tol = _tolerance(base, dtype)
    if starts_at_base and gap > tol:
        raise SanityError(
            f"sanity check: the method promises to start at the base function, but its "
            f"outputs differ by {gap:.3g} (tolerance {tol:.3g})"
        )
    if not starts_at_base and gap == 0.0:
        raise SanityError(
            "sanity check: the method's init should move the model off the base function, "
            "but the outputs are bit-identical (was the init applied?)"
        )
    kind = "identity" if starts_at_base else "offset"
    return f"{kind}: max|delta output|={gap:.3g} (tol {tol:.3g})"


def check_merge(unmerged: torch.Tensor, merged: torch.Tensor) -> str:
    gap = float((merged - unmerged).abs().max())
    tol = _tolerance(unmerged)
    if gap > tol:
        raise SanityError(
            f"sanity check: merged weights compute different outputs, max difference "
            f"{gap:.3g} (tolerance {tol:.3g})"
        )
    return f"merged == unmerged: max|delta output|={gap:.3g} (tol {tol:.3g})"


class CheckedCallbacks(TrainCallback):
    """Wraps a method's training callbacks (`methods.base.TrainCallback`s): at a step where
    a callback promises to keep the model's function (`preserves_function(step)`, e.g.
    SDS-LoRA's reparameterisation after warm-up), the probe outputs before and after it must
    agree (tolerance by dtype). `records` holds one line per check, for the row's
    `sanity_callbacks`."""

    def __init__(
        self,
        callbacks: Iterable[TrainCallback],
        probe: dict[str, torch.Tensor],
        dtype=torch.float32,
    ):
        self.callbacks = list(callbacks)
        self.probe = probe
        self.dtype = dtype
        self.records: list[str] = []

    def __iter__(self):  # the training loops take a list of callbacks: this is one
        return iter([self])

    @property
    def events(self) -> list[tuple[int, str]]:
        return [e for cb in self.callbacks for e in cb.events]

    def on_restore(self, step: int, model: nn.Module) -> None:
        for cb in self.callbacks:
            cb.on_restore(step, model)

    def on_step_end(self, step: int, model: nn.Module, optimizer, access=None) -> None:
        for cb in self.callbacks:
            before = outputs(model, self.probe) if cb.preserves_function(step) else None
            cb.on_step_end(step, model, optimizer, access)
            if before is None:
                continue
            gap = float((outputs(model, self.probe) - before).abs().max())
            tol = _tolerance(before, self.dtype)
            name = type(cb).__name__
            if gap > tol:
                raise SanityError(
                    f"sanity check: {name} promises to keep the model's function at step "
                    f"{step}, but its outputs moved by {gap:.3g} (tolerance {tol:.3g})"
                )
            self.records.append(
                f"{name} step {step}: function kept, max|delta output|={gap:.3g} (tol {tol:.3g})"
            )

    def summary(self) -> str:
        return "; ".join(self.records) if self.records else "none"
