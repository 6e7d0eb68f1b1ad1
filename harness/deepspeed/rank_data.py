"""Per-rank data of a distributed trial: this rank's micro-batches of each global batch, in
the single-device loop's order, for training and for data-informed inits.

Each optimizer step consumes one global batch (`budget.batch_size`) drawn in the same
seeded order as the single-device loop (incomplete last batches are dropped); rank r takes
its contiguous share and splits it into `accumulation` micro-batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch


class RankShares:
    """This rank's micro-batches of each global batch, in the single-device loop's order.

    A DataLoader over the row indices with the same seeded generator draws the same
    permutation as `pipeline.loader(global_batch, seed)`; incomplete global batches are
    dropped so every rank has `accumulation` full micro-batches every step.
    """

    def __init__(self, pipeline, plan, rank: int, device) -> None:
        if len(pipeline.train_rows) < plan.global_batch:
            raise ValueError(
                f"{len(pipeline.train_rows)} train rows cannot fill one global batch of "
                f"{plan.global_batch}"
            )
        self.pipeline, self.plan, self.rank, self.device = pipeline, plan, rank, device

    def steps(self, seed: int) -> Iterator[list[list[int]]]:
        """Endless: per optimizer step, this rank's micro-batches as row-index lists."""
        from torch.utils.data import DataLoader

        plan = self.plan
        generator = torch.Generator().manual_seed(seed)
        order = DataLoader(
            range(len(self.pipeline.train_rows)),
            batch_size=plan.global_batch,
            shuffle=True,
            generator=generator,
            drop_last=True,
            collate_fn=list,
        )
        lo = self.rank * plan.per_rank
        while True:
            for indices in order:
                mine = indices[lo : lo + plan.per_rank]
                yield [
                    mine[i * plan.micro_batch : (i + 1) * plan.micro_batch]
                    for i in range(plan.accumulation)
                ]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.pipeline.train_rows[i] for i in indices]
        return {k: v.to(self.device) for k, v in self.pipeline.collate(rows).items()}

    def init_batches(self, seed: int):
        """`ctx.init_batches` for data-informed inits: this rank's micro-batches of the
        first n global batches (the estimator all-reduces sums and counts over ranks), as
        `WeightedBatch`es weighted by their share of the global batch's loss terms x the
        micro-batches per global batch - so the estimators' average over micro-batches is
        the single-device average over whole batches, for token-level losses too.

        The random state is put back when the batches are used up: forward passes over
        different micro-batches draw different amounts of randomness (dropout masks of
        different shapes), and an init that draws after them (peft's LoRA-GA randomized SVD)
        would otherwise start from a different state on every rank.
        """
        import torch.distributed as tdist

        from methods.base import WeightedBatch

        world = tdist.get_world_size() if tdist.is_initialized() else 1

        def batches(n: int):
            saved = rng_state()
            try:
                for step in itertools.islice(self.steps(seed), n):
                    micro = [WeightedBatch(self.collate(indices)) for indices in step]
                    terms = [float(self.pipeline.loss_terms(b)) for b in micro]
                    total = torch.tensor(sum(terms), dtype=torch.float64, device=self.device)
                    if world > 1:
                        tdist.all_reduce(total)  # every rank draws the same n global batches
                    if float(total) <= 0:
                        raise ValueError("an init batch has no loss terms (every label ignored)")
                    for batch, count in zip(micro, terms, strict=True):
                        batch.loss_weight = count * len(micro) * world / float(total)
                        yield batch
            finally:
                set_rng_state(saved)

        return batches


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
