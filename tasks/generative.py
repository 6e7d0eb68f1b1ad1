"""What every generative (causal-LM) task shares: one prompt for training and evaluation,
loss on the response only, greedy decoding scored by the task's answer extraction.

A concrete task says how a row becomes a prompt and a target (`prompt`, `target`) and when a
generation is correct (`is_correct`); this base turns that into token ids. The prompt tokens
a model trains on are exactly the tokens it is evaluated on (tests check it token for token),
and no token id is hard-coded: EOS and padding come from the tokenizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from tasks.base import Task

IGNORE_INDEX = -100  # labels the loss skips (prompt tokens, padding): torch CrossEntropy default


class GenerativeTask(Task):
    head = "causal_lm"
    num_labels = 0
    selection_metric = "accuracy"
    headline_metric = "accuracy"
    max_new_tokens: ClassVar[int] = 32
    # Cut a generation at the first of these (the model may start a new example).
    stop_strings: ClassVar[tuple[str, ...]] = ()
    # Chat-formatted prompts carry their own special tokens; plain templates get the
    # tokenizer's usual ones (e.g. Llama's BOS).
    uses_chat_template: ClassVar[bool] = False
    # Tasks whose training data has no answer key (free-form code) select the LR by the
    # teacher-forced loss on held-out training rows: selection metric "neg_loss".
    selection_by_loss: ClassVar[bool] = False

    # -- what a concrete task defines ------------------------------------------------------
    def prompt(self, row: pd.Series, tokenizer: Any) -> str:
        raise NotImplementedError

    def target(self, row: pd.Series) -> str:
        raise NotImplementedError

    def is_correct(self, generation: str, row: pd.Series) -> bool:
        raise NotImplementedError

    def aggregate(self, correct: np.ndarray, rows: pd.DataFrame) -> dict[str, float]:
        """Metrics from per-item correctness (default: accuracy)."""
        return {"accuracy": float(np.mean(correct)) if len(correct) else 0.0}

    # -- token ids, shared -----------------------------------------------------------------
    def add_special_tokens(self, tokenizer: Any) -> bool:
        return not self.uses_chat_template

    def prompt_ids(self, tokenizer: Any, row: pd.Series, max_length: int) -> list[int]:
        text = self.prompt(row, tokenizer)
        ids = tokenizer(text, add_special_tokens=self.add_special_tokens(tokenizer))["input_ids"]
        return list(ids[-max_length:])  # keep the end: the question sits next to the answer

    def encode(self, tokenizer: Any, rows: pd.DataFrame, max_length: int) -> dict[str, list]:
        """input_ids = prompt + target + EOS; labels mask the prompt with IGNORE_INDEX.

        Over-long examples lose prompt tokens from the left first, then target tokens from
        the right, so every example keeps at least one supervised token.
        """
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; generative training needs one")
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for _, row in rows.iterrows():
            prompt = self.prompt_ids(tokenizer, row, max_length)
            answer = tokenizer(self.target(row), add_special_tokens=False)["input_ids"]
            answer = list(answer)[: max_length - 1] + [tokenizer.eos_token_id]
            prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
            ids = prompt + answer
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
        return out

    def encode_prompts(self, tokenizer: Any, rows: pd.DataFrame, max_length: int) -> list[list]:
        return [self.prompt_ids(tokenizer, row, max_length) for _, row in rows.iterrows()]

    def cut(self, generation: str) -> str:
        for stop in self.stop_strings:
            at = generation.find(stop)
            if at >= 0:
                generation = generation[:at]
        return generation

    def score(self, generations: list[str], rows: pd.DataFrame) -> tuple[dict[str, float], list]:
        """(metrics, per-item correctness) for generations in row order."""
        if len(generations) != len(rows):
            raise ValueError(f"{len(generations)} generations for {len(rows)} rows")
        pairs = zip(generations, rows.iterrows(), strict=True)
        correct = np.array([bool(self.is_correct(self.cut(g), row)) for g, (_, row) in pairs])
        return self.aggregate(correct, rows), correct.tolist()
