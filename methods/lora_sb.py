"""LoRA-SB (Ponkshe et al. 2024, arXiv 2411.19557): LoRA-XS initialised from a simulated
first full fine-tuning step.

dW_avg = -eta * sign(sum_i dL_i/dW) over round(1/1000 x train rows) examples, one per
forward/backward (the paper's 1/1000; the official arithmetic/commonsense scripts: 50 of 50K,
170 of 170K; its GLUE script: 2, `init_examples: 2`). AdamW's first step is the gradient sign;
eta = lr / (warmup_ratio x total steps), the official CERT-Lab/lora-sb `eff_lr` (the linear
warm-up's per-step increment, our first step's LR up to rounding the warm-up step count), or
the peak LR with `init_eta_rule: peak` or when the trial has no warm-up step (never above
it). GLUE encoders
(bert, roberta, xlm-roberta, deberta-v2) adapt the official targets: query, value,
attention.output.dense, output.dense (`family_target_modules`);
svd_r(dW_avg) = U_r S_r V_r^T; B = U_r, A = V_r^T (frozen, orthonormal), R = S_r / s (the
only trainable part, r x r). No offset: training starts at W0 + s B R A, i.e. after the
simulated first step. With orthonormal B and A the scaling s is immaterial (paper Thm 5),
so s = 1 by default. Gradient sums are all-reduced across ranks before the sign.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from methods.base import Hyperparams, PrepareContext
from methods.grad_estimator import LayerGradients, example_batches, layer_gradients
from methods.lora_xs import OFFICIAL_TARGETS, LoraXSLinear
from methods.plugin_adapter import PluginAdapterMethod
from methods.registry import register_method


class LoraSbHyperparams(Hyperparams):
    rank: int = Field(16, gt=0, description="r; R is r x r (paper GLUE: 8/16/24)")
    scaling: float = Field(1.0, gt=0, description="s; immaterial with orthonormal B, A")
    init_fraction: float = Field(
        0.001, gt=0, le=1, description="fraction of the train set the gradient sum sees"
    )
    init_unit: Literal["examples", "batches"] = Field(
        "examples",
        description="examples: round(fraction x train rows) examples (paper; official "
        "arithmetic/CR scripts); batches: ceil(fraction x rows / batch) whole batches",
    )
    init_examples: int | None = Field(
        None, gt=0, description="override: exact number of init examples (official GLUE: 2)"
    )
    init_batches: int | None = Field(
        None, gt=0, description="override: exact number of whole init batches"
    )
    init_eta: float | None = Field(
        None, gt=0, description="step size of the simulated first step (None = by init_eta_rule)"
    )
    init_eta_rule: Literal["warmup_increment", "peak"] = Field(
        "warmup_increment",
        description="warmup_increment: lr / (warmup_ratio x total steps), the official eff_lr "
        "(peak LR when the trial has no warm-up); peak: the training LR",
    )
    svd_niter: int | None = Field(
        None, gt=0, description="randomized SVD iterations; None = exact SVD"
    )
    target_modules: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_override(self):
        if self.init_examples is not None and self.init_batches is not None:
            raise ValueError("set at most one of init_examples and init_batches")
        return self


def truncated_svd(matrix: torch.Tensor, rank: int, niter: int | None):
    """(U_r, S_r, V_r^T): exact, or torch.svd_lowrank with q = 2r when niter is set."""
    if niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=min(2 * rank, *matrix.shape), niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


@register_method("lora_sb")
class LoraSb(PluginAdapterMethod):
    description = "LoRA-SB: W0 + s B R A, only r x r R trains; init from the sign of 1st step"
    hyperparams_cls = LoraSbHyperparams
    needs_init_batches = True
    layer_cls = LoraXSLinear  # LoRA-XS's adapter (and its folder format, LORA_XS)
    official_targets = OFFICIAL_TARGETS

    def scaling(self, hp: LoraSbHyperparams) -> float:
        return hp.scaling

    def init_examples_used(self, hp: LoraSbHyperparams, ctx: PrepareContext | None) -> int | None:
        """Examples the gradient sum sees (None: whole batches, `init_unit: batches`)."""
        if hp.init_batches is not None:
            return None
        if hp.init_examples is not None:
            return hp.init_examples
        if hp.init_unit == "batches":
            return None
        if ctx is None or not ctx.train_examples:
            return 1
        return max(1, round(hp.init_fraction * ctx.train_examples))

    def init_batches_wanted(self, hp: LoraSbHyperparams, ctx: PrepareContext | None = None) -> int:
        batch_size = (ctx.batch_size if ctx is not None else None) or 1
        examples = self.init_examples_used(hp, ctx)
        if examples is not None:
            return -(-examples // batch_size)
        if hp.init_batches:
            return hp.init_batches
        if ctx is None or not ctx.train_examples or not ctx.batch_size:
            return 1
        return max(1, math.ceil(hp.init_fraction * ctx.train_examples / ctx.batch_size))

    def eta(self, hp: LoraSbHyperparams, ctx: PrepareContext) -> float | None:
        """Step size of the simulated first AdamW step."""
        if hp.init_eta is not None:
            return hp.init_eta
        lr = ctx.learning_rate
        if lr is None or hp.init_eta_rule == "peak":
            return lr
        warmup = (ctx.warmup_ratio or 0.0) * (ctx.total_steps or 0)
        if round(warmup) >= 1:  # official eff_lr: lr / (warmup_ratio x total steps)
            return min(lr, lr / warmup)
        return lr  # no warm-up step (harness.training.train rounds ratio x T): the peak LR

    def initial_values(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        hp: LoraSbHyperparams,
        ctx: PrepareContext,
    ) -> tuple[LayerGradients, float]:
        """The gradient sums of the simulated first step, and its step size."""
        if ctx.init_batches is None:
            raise ValueError("lora_sb needs training batches for its first-step estimate")
        eta = self.eta(hp, ctx)
        if eta is None:
            raise ValueError("lora_sb needs init_eta or the training learning rate")
        examples = self.init_examples_used(hp, ctx)
        sample = (
            example_batches(ctx.init_batches(examples), examples)
            if examples is not None
            else ctx.init_batches(self.init_batches_wanted(hp, ctx))
        )
        return layer_gradients(model, layers, sample, offload=ctx.offload_statistics), eta

    def initialize(
        self,
        wrapped: dict[str, LoraXSLinear],
        values: tuple[LayerGradients, float],
        hp: LoraSbHyperparams,
        ctx: PrepareContext,
    ) -> None:
        grads, eta = values
        for name in grads:
            update = -eta * torch.sign(grads.pop_sum(name))  # simulated first AdamW step
            u, s, vh = truncated_svd(update, hp.rank, hp.svd_niter)
            layer = wrapped[name]
            layer.lora_B.copy_(u)
            layer.lora_A.copy_(vh)
            layer.lora_R.copy_(torch.diag(s) / hp.scaling)

    def starts_at_base(self, hp: LoraSbHyperparams) -> bool:
        return False  # it starts after the simulated first step

    def resolved_config(self, hp: LoraSbHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        return {
            **super().resolved_config(hp, ctx),
            "init_batches_used": self.init_batches_wanted(hp, ctx),
            "init_examples_used": self.init_examples_used(hp, ctx),
            "init_eta_used": self.eta(hp, ctx),
        }
