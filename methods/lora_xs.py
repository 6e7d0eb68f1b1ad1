"""The LoRA-XS parameterisation W = W0 + s B R A (B, A frozen; only the r x r R trains),
and the `lora_xs` method (Balazy et al. 2024, arXiv 2405.17604), the baseline LoRA-SB
Table 3 compares (rank 8: 61.07 CoLA MCC on RoBERTa-large).

The adapter: a plug-in that saves and loads like a peft adapter: `save_adapter(model, dir)`
writes `adapter_config.json` + `adapter_model.safetensors` (only B, R, A per layer),
`load_adapter(base_model, dir)` re-injects it, `merge_and_unload(model)` folds
s B R A into the base weights and returns plain `nn.Linear` layers. LoRA-SB
(methods/lora_sb.py) fills the same adapter from its simulated first step; `lora_xs` fills it
from the pretrained weight.

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

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from methods.base import Hyperparams, Method, PrepareContext
from methods.peft_lora import check_rank_fits, head_param_count, matching_linear_layers
from methods.registry import register_method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

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


class LoraXSLinear(nn.Module):
    """base(x) + s * B R A x, with B (out, r) and A (r, in) buffers and R (r, r) a parameter."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base
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

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as peft's LoRA layers expose it: model code reads a
        linear layer's `.weight` (T5's feed-forward casts its input to `wo.weight.dtype`)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_R @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * (
            x @ self.lora_A.T @ self.lora_R.T @ self.lora_B.T
        )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(
    model: nn.Module, layer_names: list[str], rank: int, scaling: float
) -> dict[str, LoraXSLinear]:
    """Replace each named nn.Linear by a LoraXSLinear; freeze everything else's base weights."""
    wrapped = {}
    for name in layer_names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, LoRA-XS wraps nn.Linear only")
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        wrapped[name] = LoraXSLinear(base, rank, scaling)
        set_module(model, name, wrapped[name])
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, LoraXSLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraXSLinear)}


def save_adapter(model: nn.Module, path: str | Path, extra_config: dict | None = None) -> None:
    """peft-style folder: config + safetensors with B, R, A per layer (and nothing else)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = adapter_layers(model)
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B", "lora_R"):
            tensors[f"{name}.{part}"] = getattr(layer, part).detach().contiguous().cpu()
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA_XS",
        "r": first.lora_R.shape[0],
        "scaling": first.scaling,
        "target_layers": sorted(layers),
        **(extra_config or {}),
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(path / ADAPTER_WEIGHTS))


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    layers = inject(model, config["target_layers"], config["r"], config["scaling"])
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B", "lora_R"):
                getattr(layer, part).copy_(tensors[f"{name}.{part}"])
    return model


@torch.no_grad()
def merge_wrapped(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """W0 <- W0 + delta_weight() for each named wrapper (a `base_layer` plus its update),
    which is then replaced by its base layer. Shared by the plug-in adapters."""
    for name, layer in layers.items():
        base = layer.base_layer
        base.weight += layer.delta_weight().to(base.weight.dtype)
        set_module(model, name, base)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """W0 <- W0 + s B R A for every adapted layer; the wrappers are replaced by their base."""
    return merge_wrapped(model, adapter_layers(model))


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
class LoraXs(Method):
    description = "LoRA-XS: W0 + s B R A, B A = top-r SVD of W0 (frozen), only r x r R trains"
    hyperparams_cls = LoraXsHyperparams

    def family_target_modules(self, model_type: str) -> list[str]:
        if model_type in OFFICIAL_TARGETS:
            return list(OFFICIAL_TARGETS[model_type])
        return super().family_target_modules(model_type)

    def targets(self, hp: LoraXsHyperparams, ctx: PrepareContext) -> list[str]:
        return list(hp.target_modules or ctx.default_target_modules)

    def scaling(self, hp: LoraXsHyperparams) -> float:
        return hp.alpha / hp.rank

    def prepare(self, model: nn.Module, hp: LoraXsHyperparams, ctx: PrepareContext) -> nn.Module:
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        check_rank_fits(layers, hp.rank)
        factors = {name: lora_xs_factors(layer.weight, hp.rank) for name, layer in layers.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = inject(model, list(layers), hp.rank, self.scaling(hp))
        with torch.no_grad():
            for name, (b, a) in factors.items():
                layer = wrapped[name]
                layer.lora_B.copy_(b)
                layer.lora_A.copy_(a)
                if hp.init_std > 0:
                    nn.init.normal_(layer.lora_R, mean=0.0, std=hp.init_std)
        for head in ctx.head_modules:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)
        return model

    def starts_at_base(self, hp: LoraXsHyperparams) -> bool:
        # R = 0 gives W0 exactly; the official R ~ N(0, 1e-10) moves the outputs by a little.
        return hp.init_std == 0

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)

    def expected_trainable_params(
        self, base_model: nn.Module, hp: LoraXsHyperparams, ctx: PrepareContext
    ) -> int:
        layers = matching_linear_layers(base_model, self.targets(hp, ctx), ctx.head_modules)
        return len(layers) * hp.rank**2 + head_param_count(base_model, ctx.head_modules)

    def resolved_config(self, hp: LoraXsHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        return {
            **hp.model_dump(),
            "target_modules": self.targets(hp, ctx),
            "scaling_used": self.scaling(hp),
        }
