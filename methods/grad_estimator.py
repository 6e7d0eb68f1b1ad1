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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from methods.base import Batch, loss_weight


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


def _distributed() -> bool:
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
            loss = model(**batch).loss
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
    if _distributed():
        dist.all_reduce(total)
        for name in layers:
            tensor = sums[name]
            dist.all_reduce(tensor)
    return LayerGradients(sums={n: sums[n] for n in layers}, batches=int(total.item()))
