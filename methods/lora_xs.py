"""The LoRA-XS parameterisation W = W0 + s B R A (B, A frozen; only the r x r R trains).

A plug-in adapter that saves and loads like a peft adapter: `save_adapter(model, dir)`
writes `adapter_config.json` + `adapter_model.safetensors` (only B, R, A per layer),
`load_adapter(base_model, dir)` re-injects it, `merge_and_unload(model)` folds
s B R A into the base weights and returns plain `nn.Linear` layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_R @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * (
            x @ self.lora_A.T @ self.lora_R.T @ self.lora_B.T
        )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
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
        _set_module(model, name, wrapped[name])
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
        _set_module(model, name, base)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """W0 <- W0 + s B R A for every adapted layer; the wrappers are replaced by their base."""
    return merge_wrapped(model, adapter_layers(model))
