"""Faults for real: exploding and NaN losses, failing trials, a driver killed mid-sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from harness import identity
from harness.cli import main
from harness.config import expand, load_config
from harness.train import Diverged, check_divergence, train
from tests.conftest import MINILM, REPO


def test_non_finite_and_exploded_losses_diverge_and_noise_does_not():
    check_divergence(2, 9.9, [0.7])  # 14x the initial loss, but below 10 x max(1, 0.7)
    with pytest.raises(Diverged, match="exploded"):
        check_divergence(2, 10.5, [0.7, 100.0])  # the reference is the first loss only
    check_divergence(3, 29.0, [3.0, 2.0])
    with pytest.raises(Diverged, match="exploded"):
        check_divergence(3, 31.0, [3.0, 2.0])
    with pytest.raises(Diverged, match="nan"):
        check_divergence(3, float("nan"), [0.7, 0.6])
    with pytest.raises(Diverged, match="inf"):
        check_divergence(1, float("inf"), [])
    check_divergence(1, 1e6, [])  # the first loss is the reference, never an explosion


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)

    def forward(self, x, labels):
        from types import SimpleNamespace

        out = self.fc(x).squeeze(-1)
        return SimpleNamespace(loss=((out - labels) ** 2).mean(), logits=out)


def test_a_too_large_learning_rate_is_stopped_as_diverged():
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(8, 4, generator=g), "labels": torch.randn(8, generator=g)}] * 4
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    with pytest.raises(Diverged):
        train(model, optimizer, data, 200, warmup_ratio=0.0, max_grad_norm=None)
    healthy = Regressor()
    result = train(
        healthy, torch.optim.SGD(healthy.parameters(), lr=0.05), data, 50,
        warmup_ratio=0.0, max_grad_norm=None,
    )  # fmt: skip
    assert result.steps == 50


def _config(tmp_path: Path, mirror_dir: str) -> Path:
    config = tmp_path / "faults.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "faults",
                "model": {"id": MINILM},
                "tasks": ["glue/sst2"],
                "methods": {
                    "lora": {"lrs": [1e-3, 2e-3]},
                    "full_ft": {"lrs": [1e4]},  # diverges
                    "lora_sb": {"lrs": [1e-3], "overrides": {"rank": 400}},  # > 384: fails
                },
                "seeds": [0, 1],
                "budget": {"max_steps": 12, "batch_size": 4, "max_length": 24, "train_rows": 48,
                           "selection_rows": 16, "test_rows": 16},
                "resources": {"cpus_per_trial": 1},
                "ray": {"max_concurrent_trials": 1},
                "output_dir": str(tmp_path / "out"),
                "data_dir": mirror_dir,
            }
        )
    )  # fmt: skip
    return config


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates_and_faults_are_recorded(tmp_path, mirror_dir):
    config = _config(tmp_path, mirror_dir)
    runs_file = tmp_path / "out" / "runs.parquet"
    env = {**os.environ, "HARNESS_DATA_DIR": mirror_dir, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "sweep", str(config)],
        cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if runs_file.exists() and len(pd.read_parquet(runs_file)) >= 2:
                break
            if driver.poll() is not None:
                pytest.fail("the sweep finished before it could be killed")
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished within 300 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, mid-sweep
        driver.wait()
    before = pd.read_parquet(runs_file)
    expected_keys = {s.key() for s in identity.resolve(expand(load_config(config)))}
    assert 2 <= len(before) < len(expected_keys)

    assert main(["sweep", str(config)]) == 0  # the same command completes the sweep
    after = pd.read_parquet(runs_file)
    assert len(after) == len(expected_keys) and set(after["key"]) == expected_keys
    assert not after["key"].duplicated().any()
    finished_ok = before[before["status"] == "ok"].set_index("key")["started_at"]
    kept = after.set_index("key").loc[finished_ok.index, "started_at"]
    pd.testing.assert_series_equal(kept, finished_ok)  # finished rows were not rerun

    by_method = after.groupby("method")["status"].agg(set)
    assert by_method["lora"] == {"ok"}
    assert by_method["full_ft"] == {"diverged"}
    assert by_method["lora_sb"] == {"failed"}
    assert after.loc[after["method"] == "lora_sb", "error"].str.contains("rank 400").all()
    board = pd.read_parquet(tmp_path / "out" / "leaderboard.parquet").set_index("method")
    assert board.loc["full_ft", "n_diverged"] == 2 and board.loc["full_ft", "n_seeds"] == 0
    assert board.loc["lora", "n_seeds"] == 2


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from harness.train import SCHEDULES

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = SCHEDULES["cosine"](optimizer, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == [0.5, 1.0]  # warm-up over 2 steps
    # then 0.5 (1 + cos(pi (t - 2) / 8)) for t = 2..9
    import math

    expected = [0.5 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 10)]
    assert lrs[2:] == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
