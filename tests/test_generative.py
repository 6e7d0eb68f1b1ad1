"""The causal-LM path: prompt/label encoding, padding, batched greedy generation."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from harness.heads.generate import greedy_generate
from harness.heads.pipelines import pad_causal_batch
from tasks.generative import IGNORE_INDEX, GenerativeTask
from tests.builders import WORDS, word_llama, word_tokenizer


class ToyQA(GenerativeTask):
    id = "toy/qa"
    description = "toy"
    protocol = "toy-v0"
    max_new_tokens = 4

    def prompt(self, row, tokenizer):
        return f"Q: {row['q']} A:"

    def target(self, row):
        return row["a"]

    def is_correct(self, generation, row):
        return generation.strip().split()[:1] == [row["a"]]


ROWS = pd.DataFrame({"q": ["what is two plus three", "w1 w2"], "a": ["five", "w3 w4 w5"]})


def test_labels_mask_the_prompt_and_end_in_eos():
    tok, task = word_tokenizer(), ToyQA()
    enc = task.encode(tok, ROWS, max_length=32)
    for i, (_, row) in enumerate(ROWS.iterrows()):
        prompt = task.prompt_ids(tok, row, 32)
        answer = tok(row["a"], add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][i] == prompt + answer + [tok.eos_token_id]
        assert enc["labels"][i] == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]


def test_training_prompt_tokens_are_exactly_the_evaluation_prompt():
    tok, task = word_tokenizer(), ToyQA()
    enc = task.encode(tok, ROWS, max_length=32)
    prompts = task.encode_prompts(tok, ROWS, max_length=32)
    for ids, labels, prompt in zip(enc["input_ids"], enc["labels"], prompts, strict=True):
        n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        assert ids[:n_prompt] == prompt


def test_over_long_examples_lose_prompt_first_and_keep_supervision():
    tok, task = word_tokenizer(), ToyQA()
    enc = task.encode(tok, ROWS, max_length=5)
    for ids, labels in zip(enc["input_ids"], enc["labels"], strict=True):
        assert len(ids) <= 5 and labels[-1] == tok.eos_token_id
        assert any(x != IGNORE_INDEX for x in labels)
    # Row 1: answer "w3 w4 w5" + EOS = 4 tokens, so 1 prompt token ("A:") is left.
    assert enc["input_ids"][1] == tok("A: w3 w4 w5", add_special_tokens=False)["input_ids"] + [1]


def test_padding_is_masked_in_attention_and_loss():
    tok, task = word_tokenizer(), ToyQA()
    enc = task.encode(tok, ROWS, max_length=32)
    rows = [dict(zip(enc, v, strict=True)) for v in zip(*enc.values(), strict=True)]
    batch = pad_causal_batch(tok.pad_token_id)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    # The loss equals the mean token cross-entropy over the answer tokens only.
    model = word_llama()
    out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)


def test_batched_left_padded_generation_equals_one_at_a_time():
    tok, model = word_tokenizer(), word_llama()
    prompts = [[3, 5, 6, 7, 8, 9, 4], [3, 12, 4], [3, 13, 14, 15, 4]]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(text for text in batched)  # something was generated
    again = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert again == batched  # deterministic, independent of batching


def test_score_cuts_at_stop_strings_and_counts_correct_items():
    class Stopping(ToyQA):
        stop_strings = ("Q:",)

    task = Stopping()
    metrics, correct = task.score(["five Q: w1", "w9"], ROWS)
    assert correct == [True, False] and metrics == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="generations for"):
        task.score(["five"], ROWS)


def test_target_token_count_is_the_causal_lm_loss_denominator():
    """`target_tokens_in` counts what the model's loss averages over, so weighting
    micro-batch losses by it (harness.deepspeed.engine.global_batch_step) rebuilds the whole
    batch's loss exactly, however unevenly the answers' lengths fall."""
    from harness.heads.pipelines import pad_causal_batch, target_tokens_in
    from tasks.generative import IGNORE_INDEX

    model = word_llama().eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, answer in [(3, 1), (2, 7), (4, 2), (1, 5)]:
        ids = torch.randint(1, len(WORDS), (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})  # fmt: skip
    collate = pad_causal_batch(0)
    whole = collate(rows)
    with torch.no_grad():
        full = model(**whole).loss
        parts = [collate(rows[:2]), collate(rows[2:])]
        weighted = sum(model(**p).loss * target_tokens_in(p) for p in parts)
        mean_of_means = sum(model(**p).loss for p in parts) / 2
    assert target_tokens_in(whole) == sum(target_tokens_in(p) for p in parts)
    torch.testing.assert_close(weighted / target_tokens_in(whole), full)
    assert abs(float(mean_of_means - full)) > 1e-3  # the unweighted average differs
