"""LoRA-One (Zhang et al. 2025, arXiv 2502.01235): spectral init from one full-gradient step.

G = mean gradient over `init_examples` = 8 single-example batches (official
YuanheZ/LoRA-One conf/init/gradient.yaml: bsz 1 x iters 8, fp32; `init_batches` = whole
trial batches instead); scaling s = alpha/sqrt(r) (`use_rslora`, every official command sets
peft.use_rslora=True); svd_r(-G) = U_r S_r V_r^T (exact; the official code uses
torch.svd_lowrank(q = 512, niter = 16), `svd_niter` gives a randomized one);
B0 = U_r S_r^(1/2) / sqrt(S_1), A0 = S_r^(1/2) V_r^T / sqrt(S_1) (S_1 the top singular
value), then "stable" scaling divides both by sqrt(gamma)
(official default 128). By default no weight offset:
training starts at W0 + s B0 A0 = W0 - s/(gamma S_1) svd_r(G), a spectral approximation of
one gradient step (`weight_shift: true` subtracts s B0 A0 from W0 instead, LoRA-GA style).
B0 and A0 are balanced (B0^T B0 = A0 A0^T).

Optimizer: the official training uses AdamW (our default, `optimizer: adamw`). The paper's
algorithm preconditions B's gradient by (A A^T + lambda I)^-1 and A's by
(B^T B + lambda I)^-1; `precond_sgd` (the paper's algorithm) and `precond_adamw` apply these
r x r damped preconditioners (damping = `precond_damping`, default 1e-6 = the official
conf/model/llama.yaml `prec_reg`; peft's Riemannian optimizer defaults to 1e-2) to the
clipped gradients before an SGD / AdamW step - what peft's Riemannian optimizer does inside
its `step()` (tested equal to it), but as a gradient transform on full tensors, so the same
code also runs under ZeRO, whose optimizer only sees flat partitions of A and B.
The result is a plain peft LoRA adapter: it saves, loads and merges as one.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import get_peft_model
from pydantic import Field

from methods.base import GradientTransform
from methods.grad_estimator import InitSampleHyperparams, init_sample, layer_gradients
from methods.lora_sb import truncated_svd
from methods.peft_lora import (
    LoraHyperparams,
    PeftLoraMethod,
    check_rank_fits,
    matching_linear_layers,
)
from methods.registry import register_method


class LoraOneHyperparams(LoraHyperparams, InitSampleHyperparams):
    use_rslora: bool = Field(
        True, description="s = alpha/sqrt(r), as every official command; else alpha/r"
    )
    stable_gamma: float = Field(128.0, gt=0, description="stable scaling gamma (official 128)")
    optimizer: Literal["adamw", "precond_sgd", "precond_adamw"] = "adamw"
    precond_damping: float = Field(
        1e-6, gt=0, description="lambda in (X + lambda I)^-1 (official prec_reg 1e-6)"
    )
    svd_niter: int | None = Field(None, gt=0, description="randomized SVD iters; None = exact")
    weight_shift: bool = Field(
        False, description="W0 <- W0 - s B0 A0 so training starts at the base function"
    )


def lora_one_factors(grad: torch.Tensor, rank: int, gamma: float, niter: int | None = None):
    """(B0, A0) from the mean gradient G, as the paper and the official code define them."""
    u, s, vh = truncated_svd(-grad, rank, niter)
    root = torch.sqrt(s / s[0])  # S_r^(1/2) / sqrt(S_1)
    scale = gamma**-0.5
    return u * root * scale, root[:, None] * vh * scale


@register_method("lora_one")
class LoraOne(PeftLoraMethod):
    description = "LoRA-One: spectral init from the one-step full gradient, no offset"
    hyperparams_cls = LoraOneHyperparams
    needs_init_batches = True

    def init_batches_wanted(self, hp, ctx=None):
        return hp.trial_batches_wanted(ctx.batch_size if ctx is not None else None)

    def extra_lora_kwargs(self, hp: LoraOneHyperparams):
        return {"use_rslora": hp.use_rslora}

    def prepare(self, model, hp: LoraOneHyperparams, ctx):
        if ctx.init_batches is None:
            raise ValueError("lora_one needs training batches for its one-step gradient")
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        check_rank_fits(layers, hp.rank)
        sample = init_sample(ctx.init_batches, hp.init_examples, hp.init_batches)
        grads = layer_gradients(model, layers, sample, offload=ctx.offload_statistics)
        factors = {
            name: lora_one_factors(grads.pop_mean(name), hp.rank, hp.stable_gamma, hp.svd_niter)
            for name in grads
        }
        model = get_peft_model(model, self.lora_config(hp, ctx))
        with torch.no_grad():
            for name, (b0, a0) in factors.items():
                layer = model.base_model.model.get_submodule(name)
                layer.lora_B["default"].weight.copy_(b0)
                layer.lora_A["default"].weight.copy_(a0)
                if hp.weight_shift:
                    weight = layer.base_layer.weight
                    weight -= (layer.scaling["default"] * b0 @ a0).to(weight.dtype)
        return model

    def starts_at_base(self, hp: LoraOneHyperparams) -> bool:
        return hp.weight_shift  # by default training starts one spectral step away

    def build_optimizer(self, model, lr, hp: LoraOneHyperparams, weight_decay=0.0):
        if hp.optimizer != "precond_sgd":  # precond_adamw: AdamW after the preconditioner
            return super().build_optimizer(model, lr, hp, weight_decay)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    def gradient_transform(self, hp: LoraOneHyperparams) -> GradientTransform | None:
        if hp.optimizer == "adamw":
            return None
        return riemannian_preconditioner(hp.precond_damping)


def riemannian_preconditioner(damping: float) -> GradientTransform:
    """For every LoRA pair: g_A <- (B^T B + damping I)^-1 g_A, g_B <- g_B (A A^T + damping I)^-1.

    Pairs are found by name (`.lora_A.` / `.lora_B.`), as peft's Riemannian optimizer finds
    them; other trainables (the task head) keep their gradients. Computed in at least fp32,
    with pinv as peft does (robust when a factor is near rank-deficient).
    """

    def damped_inverse(gram: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        return torch.linalg.pinv(gram + damping * eye)

    def transform(params, grads) -> dict[str, torch.Tensor]:
        rewritten: dict[str, torch.Tensor] = {}
        for name_a, param_a in params.items():
            name_b = name_a.replace(".lora_A.", ".lora_B.")
            if ".lora_A." not in name_a or name_b not in params or param_a.ndim != 2:
                continue
            dtype = torch.promote_types(param_a.dtype, torch.float32)
            a, b = param_a.to(dtype), params[name_b].to(dtype)
            if name_a in grads:
                grad = grads[name_a]
                rewritten[name_a] = (damped_inverse(b.T @ b) @ grad.to(dtype)).to(grad.dtype)
            if name_b in grads:
                grad = grads[name_b]
                rewritten[name_b] = (grad.to(dtype) @ damped_inverse(a @ a.T)).to(grad.dtype)
        return rewritten

    return transform
