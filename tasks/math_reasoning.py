"""Math reasoning: MetaMathQA -> GSM8K and MATH (tasks/protocols/math.py scores answers).

`metamathqa`: train on MetaMathQA (query -> response, responses end "The answer is: X"),
evaluate GSM8K test (numeric answer) and MATH-500 (boxed answer, Hendrycks equivalence);
`metamathqa_full_math` evaluates the full 5,000-problem MATH test instead of MATH-500.
Prompt: MetaMath's Alpaca template ending "### Response: Let's think step by step.", the
same text in training and evaluation. Decoding: greedy, 512 new tokens (eval.max_new_tokens
overrides it for quick runs; the row's protocol records the override through its budget).

`gsm8k_offline` is a STAND-IN (labelled in every row): it trains on GSM8K's own training
split (calculator annotations <<...>> removed, the '#### N' line kept) instead of
MetaMathQA, and evaluates on GSM8K test and MATH-500 from the mirror.
"""

from __future__ import annotations

import re
from fractions import Fraction

import pandas as pd

from tasks.base import DataSplits
from tasks.data import load_split, roles_provenance, split_roles, subsample
from tasks.generative import GenerativeTask
from tasks.protocols import math as protocol
from tasks.registry import register_task

PROTOCOL_SEED = 0
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{query}\n\n### Response: Let's think step by step."
)
DECODING = "greedy,max_new_tokens=512"
MATH_PRED = "(pred=last-boxed|after-'The answer is:')"
_CALCULATOR = re.compile(r"<<[^>]*>>")

# name -> (hub id, config, split, how the gold answer is read)
TEST_SETS = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "math": ("hendrycks/competition_math", None, "test"),
}


_ANSWER_IS = re.compile(r"The answer is:?\s*(.+)", re.IGNORECASE)


def math_prediction(text: str) -> str | None:
    """A MATH answer: the last \\boxed{} if any, else what follows the last "The answer is:"
    (the format MetaMathQA trains; MetaMath's own evaluation reads it), period stripped."""
    boxed = protocol.last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().splitlines()[0].strip()
    return answer[:-1] if answer.endswith(".") else answer


def _test_rows(name: str, df: pd.DataFrame) -> pd.DataFrame:
    if name == "gsm8k":
        gold = [str(protocol.parse_gsm8k_gold(a)) for a in df["answer"]]
        return pd.DataFrame({"query": df["question"], "kind": "gsm8k", "gold": gold})
    gold = [protocol.math_gold_answer(row) for _, row in df.iterrows()]
    return pd.DataFrame({"query": df["problem"], "kind": "math", "gold": gold})


class MathTask(GenerativeTask):
    max_new_tokens = 512
    headline_metric = "gsm8k/accuracy"
    selection_metric = "accuracy"
    test_names: tuple[str, ...] = ("gsm8k", "math500")

    def prompt(self, row, tokenizer) -> str:
        return PROMPT.format(query=row["query"])

    def target(self, row) -> str:
        return " " + str(row["response"]).strip()

    def is_correct(self, generation: str, row) -> bool:
        if row["kind"] == "gsm8k":
            # gold is stored as an exact fraction's text ("25/2"), never a rounded float
            return protocol.gsm8k_is_correct(generation, Fraction(row["gold"]))
        prediction = math_prediction(generation)
        return prediction is not None and protocol.is_equiv(prediction, row["gold"])

    def _train(self, data_dir) -> tuple[pd.DataFrame, dict]:
        raise NotImplementedError

    def splits(self, data_dir, *, train_rows=None, selection_rows=None, test_rows=None):
        train_full, train_prov = self._train(data_dir)
        pool, selection, train = split_roles(
            train_full, train_rows=train_rows, selection_rows=selection_rows,
            selection_cap=500, seed=PROTOCOL_SEED,
        )  # fmt: skip
        test, test_prov = {}, {}
        for name in self.test_names:
            hub_id, config, split = TEST_SETS[name]
            df, prov = load_split(hub_id, config, split, data_dir)
            test[name] = subsample(_test_rows(name, df), test_rows, seed=PROTOCOL_SEED)
            test_prov[name] = prov
        provenance = roles_provenance(
            train_prov, test_prov, pool, train, selection, test, decoding=DECODING
        )
        return DataSplits(train=train, selection=selection, test=test, provenance=provenance)


def _metamathqa(data_dir) -> tuple[pd.DataFrame, dict]:
    df, prov = load_split("meta-math/MetaMathQA", None, "train", data_dir)
    # Selection rows are scored by their source's rule: GSM-derived rows numerically, MATH-
    # derived rows (type MATH_*) by equivalence of the text after "The answer is:".
    kind = ["gsm8k" if str(t).startswith("GSM") else "math" for t in df["type"]]
    gold = [
        str(protocol.extract_gsm8k_answer(r)) if k == "gsm8k" else (math_prediction(r) or "")
        for k, r in zip(kind, df["response"], strict=True)
    ]
    rows = pd.DataFrame({"query": df["query"], "response": df["response"], "kind": kind})
    rows["gold"] = gold
    return rows, prov


@register_task("metamathqa")
class MetaMathQA(MathTask):
    description = "MetaMathQA -> GSM8K test (headline) and MATH-500, greedy CoT"
    protocol = f"{protocol.GSM8K_PROTOCOL};{protocol.MATH_PROTOCOL}{MATH_PRED};decoding={DECODING}"

    def _train(self, data_dir):
        return _metamathqa(data_dir)


@register_task("metamathqa_full_math")
class MetaMathQAFullMath(MetaMathQA):
    description = "MetaMathQA -> GSM8K test and the full MATH test (5,000)"
    test_names = ("gsm8k", "math")


@register_task("gsm8k_offline")
class Gsm8kOffline(MathTask):
    description = "STAND-IN: train on GSM8K train (not MetaMathQA), test GSM8K + MATH-500"
    protocol = (
        f"{protocol.GSM8K_PROTOCOL};{protocol.MATH_PROTOCOL}{MATH_PRED};decoding={DECODING};"
        "stand-in=gsm8k-train"
    )

    def _train(self, data_dir):
        df, prov = load_split("openai/gsm8k", "main", "train", data_dir)
        responses = [_CALCULATOR.sub("", a) for a in df["answer"]]
        gold = [str(protocol.parse_gsm8k_gold(a)) for a in df["answer"]]
        rows = pd.DataFrame(
            {"query": df["question"], "response": responses, "kind": "gsm8k", "gold": gold}
        )
        prov = {**prov, "stand_in": "not MetaMathQA: GSM8K's own training split"}
        return rows, prov
