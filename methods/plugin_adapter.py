"""Plug-in adapters: the methods whose adapter layer peft does not have (LoRA-XS, LoRA-SB,
SDS-LoRA), built as peft builds its tuners: a method is a small config (its
`Hyperparams`), a layer (`AdapterLayer`) and the model-level plumbing (`PluginAdapterMethod`
and the layer's class methods), and a new method gives only what differs, as a peft
`LoraVariant` gives a few explicit hooks.

A new plug-in method is one file plus its line in methods/__init__.py. It gives:

1. The layer, an `AdapterLayer` subclass:
   - `peft_type` (the adapter folder's type tag) and `adapter_tensor_names` (the
     parameters and buffers saved per layer, in saving order);
   - `__init__(base, ...)`: `super().__init__(base)`, then its tensors, created on the
     base weight's dtype and device (what it draws from the RNG is the default init);
   - `forward(x)` and `delta_weight()` (the dense W - W0, which merging adds to W0);
   - `adapter_config()`: JSON values for adapter_config.json (the same for every layer
     of a model), and `from_config(base, config)`: the layer that config describes,
     before its tensors are loaded;
   - `trainable_params(base, rank)`: the closed-form count of its trainable parameters.
2. The method, a `PluginAdapterMethod` subclass decorated `@register_method("name")`:
   - `description`, `hyperparams_cls` (with `rank` and `target_modules`, as
     `peft_lora.LoraHyperparams`), `layer_cls`;
   - `scaling(hp)`, unless it overrides `make_layer(base, hp)` (default:
     `layer_cls(base, hp.rank, scaling(hp))`);
   - its init, if the layer's own is not the method's: `initial_values(model, layers,
     hp, ctx)` runs on the untouched base model (an SVD of W0, a gradient estimate from
     `ctx.init_batches`), `initialize(wrapped, values, hp, ctx)` then writes the injected
     layers (under no_grad);
   - `official_targets` where its authors adapted other modules than the family default,
     and whatever else of `Method` differs (`starts_at_base`, `callbacks`,
     `needs_init_batches`, `resolved_config`, ...).
Everything else is here and shared: the target layers and the rank check, freeze the base
-> inject -> keep the task head trainable, the trainable-parameter count, merge, and save /
load of the adapter (`Method.save_adapter` / `load_adapter`).

The adapter folder, peft-style: `adapter_config.json` (`peft_type`, the layers'
`adapter_config()`, `target_layers`, `modules_to_save`, any extra keys) and
`adapter_model.safetensors` (`<layer>.<tensor>` for each adapted layer and each of
`adapter_tensor_names`, plus the parameters of `modules_to_save` under their own names).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from methods.base import PrepareContext
from methods.peft_lora import (
    LinearAdapterMethod,
    LoraHyperparams,
    check_rank_fits,
    matching_linear_layers,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class AdapterLayer(nn.Module):
    """A frozen base `nn.Linear` (`base_layer`) plus the method's update (module docstring:
    what a subclass gives). The class methods are the model-level adapter API of the
    layer type: `inject`, `layers_in`, `save`, `load`, `merge_and_unload`."""

    peft_type: ClassVar[str]
    adapter_tensor_names: ClassVar[tuple[str, ...]]

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as peft's LoRA layers expose it: model code reads a
        linear layer's `.weight` (T5's feed-forward casts its input to `wo.weight.dtype`)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any]) -> Self:
        raise NotImplementedError

    @staticmethod
    def trainable_params(base: nn.Linear, rank: int) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------ the model-level API

    @classmethod
    def wrap(
        cls, model: nn.Module, layer_names: Iterable[str], make: Callable[[nn.Linear], Self]
    ) -> dict[str, Self]:
        """Replace each named nn.Linear by `make(it)`; the base weights are frozen."""
        wrapped = {}
        for name in layer_names:
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                kind = type(base).__name__
                raise TypeError(f"{name} is {kind}, {cls.__name__} wraps nn.Linear only")
            base.weight.requires_grad_(False)
            if base.bias is not None:
                base.bias.requires_grad_(False)
            wrapped[name] = make(base)
            set_module(model, name, wrapped[name])
        return wrapped

    @classmethod
    def inject(
        cls, model: nn.Module, layer_names: Iterable[str], *args: Any, **kwargs: Any
    ) -> dict[str, Self]:
        """Wrap each named nn.Linear in `cls(base, *args, **kwargs)`."""
        return cls.wrap(model, layer_names, lambda base: cls(base, *args, **kwargs))

    @classmethod
    def layers_in(cls, model: nn.Module) -> dict[str, Self]:
        return {n: m for n, m in model.named_modules() if isinstance(m, cls)}

    @classmethod
    def save(
        cls,
        model: nn.Module,
        path: str | Path,
        modules_to_save: Iterable[str] = (),
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        """The peft-style folder (module docstring); `modules_to_save` (the task head)
        rides along when named."""
        layers = cls.layers_in(model)
        if not layers:
            raise ValueError(f"the model has no {cls.__name__} layers")
        configs = [layer.adapter_config() for layer in layers.values()]
        first = configs[0]
        differing = sorted(
            {k for c in configs for k in c.keys() | first if c.get(k) != first.get(k)}
        )
        if differing:
            raise ValueError(f"the {cls.__name__} layers differ in {differing}")
        tensors = {
            f"{name}.{part}": getattr(layer, part).detach().contiguous().cpu()
            for name, layer in layers.items()
            for part in cls.adapter_tensor_names
        }
        modules_to_save = list(modules_to_save)
        for head in modules_to_save:
            for pname, p in model.get_submodule(head).named_parameters():
                tensors[f"{head}.{pname}"] = p.detach().contiguous().cpu()
        config = {
            "peft_type": cls.peft_type,
            **first,
            "target_layers": sorted(layers),
            "modules_to_save": modules_to_save,
            **(extra_config or {}),
        }
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(path / ADAPTER_WEIGHTS))

    @classmethod
    @torch.no_grad()
    def load(cls, model: nn.Module, path: str | Path) -> nn.Module:
        """Inject the saved layers into a fresh base `model` and load their tensors (and
        those of any saved `modules_to_save`)."""
        path = Path(path)
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        if config.get("peft_type") != cls.peft_type:
            raise ValueError(
                f"{path} holds a {config.get('peft_type')} adapter, not {cls.peft_type}"
            )
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
        layers = cls.wrap(
            model, config["target_layers"], lambda base: cls.from_config(base, config)
        )
        for name, layer in layers.items():
            for part in cls.adapter_tensor_names:
                getattr(layer, part).copy_(tensors[f"{name}.{part}"])
        for head in config.get("modules_to_save", []):  # absent in LoRA-XS folders before it
            for pname, p in model.get_submodule(head).named_parameters():
                p.copy_(tensors[f"{head}.{pname}"])
        return model

    @classmethod
    @torch.no_grad()
    def merge_and_unload(cls, model: nn.Module) -> nn.Module:
        """W0 <- W0 + delta_weight() for every adapted layer; each wrapper is replaced by
        its base layer, so the model is plain nn.Linear layers again."""
        for name, layer in cls.layers_in(model).items():
            base = layer.base_layer
            base.weight += layer.delta_weight().to(base.weight.dtype)
            set_module(model, name, base)
        return model


class PluginAdapterMethod(LinearAdapterMethod):
    """A method whose adapter is an `AdapterLayer` on each target nn.Linear (module
    docstring: what a subclass gives)."""

    layer_cls: ClassVar[type[AdapterLayer]]
    # Model type -> target modules the method's authors adapted (else the family default).
    official_targets: ClassVar[Mapping[str, list[str]]] = {}

    def family_target_modules(self, model_type: str) -> list[str]:
        if model_type in self.official_targets:
            return list(self.official_targets[model_type])
        return super().family_target_modules(model_type)

    def target_layers(
        self, model: nn.Module, hp: LoraHyperparams, ctx: PrepareContext
    ) -> dict[str, nn.Linear]:
        layers = dict(matching_linear_layers(model, self.targets(hp, ctx), ctx.head_modules))
        check_rank_fits(layers, hp.rank)
        return layers

    def scaling(self, hp: LoraHyperparams) -> float:
        raise NotImplementedError

    def make_layer(self, base: nn.Linear, hp: LoraHyperparams) -> AdapterLayer:
        return self.layer_cls(base, hp.rank, self.scaling(hp))

    def initial_values(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        hp: LoraHyperparams,
        ctx: PrepareContext,
    ) -> Any:
        """What the init needs from the base model before it is frozen and wrapped."""
        return None

    def initialize(
        self,
        wrapped: dict[str, AdapterLayer],
        values: Any,
        hp: LoraHyperparams,
        ctx: PrepareContext,
    ) -> None:
        """Write the init into the injected layers (`values`: `initial_values`'s result)."""

    def prepare(self, model: nn.Module, hp: LoraHyperparams, ctx: PrepareContext) -> nn.Module:
        layers = self.target_layers(model, hp, ctx)
        values = self.initial_values(model, layers, hp, ctx)
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = self.layer_cls.wrap(model, list(layers), lambda base: self.make_layer(base, hp))
        with torch.no_grad():
            self.initialize(wrapped, values, hp, ctx)
        for head in ctx.head_modules:  # the task head trains under every method
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)
        return model

    def per_layer_params(self, layer: nn.Linear, hp: LoraHyperparams) -> int:
        return self.layer_cls.trainable_params(layer, hp.rank)

    def merge(self, model: nn.Module) -> nn.Module:
        return self.layer_cls.merge_and_unload(model)

    def save_adapter(self, model: nn.Module, path: str | Path) -> None:
        self.layer_cls.save(model, path)

    def load_adapter(self, base_model: nn.Module, path: str | Path) -> nn.Module:
        return self.layer_cls.load(base_model, path)
