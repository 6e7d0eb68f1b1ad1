"""Live experiment tracking: a real local sweep reports while it trains, Ray's MLflow logger
writes a real file store, and only final reports become rows (harness/sweeps/tracking.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.spec.config import SweepConfig, validate_config
from harness.spec.identity import expand
from harness.sweeps import tracking
from tests.conftest import MINILM, with_identity


def _config(tmp_path: Path, mirror_dir: str, **extra) -> Path:
    config = tmp_path / "track.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "track",
                "model": {"id": MINILM},
                "tasks": ["glue/sst2"],
                "methods": {"lora": {"lrs": [1e-3, 4e-3]}},
                "seeds": [0],
                "budget": {"max_steps": 4, "batch_size": 8, "max_length": 24, "train_rows": 32,
                           "selection_rows": 16, "test_rows": 16},
                "eval": {"every_steps": 2},
                "output_dir": str(tmp_path / "out"),
                "data_dir": mirror_dir,
                **extra,
            }
        )
    )  # fmt: skip
    return config


@pytest.mark.slow
def test_sweep_reports_live_to_a_real_mlflow_file_store(
    tmp_path: Path, mirror_dir: str, monkeypatch
):
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path, mirror_dir, tracking={"report_every": 2}, save_adapters="chosen")
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    runs = pd.read_parquet(out / "runs.parquet")
    # Only the final reports became rows: one per trial, each a full row.
    assert len(runs) == 2 and set(runs["status"]) == {"ok"}, runs[["status", "error"]]
    assert runs["test_score"].notna().all() and runs["loss_curve"].notna().all()
    # save_adapters: chosen: both trials saved one; the LR not chosen lost its at the end.
    assert (runs["adapter_bytes"] > 0).all()
    board = pd.read_parquet(out / "leaderboard.parquet")
    kept = runs[runs["lr"] == board.loc[0, "chosen_lr"]]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == list(kept["key"])

    monkeypatch.setenv(tracking.MLFLOW_FILE_STORE_ENV, "true")  # the file store, as written
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("track")
    assert experiment is not None
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert len(mlflow_runs) == 2
    by_key = {r.data.params["key"]: r for r in mlflow_runs}
    assert set(by_key) == set(runs["key"])
    for row in runs.itertuples():
        run = by_key[row.key]
        assert run.data.params["method"] == "lora" and float(run.data.params["lr"]) == row.lr
        assert run.info.status == "FINISHED"
        loss = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in loss] == [2, 4]  # every 2 of 4 steps, at the optimizer step
        assert all(m.value > 0 for m in loss)
        lrs = client.get_metric_history(run.info.run_id, "lr")
        assert lrs[0].value != lrs[-1].value  # the schedule's LR as it decays
        assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "grad_norm"))
        # The intermediate eval (step 2 of 4) is reported and equals the row's eval curve.
        selection = client.get_metric_history(run.info.run_id, "selection_score")
        at_two = [m.value for m in selection if m.step == 2]
        assert at_two == pytest.approx([json.loads(row.eval_curve)[0][1]])


def test_tracking_options_never_change_a_runs_key(tmp_path: Path):
    base = {
        "name": "k", "model": {"id": MINILM}, "tasks": ["glue/sst2"],
        "methods": {"lora": {"lrs": [1e-3]}}, "seeds": [0],
        "budget": {"max_steps": 4, "train_rows": 32}, "output_dir": str(tmp_path / "o"),
    }  # fmt: skip
    options = {
        "save_adapters": "all",
        "tracking": {"report_every": 1, "mlflow": {"experiment_name": "x"},
                     "tensorboard": True, "early_stop": "asha"},
    }  # fmt: skip
    plain = with_identity(expand(SweepConfig(**base)))
    tracked = with_identity(expand(SweepConfig(**base, **options)))
    assert [s.key() for s in plain] == [s.key() for s in tracked]


def test_train_reports_loss_lr_grad_norm_and_evals_every_n_steps():
    import torch

    from harness.training.train import train

    torch.manual_seed(0)
    model = _TinyRegressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    batches = [{"x": torch.randn(4, 3), "labels": torch.randn(4)} for _ in range(2)]
    reports: list[dict] = []
    result = train(model, optimizer, batches, 6, warmup_ratio=0.0, max_grad_norm=None,
                   evaluate_every=3, evaluate=lambda: 0.5, on_report=reports.append,
                   report_every=2)  # fmt: skip
    training = [r for r in reports if "train_loss" in r]
    assert [r["step"] for r in training] == [2, 4, 6]
    # The LR of the step reported (linear decay from 0.1 to 0 over 6 steps, no warm-up).
    assert [r["lr"] for r in training] == pytest.approx([0.1 * 5 / 6, 0.1 * 3 / 6, 0.1 * 1 / 6])
    assert all(r["grad_norm"] > 0 for r in training)
    assert [r for r in reports if "selection_score" in r] == [{"step": 3, "selection_score": 0.5}]
    assert result.eval_curve == [(3, 0.5)]


def test_only_final_reports_are_rows_and_default_interval_is_modest():
    sent: list[dict] = []
    live = tracking.LiveReport(sent.append)
    live({"step": 6, "train_loss": 0.3})
    assert sent == [{"step": 6, "train_loss": 0.3, tracking.STEP: 6, tracking.FINAL: False}]
    assert not tracking.is_final(sent[0])
    final = tracking.final_report({"status": "ok"}, "{}")
    assert tracking.is_final(final) and "step" not in final and tracking.STEP not in final
    # The main config's 60 steps: a report every 6 steps, 10 per trial.
    assert live.interval(60) == 6 and live.interval(3) == 1
    assert tracking.LiveReport(sent.append, every=25).interval(60) == 25


def test_asha_stops_a_weak_lr_within_its_group_only():
    from ray.tune.schedulers import TrialScheduler

    cfg = validate_config({
        "name": "a", "model": {"id": MINILM}, "tasks": ["glue/sst2", "glue/rte"],
        "methods": {"lora": {"lrs": [1e-4, 1e-3]}}, "seeds": [0],
        "budget": {"max_steps": 8, "train_rows": 32}, "output_dir": "/tmp/unused-asha",
        "tracking": {"early_stop": "asha", "asha_grace_steps": 2},
    })  # fmt: skip
    todo = expand(cfg)  # sst2 lr 1e-4, sst2 lr 1e-3, rte lr 1e-4, rte lr 1e-3
    scheduler = tracking.scheduler(cfg, todo)
    trials = [SimpleNamespace(trial_id=str(i), config={"index": i}) for i in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)

    def result(trial, loss: float) -> str:
        report = {"step": 2, tracking.STEP: 2, "train_loss": loss, tracking.FINAL: False}
        return scheduler.on_trial_result(None, trial, report)

    assert result(trials[0], 0.5) == TrialScheduler.CONTINUE  # first at its rung
    assert result(trials[1], 0.9) == TrialScheduler.STOP  # worse LR, same group
    # Another task's trial is not compared with SST-2's (its loss would lose).
    assert result(trials[2], 5.0) == TrialScheduler.CONTINUE
    final = {"record": "{}", tracking.FINAL: True, "train_loss": 99.0}
    assert scheduler.on_trial_result(None, trials[3], final) == TrialScheduler.CONTINUE


def test_stopped_trials_are_never_eligible_for_the_leaderboard():
    from harness.reporting.results import build_leaderboard, normalise_runs

    rows = []
    for lr, score, status in ((1e-3, 0.6, "ok"), (1e-2, 0.9, "stopped")):
        rows.append({
            "key": f"k{lr}", "setting_key": "s", "method": "lora", "task": "glue/sst2",
            "lr": lr, "seed": 0, "status": status, "selection_score": score,
            "test_score": score, "test_metrics": json.dumps({"accuracy": score}),
            "majority_baseline": 0.5, "trainable_params": 1, "init_time_s": 0.0,
            "train_time_s": 1.0, "peak_memory_mb": 1.0, "samples_per_s": 1.0,
        })  # fmt: skip
    board = build_leaderboard(normalise_runs(rows), compare=False)
    assert board.loc[0, "chosen_lr"] == 1e-3 and board.loc[0, "test_mean"] == 0.6


class _TinyRegressor:
    """A model with the harness's call convention: model(**batch).loss."""

    def __new__(cls):
        import torch

        class Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(3, 1)

            def forward(self, x, labels):
                loss = ((self.linear(x).squeeze(-1) - labels) ** 2).mean()
                return SimpleNamespace(loss=loss)

        return Module()



def test_collector_records_final_rows_only_and_stopped_trials_as_stopped(tmp_path: Path):
    from harness.reporting.results import read_runs
    from harness.sweeps.sweep import record_runs_callback
    from harness.training.trial import base_row

    specs = with_identity(expand(SweepConfig(**{
        "name": "c", "model": {"id": MINILM}, "tasks": ["glue/sst2"],
        "methods": {"lora": {"lrs": [1e-3, 1e-2]}}, "seeds": [0],
        "budget": {"max_steps": 4, "train_rows": 32}, "output_dir": str(tmp_path),
    })))  # fmt: skip
    collector = record_runs_callback(tmp_path, specs, early_stop=True)
    done, stopped = (SimpleNamespace(trial_id=str(i), config={"index": i}) for i in range(2))
    live = {"step": 2, "train_loss": 0.7, tracking.STEP: 2, tracking.FINAL: False}
    for trial in (done, stopped):
        collector.on_trial_result(0, [], trial, dict(live))
    row = base_row(specs[0]) | {"selection_score": 0.8, "test_score": 0.7}
    collector.on_trial_result(0, [], done, tracking.final_report(row, json.dumps(row)))
    for trial in (done, stopped):  # Tune calls this for every trial that ends
        collector.on_trial_complete(0, [], trial)
    collector.recorder.close()
    runs = read_runs(tmp_path).set_index("key")
    assert len(runs) == 2
    assert runs.loc[specs[0].key(), "status"] == "ok"
    assert runs.loc[specs[1].key(), "status"] == tracking.STATUS_STOPPED
    assert "after step 2 (train_loss=0.7)" in runs.loc[specs[1].key(), "error"]


@pytest.mark.slow
def test_asha_sweep_records_the_stopped_lr_and_the_leaderboard_skips_it(
    tmp_path: Path, mirror_dir: str
):
    config = _config(
        tmp_path,
        mirror_dir,
        # One batch of 8 rows: every step sees the same examples, so LR 1e-2 lowers the
        # loss by step 3 and LR 1e-9 does not; one trial at a time, the good LR first.
        methods={"lora": {"lrs": [1e-2, 1e-9]}},
        budget={"max_steps": 6, "batch_size": 8, "max_length": 24, "train_rows": 8,
                "selection_rows": 16, "test_rows": 16, "warmup_ratio": 0.0},
        eval={"batch_size": 16},
        ray={"max_concurrent_trials": 1},
        tracking={"report_every": 1, "early_stop": "asha", "asha_grace_steps": 3,
                  "tensorboard": True},
    )  # fmt: skip
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    runs = pd.read_parquet(out / "runs.parquet").set_index("lr")
    assert runs.loc[1e-2, "status"] == "ok" and runs.loc[1e-2, "steps"] == 6
    assert runs.loc[1e-9, "status"] == tracking.STATUS_STOPPED, runs.loc[1e-9, "error"]
    assert runs.loc[1e-9, "steps"] == 3 and "ASHA" in runs.loc[1e-9, "error"]
    board = pd.read_parquet(out / "leaderboard.parquet")
    assert board.loc[0, "chosen_lr"] == 1e-2
    # tensorboard: true (and no MLflow, since a logger was named): TBX event files.
    assert list((out / "ray").rglob("events.out.tfevents*"))
    assert not (out / "mlruns").exists()
