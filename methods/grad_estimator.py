"""The gradient statistics the data-informed inits (LoRA-GA, LoRA-One, LoRA-SB) start from.

`layer_gradients` runs forward/backward over N training batches and returns, per target
layer, the float32 sum of the per-batch (mean-loss) weight gradients and the batch count.

Memory: only the target weights require grad, and a post-accumulate hook moves each
layer's `.grad` into its float32 accumulator the moment autograd finishes it, then frees
it, so at most one layer's fresh gradient exists beside the accumulators. With
`offload=True` the accumulators live on the CPU, so device memory holds O(one layer).
Callers consume the result layer by layer with `pop`, freeing each accumulator as they go.

Distributed: under torch.distributed (DDP, DeepSpeed) the sums and the batch count are
all-reduced, so every rank computes the identical initialisation from all ranks' batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from methods.base import Batch, Hyperparams, loss_weight, model_inputs


@dataclass
class LayerGradients:
    sums: dict[str, torch.Tensor]  # name -> sum over batches of dL/dW, float32, (out, in)
    batches: int  # over all ranks

    def pop_mean(self, name: str) -> torch.Tensor:
        return self.sums.pop(name) / self.batches

    def pop_sum(self, name: str) -> torch.Tensor:
        return self.sums.pop(name)

    def names(self) -> list[str]:
        return list(self.sums)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.sums))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.enable_grad()
def layer_gradients(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[Batch],
    *,
    offload: bool = False,
) -> LayerGradients:
    """Sum of dL/dW over `batches` for each layer in `layers` (float32), all-reduced."""
    if not layers:
        raise ValueError("no layers to estimate gradients for")
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    acc_device = torch.device("cpu") if offload else None
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().to(dtype=torch.float32, device=acc_device or param.device)
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad.clone()
            param.grad = None  # free it now: O(one layer) of fresh gradient at a time

        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            hooks.append(layer.weight.register_post_accumulate_grad_hook(make_hook(name)))
        model.train()  # the first training step sees the model in training mode
        count = 0
        for batch in batches:
            loss = model(**model_inputs(batch)).loss
            weight = loss_weight(batch)  # a distributed micro-batch's share (WeightedBatch)
            (loss * weight if weight != 1.0 else loss).backward()
            count += 1
        if count == 0:
            raise ValueError("the init batch iterator yielded no batch")
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)

    total = torch.tensor(float(count))
    if is_distributed():
        dist.all_reduce(total)
        for name in layers:
            tensor = sums[name]
            dist.all_reduce(tensor)
    return LayerGradients(sums={n: sums[n] for n in layers}, batches=int(total.item()))


def _batch_size(batch: Batch) -> int:
    for key in ("input_ids", "pixel_values", "labels"):
        if key in batch and torch.is_tensor(batch[key]) and batch[key].ndim > 0:
            return int(batch[key].shape[0])
    return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])


def example_batches(batches: Iterable[Batch], examples: int) -> Iterator[Batch]:
    """Single-example batches: the first `examples` examples of `batches`, one per batch.

    What the official LoRA-GA / LoRA-One code does (a DataLoader of batch size 1, 8
    iterations): the estimate is the mean over examples of each example's mean-loss
    gradient. Every tensor whose first dimension is the batch size is sliced (padding kept;
    the attention mask hides it). Under torch.distributed the examples are split over the
    ranks (rank i takes `examples // world` + 1 if i < `examples % world` from its own
    share), so the all-reduced count is `examples`. Raises if the batches run out first.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
    quota = examples // world + (1 if rank < examples % world else 0)
    if quota == 0:
        raise ValueError(f"{examples} init examples cannot be split over {world} processes")
    source = iter(batches)
    try:
        yield from _take_examples(source, quota)
    finally:
        close = getattr(source, "close", None)
        if close is not None:  # a generator's cleanup (the distributed RNG restore) runs now
            close()


def _take_examples(batches: Iterator[Batch], quota: int) -> Iterator[Batch]:
    taken = 0
    for batch in batches:
        n = _batch_size(batch)
        # Each example counts once, as on one device: a distributed micro-batch's weight
        # is its share of the global batch's loss terms, not any one example's, so the
        # examples are built from the model inputs alone (unweighted), never the weight.
        tensors = model_inputs(batch)
        for i in range(n):
            if taken == quota:
                return
            yield {
                k: v[i : i + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
                for k, v in tensors.items()
            }
            taken += 1
        if taken == quota:
            return
    raise ValueError(f"the init batches held {taken} examples, {quota} were asked for")


def init_sample(
    batches: Callable[[int], Iterable[Batch]],
    examples: int | None,
    n_batches: int | None,
) -> Iterable[Batch]:
    """What a data-informed init averages over: `examples` single-example batches (drawn
    lazily from at most `examples` trial batches), else `n_batches` whole trial batches."""
    if examples is not None:
        return example_batches(batches(examples), examples)
    if n_batches is None:
        raise ValueError("set init_examples or init_batches")
    return batches(n_batches)


class InitSampleHyperparams(Hyperparams):
    """How many examples a gradient-based init averages over (LoRA-GA, LoRA-One): by default
    8 single-example batches, as both official codes (bsz 1 x iters 8); or whole batches."""

    init_examples: int | None = Field(
        8, gt=0, description="single-example batches G averages (official: bsz 1 x iters 8)"
    )
    init_batches: int | None = Field(
        None, gt=0, description="instead: whole trial batches (set alone, it turns "
        "init_examples off; the behaviour before init_examples existed)",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _batches_replace_examples(cls, data):
        if isinstance(data, dict) and data.get("init_batches") is not None:
            data = {"init_examples": None, **data}
        return data

    @model_validator(mode="after")
    def _one_sample_size(self):
        if (self.init_examples is None) == (self.init_batches is None):
            raise ValueError("set exactly one of init_examples and init_batches")
        return self

    def trial_batches_wanted(self, batch_size: int | None) -> int:
        """Trial batches the init reads: init_batches, or those holding init_examples."""
        if self.init_batches is not None:
            return self.init_batches
        return -(-self.init_examples // (batch_size or 1))
