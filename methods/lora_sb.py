"""LoRA-SB (Ponkshe et al. 2024, arXiv 2411.19557): LoRA-XS initialised from a simulated
first full fine-tuning step.

dW_avg = -eta * sign(sum_i dL_i/dW) over ~1/1000 of the training set (AdamW's first step is
the gradient sign; eta = the training LR, as the official CERT-Lab/lora-sb code does);
svd_r(dW_avg) = U_r S_r V_r^T; B = U_r, A = V_r^T (frozen, orthonormal), R = S_r / s (the
only trainable part, r x r). No offset: training starts at W0 + s B R A, i.e. after the
simulated first step. With orthonormal B and A the scaling s is immaterial (paper Thm 5),
so s = 1 by default. Gradient sums are all-reduced across ranks before the sign.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from methods.base import Hyperparams, Method, PrepareContext
from methods.grad_estimator import layer_gradients
from methods.lora_xs import inject, merge_and_unload
from methods.peft_lora import check_rank_fits, head_param_count, matching_linear_layers
from methods.registry import register_method


class LoraSbHyperparams(Hyperparams):
    rank: int = Field(16, gt=0, description="r; R is r x r (paper GLUE: 8/16/24)")
    scaling: float = Field(1.0, gt=0, description="s; immaterial with orthonormal B, A")
    init_fraction: float = Field(
        0.001, gt=0, le=1, description="fraction of the train set the gradient sum sees"
    )
    init_batches: int | None = Field(
        None, gt=0, description="override: exact number of init batches (else from fraction)"
    )
    init_eta: float | None = Field(
        None, gt=0, description="step size of the simulated first step (None = training LR)"
    )
    svd_niter: int | None = Field(
        None, gt=0, description="randomized SVD iterations; None = exact SVD"
    )
    target_modules: list[str] | None = Field(None, min_length=1)


def truncated_svd(matrix: torch.Tensor, rank: int, niter: int | None):
    """(U_r, S_r, V_r^T): exact, or torch.svd_lowrank with q = 2r when niter is set."""
    if niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=min(2 * rank, *matrix.shape), niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


@register_method("lora_sb")
class LoraSb(Method):
    description = "LoRA-SB: W0 + s B R A, only r x r R trains; init from the sign of 1st step"
    hyperparams_cls = LoraSbHyperparams
    needs_init_batches = True

    def targets(self, hp: LoraSbHyperparams, ctx: PrepareContext) -> list[str]:
        return list(hp.target_modules or ctx.default_target_modules)

    def init_batches_wanted(self, hp: LoraSbHyperparams, ctx: PrepareContext | None = None) -> int:
        if hp.init_batches:
            return hp.init_batches
        if ctx is None or not ctx.train_examples or not ctx.batch_size:
            return 1
        return max(1, math.ceil(hp.init_fraction * ctx.train_examples / ctx.batch_size))

    def prepare(self, model, hp: LoraSbHyperparams, ctx: PrepareContext):
        if ctx.init_batches is None:
            raise ValueError("lora_sb needs training batches for its first-step estimate")
        eta = hp.init_eta or ctx.learning_rate
        if eta is None:
            raise ValueError("lora_sb needs init_eta or the training learning rate")
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        check_rank_fits(layers, hp.rank)
        grads = layer_gradients(
            model,
            layers,
            ctx.init_batches(self.init_batches_wanted(hp, ctx)),
            offload=ctx.offload_statistics,
        )
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = inject(model, list(layers), hp.rank, hp.scaling)
        with torch.no_grad():
            for name in grads:
                update = -eta * torch.sign(grads.pop_sum(name))  # simulated first AdamW step
                u, s, vh = truncated_svd(update, hp.rank, hp.svd_niter)
                layer = wrapped[name]
                layer.lora_B.copy_(u)
                layer.lora_A.copy_(vh)
                layer.lora_R.copy_(torch.diag(s) / hp.scaling)
        for head in ctx.head_modules:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)
        return model

    def starts_at_base(self, hp: LoraSbHyperparams) -> bool:
        return False  # it starts after the simulated first step

    def merge(self, model):
        return merge_and_unload(model)

    def expected_trainable_params(self, base_model, hp: LoraSbHyperparams, ctx: PrepareContext):
        layers = matching_linear_layers(base_model, self.targets(hp, ctx), ctx.head_modules)
        return len(layers) * hp.rank**2 + head_param_count(base_model, ctx.head_modules)

    def resolved_config(self, hp: LoraSbHyperparams, ctx: PrepareContext):
        return {
            **hp.model_dump(),
            "target_modules": self.targets(hp, ctx),
            "init_batches_used": self.init_batches_wanted(hp, ctx),
            "init_eta_used": hp.init_eta or ctx.learning_rate,
        }
