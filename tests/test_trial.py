"""run_trial never raises: failures become rows with their error, checks fail loudly."""

from __future__ import annotations

import pytest

import methods
from harness.training.trial import run_trial
from tests.builders import trial_spec


def test_missing_data_is_a_failed_row_with_the_reason(tmp_path):
    row = run_trial(trial_spec(str(tmp_path)))
    assert row["status"] == "failed"
    assert "FileNotFoundError" in row["error"] and "train.parquet" in row["error"]
    assert row["key"] and row["method"] == "lora" and row["git_commit"]


def test_trainable_count_sanity_check_fails_the_run(mirror_dir, monkeypatch):
    lora = type(methods.get_method("lora"))
    monkeypatch.setattr(lora, "expected_trainable_params", lambda self, m, hp, ctx: 1)
    row = run_trial(trial_spec(mirror_dir))
    assert row["status"] == "failed" and "sanity check" in row["error"]


def test_ok_row_has_costs_and_both_metric_sets(mirror_dir):
    row = run_trial(trial_spec(mirror_dir))
    assert row["status"] == "ok", row.get("traceback")
    assert row["steps"] == 2 and row["train_rows"] == 16 and row["selection_rows"] == 8
    assert 0 <= row["selection_score"] <= 1 and 0 <= row["test_score"] <= 1
    assert row["trainable_params"] == row["expected_trainable_params"] < row["total_params"]
    for key in ("init_time_s", "train_time_s", "eval_time_s", "peak_memory_mb", "samples_per_s"):
        assert row[key] > 0, key
    assert row["majority_baseline"] == pytest.approx(row["majority_baseline"])  # not NaN
    assert row["model_source"].startswith("pypi-package:")


@pytest.mark.parametrize("method", ["lora", "pissa", "lora_one", "full_ft"])
def test_ok_rows_record_passed_init_and_merge_checks(mirror_dir, method):
    row = run_trial(trial_spec(mirror_dir, method=method))
    assert row["status"] == "ok", row.get("traceback")
    starts_at_base = methods.get_method(method).starts_at_base(
        methods.get_method(method).hyperparams({})
    )
    assert row["sanity_init"].startswith("identity" if starts_at_base else "offset")
    if method == "full_ft":
        assert row["sanity_merge"] == "not mergeable"
    else:
        assert row["sanity_merge"].startswith("merged == unmerged")


def test_an_init_that_breaks_the_identity_promise_fails_the_run(mirror_dir, monkeypatch):
    # Pretend LoRA-One (which starts off the base function) promised identity.
    lora_one = type(methods.get_method("lora_one"))
    monkeypatch.setattr(lora_one, "starts_at_base", lambda self, hp: True)
    row = run_trial(trial_spec(mirror_dir, method="lora_one"))
    assert row["status"] == "failed"
    assert "promises to start at the base function" in row["error"]


def test_an_init_that_was_never_applied_fails_the_run(mirror_dir, monkeypatch):
    # LoRA promising an offset: its B = 0 init leaves outputs bit-identical.
    lora = type(methods.get_method("lora"))
    monkeypatch.setattr(lora, "starts_at_base", lambda self, hp: False)
    row = run_trial(trial_spec(mirror_dir, method="lora"))
    assert row["status"] == "failed" and "bit-identical" in row["error"]


def test_a_merge_that_changes_the_function_fails_the_run(mirror_dir, monkeypatch):
    import torch

    lora = type(methods.get_method("lora"))

    def broken_merge(self, model):
        merged = model.merge_and_unload()
        with torch.no_grad():
            merged.bert.encoder.layer[0].attention.self.query.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(lora, "merge", broken_merge)
    row = run_trial(trial_spec(mirror_dir, method="lora"))
    assert row["status"] == "failed" and "merged weights compute different outputs" in row["error"]


def test_evaluation_adds_the_tasks_suite_summary_in_both_trial_paths(monkeypatch):
    """Single-device and distributed trials share evaluate_into_row: the headline metric
    may be a suite-level summary (commonsense `average`) computed across test splits."""
    from types import SimpleNamespace

    import pandas as pd

    from harness.training.trial import evaluate_into_row

    scores = {"selection": {"accuracy": 0.5}, "test/a": {"accuracy": 0.2},
              "test/b": {"accuracy": 0.6}}  # fmt: skip
    pipeline = SimpleNamespace(evaluate=lambda name: scores[name], items={"test/a": {}})
    task = SimpleNamespace(
        selection_metric="accuracy", headline_metric="average", head="classification",
        summarize=lambda t: {**t, "average": (t["a/accuracy"] + t["b/accuracy"]) / 2},
    )  # fmt: skip
    splits = SimpleNamespace(test={"a": None, "b": None}, train=pd.DataFrame({"label": [1, 1, 0]}))
    row: dict = {}
    monkeypatch.setattr("harness.training.trial._majority_baseline", lambda task, splits: 0.5)
    evaluate_into_row(task, splits, pipeline, row)
    assert row["test_score"] == pytest.approx(0.4) and row["test_metric"] == "average"
    # Both paths are the one recipe, which calls this very function (the distributed one
    # once lacked the summary): read from the modules' source, as tests/test_layout does.
    import ast
    import inspect

    import harness.deepspeed.launch as launch
    import harness.training.trial as trial

    def calls(module, name: str) -> bool:
        tree = ast.parse(inspect.getsource(module))
        return any(
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
            for node in ast.walk(tree)
        )

    def imports_from_trial(module, name: str) -> bool:
        tree = ast.parse(inspect.getsource(module))
        return any(
            isinstance(node, ast.ImportFrom) and node.module == "harness.training.trial"
            and any(alias.name == name and alias.asname is None for alias in node.names)
            for node in ast.walk(tree)
        )  # fmt: skip

    assert calls(trial, "evaluate_into_row") and calls(trial, "run_recipe")
    assert calls(launch, "run_recipe") and imports_from_trial(launch, "run_recipe")
    assert not calls(launch, "evaluate_into_row")  # no second copy of the recipe


def test_an_autocast_trial_computes_in_bf16_and_keeps_fp32_weights(mirror_dir, monkeypatch):
    """`run_trial(autocast=bfloat16)` (cluster/gpu_check.py's bf16 trial) runs the one
    recipe with init, training and evaluation under autocast; the default computes in fp32.
    Checked where it shows: the dtype of a Linear's output inside the model's forward."""
    import torch

    from harness.training import backend

    seen: list[str] = []  # the context each compute() call returned
    original = backend.LocalBackend.compute

    def watched(self):
        context = original(self)
        seen.append(context.__class__.__name__)
        return context

    monkeypatch.setattr(backend.LocalBackend, "compute", watched)
    outputs: list[torch.dtype] = []
    weights: set[torch.dtype] = set()

    def record(module, args, out):
        if isinstance(module, torch.nn.Linear) and isinstance(out, torch.Tensor):
            outputs.append(out.dtype)
            weights.add(module.weight.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        bf16 = run_trial(trial_spec(mirror_dir), autocast=torch.bfloat16)
        bf16_outputs, outputs[:] = list(outputs), []
        fp32 = run_trial(trial_spec(mirror_dir))
    finally:
        hook.remove()
    assert bf16["status"] == fp32["status"] == "ok", (bf16["error"], fp32["error"])
    assert seen == ["autocast"] * 3 + ["nullcontext"] * 3
    assert torch.bfloat16 in bf16_outputs and torch.bfloat16 not in outputs
    assert weights == {torch.float32}  # autocast computes in bf16; weights stay fp32
    # The merge check runs outside autocast: at fp32's tolerance in both.
    tolerance = [row["sanity_merge"].rsplit("(tol", 1)[1] for row in (bf16, fp32)]
    assert tolerance[0] == tolerance[1] and bf16["sanity_merge"].startswith("merged == unmerged")
    # Same data, seed and steps: the bf16 run trains the same model to nearly the same loss.
    assert bf16["final_train_loss"] != fp32["final_train_loss"]
    assert abs(bf16["final_train_loss"] - fp32["final_train_loss"]) < 0.05 * fp32[
        "final_train_loss"
    ]
