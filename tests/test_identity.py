"""Content keys (version 3): resolved defaults and family targets, protocol and data enter;
old runs migrate; one setting never mixes package versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, get_args

import pandas as pd
import pytest
from pydantic import BaseModel

import methods
import tasks
from harness.reporting.results import build_leaderboard, normalise_runs, read_runs, write_runs
from harness.spec import identity
from harness.spec.config import Budget, ConfigError, DistributedConfig, EvalConfig
from harness.spec.identity import KEY_VERSION, TrialSpec
from harness.sweeps.sweep import pending_specs
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


# ------------------------------------------------------------- KEY_RULES: each option's rule


def option_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field of `model` by dotted path, into its sections (fields typed as models)."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        paths.add(f"{prefix}{name}")
        for typ in (field.annotation, *get_args(field.annotation)):
            if isinstance(typ, type) and issubclass(typ, BaseModel):
                paths |= option_paths(typ, f"{prefix}{name}.")
    return paths


def test_every_option_of_a_trial_has_a_key_rule():
    """A field added to TrialSpec, Budget, EvalConfig or DistributedConfig needs a rule in
    identity.KEY_RULES (else committed runs could silently get new keys); a rule for a
    field that no longer exists is stale."""
    fields, rules = option_paths(TrialSpec), set(identity.KEY_RULES)
    assert not fields - rules, f"no rule in identity.KEY_RULES for {sorted(fields - rules)}"
    assert not rules - fields, f"identity.KEY_RULES names no such field: {rules - fields}"


def test_the_rule_check_finds_a_field_added_to_any_section():
    class WiderBudget(Budget):
        warmup_steps: int = 0

    class WiderDistributed(DistributedConfig):
        pipeline_stages: int = 1

    class WiderSpec(TrialSpec):
        budget: WiderBudget
        distributed: WiderDistributed | None = None
        label_smoothing: float = 0.0

    missing = option_paths(WiderSpec) - set(identity.KEY_RULES)
    assert missing == {"budget.warmup_steps", "distributed.pipeline_stages", "label_smoothing"}


def resolved_spec(**fields: Any) -> TrialSpec:
    """A resolved spec (no data read)."""
    base = {"method_config": {"rank": 8}, "protocol": "p", "data_fingerprint": "f"}
    return spec(None, **{**base, **fields})


def with_option(s: TrialSpec, path: str, value: Any) -> TrialSpec:
    """`s` with the option at dotted `path` set to `value` (not validated: keys only)."""
    section, _, name = path.rpartition(".")
    if not section:
        return s.model_copy(update={name: value})
    inner = getattr(s, section).model_copy(update={name: value})
    return s.model_copy(update={section: inner})


# A value other than the default for every option in KEY_RULES (a new rule needs one here).
OTHER_VALUES: dict[str, Any] = {
    "method": "dora", "task": "glue/sst2", "lr": 2e-3, "seed": 1, "model_id": "other/model",
    "model_revision": "abc123", "budget": BUDGET.model_copy(update={"max_steps": 3}),
    "eval": EvalConfig(batch_size=16), "method_overrides": {"rank": 8},
    "method_config": {"rank": 16}, "protocol": "p2", "data_fingerprint": "f2",
    "distributed": DistributedConfig(workers=2), "smoke": True, "head_pooling": "mean",
    "sweep": "other", "data_dir": "/elsewhere", "model_dir": "/models", "threads": 4,
    "data_revisions": {"nyu-mll/glue": "abc123"},
    "budget.max_steps": 3, "budget.epochs": 1.0, "budget.batch_size": 8,
    "budget.max_length": 32, "budget.train_rows": 32, "budget.selection_rows": 4,
    "budget.test_rows": 4, "budget.warmup_ratio": 0.1, "budget.weight_decay": 0.01,
    "budget.max_grad_norm": None, "budget.schedule": "cosine",
    "eval.batch_size": 16, "eval.every_steps": 5, "eval.max_new_tokens": 5,
    "eval.forgetting_corpus": "none", "eval.forgetting_tokens": 512,
    "eval.forgetting_window": 128,
    "distributed.gpus_per_trial": 2, "distributed.workers": 4, "distributed.zero_stage": 2,
    "distributed.offload_optimizer": True, "distributed.offload_params": True,
    "distributed.gradient_checkpointing": False, "distributed.load_dtype": "fp32",
    "distributed.micro_batch_size": 1, "distributed.precision": "fp32",
    "distributed.cpus_per_worker": 4, "distributed.offload_init_statistics": True,
    "distributed.max_failures": 3, "distributed.trial_max_failures": 3,
    "distributed.checkpoint_every_steps": 10, "distributed.save_adapter": True,
}  # fmt: skip


def test_each_option_enters_the_keys_as_its_rule_says():
    """Changing one option changes the content key exactly when its rule keys it, and the
    version-1 key (`legacy_key`, unresolved) exactly when that version keyed it."""
    assert set(OTHER_VALUES) == set(identity.KEY_RULES), "give each rule a value here"
    in_resolved_key = (identity.KEYED, identity.RESOLVED)
    in_v1_key = (identity.KEYED, identity.UNRESOLVED_ONLY)
    for path, rule in identity.KEY_RULES.items():
        base = resolved_spec()
        if path.startswith("distributed."):  # options of a distributed trial
            base = resolved_spec(distributed=DistributedConfig(workers=2))
        other = with_option(base, path, OTHER_VALUES[path])
        added_later = isinstance(rule, identity.AddedLater)
        keyed = added_later or rule in in_resolved_key
        keyed_in_v1 = added_later or rule in in_v1_key
        assert (other.key() != base.key()) == keyed, path
        assert (other.legacy_key() != base.legacy_key()) == keyed_in_v1, path


def test_keying_an_option_without_a_rule_is_an_error_not_a_new_key(monkeypatch):
    monkeypatch.delitem(identity.KEY_RULES, "eval.every_steps")
    with pytest.raises(KeyError, match="eval.every_steps.*KEY_RULES"):
        resolved_spec().key()


def test_an_option_added_later_changes_no_key_at_its_old_behaviour():
    """Its default is what the code did before it existed, and at that value it is left
    out of the key: specs that never name it keep the keys of the runs recorded before."""
    later = {p: r for p, r in identity.KEY_RULES.items() if isinstance(r, identity.AddedLater)}
    assert set(later) == {
        "distributed", "smoke", "head_pooling", "budget.schedule", "eval.max_new_tokens"
    }  # fmt: skip
    plain = resolved_spec()
    for path, rule in later.items():
        section, _, name = path.rpartition(".")
        model = {"": TrialSpec, "budget": Budget, "eval": EvalConfig}[section]
        assert model.model_fields[name].default == rule.old_behaviour, path
        assert with_option(plain, path, rule.old_behaviour).key() == plain.key(), path


def test_rows_record_the_budget_with_later_options_only_when_set():
    plain = json.loads(identity.recorded_budget(BUDGET))
    assert "schedule" not in plain and plain["max_steps"] == 2
    cosine = BUDGET.model_copy(update={"schedule": "cosine"})
    assert json.loads(identity.recorded_budget(cosine)) == {**plain, "schedule": "cosine"}


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
    identity.check_worker_data(s, s.protocol, s.data_fingerprint)  # the same: fine
    with pytest.raises(ValueError, match="not what the sweep was keyed by"):
        identity.check_worker_data(s, s.protocol, "0" * 16)
    with pytest.raises(ValueError, match="eval protocol"):
        identity.check_worker_data(s, "other-protocol", s.data_fingerprint)


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
    from harness.spec.config import validate_config

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
    from methods import targets

    s = one(spec(str(rte_copy)))
    same = identity.method_config("lora", {}, "bert")
    identity.check_worker_method_config(s, same)  # the same: fine
    monkeypatch.setitem(targets.DEFAULT_TARGET_MODULES, "bert", ["query"])
    with pytest.raises(ValueError, match="differing: target_modules"):
        identity.check_worker_method_config(s, identity.method_config("lora", {}, "bert"))


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
    from harness.spec import provenance
    from harness.spec.config import validate_config

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
