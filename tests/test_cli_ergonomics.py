"""CLI ergonomics: `key=value` overrides, `sweep --dry-run`, `status`, progress bars, and
hub data read at a pinned revision. Nothing here starts Ray or reaches the hub."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.spec.config import ConfigError, apply_assignments, load_config
from harness.spec.identity import expand
from tests.conftest import MINILM, REPO

BASE = {
    "name": "ergo",
    "model": {"id": MINILM},
    "tasks": ["glue/sst2"],
    "methods": {"lora": {"lrs": [1e-3, 2e-3]}},
    "seeds": [0, 1],
    "budget": {"max_steps": 3, "batch_size": 4, "max_length": 16, "train_rows": 16,
               "selection_rows": 8, "test_rows": 8},
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _config(tmp_path: Path, out: Path, **changes) -> Path:
    raw = {**BASE, "output_dir": str(out), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ overrides


def test_assignments_set_nested_keys_as_yaml_values():
    raw = apply_assignments(
        BASE,
        ["budget.max_steps=10", "seeds=[0]", "methods.lora.lrs=[1e-3, 0.002]",
         "methods.dora.lrs=[5e-4]", "methods.lora.overrides.rank=16", "eval.every_steps=5",
         "budget.train_rows=null", "model.id=some/model"],
    )  # fmt: skip
    assert raw["budget"]["max_steps"] == 10 and raw["seeds"] == [0]
    assert raw["methods"]["lora"] == {"lrs": ["1e-3", 0.002], "overrides": {"rank": 16}}
    assert raw["methods"]["dora"] == {"lrs": ["5e-4"]}
    assert raw["eval"] == {"every_steps": 5} and raw["budget"]["train_rows"] is None
    assert raw["model"]["id"] == "some/model"
    assert BASE["budget"]["max_steps"] == 3  # the loaded mapping is not changed in place


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("budget.max_stps=10", "unknown key 'max_stps' in budget; valid: max_steps, epochs"),
        ("budgt.max_steps=10", "unknown key 'budgt' in the top level; valid: name, model"),
        ("methods.lora.lr=[1e-3]", "unknown key 'lr' in methods.lora; valid: lrs, overrides"),
        ("seeds.0=1", "seeds is [0, 1], not a section"),
        ("max_steps", "expected key=value"),
        ("seeds=[0", "not valid YAML"),
    ],
)
def test_a_bad_assignment_is_refused_with_the_choices(assignment, message):
    with pytest.raises(ConfigError, match="override") as info:
        apply_assignments(BASE, [assignment])
    assert message in str(info.value)


def test_overrides_are_validated_like_the_file(tmp_path):
    config = _config(tmp_path, tmp_path / "out")
    cfg = load_config(config, assignments=["budget.max_steps=10", "seeds=[0]",
                                           "methods.lora.lrs=[1e-3]"])  # fmt: skip
    assert cfg.budget.max_steps == 10 and cfg.seeds == [0]
    assert cfg.methods["lora"].lrs == [0.001]  # "1e-3" (YAML 1.1: a string) read as a float
    assert len(expand(cfg)) == 1
    for bad, message in [
        ("seeds=[3, 3]", "duplicate seeds [3]"),
        ("methods.lora.lrs=[.nan]", "finite"),
        ("budget.batch_size=32", "batch_size (32) is larger than budget.train_rows"),
        ("methods.nosuch.lrs=[1e-3]", "unknown method 'nosuch'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(config, assignments=[bad])
        assert message in str(info.value), (bad, info.value)


def test_cli_refuses_a_bad_override_with_one_error_line_and_touches_nothing(
    tmp_path, capsys
):
    import ray

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    before = _snapshot(out)
    config = _config(tmp_path, out)
    assert main(["sweep", str(config), "--dry-run", "budget.max_stps=10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and sum(x.startswith("error:") for x in err.splitlines()) == 1
    assert "valid: max_steps" in err and "Traceback" not in err
    assert not ray.is_initialized() and _snapshot(out) == before


def test_an_override_typo_is_reported_without_importing_ray_or_torch(tmp_path):
    config = _config(tmp_path, tmp_path / "out")
    probe = (
        "import sys; from harness.cli import main; "
        "rc = main(['sweep', sys.argv[1], '--dry-run', 'budget.max_stps=1']); "
        "heavy = sorted(m for m in ('ray', 'torch', 'pandas', 'harness.sweeps.sweep') "
        "if m in sys.modules); print(rc, heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(config)], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert done.stderr.startswith("error:") and "max_stps" in done.stderr


# ------------------------------------------------------------------- dry run and status


@pytest.fixture
def recorded(tmp_path, mirror_dir, monkeypatch):
    """A config, its resolved specs (real mirror data) and an output dir where the first
    two keys finished ok (10 s, 30 s), the third failed and the last is not run; the
    second ok row is still only in the journal."""
    from harness.reporting.results import append_runs
    from harness.spec import identity
    from harness.training.trial import STATUS_FAILED, base_row

    monkeypatch.setenv("HARNESS_DATA_DIR", mirror_dir)
    out = tmp_path / "out"
    config = _config(tmp_path, out)
    cfg = load_config(config)
    specs = identity.resolve(expand(cfg))
    assert len(specs) == 4
    ok = [base_row(s) | {"wall_time_s": t} for s, t in zip(specs[:2], (10.0, 30.0), strict=True)]
    append_runs(out, [ok[0], base_row(specs[2], STATUS_FAILED, "boom") | {"wall_time_s": 2.0}])
    append_runs(out, [ok[1]], compact=False)  # journal only
    assert len(list((out / "runs.journal").glob("*.json"))) == 1
    return SimpleNamespace(config=config, cfg=cfg, specs=specs, out=out)


def test_dry_run_prints_keys_status_and_cost_and_writes_nothing(recorded, capsys):
    import ray

    specs, out = recorded.specs, recorded.out
    (out / ".runs.lock").unlink()  # a reader must not create it either
    before = _snapshot(out)
    assert main(["sweep", str(recorded.config), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not ray.is_initialized()
    assert _snapshot(out) == before and not (out / ".runs.lock").exists()
    lines = {s.key(): next(x for x in text.splitlines() if s.key() in x) for s in specs}
    assert lines[specs[0].key()].endswith("done")
    assert lines[specs[1].key()].endswith("done (in runs.journal)")
    assert lines[specs[2].key()].endswith("failed: rerun")
    assert lines[specs[3].key()].endswith("pending")
    assert "1 methods x 1 tasks x 2 LRs x 2 seeds = 4 trials" in text
    assert "done: 2, to run: 2" in text
    # 2 trials x 3 steps; median of the ok trials' wall times (10, 30) = 20 s x 2 = 40 s
    assert "2 trials x 3 steps = 6 optimizer steps" in text
    assert "~40 s of trial time (median 20.0 s/trial over 2 recorded trials" in text


def test_dry_run_with_overrides_shows_the_overridden_grid(recorded, capsys):
    assert main(["sweep", str(recorded.config), "--dry-run", "seeds=[0, 1, 2]",
                 "methods.lora.lrs=[1e-3]"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "x 1 LRs x 3 seeds = 3 trials" in text and "done: 2, to run: 1" in text


def test_dry_run_refuses_what_the_sweep_would_refuse(recorded, capsys):
    # Another budget for the same (method, task): a sweep would stop; so does the dry run.
    assert main(["sweep", str(recorded.config), "--dry-run", "budget.max_steps=4"]) == 2
    assert "different setting" in capsys.readouterr().err


def test_status_of_a_partial_dir_counts_running_and_eta(recorded, capsys):
    from harness.sweeps.plan import RunningTrials, write_plan

    out, specs = recorded.out, recorded.specs
    write_plan(out, recorded.cfg, specs)  # as the sweep driver does (this process)
    running = RunningTrials(out)
    running.start(specs[3].key())
    running.start(specs[0].key())  # started and recorded since: not running
    before = _snapshot(out)
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert _snapshot(out) == before
    assert "sweep 'ergo', 2 done, 1 pending, 1 failed, 0 diverged of 4 trials" in text
    assert f"driver pid {os.getpid()} running" in text
    running_lines = [x for x in text.splitlines() if "running:" in x]
    assert len(running_lines) == 1 and "lr=0.002 seed=1" in running_lines[0]
    # 2 left (1 pending + 1 failed) x median 20 s / 1 running at once = 40 s
    assert "ETA: ~40 s (2 trials left x median 20.0 s/trial / 1 running at once)" in text

    running.finish(specs[3].key())
    assert json.loads((out / "sweep_running.json").read_text()) == {specs[0].key(): ANY_TIME}


class _AnyTime:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other[:4].isdigit() and "T" in other


ANY_TIME = _AnyTime()


def test_status_of_a_finished_dir_and_of_an_exited_driver(recorded, capsys):
    from harness.reporting.results import append_runs
    from harness.sweeps.plan import PLAN_FILE, write_plan
    from harness.training.trial import base_row

    out, specs = recorded.out, recorded.specs
    write_plan(out, recorded.cfg, specs)
    plan = json.loads((out / PLAN_FILE).read_text())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    plan["driver"]["pid"] = int(gone.stdout)  # a process that has exited
    (out / PLAN_FILE).write_text(json.dumps(plan))
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"no sweep running (driver pid {int(gone.stdout)} has exited)" in text
    assert "the 2 trials left take ~40 s of trial time" in text

    append_runs(out, [base_row(s) | {"wall_time_s": 5.0} for s in specs[2:]])
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 done, 0 pending, 0 failed, 0 diverged of 4 trials" in text
    assert "ETA: complete" in text


def test_status_of_an_empty_or_missing_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 0
    assert "empty (no runs recorded)" in capsys.readouterr().out
    assert list((tmp_path / "empty").iterdir()) == []  # not even a lock file
    assert main(["status", str(tmp_path / "missing")]) == 0
    assert "no such folder" in capsys.readouterr().out


def test_the_sweep_callback_keeps_the_running_list(tmp_path):
    from harness.sweeps.plan import RUNNING_FILE
    from harness.sweeps.sweep import record_runs_callback
    from tests.conftest import with_identity

    cfg = load_config(_config(tmp_path, tmp_path / "out"))
    specs = with_identity(expand(cfg))
    callback = record_runs_callback(tmp_path / "out", specs)
    trials = [SimpleNamespace(config={"index": i}, trial_id=f"t{i}") for i in (1, 2)]
    for trial in trials:
        callback.on_trial_start(0, [], trial)
    running = json.loads((tmp_path / "out" / RUNNING_FILE).read_text())
    assert sorted(running) == sorted(specs[i].key() for i in (1, 2))
    callback.on_trial_complete(0, [], trials[0])  # (records it as stopped: no final report)
    running = json.loads((tmp_path / "out" / RUNNING_FILE).read_text())
    assert list(running) == [specs[2].key()]


# --------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from harness.sweeps.progress import progress_bar

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    assert list(progress_bar(range(5), total=5, desc="init")) == [0, 1, 2, 3, 4]
    assert piped.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress_bar(iter(range(5)), total=5, desc="init")) == [0, 1, 2, 3, 4]
    assert "init:" in terminal.getvalue() and "/5 [" in terminal.getvalue()


def test_evaluation_loop_output_is_the_same_with_a_bar(monkeypatch):
    import torch
    from torch.utils.data import DataLoader

    from harness.training.train import predict

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, x):
            return SimpleNamespace(logits=self.layer(x))

    torch.manual_seed(0)
    model = Linear()
    data = [{"x": torch.randn(3)} for _ in range(7)]
    loader = DataLoader(data, batch_size=2)
    plain = predict(model, loader)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    barred = predict(model, loader)
    assert plain.shape == (7, 2) and (plain == barred).all()
    assert "evaluate:" in terminal.getvalue() and "/4 [" in terminal.getvalue()


# ------------------------------------------------------------------ pinned hub revisions

SHA_OLD = "a" * 40
SHA_NEW = "b" * 40


@pytest.fixture
def fake_hub(monkeypatch, mirror_dir):
    """huggingface_hub's dataset_info and datasets.load_dataset, answering from the mirror's
    SST-2 files: the hub's current commit is `hub.current`; every call is recorded."""
    import datasets
    import huggingface_hub

    hub = SimpleNamespace(current=SHA_OLD, info_calls=[], loads=[])

    def dataset_info(self, repo_id, *, revision=None, timeout=None, **kwargs):
        assert timeout is not None  # never hangs on a black-holed network
        hub.info_calls.append((repo_id, revision))
        if repo_id.startswith("offline/"):
            raise OSError("hub unreachable")
        sha = revision if revision and len(revision) == 40 else hub.current
        return SimpleNamespace(id=repo_id, sha=sha)

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        hub.loads.append((path, name, split, revision))
        df = pd.read_parquet(Path(mirror_dir) / "nyu-mll/glue/sst2" / f"{split}.parquet")
        df = df.head(120) if revision != SHA_NEW else df.tail(120)  # a new commit's data
        return datasets.Dataset.from_pandas(df.reset_index(drop=True))

    import tasks.data

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    # The fake commits must not outlive the test in the per-process cache of resolutions
    # (a later test would read the real hub at "aaaa...").
    monkeypatch.setattr(tasks.data, "_resolved", {})
    monkeypatch.setattr(tasks.data, "_pinned", {})
    return hub


def test_hub_split_is_read_at_the_resolved_commit_and_records_it(fake_hub):
    import datasets

    from tasks.data import dataset_fingerprint, load_split, pinned_revisions

    df, prov = load_split("test-org/current", "sst2", "train", None)
    assert fake_hub.info_calls == [("test-org/current", None)]
    assert fake_hub.loads == [("test-org/current", "sst2", "train", SHA_OLD)]
    assert prov["revision"] == SHA_OLD and prov["rows"] == len(df) == 120
    # The public content fingerprint: the same rows give the same value, others differ.
    again = datasets.Dataset.from_pandas(df)
    assert prov["fingerprint"] == dataset_fingerprint(again)
    assert prov["fingerprint"] != dataset_fingerprint(again.select(range(119)))
    load_split("test-org/current", "sst2", "validation", None)
    assert len(fake_hub.info_calls) == 1  # resolved once per process

    with pinned_revisions({"test-org/pinned": "v1.0"}):
        _, prov = load_split("test-org/pinned", "sst2", "train", None)
    assert fake_hub.info_calls[-1] == ("test-org/pinned", "v1.0")  # a tag: resolved to a sha
    assert prov["revision"] == SHA_OLD and fake_hub.loads[-1][-1] == SHA_OLD

    _, prov = load_split("offline/data", "sst2", "train", None)  # hub unreachable
    assert prov["revision"] is None and fake_hub.loads[-1][-1] is None


def test_driver_pins_the_commit_for_trials_and_keys_ignore_it(fake_hub, tmp_path):
    from harness.spec import identity
    from tasks.data import pinned_revisions

    cfg = load_config(_config(tmp_path, tmp_path / "out", tasks=["glue/sst2"]))
    assert cfg.resolved_data_dir() is None
    specs = identity.resolve(expand(cfg))
    assert {s.data_revisions["nyu-mll/glue"] for s in specs} == {SHA_OLD}
    assert all(load[-1] == SHA_OLD for load in fake_hub.loads)
    spec = specs[0]
    # Provenance only: the content fingerprint is what the key holds.
    assert spec.model_copy(update={"data_revisions": None}).key() == spec.key()

    fake_hub.current = SHA_NEW  # the dataset is updated on the hub mid-sweep
    with pinned_revisions(spec.data_revisions):  # what a trial does before reading data
        fingerprint, revisions = identity.task_data_identity(spec.task, spec)
    assert revisions == {"nyu-mll/glue": SHA_OLD} and fingerprint == spec.data_fingerprint
    assert fake_hub.loads[-1][-1] == SHA_OLD

    # Configured: `data_revisions` names the commit to read.
    cfg = load_config(_config(tmp_path, tmp_path / "out", data_revisions={"nyu-mll/glue": SHA_NEW}))
    new = identity.resolve(expand(cfg))[0]
    assert new.data_revisions == {"nyu-mll/glue": SHA_NEW}
    assert new.data_fingerprint != spec.data_fingerprint and new.key() != spec.key()
