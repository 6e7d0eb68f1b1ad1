"""The contract every fine-tuning method implements.

A method sees a model and batches of tensors, nothing else: no Ray, no task, no data
loading. A batch is a dict the model accepts as keyword arguments, including `labels`, so
`model(**model_inputs(batch)).loss` is the training loss, how data-informed inits get
their gradients (`model_inputs` drops a distributed micro-batch's weight entry).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from methods.targets import default_target_modules

Batch = dict[str, torch.Tensor]


LOSS_WEIGHT_KEY = "__loss_weight__"
"""The reserved batch entry holding a `WeightedBatch`'s weight (a float, not a tensor)."""


def _checked_weight(value: Any) -> float:
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"a batch's loss weight must be finite and >= 0, got {weight}")
    return weight


class WeightedBatch(dict):
    """A batch whose mean loss counts `loss_weight` times where an init averages over
    batches. Distributed trials hand data-informed inits the micro-batches of each global
    batch as these, weighted by their share of its loss terms (a causal LM's labelled
    tokens), so the average over micro-batches equals the single-device average over whole
    batches.

    The weight is an entry, `batch[LOSS_WEIGHT_KEY]`, so no copy can drop it silently:
    `dict(batch)`, a comprehension over `batch.items()`, `batch.copy()`, `batch | more`,
    `batch.to(device)` (which peft's `move_inputs_to_device` calls), deepcopy and pickle
    all keep it. The price: the model is called as `model(**model_inputs(batch))`. A bare
    `model(**batch)` is a TypeError for a forward with explicit keywords; transformers'
    models take `**kwargs` and ignore the entry. A batch meant to be unweighted is built
    from `model_inputs(batch)` (`grad_estimator.example_batches`).
    """

    def __init__(
        self, tensors: Mapping[str, Any] | None = None, loss_weight: float | None = None
    ) -> None:
        super().__init__(tensors or {})
        # A copy of a weighted batch is that weighted batch; an explicit weight wins.
        self.loss_weight = loss_weight if loss_weight is not None else self.loss_weight

    @property
    def loss_weight(self) -> float:
        return _checked_weight(self.get(LOSS_WEIGHT_KEY, 1.0))

    @loss_weight.setter
    def loss_weight(self, value: float) -> None:
        self[LOSS_WEIGHT_KEY] = _checked_weight(value)

    def with_tensors(self, tensors: Mapping[str, Any]) -> WeightedBatch:
        """Another batch of the same examples (moved, cast, re-collated), same weight."""
        return WeightedBatch(tensors, self.loss_weight)

    def to(self, *args: Any, **kwargs: Any) -> WeightedBatch:
        """Every tensor `.to(*args, **kwargs)` (device, dtype), the weight kept."""
        return self.with_tensors(
            {k: v.to(*args, **kwargs) if torch.is_tensor(v) else v for k, v in self.items()}
        )

    def copy(self) -> WeightedBatch:
        return WeightedBatch(self)

    def __or__(self, other: Mapping[str, Any]) -> WeightedBatch:
        return WeightedBatch({**self, **other})

    def __repr__(self) -> str:
        return f"WeightedBatch({model_inputs(self)!r}, loss_weight={self.loss_weight:g})"


def loss_weight(batch: Mapping[str, Any]) -> float:
    """How many times the batch's mean loss counts: its `LOSS_WEIGHT_KEY` entry, else 1."""
    return _checked_weight(batch.get(LOSS_WEIGHT_KEY, 1.0))


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What the model is called with: the batch's entries but its weight, as a plain
    (unweighted) dict. Every `model(**...)` on a batch that may be weighted goes through it."""
    return {k: v for k, v in batch.items() if k != LOSS_WEIGHT_KEY}


class Hyperparams(BaseModel):
    """Base for a method's hyperparameters; unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PrepareContext:
    """What the harness tells a method about the model it is adapting.

    head_modules: names of the freshly initialised task head (e.g. `classifier`); these stay
        fully trainable under every method (peft `modules_to_save`).
    default_target_modules: the target modules for this model family, used when the method's
        hyperparameters leave `target_modules` unset.
    init_batches: a callable returning an iterable of training batches, for methods with a
        data-informed initialisation (`Method.needs_init_batches`); it yields at most the
        number of batches the method asked for in `init_batches_wanted`.
    learning_rate, train_examples, batch_size, total_steps, warmup_ratio: the trial's
        training setup, for inits that depend on it (LoRA-SB's simulated first step,
        "1/1000 of the training set").
    offload_statistics: keep init statistics (gradient accumulators) on the CPU.
    init_notes: filled by `Method.prepare` with what its init decided and a result row must
        show (JSON values; e.g. CG-LoRA's layers with a degenerate curvature factor). The
        harness records them under `init_notes` in the row's method config.
    """

    head_modules: list[str]
    default_target_modules: list[str]
    init_batches: Callable[[int], Iterable[Batch]] | None = None
    learning_rate: float | None = None  # LoRA-SB simulates the first AdamW step with it
    train_examples: int | None = None  # so an init can use a fraction of the train set
    batch_size: int | None = None
    # The trial's optimizer steps and warm-up ratio (LoRA-SB's first-step LR: official GLUE
    # uses lr / (warmup_ratio x total_steps), the per-step increment of the linear warm-up).
    total_steps: int | None = None
    warmup_ratio: float | None = None
    # Data-informed inits keep their fp32 gradient accumulators in host memory (8B models).
    offload_statistics: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    init_notes: dict[str, Any] = field(default_factory=dict)


class ParamAccess(Protocol):
    """How a training callback reads and rewrites trainable parameters and optimizer state.

    On one device that is the tensors themselves (`LocalParamAccess`). Under DeepSpeed ZeRO
    the optimizer owns fp32 master partitions and ZeRO-3 partitions the module's parameters
    too, so the harness passes an implementation that gathers and scatters (every rank calls
    each method in the same order: reads and writes are collective).
    """

    def read(self, param: nn.Parameter) -> torch.Tensor:
        """The full parameter value (float32 master copy where one exists)."""
        ...

    def write(self, updates: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Set each parameter (and any master copy) to its full new value."""
        ...

    def reset_optimizer_state(self) -> None:
        """Every parameter's optimizer state back to fresh (AdamW: zero moments, step 0)."""
        ...

    def shape(self, param: nn.Parameter) -> torch.Size:
        """The full shape (ZeRO-3 partitions a parameter, leaving an empty local tensor)."""
        ...


class LocalParamAccess:
    """ParamAccess on one device: the parameters and the torch optimizer directly."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def read(self, param: nn.Parameter) -> torch.Tensor:
        return param.detach()

    @torch.no_grad()
    def write(self, updates: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        for param, value in updates:
            param.copy_(value)

    def reset_optimizer_state(self) -> None:
        # Dropped state is re-created lazily at the next step, as for a fresh optimizer.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state.pop(p, None)

    def shape(self, param: nn.Parameter) -> torch.Size:
        return param.shape


class TrainCallback(Protocol):
    """Called by the training loop after each optimizer step (1-based step).

    `access` (None = `LocalParamAccess(optimizer)`) is how the callback must read and rewrite
    parameters and optimizer state; a method whose callbacks do so only through it sets
    `Method.callbacks_support_zero` and then also trains under DeepSpeed ZeRO.

    A method's callbacks subclass this protocol (PEP 544: an explicit subclass inherits its
    bodies) and so get the defaults of everything but `on_step_end`: no function-preserving
    step, nothing to do on a restore, no events. The harness (harness/training/sanity.py
    `CheckedCallbacks`) uses all four members directly.
    """

    # (step, what happened) for the row's `callback_events` and for logs.
    events: Sequence[tuple[int, str]] = ()

    def on_step_end(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        access: ParamAccess | None = None,
    ) -> None:
        raise NotImplementedError

    def preserves_function(self, step: int) -> bool:
        """Whether `on_step_end(step, ...)` promises to leave the model's outputs unchanged
        (SDS-LoRA's reparameterisation); the harness checks the promise on a probe batch."""
        return False

    def on_restore(self, step: int, model: nn.Module) -> None:
        """A run resumed from a checkpoint taken after `step`: bring any state the
        checkpoint does not hold (SDS-LoRA's active form) in line with that step."""
        return None


# A rewrite of one optimizer step's gradients, applied after clipping and before the
# optimizer step: (full trainable parameters by name, their full gradients by name) -> the
# gradients it replaces, by name. Pure on full tensors, so the harness can apply it on one
# device and under ZeRO, whose optimizer only ever sees flat partitions (harness.deepspeed
# assembles the full tensors, then scatters the result back).
GradientTransform = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]
]


class Method:
    """A fine-tuning method: parameterisation, initialisation, optimizer param groups.

    Subclasses set `name`, `description`, `hyperparams_cls` and implement `prepare` and
    `expected_trainable_params`; they override `build_optimizer` when their param groups are
    not one AdamW group (LoRA+), `gradient_transform` to precondition gradients (LoRA-One),
    `callbacks` for training-time hooks, and `save_adapter` / `load_adapter` when the
    trained model holds an adapter apart from the base weights (peft methods:
    methods/peft_lora.py; plug-in adapters: methods/plugin_adapter.py).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    hyperparams_cls: ClassVar[type[Hyperparams]] = Hyperparams
    needs_init_batches: ClassVar[bool] = False
    # Callbacks touch parameters/optimizer state only through ParamAccess (ZeRO-capable).
    callbacks_support_zero: ClassVar[bool] = False
    # The data-informed init's passes keep the model's gradient checkpointing (False: they
    # switch it off, so they hold one micro-batch's full activations - CG-LoRA's K-FAC taps).
    init_keeps_gradient_checkpointing: ClassVar[bool] = True

    def family_target_modules(self, model_type: str) -> list[str]:
        """This method's default target modules for a model family (HF `model_type`), used
        when its hyperparameters leave `target_modules` unset. The harness resolves them at
        the driver into the run's method config, so they are part of the run's identity.
        Override where the method's authors adapted other modules (e.g. LoRA-SB on GLUE)."""
        return default_target_modules(model_type)

    def hyperparams(self, overrides: Mapping[str, Any] | None = None) -> Hyperparams:
        """Defaults merged with overrides, validated (raises pydantic.ValidationError)."""
        return self.hyperparams_cls(**dict(overrides or {}))

    def init_batches_wanted(self, hp: Hyperparams, ctx: PrepareContext | None = None) -> int:
        """How many training batches the data-informed init consumes (0 if none)."""
        return 0

    def init_statistics_bytes(
        self, hp: Hyperparams, layer_shapes: list[tuple[int, int]], examples: int
    ) -> int:
        """Bytes the data-informed init holds besides the model, for `layer_shapes` (out, in)
        of the targeted weights and `examples` init examples on this rank (the memory
        estimate uses it). Default: one fp32 gradient accumulator per weight, 4 sum(m n)."""
        return 4 * sum(out_dim * in_dim for out_dim, in_dim in layer_shapes)

    def prepare(self, model: nn.Module, hp: Hyperparams, ctx: PrepareContext) -> nn.Module:
        """Return the model to train (wrapped/reparameterised, init done, trainables set)."""
        raise NotImplementedError

    def build_optimizer(
        self, model: nn.Module, lr: float, hp: Hyperparams, weight_decay: float = 0.0
    ) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def gradient_transform(self, hp: Hyperparams) -> GradientTransform | None:
        """A rewrite of each step's (clipped) gradients before the optimizer sees them
        (LoRA-One's r x r preconditioners); None for plain gradients."""
        return None

    def callbacks(self, hp: Hyperparams, total_steps: int) -> list[TrainCallback]:
        """Training-time hooks (`TrainCallback` subclasses); `total_steps` is the run's
        number of optimizer steps (for schedules tied to the run length, e.g. SDS-LoRA's
        warm-up and basis refresh)."""
        return []

    def starts_at_base(self, hp: Hyperparams) -> bool:
        """Whether the prepared model computes the base model's function (before training).

        The harness checks this promise on a probe batch: outputs equal the base model's
        when True, and differ from them (the method's deliberate offset) when False.
        """
        return True

    def merge(self, model: nn.Module) -> nn.Module | None:
        """Fold the adapter into plain weights (in place allowed); None if not mergeable.

        Called once, after evaluation; the harness checks merged outputs equal unmerged ones.
        """
        return None

    def save_adapter(self, model: nn.Module, path: str | Path) -> None:
        """Write the prepared (trained) model's adapter - what the method added to the base
        model, not the base weights - into the folder `path`, for `load_adapter`. The task
        head need not be in it (the harness saves it beside). Raises NotImplementedError
        where the method has no adapter apart from the model (full fine-tuning: the harness
        then saves the whole model)."""
        raise NotImplementedError(f"{self.name} has no adapter apart from the model")

    def load_adapter(self, base_model: nn.Module, path: str | Path) -> nn.Module:
        """The model `save_adapter` saved into `path`, rebuilt on a freshly loaded base
        model (the one the method's init saw: for W0-moving inits, the moved base)."""
        raise NotImplementedError(f"{self.name} has no adapter apart from the model")

    def expected_trainable_params(
        self, base_model: nn.Module, hp: Hyperparams, ctx: PrepareContext
    ) -> int:
        """Closed-form trainable-parameter count, computed on the *unprepared* base model.

        The harness compares it with the prepared model's count as a sanity check.
        """
        raise NotImplementedError

    def resolved_config(self, hp: Hyperparams, ctx: PrepareContext) -> dict[str, Any]:
        """The hyperparameters as actually used (defaults filled in), for result rows."""
        return hp.model_dump()
