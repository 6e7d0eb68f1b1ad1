"""Confidence intervals over seeds and the paired bootstrap against LoRA."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.reporting.results import build_leaderboard, format_leaderboard, metric_value_range
from harness.reporting.stats import ci95, clip_interval, paired_bootstrap
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


# -- intervals cut to the metric's range, and marked when too few seeds stand behind them ------
def _raw_t_interval(scores: list[float]) -> tuple[float, float]:
    """The Student-t 95% interval, computed here without harness.reporting.stats."""
    x = np.asarray(scores, dtype=float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def _seed_rows(scores: list[float], task="glue/sst2", metric="accuracy") -> list[dict]:
    rows = []
    for seed, score in enumerate(scores):
        row = result_row("lora", 1e-3, seed, 0.9, score, task=task)
        row.update(test_metric=metric, test_metrics=json.dumps({metric: score}))
        rows.append(row)
    return rows


def test_two_seed_accuracy_interval_is_cut_at_one_and_marked():
    scores = [0.90, 0.96]
    raw_low, raw_high = _raw_t_interval(scores)
    assert 0 < raw_low and raw_high > 1  # the case: a t-interval no accuracy can reach
    board = build_leaderboard(pd.DataFrame(_seed_rows(scores)), compare=False)
    row = board.iloc[0]
    assert row["test_ci_low"] == pytest.approx(raw_low) and row["test_ci_high"] == 1.0
    assert row["ci_clipped"] and row["few_seeds"] and row["n_seeds"] == 2
    shown = format_leaderboard(board)
    assert f"[{raw_low:.3f}, 1.000]* (n=2)" in shown
    assert "n < 3 seeds: interval unreliable" in shown
    assert "ci_clipped" in shown  # says why an end sits on the metric's bound


def test_three_seeds_inside_the_range_are_neither_cut_nor_marked():
    scores = [0.70, 0.72, 0.74]
    raw_low, raw_high = _raw_t_interval(scores)
    board = build_leaderboard(pd.DataFrame(_seed_rows(scores)), compare=False)
    row = board.iloc[0]
    assert row["test_ci_low"] == pytest.approx(raw_low)
    assert row["test_ci_high"] == pytest.approx(raw_high)
    assert not row["ci_clipped"] and not row["few_seeds"]
    shown = format_leaderboard(board)
    assert f"[{raw_low:.3f}, {raw_high:.3f}] " in shown and "*" not in shown
    assert "unreliable" not in shown and "ci_clipped" not in shown


def test_pearson_interval_is_cut_at_minus_one():
    scores = [-0.95, -0.85]
    raw_low, raw_high = _raw_t_interval(scores)
    assert raw_low < -1 < raw_high < 0
    rows = _seed_rows(scores, task="glue/stsb", metric="pearson")
    row = build_leaderboard(pd.DataFrame(rows), compare=False).iloc[0]
    assert row["test_ci_low"] == -1.0 and row["test_ci_high"] == pytest.approx(raw_high)
    assert row["ci_clipped"] and row["few_seeds"]


def test_an_undeclared_metric_is_not_cut_and_one_seed_has_no_interval():
    scores = [5.0, 9.0]  # a loss of a task this checkout does not know: unbounded
    raw_low, raw_high = _raw_t_interval(scores)
    rows = _seed_rows(scores, task="custom/lm", metric="loss")
    row = build_leaderboard(pd.DataFrame(rows), compare=False).iloc[0]
    assert raw_low < 0 and row["test_ci_low"] == pytest.approx(raw_low)
    assert row["test_ci_high"] == pytest.approx(raw_high)
    assert not row["ci_clipped"] and row["few_seeds"]
    # An unknown task's metric is still read by its name.
    rows = _seed_rows([0.90, 0.96], task="custom/cls", metric="test/accuracy")
    assert build_leaderboard(pd.DataFrame(rows), compare=False).iloc[0]["test_ci_high"] == 1.0
    one = build_leaderboard(pd.DataFrame(_seed_rows([0.9])), compare=False).iloc[0]
    assert pd.isna(one["test_ci_low"]) and pd.isna(one["ci_clipped"]) and one["few_seeds"]


def test_metric_ranges_come_from_the_task_declarations():
    assert metric_value_range("glue/mnli", "matched/accuracy") == (0.0, 1.0)
    assert metric_value_range("glue/cola", "mcc") == (-1.0, 1.0)
    assert metric_value_range("code_feedback", "pass@1") == (0.0, 1.0)
    assert metric_value_range("custom/x", "pass@10") == (0.0, 1.0)
    assert metric_value_range("commonsense170k", "average") == (0.0, 1.0)  # of accuracies
    low, high = metric_value_range("commonsense170k", "neg_loss")
    assert np.isinf(low) and np.isinf(high)
    assert clip_interval(float("nan"), float("nan"), (0.0, 1.0))[2] is False
    assert clip_interval(-0.1, 0.5, (0.0, 1.0)) == (0.0, 0.5, True)


def test_report_marks_few_seed_intervals_and_says_so(tmp_path):
    from harness.reporting.report import write_report

    rows = _seed_rows([0.90, 0.96]) + [
        {**r, "method": "dora", "key": f"dora-{i}"} for i, r in enumerate(_seed_rows([0.7] * 3))
    ]
    board = build_leaderboard(pd.DataFrame(rows), compare=False)
    board.to_parquet(tmp_path / "leaderboard.parquet", index=False)  # no runs: shown as is
    html_path, md_path = write_report(tmp_path)
    html, md = html_path.read_text(), md_path.read_text()
    low = board.set_index("method").loc["lora", "test_ci_low"]
    assert f"<td>{low:.4f}*</td><td>1.0000*</td>" in html
    assert "<td>0.7000</td><td>0.7000</td>" in html  # three seeds: no mark
    for text in (html, md):
        assert "n &lt; 3 seeds: interval unreliable" in text and "ci_clipped" in text
    # A board written before the columns existed is shown as stored, with a warning.
    board.drop(columns=["few_seeds", "ci_clipped"]).to_parquet(tmp_path / "leaderboard.parquet")
    html = write_report(tmp_path)[0].read_text()
    assert f"<td>{low:.4f}</td><td>1.0000</td>" in html
    assert "predates the few_seeds and ci_clipped columns" in html
