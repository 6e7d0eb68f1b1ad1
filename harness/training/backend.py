"""What differs between a single-device trial and one rank of a DeepSpeed trial.

harness.training.trial's `run_recipe` is the one trial recipe (data -> model -> method -> train ->
evaluate -> record); it asks a `Backend` for what depends on where it runs: the process
settings, the init batches, the wrapped model and optimizer (a harness.training.train `Stepper`,
which takes each optimizer step over this process's micro-batches and gives the callbacks
their parameter access), checkpoints, reductions and agreement checks across ranks, the
adapter artifact and the merge check. `LocalBackend` is world size 1 with one micro-batch
per step; harness.deepspeed.engine's `DeepSpeedBackend` is one rank under ZeRO-2/3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from harness.heads.sharding import Shard
from harness.spec.identity import TrialSpec
from harness.sweeps.progress import progress_bar
from harness.sweeps.tracking import LiveReport
from harness.training import memory, sanity
from harness.training.adapters import AdapterSaver
from harness.training.train import SCHEDULES, Batch, LocalStepper, Stepper, TrainState, local_steps
from methods.base import GradientTransform, Method

InitBatches = Callable[[int], Iterator[Batch]]
Report = Callable[[dict[str, Any]], None]


class ArtifactSaver(Protocol):
    """Where the trained adapter goes (harness.training.adapters' `AdapterSaver` on one device)."""

    def before_init(self, model: nn.Module) -> None: ...

    def after_init(self, model: nn.Module) -> None: ...

    def save(self, model: nn.Module, method: Method, spec: Any, probe: Batch,
             outputs: torch.Tensor, head_modules: list[str]) -> dict[str, Any]:  # fmt: skip
        """Write the artifact; returns the row's columns for it."""
        ...


class Backend(Protocol):
    """The recipe's view of where it runs (every rank of a distributed trial calls each
    hook alike: several are collective)."""

    device: torch.device
    weights_dtype: torch.dtype  # how the model is loaded
    # The precision the method's checks compare at: weights_dtype, or the autocast dtype.
    checks_dtype: torch.dtype
    offload_init_statistics: bool  # data-informed inits keep gradient sums in host memory
    probes_forgetting: bool  # the forgetting probe needs the whole model on this process

    def start(self) -> None:
        """Process settings (threads, current device) before anything is loaded."""
        ...

    def compute(self) -> contextlib.AbstractContextManager:
        """The context the method's init, training and evaluation run in (bf16 autocast on
        one GPU; nothing otherwise). The merge check runs outside it, at weights_dtype."""
        ...

    def adapt_model(self, model: nn.Module) -> None:
        """Before the method: settings of the loaded model (gradient checkpointing)."""
        ...

    def init_batches(self, pipeline) -> InitBatches:
        """`ctx.init_batches` for data-informed inits (this rank's share, weighted)."""
        ...

    def check_init(self, model: nn.Module) -> None:
        """After the method's init: every rank holds the same adapter, or SanityError."""
        ...

    def adapter_saver(self) -> ArtifactSaver | None: ...

    def wrap(
        self,
        pipeline,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_transform: GradientTransform | None,
        total_steps: int,
    ) -> Stepper:
        """The prepared model and the method's optimizer, ready to step (with the LR
        schedule; under ZeRO, partitioned by the DeepSpeed engine)."""
        ...

    def eval_shard(self) -> Shard | None:
        """This rank's share of the evaluation items (None: all of them)."""
        ...

    def restore(self) -> TrainState:
        """Where training starts: a fresh state, or the run's latest checkpoint."""
        ...

    def training_batches(self, pipeline, state: TrainState) -> Iterator[list[Batch]]:
        """Per optimizer step, this rank's micro-batches of the single-device batch, after
        the `state.step` batches already trained on."""
        ...

    def live_reporting(self, total_steps: int) -> tuple[Report | None, int | None]:
        """(report function, steps between reports) for `train_loop`, or (None, None)."""
        ...

    def check_after_training(self, model: nn.Module) -> None:
        """Every rank holds the same module buffers (callbacks rewrite some), or SanityError."""
        ...

    def peak_memory(self) -> tuple[float, str]:
        """(peak MB, what was measured), the maximum over ranks."""
        ...

    def merge_check(self, method: Method, model: nn.Module, probe: Batch,
                    unmerged: torch.Tensor) -> str:  # fmt: skip
        """The row's `sanity_merge`: merged == unmerged outputs, where it can be checked
        (merges in place: the trial's last use of the model)."""
        ...

    def record(self, row: dict[str, Any], callbacks: sanity.CheckedCallbacks) -> None:
        """The backend's own columns (the `distributed` record)."""
        ...


class LocalBackend:
    """One device, one process: world size 1, one micro-batch per optimizer step.

    `autocast`: a lower compute dtype (torch.bfloat16) for init, training and evaluation,
    with float32 weights and optimizer states (cluster/gpu_check.py's bf16 trials); None,
    the default and what every sweep trial uses, computes in float32."""

    weights_dtype = torch.float32
    offload_init_statistics = False
    probes_forgetting = True

    def __init__(
        self,
        spec: TrialSpec,
        live: LiveReport | None = None,
        adapters_dir: str | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.spec, self.live, self.adapters_dir = spec, live, adapters_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = autocast
        self.checks_dtype = autocast or self.weights_dtype

    def compute(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def start(self) -> None:
        torch.set_num_threads(self.spec.threads)

    def adapt_model(self, model: nn.Module) -> None:
        pass

    def init_batches(self, pipeline) -> InitBatches:
        spec = self.spec

        def first_batches(n: int):
            batches = pipeline.batches(spec.budget.batch_size, spec.seed + 1, self.device)
            for i, batch in enumerate(batches):
                if i >= n:
                    return
                yield batch

        def init_batches(n: int):  # a bar on a terminal: inits can read many batches
            yield from progress_bar(first_batches(n), total=n, desc=f"{spec.method} init")

        return init_batches

    def check_init(self, model: nn.Module) -> None:
        pass

    def adapter_saver(self) -> AdapterSaver | None:
        if not self.adapters_dir:
            return None
        return AdapterSaver(Path(self.adapters_dir) / self.spec.key())

    def wrap(
        self,
        pipeline,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_transform: GradientTransform | None,
        total_steps: int,
    ) -> LocalStepper:
        budget = self.spec.budget
        schedule = SCHEDULES[budget.schedule or "linear"]
        scheduler = schedule(optimizer, total_steps, budget.warmup_ratio)
        return LocalStepper(model, optimizer, scheduler, budget.max_grad_norm, grad_transform)

    def eval_shard(self) -> None:
        return None

    def restore(self) -> TrainState:
        return TrainState()

    def training_batches(self, pipeline, state: TrainState) -> Iterator[list[Batch]]:
        return local_steps(pipeline.loader(self.spec.budget.batch_size, self.spec.seed),
                           self.device)  # fmt: skip

    def live_reporting(self, total_steps: int) -> tuple[Report | None, int | None]:
        if self.live is None:
            return None, None
        return self.live, self.live.interval(total_steps)

    def check_after_training(self, model: nn.Module) -> None:
        pass

    def peak_memory(self) -> tuple[float, str]:
        return memory.peak_mb(self.device)

    def merge_check(self, method: Method, model: nn.Module, probe: Batch,
                    unmerged: torch.Tensor) -> str:  # fmt: skip
        merged = method.merge(model)
        if merged is None:
            return "not mergeable"
        return sanity.check_merge(unmerged, sanity.outputs(merged, probe))

    def record(self, row: dict[str, Any], callbacks: sanity.CheckedCallbacks) -> None:
        pass
