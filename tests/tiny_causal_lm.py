"""A tiny seeded random Llama with a small byte-level BPE tokenizer, saved as a model folder.

Offline stand-in for a pretrained causal LM in tests that need a real model folder (a trial
reads `model.id` as a folder; lm-eval's HFLM takes the model instance): byte-level, so any
text tokenizes without unknown tokens; the BPE is trained on the shipped forgetting corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.training.forgetting import SHIPPED_CORPUS

EOS = "<|endoftext|>"


def byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SHIPPED_CORPUS.read_text(encoding="utf-8")], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def tiny_random_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def save_tiny_causal_lm(folder: Path) -> Path:
    """Write the tokenizer and a tiny random Llama (matching vocabulary) into `folder`."""
    tokenizer = byte_level_tokenizer()
    assert tokenizer.convert_tokens_to_ids(EOS) == 0  # the config's special ids
    tiny_random_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
