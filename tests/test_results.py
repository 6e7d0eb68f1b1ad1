"""Leaderboard aggregation: LR chosen on the selection split only, failures never averaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.reporting.results import (
    LEADERBOARD_COLUMNS,
    RUN_COLUMNS,
    append_runs,
    build_leaderboard,
    read_runs,
    write_leaderboard,
)
from tests.builders import result_row


def test_lr_is_chosen_by_selection_mean_not_by_test():
    runs = pd.DataFrame(
        [
            # lr 1e-3: better on selection, worse on test -> must be chosen anyway.
            result_row("lora", 1e-3, 0, 0.90, 0.70),
            result_row("lora", 1e-3, 1, 0.88, 0.72),
            result_row("lora", 1e-4, 0, 0.80, 0.95),
            result_row("lora", 1e-4, 1, 0.82, 0.96),
        ]
    )
    board = build_leaderboard(runs)
    row = board.iloc[0]
    assert row["chosen_lr"] == 1e-3
    assert row["selection_mean"] == pytest.approx(0.89)
    assert row["test_mean"] == pytest.approx(0.71)
    assert row["test_std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
    assert row["n_seeds"] == 2 and json.loads(row["seeds"]) == [0, 1]
    assert list(board.columns) == LEADERBOARD_COLUMNS


def test_a_selection_tie_goes_to_the_smallest_lr_even_through_float_round_off():
    """Equal accuracy counts on the selection split are a tie even when their float means
    differ in the last bit (the study's PiSSA SST-2 grid: 0.8099999999999999 vs 0.81)."""
    scores = {5e-4: (0.78, 0.82, 0.83), 1e-3: (0.805, 0.81, 0.815)}
    runs = pd.DataFrame(
        [
            result_row("pissa", lr, seed, sel, 0.80 + 0.01 * (lr == 1e-3))
            for lr, sels in scores.items()
            for seed, sel in enumerate(sels)
        ]
        + [result_row("pissa", 1e-4, seed, 0.70, 0.70) for seed in range(3)]
    )
    means = runs.groupby("lr")["selection_score"].mean()
    assert means[5e-4] < means[1e-3]  # the round-off this is about
    row = build_leaderboard(runs).iloc[0]
    assert row["chosen_lr"] == 5e-4 and not bool(row["lr_at_grid_edge"])
    assert row["selection_mean"] == pytest.approx(0.81) and row["test_mean"] == pytest.approx(0.80)
    # A real difference, one item of 200 on one seed, still wins.
    runs.loc[(runs["lr"] == 1e-3) & (runs["seed"] == 0), "selection_score"] = 0.810
    assert build_leaderboard(runs).iloc[0]["chosen_lr"] == 1e-3


def test_failed_or_diverged_seed_makes_its_lr_ineligible():
    runs = pd.DataFrame(
        [
            result_row("lora", 1e-2, 0, 0.99, 0.99),
            result_row("lora", 1e-2, 1, float("nan"), float("nan"), status="diverged"),
            result_row("lora", 1e-3, 0, 0.80, 0.81),
            result_row("lora", 1e-3, 1, 0.82, 0.83),
        ]
    )
    row = build_leaderboard(runs).iloc[0]
    assert row["chosen_lr"] == 1e-3
    assert row["n_diverged"] == 1 and row["n_runs"] == 4
    assert row["test_mean"] == pytest.approx(0.82)


def test_all_failed_gives_a_row_without_scores():
    runs = pd.DataFrame([result_row("dora", 1e-3, 0, None, None, status="failed")])
    row = build_leaderboard(runs).iloc[0]
    assert row["n_seeds"] == 0 and row["n_failed"] == 1 and pd.isna(row["test_mean"])


def test_append_replaces_same_key_and_writes_atomically(tmp_path: Path):
    append_runs(tmp_path, [result_row("lora", 1e-3, 0, 0.5, 0.5, status="failed")])
    append_runs(
        tmp_path, [result_row("lora", 1e-3, 0, 0.9, 0.8), result_row("lora", 1e-3, 1, 0.7, 0.6)]
    )
    runs = read_runs(tmp_path)
    assert len(runs) == 2 and set(runs["status"]) == {"ok"}
    assert list(runs.columns[: len(RUN_COLUMNS)]) == RUN_COLUMNS
    # no temp files or journal entries left; the lock file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runs.lock", "runs.parquet"]
    board = write_leaderboard(tmp_path)
    assert board.iloc[0]["test_mean"] == pytest.approx(0.7)
    assert (tmp_path / "leaderboard.parquet").is_file()


def test_an_lr_missing_a_seed_cannot_win_on_a_noisier_mean():
    """An LR added later (or interrupted) with fewer seeds is not eligible until it has
    every seed the (method, task) was run with."""
    runs = pd.DataFrame(
        [result_row("lora", 1e-4, s, 0.80, 0.80) for s in (0, 1, 2)]
        + [result_row("lora", 1e-3, 0, 0.81, 0.70)]
    )
    row = build_leaderboard(runs).iloc[0]
    assert row["chosen_lr"] == 1e-4 and row["n_seeds"] == 3
    assert row["test_mean"] == pytest.approx(0.80)


def test_a_nan_score_makes_its_lr_ineligible():
    """NaN (e.g. Pearson of NaN predictions) must not be skipped by the mean: the LR would be
    chosen on a subset of its seeds, or report a mean over fewer seeds than n_seeds says."""
    nan = float("nan")
    runs = pd.DataFrame(
        [
            result_row("lora", 1e-3, 0, 0.9, 0.7),
            result_row("lora", 1e-3, 1, nan, 0.1),
            result_row("lora", 1e-3, 2, 0.9, 0.7),
            result_row("lora", 1e-4, 0, 0.8, 0.8),
            result_row("lora", 1e-4, 1, 0.8, 0.8),
            result_row("lora", 1e-4, 2, 0.8, nan),
        ]
    )
    row = build_leaderboard(runs).iloc[0]
    assert pd.isna(row["chosen_lr"]) and row["n_seeds"] == 0
    runs.loc[5, "test_score"] = 0.8
    row = build_leaderboard(runs).iloc[0]
    assert row["chosen_lr"] == 1e-4 and row["test_mean"] == pytest.approx(0.8)
