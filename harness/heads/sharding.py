"""Evaluation split across the ranks of a distributed trial.

Without it every rank evaluates every item (correct, but world-size times the work: 8x for a
generative test set on 8 GPUs). With a `Shard`, rank r evaluates items r, r + world, ...,
and the per-item results are gathered back into the original order on every rank, so every
rank computes the same metrics from the same predictions.

Under ZeRO-3 every forward pass is collective (each module's parameters are gathered from
all ranks), so `synced` makes every rank run the same number of model calls: a rank with
fewer items runs dummy calls on one item (results discarded), and generation passes
`synced_gpus` so ranks that finished decoding keep stepping until all have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    synced: bool = False  # ZeRO-3: equal numbers of forward calls on every rank

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world of {self.world}")

    def map(
        self,
        items: Sequence[Any],
        evaluate: Callable[[list[Any]], Sequence[Any]],
        batch_size: int,
    ) -> list[Any]:
        """`evaluate` (a list of items -> one result per item, in ceil(len / batch_size)
        model calls) over this rank's share, gathered into the order of `items`."""
        n = len(items)
        local = list(items[self.rank :: self.world])
        results = list(evaluate(local)) if local else []
        if len(results) != len(local):
            raise ValueError(f"evaluate returned {len(results)} results for {len(local)} items")
        if self.synced and n:
            most = math.ceil(math.ceil(n / self.world) / batch_size)
            for _ in range(most - math.ceil(len(local) / batch_size)):
                evaluate(list(items[:1]))  # a dummy call, so collectives line up
        gathered = _all_gather(results, self.world)
        ordered: list[Any] = [None] * n
        filled = 0
        for rank, part in enumerate(gathered):
            for j, value in enumerate(part):
                ordered[rank + j * self.world] = value
                filled += 1
        if filled != n:
            raise RuntimeError(f"gathered {filled} results for {n} items")
        return ordered


def _all_gather(value: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
