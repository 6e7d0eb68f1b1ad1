"""LoRA-GA (Wang et al. 2024): adapters from the SVD of the estimated full gradient.

G = mean gradient of the target weights (the shared estimator, methods/grad_estimator.py, in
place of peft's `preprocess_loraga`: float32, layer-wise, all-reduced across ranks), by default
over 8 single-example batches (official Outsider565/LoRA-GA conf/init/gradient.yaml: bsz 1 x
iters 8). svd(G) = U S V^T with torch.svd_lowrank(G, q = min(4r, m, n), niter = 4), as both
codes do (`svd_niter: null` = exact SVD). Direction ArB2r: A0 = V[:, :r]^T, B0 = U[:, r:2r].
W0 <- W0 - s B0 A0, so training starts at the base function. ArB2r pairs singular vectors of
different indices, so B0 A0 depends on their signs, which an SVD leaves free: a one-ulp change
of G (another summation order, e.g. 2 ranks instead of 1) can flip them under svd_lowrank and
move the loss curve by several % (tests/test_distributed_methods.py measures it). This is the
official method's property, kept. Two conventions for the scale:

- `convention: "official"` (default; Outsider565/LoRA-GA peft/src/peft/tuners/lora/layer.py
  `lora_ga_init`, reproduce/run_exp.py): no singular values in B0; the "stable" factor
  zeta = m^(1/4)/sqrt(gamma) (m = out features) multiplies B0 *and* A0, so
  s B0 A0 = s zeta^2 U[:, r:2r] V[:, :r]^T. Implemented here on a plain peft LoRA adapter.
  With rsLoRA scaling (`use_rslora`, default True: the official README's "peft.use_rslora=True").
- `convention: "peft"` (peft 0.21 `lora_ga_init`): B0 = U[:, r:2r] diag(S[r:2r]) * zeta and A0
  unscaled, so ||s B0 A0|| is ||G||-sized: on small models 4e-7 to 3e-2 of the official one.
  The committed results up to 2026-07 used this, with alpha/r scaling and 8 whole batches
  (`methods/presets.py` "peft-legacy").
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import LoraGAConfig, get_peft_model
from pydantic import Field

from methods.grad_estimator import InitSampleHyperparams, init_sample, layer_gradients
from methods.peft_lora import (
    LoraHyperparams,
    PeftLoraMethod,
    check_rank_fits,
    matching_linear_layers,
)
from methods.registry import register_method

B_CONVENTION = "peft-0.21: B0 = U[:, r:2r] diag(S[r:2r]) * m^(1/4)/sqrt(gamma); A0 = V[:, :r]^T"
OFFICIAL_CONVENTION = (
    "official (Outsider565/LoRA-GA): B0 = U[:, r:2r] * m^(1/4)/sqrt(gamma); "
    "A0 = V[:, :r]^T * m^(1/4)/sqrt(gamma)"
)


class LoraGaHyperparams(LoraHyperparams, InitSampleHyperparams):
    convention: Literal["official", "peft"] = Field(
        "official", description="official: no S in B0, stable factor on B0 and A0; peft: 0.21"
    )
    use_rslora: bool = Field(True, description="s = alpha/sqrt(r) (official runs); else alpha/r")
    stable_gamma: float = Field(16.0, gt=0, description="stable-scaling gamma (official 16)")
    direction: str = Field("ArB2r", pattern="^(ArBr|A2rBr|ArB2r)$")
    svd_niter: int | None = Field(
        4, gt=0, description="official convention: svd_lowrank iterations (q = 4r); None = exact"
    )


def svd_for_lora_ga(grad: torch.Tensor, rank: int, niter: int | None):
    """(U, S, V^T) of G: the official torch.svd_lowrank(q = min(4r, m, n), niter), or exact."""
    if niter is None:
        return torch.linalg.svd(grad, full_matrices=False)
    u, s, v = torch.svd_lowrank(grad, q=min(4 * rank, *grad.shape), niter=niter)
    return u, s, v.T


def lora_ga_factors(
    grad: torch.Tensor, rank: int, gamma: float, direction: str = "ArB2r", niter: int | None = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) of the official convention from the mean gradient G (out, in)."""
    u, _, vh = svd_for_lora_ga(grad.to(torch.promote_types(grad.dtype, torch.float32)), rank, niter)
    if direction == "ArB2r":
        b, a = u[:, rank : 2 * rank], vh[:rank]
    elif direction == "A2rBr":
        b, a = u[:, :rank], vh[rank : 2 * rank]
    else:  # ArBr: B the even, A the odd singular indices
        b, a = u[:, 0 : 2 * rank : 2], vh[1 : 2 * rank : 2]
    zeta = grad.shape[0] ** 0.25 / gamma**0.5
    return b * zeta, a * zeta


@register_method("lora_ga")
class LoraGa(PeftLoraMethod):
    description = (
        "LoRA-GA: adapters from the SVD of the estimated gradient, offset W0; default the "
        "official convention (no S in B0, stable factor on B0 and A0, rsLoRA); peft's optional"
    )
    hyperparams_cls = LoraGaHyperparams
    needs_init_batches = True

    def init_batches_wanted(self, hp: LoraGaHyperparams, ctx=None) -> int:
        return hp.trial_batches_wanted(ctx.batch_size if ctx is not None else None)

    def extra_lora_kwargs(self, hp: LoraGaHyperparams):
        kwargs = {"use_rslora": hp.use_rslora}
        if hp.convention == "peft":
            kwargs["init_lora_weights"] = "lora_ga"
            kwargs["lora_ga_config"] = LoraGAConfig(
                direction=hp.direction, scale="stable", stable_gamma=hp.stable_gamma
            )
        return kwargs

    def prepare(self, model, hp: LoraGaHyperparams, ctx):
        if ctx.init_batches is None:
            raise ValueError("lora_ga needs training batches for its gradient estimate")
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        sample = init_sample(ctx.init_batches, hp.init_examples, hp.init_batches)
        grads = layer_gradients(model, layers, sample, offload=ctx.offload_statistics)
        if hp.convention == "peft":
            for name in grads:
                # peft's lora_ga_init reads the estimate from here (what preprocess_loraga
                # sets); ours is all-reduced across ranks and accumulated in float32.
                layers[name]._peft_loraga_grad = grads.pop_mean(name)
            return get_peft_model(model, self.lora_config(hp, ctx))
        check_rank_fits(layers, 2 * hp.rank)  # every direction reads 2r singular vectors
        factors = {}
        for name in grads:
            grad = grads.pop_mean(name)
            factors[name] = lora_ga_factors(
                grad.to(layers[name].weight.device), hp.rank, hp.stable_gamma, hp.direction,
                hp.svd_niter,
            )  # fmt: skip
        model = get_peft_model(model, self.lora_config(hp, ctx))
        with torch.no_grad():
            for name, (b0, a0) in factors.items():
                layer = model.base_model.model.get_submodule(name)
                lora_b, lora_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
                lora_b.copy_(b0)
                lora_a.copy_(a0)
                # The offset from the stored adapters, in float32 (as peft and the official).
                weight = layer.base_layer.weight
                offset = layer.scaling["default"] * (lora_b.float() @ lora_a.float())
                weight.copy_((weight.float() - offset).to(weight.dtype))
        return model

    def resolved_config(self, hp: LoraGaHyperparams, ctx):
        convention = B_CONVENTION if hp.convention == "peft" else OFFICIAL_CONVENTION
        return {**super().resolved_config(hp, ctx), "b_convention": convention}
