"""Confidence intervals over seeds and the paired bootstrap against LoRA."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.results import build_leaderboard
from harness.stats import ci95, paired_bootstrap
from tests.builders import result_row


def accuracy(pred, labels):
    return float((pred == labels).mean())


def test_ci95_is_the_student_t_interval():
    scores = [0.70, 0.80, 0.90]
    low, high = ci95(scores)
    half = stats.t.ppf(0.975, 2) * np.std(scores, ddof=1) / np.sqrt(3)
    assert low == pytest.approx(0.8 - half) and high == pytest.approx(0.8 + half)
    assert half == pytest.approx(0.2484, abs=1e-4)  # t(0.975, 2) = 4.303, sd 0.1
    assert np.isnan(ci95([0.5])[0])


def test_identical_methods_differ_by_zero_within_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    seeds = [(rng.integers(0, 2, 200), labels) for _ in range(3)]
    result = paired_bootstrap(seeds, seeds, accuracy)
    assert result["delta"] == 0 and result["ci_low"] == 0 == result["ci_high"]
    assert result["within_noise"]


def test_a_clearly_better_method_is_not_within_noise():
    labels = np.array([0, 1] * 100)
    perfect = [(labels.copy(), labels) for _ in range(3)]
    half = [(np.zeros(200, dtype=int), labels) for _ in range(3)]
    result = paired_bootstrap(perfect, half, accuracy)
    assert result["delta"] == pytest.approx(0.5)
    assert 0.4 < result["ci_low"] < 0.5 < result["ci_high"] < 0.6
    assert not result["within_noise"]


def test_same_rate_coin_flips_are_within_noise():
    rng = np.random.default_rng(7)
    a = ((rng.random(150) < 0.6).astype(float), None)
    b = ((rng.random(150) < 0.6).astype(float), None)
    result = paired_bootstrap([a], [b], lambda p, y: float(p.mean()))
    assert result["within_noise"]
    assert result["ci_low"] < result["delta"] < result["ci_high"]


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same test items"):
        paired_bootstrap([(np.zeros(3), None)], [(np.zeros(4), None)], accuracy)
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        paired_bootstrap([(np.zeros(3), None)], [], accuracy)


def _with_items(row, predictions, labels):
    row["test_items"] = json.dumps(
        {"test/validation": {"pred": list(map(int, predictions)), "label": list(map(int, labels))}}
    )
    return row


def test_leaderboard_flags_the_paired_difference_with_lora():
    labels = np.array([0, 1] * 50)
    rows = []
    for seed in (0, 1):
        # dora is right on every item; lora on half; full_ft flips one item of lora's.
        rows.append(_with_items(result_row("dora", 1e-3, seed, 0.9, 1.0), labels, labels))
        rows.append(_with_items(result_row("lora", 1e-3, seed, 0.9, 0.5), np.zeros(100), labels))
        near = np.zeros(100)
        near[1] = 1
        rows.append(_with_items(result_row("full_ft", 1e-5, seed, 0.9, 0.51), near, labels))
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    assert board.loc["dora", "vs_lora_delta"] == pytest.approx(0.5)
    assert not board.loc["dora", "vs_lora_within_noise"]
    assert board.loc["full_ft", "vs_lora_delta"] == pytest.approx(0.01)
    assert board.loc["full_ft", "vs_lora_within_noise"]
    assert pd.isna(board.loc["lora", "vs_lora_delta"])
    assert board.loc["dora", "test_ci_low"] == board.loc["dora", "test_ci_high"] == 1.0


def test_no_comparison_with_lora_run_under_another_setting():
    """Same item count, but LoRA ran on another model (or other test items): the leaderboard
    leaves vs-LoRA empty rather than reporting a difference between two experiments."""
    labels = np.array([0, 1] * 50)
    rows = []
    for seed in (0, 1):
        rows.append(_with_items(result_row("dora", 1e-3, seed, 0.9, 1.0), labels, labels))
        lora = _with_items(result_row("lora", 1e-3, seed, 0.9, 0.5), np.zeros(100), labels)
        lora["model_id"] = "another-model"
        rows.append(lora)
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    assert pd.isna(board.loc["dora", "vs_lora_delta"])
    assert pd.isna(board.loc["dora", "vs_lora_within_noise"])
    # Other test items (another label order / count) are refused per row, not a crash.
    for row in rows:
        row["model_id"] = "m"
    rows[1] = _with_items(rows[1], np.zeros(100), labels[::-1])
    rows[3] = _with_items(rows[3], np.zeros(80), labels[:80])
    board = build_leaderboard(pd.DataFrame(rows)).set_index("method")
    assert pd.isna(board.loc["dora", "vs_lora_delta"])


def test_an_undefined_interval_is_not_reported_as_a_difference():
    def nan_metric(pred, labels):
        return float("nan")

    result = paired_bootstrap([(np.zeros(5), None)], [(np.zeros(5), None)], nan_metric)
    assert result["within_noise"] is None
