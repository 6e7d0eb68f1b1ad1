"""Bad sweep configs give one clear error, exit code 2, and start nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.spec.config import ConfigError, load_config, validate_config
from harness.spec.identity import expand
from tests.conftest import MINILM, with_identity

GOOD = {
    "name": "t",
    "model": {"id": MINILM},
    "tasks": ["glue/sst2"],
    "methods": {"lora": {"lrs": [1e-3]}, "full_ft": {"lrs": [1e-4, 5e-5]}},
    "seeds": [0, 1],
    "budget": {"max_steps": 2, "batch_size": 4, "max_length": 16},
    "output_dir": "unused",
}


def _with(**changes):
    cfg = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def test_good_config_expands_to_the_full_grid():
    cfg = validate_config(copy.deepcopy(GOOD))
    specs = expand(cfg)
    assert len(specs) == (1 + 2) * 1 * 2
    assert len({s.key() for s in with_identity(specs)}) == len(specs)
    assert {(s.method, s.lr, s.seed) for s in specs} >= {("full_ft", 5e-5, 1), ("lora", 1e-3, 0)}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with(methods={"not_a_method": {"lrs": [1e-3]}}), "unknown method 'not_a_method'"),
        (_with(tasks=["glue/nope"]), "unknown task 'glue/nope'"),
        (_with(methods__lora={"lrs": []}), "empty learning-rate grid"),
        (_with(seeds=[]), "seeds"),
        (_with(methods__lora={"lrs": [1e-3], "overrides": {"rank": 0}}), "rank"),
        (_with(methods__lora={"lrs": [1e-3], "overrides": {"rank": -4}}), "rank"),
        (
            _with(methods__lora={"lrs": [1e-3], "overrides": {"target_modules": ["q_proj"]}}),
            "target modules ['q_proj'] are absent",
        ),
        (_with(budget={"max_steps": 2, "epochs": 1}), "exactly one of max_steps or epochs"),
        (_with(methods__lora={"lrs": [-1e-3]}), "learning rates must be > 0"),
        (_with(methods__lora={"lrs": [1e-3], "overrides": {"rnk": 4}}), "rnk"),
        (_with(budgt={"max_steps": 1}), "budgt"),
    ],
)
def test_bad_config_raises_one_clear_error(raw, message):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert message in str(info.value)


def test_cli_exits_2_and_starts_nothing(tmp_path: Path, capsys):
    import ray

    out = tmp_path / "out"
    raw = _with(methods__lora={"lrs": [1e-3], "overrides": {"rank": 0}}, output_dir=str(out))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "rank" in err
    assert not out.exists()
    assert not ray.is_initialized()


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_data_dir_comes_from_env_when_config_is_silent(monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", "/some/mirror")
    cfg = validate_config(copy.deepcopy(GOOD))
    assert cfg.resolved_data_dir() == "/some/mirror"
    assert expand(cfg)[0].data_dir == "/some/mirror"


def test_task_budgets_change_only_their_tasks_trials():
    two_tasks = {**copy.deepcopy(GOOD), "tasks": ["glue/sst2", "glue/stsb"]}
    plain = {(s.task, s.method, s.lr, s.seed): s for s in expand(validate_config(two_tasks))}
    per_task = validate_config(
        {**copy.deepcopy(two_tasks), "task_budgets": {"glue/stsb": {"max_length": 24}}}
    )
    for spec in expand(per_task):
        before = plain[(spec.task, spec.method, spec.lr, spec.seed)]
        if spec.task == "glue/stsb":
            assert spec.budget.max_length == 24 and before.budget.max_length == 16
            assert spec.budget.model_dump() == {**before.budget.model_dump(), "max_length": 24}
        else:  # untouched tasks keep the very same budget, so the same keys
            assert spec.budget == before.budget
    assert per_task.budget_for("glue/sst2") is per_task.budget


@pytest.mark.parametrize(
    ("task_budgets", "message"),
    [
        ({"glue/cola": {"max_length": 24}}, "task_budgets names tasks not in `tasks`"),
        ({"glue/sst2": {"max_lenght": 24}}, "max_lenght"),
        ({"glue/sst2": {"batch_size": 0}}, "batch_size"),
    ],
)
def test_bad_task_budgets_are_one_config_error(task_budgets, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({**copy.deepcopy(GOOD), "task_budgets": task_budgets})
