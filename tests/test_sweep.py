"""A real smoke sweep: MiniLM on real SST-2 rows through local Ray Tune."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.reporting.results import LEADERBOARD_COLUMNS, RUN_COLUMNS
from tests.conftest import MINILM

pytestmark = pytest.mark.slow


def test_smoke_sweep_writes_both_parquet_files_and_leaderboard_reproduces(
    tmp_path: Path, mirror_dir: str, capsys
):
    out = tmp_path / "out"
    config = tmp_path / "smoke.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "smoke",
                "model": {"id": MINILM},
                "tasks": ["glue/sst2"],
                "methods": {"lora": {"lrs": [1e-3]}, "full_ft": {"lrs": [1e-4]}},
                "seeds": [0, 1],
                "budget": {
                    "max_steps": 4,
                    "batch_size": 8,
                    "max_length": 32,
                    "train_rows": 64,
                    "selection_rows": 32,
                    "test_rows": 48,
                },
                "resources": {"cpus_per_trial": 1},
                "output_dir": str(out),
                "data_dir": mirror_dir,
            }
        )
    )
    assert main(["sweep", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "4 trials to run" in printed and "[4/4" in printed

    runs = pd.read_parquet(out / "runs.parquet")
    assert list(runs.columns[: len(RUN_COLUMNS)]) == RUN_COLUMNS
    assert len(runs) == 4 and set(runs["status"]) == {"ok"}, runs[["status", "error"]]
    assert set(runs["method"]) == {"lora", "full_ft"} and set(runs["seed"]) == {0, 1}
    assert (runs["steps"] == 4).all() and (runs["train_rows"] == 64).all()
    assert (runs["trainable_params"] == runs["expected_trainable_params"]).all()
    full = runs[runs["method"] == "full_ft"].iloc[0]
    assert full["trainable_params"] == full["total_params"]
    lora = runs[runs["method"] == "lora"].iloc[0]
    assert lora["trainable_params"] < full["trainable_params"] / 10
    assert json.loads(lora["test_rows"]) == {"validation": 48}
    assert runs["data_kind"].eq("mirror").all() and runs["model_source"].str.len().gt(0).all()
    assert runs["test_score"].between(0, 1).all()
    for col in ("git_commit", "packages", "device", "hostname", "protocol", "method_config"):
        assert runs[col].notna().all() and runs[col].str.len().gt(0).all(), col
    # Different seeds give different training (seeding is not a no-op).
    assert runs.groupby("method")["final_train_loss"].nunique().eq(2).all()

    board = pd.read_parquet(out / "leaderboard.parquet")
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert len(board) == 2 and (board["n_seeds"] == 2).all()

    assert main(["leaderboard", str(out)]) == 0
    pd.testing.assert_frame_equal(board, pd.read_parquet(out / "leaderboard.parquet"))

    # The same command again finds nothing to do and changes no row.
    assert main(["sweep", str(config)]) == 0
    assert "0 trials to run (4 already done)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(runs, pd.read_parquet(out / "runs.parquet"))


def test_smoke_sweep_data_informed_methods_on_a_regression_task(tmp_path: Path, mirror_dir: str):
    out = tmp_path / "out"
    config = tmp_path / "smoke.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "smoke-data-informed",
                "model": {"id": MINILM},
                "tasks": ["glue/stsb"],
                "methods": {
                    "lora_one": {"lrs": [1e-3], "overrides": {"init_batches": 2}},
                    "lora_sb": {"lrs": [1e-3], "overrides": {"rank": 8}},
                    "lora_ga": {"lrs": [1e-3], "overrides": {"init_batches": 2}},
                    "cg_lora": {"lrs": [1e-3], "overrides": {"init_examples": 16}},
                    "sds_lora": {"lrs": [1e-3], "overrides": {"warmup_steps": 1}},
                },
                "seeds": [0],
                "budget": {"max_steps": 3, "batch_size": 8, "max_length": 32, "train_rows": 64,
                           "selection_rows": 32, "test_rows": 32},
                "output_dir": str(out),
                "data_dir": mirror_dir,
            }
        )
    )  # fmt: skip
    assert main(["sweep", str(config)]) == 0
    runs = pd.read_parquet(out / "runs.parquet").set_index("method")
    assert set(runs.index) == {"lora_one", "lora_sb", "lora_ga", "cg_lora", "sds_lora"}
    assert (runs["status"] == "ok").all(), runs["error"]
    assert (runs["init_time_s"] > 0).all() and runs["test_metric"].eq("pearson").all()
    # R per layer (6 blocks x the official GLUE targets: query, value, attention.output.dense,
    # output.dense) + head
    assert runs.loc["lora_sb", "trainable_params"] == 6 * 4 * 8 * 8 + 384 + 1
    assert json.loads(runs.loc["lora_sb", "method_config"])["init_eta_used"] == 1e-3
    # CG-LoRA starts off the base function (no shift); SDS-LoRA at it; both merge exactly.
    assert runs.loc["cg_lora", "sanity_init"].startswith("offset")
    assert runs.loc["sds_lora", "sanity_init"].startswith("identity")
    assert runs[["sanity_merge"]].map(lambda v: v.startswith("merged == unmerged")).all().all()
