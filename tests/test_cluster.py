"""A real 2-node Ray cluster (head + worker in separate network namespaces, veth between them,
a shared folder as storage; cluster/two_node.py): trials land on both nodes, a worker node
killed mid-sweep leaves failed rows that say why, the sweep finishes on the head, and
rerunning the same command completes every key without duplicates.

Needs root and `ip netns` (CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.cli import EXIT_BAD_INPUT
from harness.reporting.results import read_runs
from harness.spec import identity
from harness.spec.config import load_config
from harness.spec.identity import expand
from harness.sweeps.sweep import trial_name
from tests.conftest import MINILM, REPO

_spec = importlib.util.spec_from_file_location("two_node", REPO / "cluster" / "two_node.py")
two_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_node)

SWEEP_TIMEOUT_S = 240  # each sweep; the whole test takes about a minute on 2 idle cores
KILL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def netns():
    why = two_node.netns_available()
    if why:
        pytest.skip(f"a 2-node cluster needs network namespaces: {why}")


def _config(tmp_path: Path, mirror_dir: str, shared: bool = True) -> Path:
    raw = {
        "name": "cluster",
        "model": {"id": MINILM},
        "tasks": ["glue/sst2"],
        "methods": {"lora": {"lrs": [1e-3, 2e-3]}},
        # 4 trials on 2 one-CPU nodes: the worker takes a second one while the head runs
        "seeds": [0, 1],
        # ~100 steps: a trial lasts seconds, long enough to kill its node while it runs
        "budget": {"max_steps": 100, "batch_size": 4, "max_length": 24, "train_rows": 64,
                   "selection_rows": 16, "test_rows": 16},
        "resources": {"cpus_per_trial": 1},  # one per node: 2 trials at once, one on each
        "ray": {"storage_path": str(tmp_path / "shared"), "shared_storage": shared},
        "output_dir": str(tmp_path / "out"),
        "data_dir": mirror_dir,
    }  # fmt: skip
    if not shared:
        del raw["ray"]["shared_storage"]
    path = tmp_path / ("sweep.yaml" if shared else "local.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(cluster, config: Path, log: Path) -> subprocess.Popen:
    """`harness sweep CONFIG --address HEAD` as a driver inside the head's namespace."""
    cmd = [sys.executable, "-m", "harness.cli", "sweep", str(config),
           "--address", two_node.HEAD_ADDRESS]  # fmt: skip
    out = open(log, "ab")  # noqa: SIM115 - the child holds it; closed when we return
    try:
        return cluster.run_in_head(cmd, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"sweep did not finish within {timeout:g} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_two_node_sweep_survives_a_killed_worker_and_a_rerun_completes(netns, tmp_path, mirror_dir):
    started = time.monotonic()
    config = _config(tmp_path, mirror_dir)
    out = tmp_path / "out"
    specs = identity.resolve(expand(load_config(config)))
    name_to_key = {trial_name(s): s.key() for s in specs}
    expected = set(name_to_key.values())
    log = tmp_path / "driver.log"
    env = {"HF_HUB_OFFLINE": "1", "HARNESS_DATA_DIR": mirror_dir, "TOKENIZERS_PARALLELISM": "false"}

    with two_node.TwoNodeCluster(env=env, logs_to=tmp_path) as cluster:
        assert cluster.alive_nodes() == 2

        # Node-local storage is refused on 2 nodes; the shared folder is declared as such.
        local = _sweep(cluster, _config(tmp_path, mirror_dir, shared=False), log)
        assert _wait(local, log, SWEEP_TIMEOUT_S) == EXIT_BAD_INPUT
        assert "the Ray cluster has 2 nodes but the storage path" in log.read_text()
        assert not read_runs(out).shape[0]

        # 1. The sweep: once the worker has finished a trial and started another, kill it.
        driver = _sweep(cluster, config, log)
        victims: list[str] = []
        try:
            deadline = time.monotonic() + KILL_TIMEOUT_S
            while time.monotonic() < deadline and not victims:
                if driver.poll() is not None:
                    pytest.fail(f"sweep ended before the kill:\n{log.read_text()[-3000:]}")
                runs = read_runs(out)
                done = set(runs["key"]) if len(runs) else set()
                on_worker = (
                    len(runs)
                    and "ray_node_ip" in runs
                    and (runs["ray_node_ip"] == two_node.WORKER_IP).any()
                )
                running = [
                    n
                    for n in cluster.worker_trial_dirs()
                    if n in name_to_key and name_to_key[n] not in done
                ]
                if on_worker and running:
                    cluster.kill_worker()  # raylet, object store, workers: the node is gone
                    victims = running
                else:
                    time.sleep(0.2)
            if not victims:
                pytest.fail(f"no second trial on the worker in {KILL_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-3000:]}")  # fmt: skip
            assert _wait(driver, log, SWEEP_TIMEOUT_S) == 0, log.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        first = read_runs(out)
        assert set(first["key"]) == expected and not first["key"].duplicated().any()

        ok = first[first["status"] == "ok"]
        assert set(ok["ray_node_ip"]) == {two_node.HEAD_IP, two_node.WORKER_IP}  # both nodes
        failed = first[first["status"] == "failed"]
        victim_keys = {name_to_key[n] for n in victims}
        assert set(failed["key"]) == victim_keys, (victims, first[["key", "status", "error"]])
        for error in failed["error"]:
            # Ray's words, depending on when it noticed: "The actor ... is unavailable: ...
            # RpcError: ... Socket closed" or "The actor died because its node has died".
            cause = error.split("(error file:")[0]
            assert cause.startswith("trial process failed: "), error
            assert re.search(r"actor \S* ?is (unavailable|dead)|actor died|node has died",
                             cause, re.IGNORECASE), error  # fmt: skip
        # Both nodes wrote their trials' Tune results into the one shared folder.
        for name in name_to_key:
            assert (tmp_path / "shared" / "cluster" / name / "result.json").is_file(), name
        assert cluster.alive_nodes() == 1  # the head saw the worker die

        # 2. The same command again: only the failed keys run; nothing duplicated.
        rerun = _sweep(cluster, config, log)
        assert _wait(rerun, log, SWEEP_TIMEOUT_S) == 0, log.read_text()[-3000:]
        assert (
            f"{len(victim_keys)} trials to run ({len(expected) - len(victim_keys)} already done)"
            in log.read_text()
        )

    after = pd.read_parquet(out / "runs.parquet")
    assert len(after) == len(expected) and set(after["key"]) == expected
    assert not after["key"].duplicated().any()
    assert set(after["status"]) == {"ok"}
    kept = after.set_index("key").loc[ok["key"], "started_at"]
    pd.testing.assert_series_equal(kept, ok.set_index("key")["started_at"])  # not rerun
    redone = after.set_index("key").loc[sorted(victim_keys)]
    assert set(redone["ray_node_ip"]) == {two_node.HEAD_IP}
    board = pd.read_parquet(out / "leaderboard.parquet")
    assert board.loc[0, "n_seeds"] == 2 and board.loc[0, "n_failed"] == 0
    print(f"two-node cluster test: {time.monotonic() - started:.0f} s")
