"""What the LoRA-family methods share: hyperparameters, target layers, the parameter formula,
peft wrapping.

`LinearAdapterMethod` is what every method that adapts the model's `nn.Linear` layers
shares (peft's LoRA variants here, the plug-in adapters of methods/plugin_adapter.py): the
target modules, the layers they match and the closed-form trainable-parameter count.
Each peft variant (rsLoRA, DoRA, PiSSA, LoRA-GA, LoRA+) is a small subclass of
`PeftLoraMethod` that changes one thing, as peft's `tuners/lora` does with its variants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import Field
from torch import nn

from methods.base import Hyperparams, Method, PrepareContext


class LoraHyperparams(Hyperparams):
    rank: int = Field(8, gt=0, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: s = alpha/r (rsLoRA: /sqrt r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="module-name suffixes; None = the model family's default"
    )


def _matches(name: str, key: str) -> bool:
    # peft's rule for a list of target names: exact, or a dotted suffix.
    return name == key or name.endswith("." + key)


def matching_linear_layers(
    model: nn.Module, target_modules: list[str], exclude: list[str] = ()
) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers a LoRA config with these targets adapts (head modules excluded)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(_matches(name, key) for key in target_modules)
        and not any(name == h or name.startswith(h + ".") for h in exclude)
    ]
    if not found:
        raise ValueError(f"target modules {target_modules} match no linear layer of the model")
    return found


def check_rank_fits(layers: dict[str, nn.Linear], rank: int) -> None:
    for name, layer in layers.items():
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = "
                f"{min(layer.in_features, layer.out_features)} of layer {name}"
            )


def head_param_count(model: nn.Module, head_modules: list[str]) -> int:
    modules = dict(model.named_modules())
    return sum(p.numel() for h in head_modules for p in modules[h].parameters())


class LinearAdapterMethod(Method):
    """A method that adapts the `nn.Linear` layers its hyperparameters' `target_modules`
    name (None: the model family's default), the task head excluded. Its hyperparameters
    have `rank` and `target_modules`; a subclass whose adapter is not LoRA-sized overrides
    `per_layer_params`."""

    def targets(self, hp: LoraHyperparams, ctx: PrepareContext) -> list[str]:
        return list(hp.target_modules or ctx.default_target_modules)

    def per_layer_params(self, layer: nn.Linear, hp: LoraHyperparams) -> int:
        """Trainable parameters the method adds to one adapted layer: B (m, r) + A (r, n)."""
        return hp.rank * (layer.in_features + layer.out_features)

    def expected_trainable_params(
        self, base_model: nn.Module, hp: LoraHyperparams, ctx: PrepareContext
    ) -> int:
        layers = matching_linear_layers(base_model, self.targets(hp, ctx), ctx.head_modules)
        adapters = sum(self.per_layer_params(layer, hp) for _, layer in layers)
        return adapters + head_param_count(base_model, ctx.head_modules)

    def resolved_config(self, hp: LoraHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        return {**hp.model_dump(), "target_modules": self.targets(hp, ctx)}


class PeftLoraMethod(LinearAdapterMethod):
    """Plain LoRA through peft; subclasses override `extra_lora_kwargs` and friends."""

    hyperparams_cls: ClassVar[type[Hyperparams]] = LoraHyperparams

    def extra_lora_kwargs(self, hp: LoraHyperparams) -> dict[str, Any]:
        return {}

    def lora_config(self, hp: LoraHyperparams, ctx: PrepareContext) -> LoraConfig:
        return LoraConfig(
            r=hp.rank,
            lora_alpha=hp.alpha,
            lora_dropout=hp.dropout,
            target_modules=self.targets(hp, ctx),
            modules_to_save=list(ctx.head_modules) or None,
            **self.extra_lora_kwargs(hp),
        )

    def prepare(self, model: nn.Module, hp: LoraHyperparams, ctx: PrepareContext) -> nn.Module:
        return get_peft_model(model, self.lora_config(hp, ctx))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()

    def save_adapter(self, model: nn.Module, path: str | Path) -> None:
        """peft's own folder (`save_pretrained`, safetensors; the head as modules_to_save)."""
        model.save_pretrained(str(path), safe_serialization=True)

    def load_adapter(self, base_model: nn.Module, path: str | Path) -> nn.Module:
        # It applies to the base model as the init left it (W0-moving inits: not the stock
        # one; harness/training/adapters.py keeps a converted copy for that).
        return PeftModel.from_pretrained(base_model, str(path))
