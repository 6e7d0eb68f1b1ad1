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

from harness.cli import main
from harness.reporting.results import read_runs
from harness.spec import identity
from harness.spec.config import load_config
from harness.spec.identity import expand
from harness.training.train import Diverged, check_divergence, train
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
                    # (a rank above a layer's dims, the failing trial here before, is now
                    # refused with the config: tests/test_adversarial_config.py)
                    "pissa": {"lrs": [1e-3]},
                },
                "seeds": [0, 1, 2],
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
    raw = yaml.safe_load(config.read_text())
    # 8 trials, two at a time (one CPU each): the kill still lands mid-sweep, with some
    # trials finished, some running and some not started.
    raw["seeds"] = [0, 1]
    raw["ray"] = {"max_concurrent_trials": 2}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    runs_file = out / "runs.parquet"
    env = {**os.environ, "HARNESS_DATA_DIR": mirror_dir, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "sweep", str(config)],
        cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            # rows are durable in the journal before runs.parquet is compacted
            if len(read_runs(out)) >= 2:
                break
            if driver.poll() is not None:
                pytest.fail("the sweep finished before it could be killed")
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished within 300 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, mid-sweep
        driver.wait()
    before = read_runs(out)  # what the killed sweep had recorded, journal included
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
    assert by_method["pissa"] == {"ok"}
    board = pd.read_parquet(tmp_path / "out" / "leaderboard.parquet").set_index("method")
    assert board.loc["full_ft", "n_diverged"] == 2 and board.loc["full_ft", "n_seeds"] == 0
    assert board.loc["lora", "n_seeds"] == 2


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from harness.training.train import SCHEDULES

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


def _killed_trainable(config: dict) -> None:
    """Dies of `config["signal"]` inside the witness, as `harness.sweeps.sweep._trainable` runs."""
    from ray import tune

    from harness.sweeps.crash_witness import crash_witness

    with crash_witness(Path(tune.get_context().get_trial_dir())):
        time.sleep(2.5)  # one heartbeat, so the row can say how large the worker was
        if config["signal"] == "SIGSEGV":
            import ctypes

            ctypes.string_at(0)  # a real segmentation fault, in C
        os.kill(os.getpid(), getattr(signal, config["signal"]))
        time.sleep(30)  # a handled signal may take a moment to end the worker


KILLS = [  # (signal sent, what the row must say)
    ("SIGKILL", "killed by SIGKILL (9)"),  # the OOM killer's signal: no handler runs
    ("SIGSEGV", "fatal signal: Fatal Python error: Segmentation fault"),
    ("SIGTERM", "terminated by SIGTERM (15)"),
]


def test_a_killed_worker_row_says_why_not_only_where(tmp_path):
    """Ray gives a killed worker's trial only an error file in its temporary session folder,
    which names no signal; the row must carry the cause: the signal and the last memory.
    One Ray session, three trials, each worker killed another way."""
    import ray
    from ray import tune

    from harness.sweeps.sweep import record_runs_callback
    from tests.conftest import with_identity

    raw = yaml.safe_load(_config(tmp_path, str(tmp_path)).read_text())
    raw["methods"] = {"lora": {"lrs": [1e-3]}}
    raw["seeds"] = list(range(len(KILLS)))
    from harness.spec.config import validate_config

    specs = with_identity(expand(validate_config(raw)))
    out = tmp_path / "out"
    # One CPU per killed trial: all three die at once (they only sleep until then).
    ray.init(num_cpus=len(KILLS), include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        tune.Tuner(
            tune.with_resources(_killed_trainable, {"cpu": 1}),
            param_space={"index": tune.grid_search(list(range(len(KILLS)))),
                         "signal": tune.sample_from(lambda c: KILLS[c.config.index][0])},
            run_config=tune.RunConfig(
                name="exp", storage_path=str(tmp_path / "ray"), verbose=0,
                callbacks=[record_runs_callback(out, specs)],
            ),
        ).fit()  # fmt: skip
    finally:
        ray.shutdown()
    from harness.reporting.results import read_runs

    rows = read_runs(out).set_index("seed")
    for seed, (sent, expected) in enumerate(KILLS):
        row = rows.loc[seed]
        assert row["status"] == "failed", sent
        cause = row["error"].split("(error file:")[0]
        assert expected in cause, (sent, row["error"])
        assert "resident memory" in cause, (sent, row["error"])
        if sent != "SIGSEGV":
            # Ray's own words stay beside the witness's: "... its worker process has died."
            assert "worker process has died" in cause, (sent, row["error"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_sweep(tmp_path: Path, mirror_dir: str, **changes) -> Path:
    raw = yaml.safe_load(_config(tmp_path, mirror_dir).read_text())
    raw["methods"] = {"lora": {"lrs": [1e-3]}}
    raw.update(changes)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _cli(config: Path, *args: str, timeout: float, mirror_dir: str):
    env = {**os.environ, "HARNESS_DATA_DIR": mirror_dir, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "sweep", str(config), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return done, time.monotonic() - started


def test_an_unreachable_ray_address_is_an_error_in_seconds(tmp_path, mirror_dir):
    from harness.spec.config import ConfigError
    from harness.sweeps.sweep import check_address

    port = _free_port()  # nothing listens there: ray.init would retry for minutes
    with pytest.raises(ConfigError, match="unreachable"):
        check_address(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="unreachable"):
        check_address(f"ray://127.0.0.1:{port}")
    check_address(None)  # local Ray: nothing to check
    done, took = _cli(
        _small_sweep(tmp_path, mirror_dir), "--address", f"127.0.0.1:{port}",
        timeout=120, mirror_dir=mirror_dir,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error:"), done.stderr[-2000:]
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr
    assert took < 60


def test_resources_the_cluster_lacks_are_refused_not_waited_for():
    from harness.spec.config import ConfigError, validate_config
    from harness.sweeps.sweep import check_cluster_fits

    base = {
        "name": "r", "model": {"id": MINILM}, "tasks": ["glue/sst2"],
        "methods": {"lora": {"lrs": [1e-3]}}, "seeds": [0], "budget": {"max_steps": 1},
        "output_dir": "unused",
    }  # fmt: skip
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"GPU": 8}}]
    check_cluster_fits(validate_config(base), nodes)
    gpu = validate_config(base | {"resources": {"gpus_per_trial": 1}})
    with pytest.raises(ConfigError, match="wait forever"):
        check_cluster_fits(gpu, nodes)
    cpus = validate_config(base | {"resources": {"cpus_per_trial": 3}})
    with pytest.raises(ConfigError, match="2 CPUs"):
        check_cluster_fits(cpus, nodes)
    # 2 + 2 CPUs in the cluster, but no one node holds a 3-CPU trial
    with pytest.raises(ConfigError, match="cannot be scheduled"):
        check_cluster_fits(cpus, nodes + [{"Alive": True, "Resources": {"CPU": 2.0}}])


def test_a_gpu_trial_on_a_machine_without_gpus_is_an_error_not_a_hang(tmp_path, mirror_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = _small_sweep(tmp_path, mirror_dir, resources={"gpus_per_trial": 1})
    done, took = _cli(config, timeout=180, mirror_dir=mirror_dir)
    assert done.returncode == 2 and "error:" in done.stderr, done.stderr[-2000:]
    assert "GPU" in done.stderr and "wait forever" in done.stderr
    assert took < 120


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_mid_sweep_exits_non_zero_and_says_how_to_resume(tmp_path, mirror_dir, signum):
    """Ctrl-C, or SIGTERM (`kill PID`: how a background sweep is stopped, since the shell
    makes a background job ignore SIGINT), stops at once with a partial leaderboard."""
    config = _small_sweep(tmp_path, mirror_dir, seeds=list(range(8)))
    env = {**os.environ, "HARNESS_DATA_DIR": mirror_dir, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "sweep", str(config)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert driver.stdout is not None
        seen = []
        for line in driver.stdout:  # the driver's progress lines, as they come
            seen.append(line)
            if line.startswith("[1/8"):
                driver.send_signal(signum)  # after the first of 8 trials
                break
        else:
            pytest.fail("the sweep ended before its first trial: " + "".join(seen[-20:]))
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    out = "".join(seen) + out
    assert driver.returncode == 130, err[-2000:]
    assert "interrupted: rerun the same command to resume" in err
    assert "PARTIAL leaderboard" in out
    assert "Tuner.restore" not in out + err
    # the file says it too, not only the terminal: the row knows how many of 8 are missing
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    row = pd.read_parquet(out_dir / "leaderboard.parquet").iloc[0]
    assert bool(row["partial"]) and row["n_planned"] == 8 and 1 <= row["n_missing"] < 8
