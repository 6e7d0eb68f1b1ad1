"""Generative task families on the real mirror: splits, stand-in labels, scoring, a real trial."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import tasks
from harness.spec.config import Budget, EvalConfig
from harness.spec.identity import TrialSpec
from harness.training.trial import run_trial
from tasks.math_reasoning import math_prediction
from tasks.protocols.commonsense import build_prompt

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_commonsense_offline_is_a_labelled_stand_in_with_seven_test_sets(mirror_dir):
    task = tasks.get_task("commonsense_offline")
    splits = task.splits(mirror_dir, train_rows=40, selection_rows=20, test_rows=5)
    assert set(splits.test) == {
        "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"
    }  # fmt: skip
    assert "hellaswag" not in splits.test and "stand-in" in task.protocol
    assert "not Commonsense170K" in splits.provenance["train"]["stand_in"]
    assert set(splits.provenance["train"]["parts"]) == {
        "boolq", "ARC-Challenge", "ARC-Easy", "openbookqa"
    }  # fmt: skip
    assert len(splits.train) == 40 and len(splits.selection) == 20
    assert set(splits.train["dataset"]) <= {"boolq", "ARC-Challenge", "ARC-Easy", "openbookqa"}
    both = pd.merge(splits.train, splits.selection, on=["instruction", "input", "output"])
    assert both.empty  # selection is carved from train, disjoint from it
    row = splits.test["winogrande"].iloc[0]
    assert task.prompt(row, None) == build_prompt(row["instruction"], row["input"])
    assert task.is_correct(f"the correct answer is {row['answer']}", row)
    metrics = task.summarize({f"{n}/accuracy": 0.5 for n in splits.test} | {"boolq/accuracy": 1.0})
    assert metrics["average"] == pytest.approx((1.0 + 6 * 0.5) / 7)


def test_commonsense170k_refuses_the_mirror_with_a_pointer_to_the_stand_in(mirror_dir):
    with pytest.raises(FileNotFoundError, match="commonsense_offline"):
        tasks.get_task("commonsense170k").splits(mirror_dir)


def test_gsm8k_offline_training_targets_and_scoring(mirror_dir):
    task = tasks.get_task("gsm8k_offline")
    splits = task.splits(mirror_dir, train_rows=20, selection_rows=10, test_rows=6)
    assert "<<" not in "".join(splits.train["response"])  # calculator annotations removed
    assert splits.train["response"].str.contains("#### ").all()
    assert set(splits.test) == {"gsm8k", "math500"}
    gsm = splits.test["gsm8k"].iloc[0]
    assert task.is_correct(f"so she makes that much.\n#### {gsm['gold']}", gsm)
    assert not task.is_correct("#### 123456789", gsm)
    math_row = splits.test["math500"].iloc[0]
    assert task.is_correct(f"The answer is $\\boxed{{{math_row['gold']}}}$.", math_row)
    assert task.is_correct(f"The answer is: {math_row['gold']}", math_row)
    assert "not MetaMathQA" in splits.provenance["train"]["stand_in"]


def test_math_prediction_prefers_the_box_then_the_answer_line():
    assert math_prediction("x \\boxed{\\frac{1}{2}} so The answer is: 3") == "\\frac{1}{2}"
    assert math_prediction("step\nThe answer is: 12.5.\nNext question") == "12.5"
    assert math_prediction("no answer here") is None


def test_codealpaca_stand_in_and_sandboxed_humaneval_scoring(mirror_dir):
    task = tasks.get_task("codealpaca_offline")
    splits = task.splits(mirror_dir, train_rows=10, selection_rows=5, test_rows=4)
    assert splits.provenance["train"]["license"].startswith("CC BY-NC")
    assert task.selection_metric == "neg_loss" and task.selection_by_loss
    test = splits.test["humaneval"]
    full = pd.read_parquet(
        f"{mirror_dir}/openai/openai_humaneval/openai_humaneval/test.parquet"
    ).set_index("task_id")
    canonical = [
        f"```python\n{full.loc[t, 'prompt']}{full.loc[t, 'canonical_solution']}```"
        for t in test["task_id"]
    ]
    metrics, passed = task.score(canonical, test)
    assert passed == [True] * len(test) and metrics == {"pass@1": 1.0}
    wrong = ["```python\ndef nothing():\n    return None\n```"] * len(test)
    assert task.score(wrong, test)[0] == {"pass@1": 0.0}


@pytest.mark.slow
def test_a_real_smollm2_trial_on_the_commonsense_stand_in(mirror_dir):
    spec = TrialSpec(
        sweep="t", method="lora", method_overrides={}, task="commonsense_offline", lr=1e-4,
        seed=0, model_id=SMOLLM, model_revision=None,
        budget=Budget(max_steps=2, batch_size=2, max_length=192, train_rows=8, selection_rows=2,
                      test_rows=1),
        eval=EvalConfig(batch_size=8, max_new_tokens=8), data_dir=mirror_dir, model_dir=None,
    )  # fmt: skip
    row = run_trial(spec)
    assert row["status"] == "ok", row.get("traceback")
    assert "NOT the hub's bf16 weights" in row["model_revision"]
    assert "stand-in" in row["protocol"] and row["data_kind"] == "mirror"
    metrics = json.loads(row["test_metrics"])
    assert set(metrics) == {f"{n}/accuracy" for n in json.loads(row["test_rows"])} | {"average"}
    assert row["sanity_init"].startswith("identity") and row["trainable_params"] > 0
    assert row["sanity_merge"].startswith("merged == unmerged")
