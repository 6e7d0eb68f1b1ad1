"""The LoRA-XS parameterisation W = W0 + s B R A (B, A frozen; only the r x r R trains),
and the `lora_xs` method (Balazy et al. 2024, arXiv 2405.17604), the baseline LoRA-SB
Table 3 compares (rank 8: 61.07 CoLA MCC on RoBERTa-large).

The adapter: a plug-in (methods/plugin_adapter.py) that saves and loads like a peft
adapter: `save_adapter(model, dir)` writes `adapter_config.json` +
`adapter_model.safetensors` (only B, R, A per layer), `load_adapter(base_model, dir)`
re-injects it, `merge_and_unload(model)` folds s B R A into the base weights and returns
plain `nn.Linear` layers. LoRA-SB (methods/lora_sb.py) fills the same adapter from its
simulated first step; `lora_xs` fills it from the pretrained weight.

The `lora_xs` init follows the official MohammadrezaBanaei/LoRA-XS code
(utils/initialization_utils.py `get_svd_replacement_module` + `find_and_initialize`,
config/loraxs_config.yaml `init_type: svd_on_w`, `retain_part: top`; forward and merge in
utils/latent_utils.py `forward_latent` / `merge_latent`). That code takes the SVD of W0^T
(in x out) = U' S V'^T and sets the encoder to (U' S)[:, :r], the decoder to V'^T[:r]; in
terms of W0 (out x in) = U S V^T that is

    B = U_r            (out x r, orthonormal, frozen; peft lora_B),
    A = S_r V_r^T      (r x in, carries the singular values, frozen; peft lora_A),

so B A = U_r S_r V_r^T, the best rank-r approximation of W0 (Eckart-Young), with S on A's
side (the paper's text says B = U S, A = V^T; the product is the same, the split is not,
and only the official split is implemented). R (`default_lora_latent_mapping`, an r x r
nn.Linear without bias) is drawn from N(0, sigma^2), sigma = 1e-5 (`init_module_weights(...,
sigma=0.00001)`), so training starts 1e-5-close to, not exactly at, W0 (no weight offset is
subtracted: W0 stays as it is). The scaling is peft's default s = lora_alpha / r with the
official GLUE default lora_alpha = 16 (main_glue.py `ModelArguments.lora_alpha`; no
use_rslora). The SVD is exact (torch.linalg.svd, as the official code), in at least fp32.

Deviations from the official GLUE script: one learning rate for R and the task head (it
gives the classifier its own `cls_learning_rate`), the harness's AdamW weight decay (the
official torch.optim.AdamW(...) call keeps torch's default 0.01) and schedule; the other
official init types (`random`, `svd_on_random`, `retain_part: bottom`) are not implemented.
Default targets on GLUE encoders: the official query, value, attention.output.dense,
output.dense (main_glue.py LoraConfig.target_modules; the same list as LoRA-SB's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import torch
from pydantic import Field
from torch import nn

from methods.base import Hyperparams, PrepareContext
from methods.plugin_adapter import AdapterLayer, PluginAdapterMethod
from methods.registry import register_method

# The official GLUE targets of LoRA-SB (CERT-Lab/lora-sb models.py, RoBERTa), which LoRA-XS
# shares: query, value and both output projections; our encoder default also adapts key
# and intermediate.dense. Kept here, below lora_sb (which imports this module).
GLUE_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
OFFICIAL_TARGETS: dict[str, list[str]] = {
    "bert": GLUE_TARGETS,
    "roberta": GLUE_TARGETS,
    "xlm-roberta": GLUE_TARGETS,
    "deberta-v2": ["query_proj", "value_proj", "attention.output.dense", "output.dense"],
}


class LoraXSLinear(AdapterLayer):
    """base(x) + s * B R A x, with B (out, r) and A (r, in) buffers and R (r, r) a parameter."""

    peft_type = "LORA_XS"
    adapter_tensor_names = ("lora_A", "lora_B", "lora_R")

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        super().__init__(base)
        self.scaling = scaling
        dtype, device = base.weight.dtype, base.weight.device
        # Buffers, not parameters: frozen by construction and still saved with the adapter.
        self.register_buffer(
            "lora_B", torch.zeros(base.out_features, rank, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_A", torch.zeros(rank, base.in_features, dtype=dtype, device=device)
        )
        self.lora_R = nn.Parameter(torch.zeros(rank, rank, dtype=dtype, device=device))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_R @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * (
            x @ self.lora_A.T @ self.lora_R.T @ self.lora_B.T
        )

    def adapter_config(self) -> dict[str, Any]:
        return {"r": self.lora_R.shape[0], "scaling": self.scaling}

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any]) -> Self:
        return cls(base, config["r"], config["scaling"])

    @staticmethod
    def trainable_params(base: nn.Linear, rank: int) -> int:
        return rank**2  # only R trains; B and A are buffers


# The adapter API of these layers (LoRA-SB's too), as module functions.
inject = LoraXSLinear.inject  # (model, layer names, rank, scaling)
adapter_layers = LoraXSLinear.layers_in
save_adapter = LoraXSLinear.save
load_adapter = LoraXSLinear.load
merge_and_unload = LoraXSLinear.merge_and_unload


# ---------------------------------------------------------------- the `lora_xs` method


class LoraXsHyperparams(Hyperparams):
    rank: int = Field(8, gt=0, description="r; R is r x r (LoRA-SB Table 3: 8/16/24)")
    alpha: float = Field(16.0, gt=0, description="s = alpha / r (official lora_alpha 16)")
    init_std: float = Field(
        1e-5, ge=0, description="R ~ N(0, init_std^2) (official sigma 1e-5); 0 = R = 0"
    )
    target_modules: list[str] | None = Field(None, min_length=1)


def lora_xs_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r, S_r V_r^T) of W0 = U S V^T: the official split, B A = svd_r(W0)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank]


@register_method("lora_xs")
class LoraXs(PluginAdapterMethod):
    description = "LoRA-XS: W0 + s B R A, B A = top-r SVD of W0 (frozen), only r x r R trains"
    hyperparams_cls = LoraXsHyperparams
    layer_cls = LoraXSLinear
    official_targets = OFFICIAL_TARGETS

    def scaling(self, hp: LoraXsHyperparams) -> float:
        return hp.alpha / hp.rank

    def initial_values(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        hp: LoraXsHyperparams,
        ctx: PrepareContext,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: lora_xs_factors(layer.weight, hp.rank) for name, layer in layers.items()}

    def initialize(
        self,
        wrapped: dict[str, LoraXSLinear],
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        hp: LoraXsHyperparams,
        ctx: PrepareContext,
    ) -> None:
        for name, (b, a) in factors.items():
            layer = wrapped[name]
            layer.lora_B.copy_(b)
            layer.lora_A.copy_(a)
            if hp.init_std > 0:
                nn.init.normal_(layer.lora_R, mean=0.0, std=hp.init_std)

    def starts_at_base(self, hp: LoraXsHyperparams) -> bool:
        # R = 0 gives W0 exactly; the official R ~ N(0, 1e-10) moves the outputs by a little.
        return hp.init_std == 0

    def resolved_config(self, hp: LoraXsHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        return {**super().resolved_config(hp, ctx), "scaling_used": self.scaling(hp)}
