"""Batched, deterministic greedy generation for the generative tasks' evaluation."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig

from harness.sweeps.progress import progress_bar


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    synced_gpus: bool = False,
) -> list[str]:
    """The decoded continuation of each prompt (token ids), in input order.

    Prompts are batched by length (less padding) and left-padded, so every row's new tokens
    start at the same position; decoding stops at EOS or after `max_new_tokens`. Greedy
    decoding makes the result a function of the weights alone. `synced_gpus` (ZeRO-3 with
    sharded prompts): keep stepping until every rank has finished (collective forwards).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to stop generation at")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    # An explicit config, so a checkpoint's own generation defaults (sampling, repetition
    # penalties) never change the protocol.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    try:
        starts = range(0, len(order), batch_size)
        for start in progress_bar(starts, total=len(starts), desc="generate"):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, width - n :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                synced_gpus=synced_gpus,
            )
            for row, i in enumerate(chunk):
                texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts
