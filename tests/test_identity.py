"""Content keys (version 3): resolved defaults and family targets, protocol and data enter;
old runs migrate; one setting never mixes package versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import methods
import tasks
from harness import identity
from harness.config import KEY_VERSION, Budget, ConfigError, EvalConfig, TrialSpec
from harness.results import build_leaderboard, normalise_runs, read_runs, write_runs
from harness.sweep import pending_specs
from harness.trial import _check_identity
from tests.conftest import MINILM

BUDGET = Budget(max_steps=2, batch_size=4, max_length=16, train_rows=16, selection_rows=8,
                test_rows=8)  # fmt: skip


def spec(data_dir: str | None, method: str = "lora", overrides=None, **fields) -> TrialSpec:
    return TrialSpec(
        sweep="t", method=method, method_overrides=overrides or {}, task="glue/rte", lr=1e-3,
        seed=0, model_id=MINILM, model_revision=None, budget=BUDGET,
        eval=EvalConfig(batch_size=8), data_dir=data_dir, model_dir=None, **fields,
    )  # fmt: skip


def one(s: TrialSpec) -> TrialSpec:
    return identity.resolve([s])[0]


@pytest.fixture
def rte_copy(tmp_path, mirror_dir) -> Path:
    """A writable mirror holding only GLUE RTE."""
    src = Path(mirror_dir) / "nyu-mll" / "glue" / "rte"
    dst = tmp_path / "mirror" / "nyu-mll" / "glue" / "rte"
    dst.mkdir(parents=True)
    for f in src.glob("*.parquet"):
        shutil.copyfile(f, dst / f.name)
    return tmp_path / "mirror"


def test_unresolved_spec_has_no_content_key():
    with pytest.raises(ValueError, match="not resolved"):
        spec(None).key()


def test_resolved_defaults_enter_the_key_not_how_they_were_written(rte_copy):
    default = one(spec(str(rte_copy)))
    rank = default.method_config["rank"]
    assert one(spec(str(rte_copy), overrides={"rank": rank})).key() == default.key()
    other = one(spec(str(rte_copy), overrides={"rank": rank * 2}))
    assert other.key() != default.key() and other.setting_key() != default.setting_key()


def test_a_changed_default_is_a_new_key(rte_copy, monkeypatch):
    before = one(spec(str(rte_copy)))
    lora = methods.get_method("lora")
    doubled = before.method_config["alpha"] * 2

    class NewDefaults(lora.hyperparams_cls):
        alpha: float = doubled

    monkeypatch.setattr(type(lora), "hyperparams_cls", NewDefaults)
    after = one(spec(str(rte_copy)))
    assert after.method_config["alpha"] == doubled
    assert after.key() != before.key()


def test_protocol_version_enters_the_key(rte_copy, monkeypatch):
    before = one(spec(str(rte_copy)))
    monkeypatch.setattr(type(tasks.get_task("glue/rte")), "protocol", "glue-v2:changed")
    after = one(spec(str(rte_copy)))
    assert after.protocol == "glue-v2:changed" and after.key() != before.key()


def test_data_fingerprint_enters_the_key_and_ignores_location(rte_copy, tmp_path):
    before = one(spec(str(rte_copy)))
    moved = tmp_path / "elsewhere"
    shutil.copytree(rte_copy, moved)
    assert one(spec(str(moved))).key() == before.key()  # same bytes, another folder
    test_file = rte_copy / "nyu-mll" / "glue" / "rte" / "validation.parquet"
    pd.read_parquet(test_file).iloc[:-1].to_parquet(test_file)  # one test row fewer
    after = one(spec(str(rte_copy)))
    assert after.data_fingerprint != before.data_fingerprint and after.key() != before.key()


def test_unreadable_data_is_one_clear_error_before_work(tmp_path):
    with pytest.raises(ConfigError, match="glue/rte: cannot read its data"):
        identity.resolve([spec(str(tmp_path)), spec(str(tmp_path), method="dora")])


def test_worker_reading_other_data_than_the_driver_fails(rte_copy):
    s = one(spec(str(rte_copy)))
    _check_identity(s, s.protocol, s.data_fingerprint)  # the same: fine
    with pytest.raises(ValueError, match="not what the sweep was keyed by"):
        _check_identity(s, s.protocol, "0" * 16)
    with pytest.raises(ValueError, match="eval protocol"):
        _check_identity(s, "other-protocol", s.data_fingerprint)


def _v1_row(s: TrialSpec, status: str = "ok", **changes) -> dict:
    """A runs.parquet row as recorded before key version 2 (no identity columns)."""
    splits = tasks.get_task(s.task).splits(s.data_dir, train_rows=16, selection_rows=8, test_rows=8)
    row = {
        "key": s.legacy_key(), "sweep": "t", "status": status, "method": s.method,
        "task": s.task, "seed": s.seed, "lr": s.lr, "protocol": s.protocol,
        "data_source": json.dumps(splits.provenance, default=str),
        # what prepare recorded: the targets it resolved from the family
        "method_config": json.dumps(s.method_config),
        "selection_score": 0.5, "test_score": 0.5, "git_commit": "old",
    }  # fmt: skip
    return {**row, **changes}


def test_version1_runs_of_the_same_setting_are_rekeyed(rte_copy):
    specs = identity.resolve([spec(str(rte_copy)), spec(str(rte_copy), method="dora")])
    runs = normalise_runs([_v1_row(specs[0]), _v1_row(specs[1])])
    migrated, count = identity.migrate_runs(runs, specs)
    assert count == 2
    assert list(migrated["key"]) == [s.key() for s in specs]
    assert list(migrated["legacy_key"]) == [s.legacy_key() for s in specs]
    assert list(migrated["setting_key"]) == [s.setting_key() for s in specs]
    assert identity.setting_conflicts(migrated, specs) == []


@pytest.mark.parametrize(
    "change",
    [
        {"protocol": "glue-v0:old"},
        {"method_config": json.dumps({"rank": 4, "alpha": 16.0, "dropout": 0.0})},
        {"data_source": json.dumps({"train": {"fingerprint": "feedfacefeedface"}})},
    ],
)
def test_version1_runs_of_another_setting_are_a_conflict_not_a_match(rte_copy, change):
    specs = identity.resolve([spec(str(rte_copy))])
    runs = normalise_runs([_v1_row(specs[0], **change)])
    migrated, count = identity.migrate_runs(runs, specs)
    assert count == 0 and migrated["key"].iloc[0] == specs[0].legacy_key()
    (problem,) = identity.setting_conflicts(migrated, specs)
    assert "lora on glue/rte" in problem and "not provably this setting" in problem


def test_sweep_refuses_an_output_dir_of_another_setting_and_changes_nothing(rte_copy, tmp_path):
    from harness.config import validate_config

    cfg = validate_config({
        "name": "t", "model": {"id": MINILM}, "tasks": ["glue/rte"],
        "methods": {"lora": {"lrs": [1e-3]}}, "seeds": [0],
        "budget": BUDGET.model_dump(), "output_dir": str(tmp_path / "out"),
        "data_dir": str(rte_copy), "eval": {"batch_size": 8},
    })  # fmt: skip
    (resolved,) = identity.resolve([spec(str(rte_copy))])
    out = tmp_path / "out"
    # A finished run of this (method, task) but rank 4: another setting.
    other = one(spec(str(rte_copy), overrides={"rank": 4}))
    write_runs(out, normalise_runs([{
        "key": other.key(), "key_version": 2, "setting_key": other.setting_key(),
        "status": "ok", "method": "lora", "task": "glue/rte", "seed": 0, "lr": 1e-3,
    }]))  # fmt: skip
    before = (out / "runs.parquet").read_bytes()
    with pytest.raises(ConfigError, match="different setting"):
        pending_specs(cfg, out)
    assert (out / "runs.parquet").read_bytes() == before

    # A version-1 run of exactly this setting: re-keyed on disk, and not run again.
    write_runs(out, normalise_runs([_v1_row(resolved)]))
    todo, done = pending_specs(cfg, out)
    assert (todo, done) == ([], 1)
    runs = read_runs(out)
    assert runs["key"].tolist() == [resolved.key()]
    assert runs["key_version"].tolist() == [KEY_VERSION]


def test_leaderboard_never_averages_across_settings(rte_copy):
    a = one(spec(str(rte_copy)))
    b = one(spec(str(rte_copy), overrides={"rank": 4}))
    rows = [
        {"key": s.key(), "key_version": 2, "setting_key": s.setting_key(), "status": "ok",
         "method": "lora", "task": "glue/rte", "seed": 0, "lr": 1e-3, "selection_score": 0.5,
         "test_score": 0.5, "test_metrics": "{}", "majority_baseline": 0.5}
        for s in (a, b)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="2 different settings"):
        build_leaderboard(normalise_runs(rows))


# ------------------------------------------------------------ key version 3: family targets


def test_family_default_targets_are_resolved_into_the_key(rte_copy, monkeypatch):
    """Editing a family's default target list changes the key (it did not in version 2)."""
    from methods import targets

    before = one(spec(str(rte_copy)))
    assert before.method_config["target_modules"] == targets.DEFAULT_TARGET_MODULES["bert"]
    monkeypatch.setitem(targets.DEFAULT_TARGET_MODULES, "bert", ["query", "value"])
    after = one(spec(str(rte_copy)))
    assert after.method_config["target_modules"] == ["query", "value"]
    assert after.key() != before.key() and after.setting_key() != before.setting_key()
    # Explicit targets are the same setting whichever way they were written.
    explicit = one(spec(str(rte_copy), overrides={"target_modules": ["query", "value"]}))
    assert explicit.key() == after.key()


def test_a_method_with_its_own_family_targets_resolves_them(rte_copy, monkeypatch):
    lora = methods.get_method("lora")
    monkeypatch.setattr(type(lora), "family_target_modules", lambda self, t: ["value"])
    assert one(spec(str(rte_copy))).method_config["target_modules"] == ["value"]
    # full fine-tuning has no target modules: nothing is added to its config
    assert "target_modules" not in one(spec(str(rte_copy), method="full_ft")).method_config


def test_worker_resolving_other_targets_than_the_driver_fails(rte_copy, monkeypatch):
    """A worker whose family default differs (other code) must not run under the key."""
    from harness.trial import _check_method_config
    from methods import targets

    s = one(spec(str(rte_copy)))
    _check_method_config(s, identity.method_config("lora", {}, "bert"))  # the same: fine
    monkeypatch.setitem(targets.DEFAULT_TARGET_MODULES, "bert", ["query"])
    with pytest.raises(ValueError, match="differing: target_modules"):
        _check_method_config(s, identity.method_config("lora", {}, "bert"))


def _v2_row(s: TrialSpec, **changes) -> dict:
    """A row as key version 2 recorded it: keyed with the family's targets unresolved."""
    config = identity.v2_method_config(s)
    row = _v1_row(s, key=s.earlier_key(2, config), key_version=2)
    return {**row, **changes}


def test_version2_runs_of_the_same_setting_are_rekeyed(rte_copy):
    specs = identity.resolve([spec(str(rte_copy)), spec(str(rte_copy), method="full_ft")])
    rows = [_v2_row(s) for s in specs]
    assert rows[0]["key"] != specs[0].key()  # version 2 hashed targets=None
    migrated, count = identity.migrate_runs(normalise_runs(rows), specs)
    assert count == 2
    assert list(migrated["key"]) == [s.key() for s in specs]
    assert list(migrated["legacy_key"]) == [r["key"] for r in rows]
    assert list(migrated["key_version"]) == [KEY_VERSION] * 2
    assert identity.setting_conflicts(migrated, specs) == []


def test_version2_runs_that_adapted_other_modules_are_a_conflict(rte_copy):
    """The recorded targets prove the setting: a v2 row that ran other targets than the
    family now resolves to is not re-keyed (the family default changed since)."""
    (s,) = identity.resolve([spec(str(rte_copy))])
    row = _v2_row(s, method_config=json.dumps({**s.method_config, "target_modules": ["query"]}))
    migrated, count = identity.migrate_runs(normalise_runs([row]), [s])
    assert count == 0 and migrated["key"].iloc[0] == row["key"]
    assert identity.setting_conflicts(migrated, [s])


def test_added_option_reads_old_rows_as_the_old_behaviour(rte_copy, monkeypatch):
    """An option added after version 2: rows without it ran its legacy value, so a spec
    at that value migrates them, and a spec at another value does not."""
    lora = methods.get_method("lora")

    class WithOption(lora.hyperparams_cls):
        convention: str = "new"

    monkeypatch.setattr(type(lora), "hyperparams_cls", WithOption)
    monkeypatch.setitem(identity.FIELDS_ADDED_SINCE_V2, "lora", {"convention": "old"})
    old, new = identity.resolve(
        [spec(str(rte_copy), overrides={"convention": "old"}), spec(str(rte_copy))]
    )
    recorded = {k: v for k, v in old.method_config.items() if k != "convention"}
    row = _v2_row(old, method_config=json.dumps(recorded))
    assert identity.v2_method_config(new) is None  # version 2 never ran "new"
    migrated, count = identity.migrate_runs(normalise_runs([row]), [old])
    assert count == 1 and migrated["key"].iloc[0] == old.key()
    migrated, count = identity.migrate_runs(normalise_runs([row]), [new])
    assert count == 0


# ------------------------------------------------------------ package versions


def test_sweep_refuses_runs_of_other_package_versions_and_changes_nothing(rte_copy, tmp_path):
    from harness import provenance
    from harness.config import validate_config

    cfg = validate_config({
        "name": "t", "model": {"id": MINILM}, "tasks": ["glue/rte"],
        "methods": {"lora": {"lrs": [1e-3, 2e-3]}}, "seeds": [0],
        "budget": BUDGET.model_dump(), "output_dir": str(tmp_path / "out"),
        "data_dir": str(rte_copy), "eval": {"batch_size": 8},
    })  # fmt: skip
    (s,) = identity.resolve([spec(str(rte_copy))])
    here = provenance.package_versions()
    row = {
        "key": s.key(), "key_version": KEY_VERSION, "setting_key": s.setting_key(),
        "status": "ok", "method": "lora", "task": "glue/rte", "seed": 0, "lr": 1e-3,
        "packages": json.dumps(here),
    }  # fmt: skip
    out = tmp_path / "out"
    write_runs(out, normalise_runs([row]))
    todo, done = pending_specs(cfg, out)  # same versions: resumes
    assert (len(todo), done) == (1, 1)
    older = {**here, "transformers": "4.0.0"}
    write_runs(out, normalise_runs([{**row, "packages": json.dumps(older)}]))
    before = (out / "runs.parquet").read_bytes()
    with pytest.raises(ConfigError, match=r"transformers \['4.0.0'\] \(here 5"):
        pending_specs(cfg, out)
    assert (out / "runs.parquet").read_bytes() == before
    # A package that changes no number (ray) may differ.
    write_runs(out, normalise_runs([{**row, "packages": json.dumps({**here, "ray": "1.0"})}]))
    assert len(pending_specs(cfg, out)[0]) == 1


def test_mixed_versions_ignore_unrecorded_and_absent_packages():
    a = json.dumps({"torch": "2.13.0", "deepspeed": "absent"})
    b = json.dumps({"torch": "2.13.0", "deepspeed": "0.19.8", "peft": "0.21.2"})
    assert identity.mixed_versions([a, b]) == {}
    c = json.dumps({"torch": "2.12.0"})
    assert identity.mixed_versions([a, b, c]) == {"torch": {"2.12.0", "2.13.0"}}


def test_leaderboard_never_mixes_package_versions(rte_copy):
    s = one(spec(str(rte_copy)))
    rows = [
        {"key": f"k{seed}", "key_version": KEY_VERSION, "setting_key": s.setting_key(),
         "status": "ok", "method": "lora", "task": "glue/rte", "seed": seed, "lr": 1e-3,
         "selection_score": 0.5, "test_score": 0.5, "test_metrics": "{}",
         "majority_baseline": 0.5, "packages": json.dumps({"torch": torch, "ray": ray}),
         "trainable_params": 1, "init_time_s": 0.0, "train_time_s": 1.0,
         "peak_memory_mb": 1.0, "samples_per_s": 1.0}
        for seed, torch, ray in ((0, "2.13.0", "2.60.0"), (1, "2.13.0", "2.59.0"))
    ]  # fmt: skip
    assert len(build_leaderboard(normalise_runs(rows), compare=False)) == 1  # ray: no number
    rows[1]["packages"] = json.dumps({"torch": "2.12.0"})
    with pytest.raises(ValueError, match=r"different package versions \(torch"):
        build_leaderboard(normalise_runs(rows), compare=False)
