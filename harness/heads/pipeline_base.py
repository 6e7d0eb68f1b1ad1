"""What every pipeline kind shares (harness.heads.pipelines): the `Pipeline` record a trial reads,
its seeded loaders and per-item outcome records. Below harness.heads.pipelines, which builds the
sequence and causal-LM pipelines and dispatches to harness.heads.image_pipeline and
harness.heads.seq2seq_pipeline; those two build on this module, not on harness.heads.pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness.heads.sharding import Shard
from harness.modeling.models import LoadedModel
from harness.training.train import cycle
from tasks.generative import IGNORE_INDEX


def make_loader(
    rows, collate, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=generator,
        drop_last=drop_last,
    )


def item_record(predictions: np.ndarray, labels: np.ndarray, regression: bool) -> dict:
    if regression:
        return {"pred": np.round(predictions, 5).tolist(), "label": labels.tolist()}
    return {"pred": predictions.astype(int).tolist(), "label": labels.astype(int).tolist()}


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms of a per-example loss (classification, regression): the examples."""
    return int(batch["labels"].shape[0])


def target_tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms of a causal LM's token-mean loss: the labelled tokens after the shift."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


@dataclass
class Pipeline:
    """A loaded model plus the train rows, batching and split evaluators of one trial."""

    loaded: LoadedModel
    train_rows: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    evaluators: dict[str, Callable[[], dict[str, float]]]  # "selection", "test/<name>"
    # Per-item outcomes of the last evaluation of each split (for paired statistics):
    # {"pred": [...], "label": [...]} or, for generative tasks, {"correct": [...]}.
    items: dict[str, dict[str, list]] = field(default_factory=dict)
    # Distributed trials: each rank evaluates its share of the items (harness.heads.sharding).
    shard: Shard | None = None
    # What the model's loss averages over in a batch, so that micro-batches can be weighted
    # to give the whole batch's mean (harness.deepspeed.engine.global_batch_step).
    loss_terms: Callable[[dict[str, torch.Tensor]], int] = examples_in

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def loader(self, batch_size: int, seed: int) -> DataLoader:
        """Training batches in a seeded order; an epoch's incomplete last batch is dropped,
        so every step is one full batch - the global batches of the distributed path
        (harness.deepspeed.rank_data.RankShares draws the same order)."""
        return make_loader(
            self.train_rows, self.collate, batch_size, shuffle=True, seed=seed, drop_last=True
        )

    def batches(self, batch_size: int, seed: int, device) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches (epochs reshuffled, as in training), on `device`."""
        if len(self.train_rows) < batch_size:
            raise ValueError(
                f"{len(self.train_rows)} train rows cannot fill a batch of {batch_size}"
            )
        for batch in cycle(self.loader(batch_size, seed)):
            yield {k: v.to(device) for k, v in batch.items()}

    def evaluate(self, split: str) -> dict[str, float]:
        return self.evaluators[split]()
