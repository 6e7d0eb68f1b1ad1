"""Sharded evaluation (harness/heads/sharding.py): 2 gloo ranks give what one process gives."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.heads.generate import greedy_generate
from harness.heads.pipelines import make_loader
from harness.heads.sharding import Shard
from harness.training.train import predict
from tests.builders import tiny_bert, word_llama, word_tokenizer

N_ITEMS, BATCH = 5, 2  # shards of 3 and 2 items: 2 and 1 calls, so one dummy call under sync


def _rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1, 100, (4 + i % 3,), generator=g).tolist(),
         "attention_mask": [1] * (4 + i % 3)}
        for i in range(N_ITEMS)
    ]  # fmt: skip


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _prompts() -> list[list[int]]:
    return [[3, 5 + i % 4, 6, 7 + i % 3, 4] for i in range(N_ITEMS)]


def _logits(model, part: list) -> np.ndarray:
    return predict(model, make_loader(part, _collate, BATCH, False))


def _generate(model, tok, part: list, synced: bool) -> list[str]:
    return greedy_generate(model, tok, part, max_new_tokens=4, batch_size=BATCH, synced_gpus=synced)


def _rank(rank: int, world: int, init_file: str, out: str, synced: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = Shard(rank, world, synced=synced)
        bert, llama, tok = tiny_bert(), word_llama(), word_tokenizer()
        calls = []

        def counted(part):
            calls.append(len(part))
            return _logits(bert, part)

        logits = np.stack(shard.map(_rows(), counted, BATCH))
        texts = shard.map(_prompts(), lambda p: _generate(llama, tok, p, synced), BATCH)
        torch.save({"logits": logits, "texts": texts, "calls": calls}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("synced", [False, True])
def test_two_ranks_evaluate_shards_and_gather_what_one_process_computes(synced):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, f"{tmp}/rendezvous", tmp, synced), nprocs=2, join=True)
        results = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in (0, 1)]
    expected_logits = _logits(tiny_bert(), _rows())
    expected_texts = _generate(word_llama(), word_tokenizer(), _prompts(), synced=False)
    for result in results:  # every rank ends with every item, in the original order
        np.testing.assert_allclose(result["logits"], expected_logits, rtol=1e-5, atol=1e-6)
        assert result["texts"] == expected_texts
    # Rank 0 evaluated items 0, 2, 4 (3 items, 2 calls); rank 1 items 1, 3 (1 call), plus a
    # one-item dummy call when synced so both make 2 model calls.
    assert results[0]["calls"] == [3]
    assert results[1]["calls"] == ([2, 1] if synced else [2])


def test_a_single_rank_shard_is_the_plain_evaluation():
    rows = _rows()
    model = tiny_bert()
    np.testing.assert_allclose(
        np.stack(Shard(0, 1).map(rows, lambda part: _logits(model, part), BATCH)),
        _logits(model, rows),
    )
    with pytest.raises(ValueError, match="outside world"):
        Shard(2, 2)
