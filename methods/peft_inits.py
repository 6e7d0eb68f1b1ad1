"""peft_lora: plain peft LoRA with any of peft's `init_lora_weights` and LoraConfig options.

One method covers peft 0.21's other inits at no cost: True (Kaiming A, B = 0), False (random
A and B: off the base function), "gaussian", "orthogonal", "olora", "pissa",
"pissa_niter_K", "mica", and the data-informed "eva" and "corda", which read the trial's
init batches (`init_batches` whole batches):

- EVA (peft `initialize_lora_eva_weights`): A = the top principal directions (right-singular
  vectors of the centred inputs) of each adapted layer's inputs, by peft's incremental PCA
  cycled over the batches until it converges (at most `EVA_MAX_PASSES` passes); B = 0.
  Padding (and, for token-level labels, label -100) positions are left out. Our EvaConfig
  default is rho = 1 (peft: 2): rho > 1 redistributes ranks across layers from the data,
  so the trainable-parameter count the harness checks before the init is not known.
- CorDA (peft `preprocess_corda` with a `run_model` callback): covariance C of each layer's
  inputs, SVD of W C; IPM (default) adapts the top r components, KPM the bottom r; W0 keeps
  the rest. peft's hook takes one sequence at a time, so the callback feeds single examples
  with their padding removed; under torch.distributed it sums C over ranks.

Refused, with the reason: "loftq" (peft 0.21's `loftq_init` needs bitsandbytes, not a
dependency here, and runs on CUDA/XPU only: its compute device is hard-coded) and
"lora_ga" (the `lora_ga` method, `convention: peft`, feeds peft's init our gradient
estimate). LoraConfig options pass through `lora_options`, checked when the config is read:
an unknown name, one the method's own fields set (rank, alpha, ...), or one whose trainable
parameters `expected_trainable_params` does not model is refused in one error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import peft
import torch
import torch.distributed as dist
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from pydantic import Field, field_validator, model_validator
from torch import nn

from methods.base import Batch, PrepareContext, model_inputs
from methods.peft_lora import LoraHyperparams, PeftLoraMethod, head_param_count
from methods.registry import register_method

PLAIN_INITS = (True, False, "gaussian", "orthogonal", "olora", "pissa", "mica")
DATA_INITS = ("eva", "corda")
PISSA_NITER = re.compile(r"^pissa_niter_\d+$")
REFUSED_INITS = {
    "loftq": (
        "peft 0.21's loftq_init quantizes with bitsandbytes (not a dependency of this "
        "harness) on a hard-coded CUDA/XPU compute device, so it cannot run on CPU; "
        "it also replaces W0 by its quantized copy, which the harness's base-function "
        "check does not model"
    ),
    "lora_ga": (
        "peft's lora_ga init needs a gradient estimate attached to each layer: use the "
        "lora_ga method with convention: peft, which feeds it the harness's estimate"
    ),
}
# LoraConfig fields the method's own hyperparameters set.
OWN_FIELDS = {
    "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "target_modules", "init_lora_weights": "init_lora_weights",
    "modules_to_save": "(the harness: the task head)",
}  # fmt: skip
# Options whose effect on the trainable parameters expected_trainable_params models.
SUPPORTED_OPTIONS = (
    "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "eva_config", "corda_config",
)  # fmt: skip
# CorDA's cache/covariance files would skip reading this trial's batches.
CORDA_REFUSED = ("cache_file", "covariance_file")
EVA_MAX_PASSES = 50  # passes over the init batches before EVA's PCA must have converged
EVA_DEFAULTS = {"rho": 1.0}  # ours where peft's differs (see the module docstring)


def _field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _check_sub_config(name: str, options: Any, config_cls: type, refused=()) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"lora_options.{name} must be a mapping of {config_cls.__name__} fields")
    unknown = sorted(set(options) - set(_field_names(config_cls)))
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} option(s) {unknown}; it has: "
            f"{', '.join(_field_names(config_cls))}"
        )
    blocked = sorted(set(options) & set(refused))
    if blocked:
        raise ValueError(
            f"lora_options.{name}: {blocked} not supported (they would skip reading the "
            "trial's init batches and are not part of the run's identity)"
        )


def check_lora_options(options: dict[str, Any], init: bool | str) -> None:
    """Refuse, in one error, LoraConfig options this method cannot pass through."""
    fields = set(_field_names(LoraConfig))
    problems = []
    unknown = sorted(set(options) - fields)
    if unknown:
        problems.append(
            f"unknown LoraConfig option(s) {unknown} (peft {peft.__version__} LoraConfig has: "
            f"{', '.join(sorted(fields))})"
        )
    own = sorted(set(options) & set(OWN_FIELDS))
    if own:
        problems.append(
            "set by the method's own hyperparameters: "
            + ", ".join(f"{k} -> {OWN_FIELDS[k]}" for k in own)
        )
    unmodelled = sorted((set(options) & fields) - set(OWN_FIELDS) - set(SUPPORTED_OPTIONS))
    if unmodelled:
        problems.append(
            f"option(s) {unmodelled} not supported: the harness checks a closed-form "
            f"trainable-parameter count that models only {', '.join(SUPPORTED_OPTIONS)}"
        )
    if problems:
        raise ValueError("peft_lora lora_options: " + "; ".join(problems))
    if "eva_config" in options:
        if init != "eva":
            raise ValueError("lora_options.eva_config is only read with init_lora_weights: eva")
        _check_sub_config("eva_config", options["eva_config"], EvaConfig)
        if resolved_eva(options).rho != 1.0:
            raise ValueError(
                "lora_options.eva_config.rho must be 1.0 here: rho > 1 redistributes ranks "
                "across layers from the data, so the trainable-parameter count the harness "
                "checks before the init cannot be known"
            )
    if "corda_config" in options:
        if init != "corda":
            raise ValueError("lora_options.corda_config is only read with init_lora_weights: corda")
        _check_sub_config("corda_config", options["corda_config"], CordaConfig, CORDA_REFUSED)


def resolved_eva(options: dict[str, Any]) -> EvaConfig:
    return EvaConfig(**{**EVA_DEFAULTS, **options.get("eva_config", {})})


def resolved_corda(options: dict[str, Any]) -> CordaConfig:
    return CordaConfig(**options.get("corda_config", {}))


class PeftInitHyperparams(LoraHyperparams):
    init_lora_weights: bool | str = Field(
        True, description="peft's init: True, False, gaussian, orthogonal, olora, pissa, "
        "pissa_niter_K, mica, eva, corda (loftq, lora_ga refused)",
    )  # fmt: skip
    lora_options: dict[str, Any] = Field(
        default_factory=dict, description="further LoraConfig fields (eva_config, corda_config "
        "as mappings); checked: unknown or unmodelled ones are refused",
    )  # fmt: skip
    init_batches: int = Field(
        8, gt=0, description="whole trial batches EVA / CorDA read (other inits read none)"
    )

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value in REFUSED_INITS:
            raise ValueError(f"init_lora_weights {value!r} is refused: {REFUSED_INITS[value]}")
        known = value in PLAIN_INITS or value in DATA_INITS
        if not known and not (isinstance(value, str) and PISSA_NITER.match(value)):
            raise ValueError(
                f"unknown init_lora_weights {value!r}; peft {peft.__version__} inits here: "
                f"{', '.join(map(str, PLAIN_INITS + DATA_INITS))}, pissa_niter_K"
            )
        return value

    @model_validator(mode="after")
    def _options_pass_through(self):
        check_lora_options(self.lora_options, self.init_lora_weights)
        if self.init_lora_weights == "orthogonal" and self.rank % 2:
            raise ValueError(f"init_lora_weights orthogonal needs an even rank, got {self.rank}")
        # peft's own cross-checks (e.g. lora_bias only with True/False), before any work.
        try:
            lora_config_for(self, ["_validation_only_"], None)
        except (TypeError, ValueError) as error:
            raise ValueError(f"peft LoraConfig refuses these settings: {error}") from error
        return self


def lora_config_for(
    hp: PeftInitHyperparams, targets: list[str], modules_to_save: list[str] | None
) -> LoraConfig:
    options = dict(hp.lora_options)
    options.pop("eva_config", None)
    options.pop("corda_config", None)
    if hp.init_lora_weights == "eva":
        options["eva_config"] = resolved_eva(hp.lora_options)
    if hp.init_lora_weights == "corda":
        options["corda_config"] = resolved_corda(hp.lora_options)
    return LoraConfig(
        r=hp.rank,
        lora_alpha=hp.alpha,
        lora_dropout=hp.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        init_lora_weights=hp.init_lora_weights,
        **options,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def single_examples(batches: Iterable[Batch]) -> Iterable[Batch]:
    """Each batch's examples one at a time, padding positions dropped (CorDA's hook takes
    one (tokens, features) sequence per call)."""
    for batch in batches:
        n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0)
        mask = batch.get("attention_mask")
        for i in range(n):
            keep = mask[i].bool() if mask is not None else None
            example = {}
            for key, value in batch.items():
                if not (torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n):
                    example[key] = value
                    continue
                row = value[i]
                if keep is not None and row.ndim >= 1 and row.shape[0] == keep.shape[0]:
                    row = row[keep]  # the sequence positions the mask keeps
                example[key] = row.unsqueeze(0)
            yield example


def eva_model_inputs(model_input: Batch, peft_config: LoraConfig) -> torch.Tensor:
    """(batch, position) indices EVA's PCA reads: unpadded positions and, where the labels
    are per token (causal LM), those not masked out. peft's default also ANDs per-example
    classification labels with the token mask, which broadcasts wrongly."""
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    labels = model_input.get("labels")
    eva = peft_config.eva_config
    if eva.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask.nonzero()


@register_method("peft_lora")
class PeftLoraInits(PeftLoraMethod):
    description = (
        "peft LoRA with any peft init_lora_weights (gaussian, orthogonal, olora, pissa, mica, "
        "eva, corda, ...) and LoraConfig options; EVA/CorDA read the init batches"
    )
    hyperparams_cls = PeftInitHyperparams
    needs_init_batches = True

    def init_batches_wanted(self, hp: PeftInitHyperparams, ctx=None) -> int:
        return hp.init_batches if hp.init_lora_weights in DATA_INITS else 0

    def starts_at_base(self, hp: PeftInitHyperparams) -> bool:
        return hp.init_lora_weights is not False  # False: random A and B (peft's debug init)

    def lora_config(self, hp: PeftInitHyperparams, ctx: PrepareContext) -> LoraConfig:
        return lora_config_for(hp, self.targets(hp, ctx), list(ctx.head_modules) or None)

    def prepare(self, model: nn.Module, hp: PeftInitHyperparams, ctx: PrepareContext):
        init = hp.init_lora_weights
        config = self.lora_config(hp, ctx)
        if init in DATA_INITS and ctx.init_batches is None:
            raise ValueError(f"peft_lora {init} needs the trial's init batches")
        if init == "corda":
            batches = list(ctx.init_batches(hp.init_batches))
            was_training = model.training
            preprocess_corda(model, config, run_model=lambda: self._run_corda(model, batches))
            model.train(was_training)
            return get_peft_model(model, config)
        model = get_peft_model(model, config)
        if init == "eva":
            self._init_eva(model, list(ctx.init_batches(hp.init_batches)))
        return model

    @staticmethod
    @torch.no_grad()
    def _run_corda(model: nn.Module, batches: list[Batch]) -> None:
        for example in single_examples(batches):
            model(**model_inputs(example))
        if _distributed():  # every rank then computes the same W C decomposition
            for module in model.modules():
                if torch.is_tensor(getattr(module, "covariance_matrix", None)):
                    dist.all_reduce(module.covariance_matrix)
                    count = torch.tensor(float(module.sample_count), device=module.weight.device)
                    dist.all_reduce(count)
                    module.sample_count = int(count.item())

    @staticmethod
    def _init_eva(model: nn.Module, batches: list[Batch]) -> None:
        if not batches:
            raise ValueError("peft_lora eva: the init batches are empty")
        limit = EVA_MAX_PASSES * len(batches) + 1  # +1: peft's input-hashing pass
        calls = 0

        def forward(peft_model, inputs):
            nonlocal calls
            calls += 1
            if calls > limit:
                raise RuntimeError(
                    f"EVA's PCA did not converge within {EVA_MAX_PASSES} passes over "
                    f"{len(batches)} init batches (lower eva_config.tau or add init_batches)"
                )
            return peft_model(**model_inputs(inputs))

        token_level = "input_ids" in batches[0]
        initialize_lora_eva_weights(
            model,
            dataloader=batches,
            forward_fn=forward,
            prepare_model_inputs_fn=eva_model_inputs if token_level else None,
            prepare_layer_inputs_fn=(
                prepare_layer_inputs_fn_language_modeling if token_level else None
            ),
            show_progress_bar=False,
        )

    def adapted_layers(
        self, base_model: nn.Module, hp: PeftInitHyperparams, ctx: PrepareContext
    ) -> list[tuple[str, nn.Linear, int]]:
        """(name, layer, rank) of each linear peft adapts, by peft's own matching rule."""
        config = self.lora_config(hp, ctx)
        ranks = config.rank_pattern
        found = [
            (name, module, ranks.get(get_pattern_key(ranks, name), hp.rank))
            for name, module in base_model.named_modules()
            if isinstance(module, nn.Linear)
            and not any(name == h or name.startswith(h + ".") for h in ctx.head_modules)
            and check_target_module_exists(config, name)
        ]
        if not found:
            raise ValueError("peft_lora: the LoraConfig targets match no linear layer")
        return found

    def expected_trainable_params(
        self, base_model: nn.Module, hp: PeftInitHyperparams, ctx: PrepareContext
    ) -> int:
        options = hp.lora_options
        total = 0
        for _, layer, rank in self.adapted_layers(base_model, hp, ctx):
            if hp.init_lora_weights == "mica":
                total += rank * layer.in_features  # MiCA freezes B; A trains
            else:
                total += rank * (layer.in_features + layer.out_features)
            # DoRA's magnitude vector and lora_bias's B bias: one value per output.
            extras = bool(options.get("use_dora")) + bool(options.get("lora_bias"))
            total += layer.out_features * extras
        return total + head_param_count(base_model, ctx.head_modules)

    def resolved_config(self, hp: PeftInitHyperparams, ctx: PrepareContext) -> dict[str, Any]:
        resolved = super().resolved_config(hp, ctx)
        options = dict(hp.lora_options)
        if hp.init_lora_weights == "eva":
            options["eva_config"] = dataclasses.asdict(resolved_eva(hp.lora_options))
        if hp.init_lora_weights == "corda":
            options["corda_config"] = dataclasses.asdict(resolved_corda(hp.lora_options))
        return {**resolved, "lora_options": options, "peft_version": peft.__version__}
