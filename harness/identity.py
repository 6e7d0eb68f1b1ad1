"""What a run *is*: resolving trial specs to their full identity, and recognising old runs.

The content key (`TrialSpec.key`, version 3) hashes the resolved method config (defaults
filled in, and the target modules resolved from the model's family, so editing a family's
default list is a new key), the task's eval protocol version, the model id/revision, a
fingerprint of the exact data files the task reads, the budget, eval options, seed and LR.
The driver resolves those before any trial starts (`resolve`), reading each task's data and
the model's structure once: unreadable data is one clear error before work begins, and a
trial re-checks that it reads the same data and resolves the same method config.

Runs recorded under earlier key versions (1: hash of the unresolved spec; 2: resolved, but
the family's targets left unresolved) are migrated in place (`migrate_runs`) when their
recorded protocol, data fingerprint and method config prove they are the same setting;
otherwise they are reported as a conflict, never mixed in. Hyperparameters added since are
read as the value that reproduces what the old code did (`FIELDS_ADDED_SINCE_V2`).

Package versions that change numbers (`NUMERIC_PACKAGES`) are not keyed, but one (method,
task) setting never mixes them: `version_conflicts` refuses a sweep whose environment
differs from the runs already recorded for its settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from harness.config import KEY_VERSION, ConfigError, TrialSpec

# Hyperparameters added to a method after key version 2, with the value that reproduces
# what that method did before the option existed: a row recorded without the field ran
# that value, and a spec with that value resolves to the row's old key.
# (Checked against a dump of every method's defaults at the last version-2 commit, 828682f.)
FIELDS_ADDED_SINCE_V2: dict[str, dict[str, Any]] = {
    # peft 0.21's convention, alpha/r scaling, whole batches; svd_niter is unused there.
    "lora_ga": {"convention": "peft", "use_rslora": False, "init_examples": None, "svd_niter": 4},
    "lora_one": {"use_rslora": False, "init_examples": None},
    "lora_sb": {"init_unit": "batches", "init_eta_rule": "peak", "init_examples": None},
}

# Packages whose version can change a number; one setting's runs must agree on them.
NUMERIC_PACKAGES = (
    "torch", "transformers", "peft", "datasets", "numpy", "scikit-learn", "deepspeed",
)  # fmt: skip


def data_fingerprint(provenance: dict[str, Any]) -> str:
    """One fingerprint of every source a task's splits came from: the per-file
    fingerprints in its provenance, by their place in it (row counts and local paths,
    which vary with the budget and the machine, do not enter)."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "fingerprint" in node:
                found.append((where, str(node["fingerprint"])))
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(provenance, "")
    if not found:
        raise ValueError("the task's data provenance names no fingerprint")
    blob = json.dumps(sorted(found))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def method_config(
    method: str, overrides: Mapping[str, Any], model_type: str | None = None
) -> dict[str, Any]:
    """The method's hyperparameters with defaults filled in, as JSON values; with the model
    family known, unset target modules become the method's default for that family."""
    import methods

    impl = methods.get_method(method)
    config = json.loads(json.dumps(impl.hyperparams(overrides).model_dump(mode="json")))
    if model_type is not None and "target_modules" in config and not config["target_modules"]:
        config["target_modules"] = impl.family_target_modules(model_type)
    return dict(sorted(config.items()))


def _model_type(spec: TrialSpec) -> str:
    from harness.models import model_structure

    return model_structure(spec.model_id, spec.model_revision, spec.model_dir).model_type


def task_data_identity(task_id: str, spec: TrialSpec) -> tuple[str, dict[str, str]]:
    """The task's data fingerprint and the commit each hub dataset it read was read at
    (the spec's pinned revisions, else the current commits, resolved here once)."""
    import tasks
    from tasks.data import hub_revisions, pinned_revisions

    budget = spec.budget
    with pinned_revisions(spec.data_revisions):
        splits = tasks.get_task(task_id).splits(
            spec.data_dir,
            train_rows=budget.train_rows,
            selection_rows=budget.selection_rows,
            test_rows=budget.test_rows,
        )
    return data_fingerprint(splits.provenance), hub_revisions(splits.provenance)


def task_data_fingerprint(task_id: str, spec: TrialSpec) -> str:
    return task_data_identity(task_id, spec)[0]


NOT_READ = "not-read"


def resolve(specs: Iterable[TrialSpec], read_data: bool = True) -> list[TrialSpec]:
    """Fill in method_config, protocol and data_fingerprint (each task's data read once;
    `read_data=False` marks the fingerprint NOT_READ, which no worker's data matches)."""
    import tasks
    from harness.pipelines import pooling_problem, task_protocol

    fingerprints: dict[tuple[str, str | None], str] = {}
    revisions: dict[tuple[str, str | None], dict[str, str]] = {}  # hub id -> commit read
    model_types: dict[tuple[str, str | None, str | None], str | None] = {}
    problems: list[str] = []
    out: list[TrialSpec] = []
    for spec in specs:
        model = (spec.model_id, spec.model_revision, spec.model_dir)
        if model not in model_types:
            try:
                model_types[model] = _model_type(spec)
            except Exception as err:  # noqa: BLE001 - reported as one error below
                model_types[model] = None
                if read_data:
                    problems.append(
                        f"model {spec.model_id}: cannot read its structure: "
                        f"{type(err).__name__}: {err}"
                    )
        task = tasks.get_task(spec.task)
        if model_types[model] is not None and (
            problem := pooling_problem(task, model_types[model], spec.head_pooling)
        ):
            if (message := f"model {spec.model_id}, task {spec.task}: {problem}") not in problems:
                problems.append(message)
        where = (spec.task, spec.data_dir)
        if where not in fingerprints and not read_data:
            fingerprints[where] = NOT_READ
        elif where not in fingerprints:
            try:
                fingerprints[where], revisions[where] = task_data_identity(spec.task, spec)
            except Exception as err:  # noqa: BLE001 - reported as one error below
                fingerprints[where] = ""
                source = spec.data_dir or "the hub"
                problems.append(
                    f"task {spec.task}: cannot read its data from {source}: "
                    f"{type(err).__name__}: {err}"
                )
        out.append(
            spec.model_copy(
                update={
                    "method_config": method_config(
                        spec.method, spec.method_overrides, model_types[model]
                    ),
                    # The model family can change it (text-to-text on encoder-decoders).
                    "protocol": task_protocol(tasks.get_task(spec.task), model_types[model]),
                    "data_fingerprint": fingerprints[where],
                    # Trials read the same commits the driver fingerprinted.
                    "data_revisions": {**(spec.data_revisions or {}), **revisions.get(where, {})}
                    or None,
                }
            )
        )
    if problems:
        raise ConfigError("data or models needed by the sweep cannot be read:\n" + "\n".join(
            f"  - {p}" for p in problems
        ))  # fmt: skip
    return out


# ------------------------------------------------------------ runs from key versions 1 and 2


def _loads(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def v2_method_config(spec: TrialSpec) -> dict[str, Any] | None:
    """The method config key version 2 resolved this spec to, or None when no version-2
    run can have been this setting (an added option at a value the old code never ran).

    Version 2 left family-default target modules unset, and knew no added option."""
    config = dict(spec.method_config or {})
    if "target_modules" in config and not spec.method_overrides.get("target_modules"):
        config["target_modules"] = None
    for name, legacy in FIELDS_ADDED_SINCE_V2.get(spec.method, {}).items():
        if name in config:
            if config[name] != legacy:
                return None
            del config[name]
    return config


def _recorded_config(row: pd.Series) -> dict[str, Any] | None:
    """The row's recorded method config, with options added since read as what it ran."""
    config = _loads(row["method_config"])
    if config is None:
        return None
    added = FIELDS_ADDED_SINCE_V2.get(row["method"], {})
    return {**added, **config}


def _same_setting(row: pd.Series, spec: TrialSpec) -> str | None:
    """Why an earlier-version row is not the setting `spec` resolves to (None: it is).

    A row that finished ok must prove all three; a failed row may lack what it never
    reached (data, method), since it will be rerun anyway.
    """
    strict = row["status"] == "ok"
    if pd.notna(row["protocol"]) or strict:
        if row["protocol"] != spec.protocol:
            return f"protocol {row['protocol']!r} != {spec.protocol!r}"
    source = _loads(row["data_source"])
    if source is not None or strict:
        try:
            recorded = data_fingerprint(source or {})
        except ValueError:
            recorded = None
        if recorded != spec.data_fingerprint:
            return f"data fingerprint {recorded} != {spec.data_fingerprint}"
    config = _recorded_config(row)
    if config is not None or strict:
        config = config or {}
        for name, value in (spec.method_config or {}).items():
            # None = resolved at prepare time from the model, which the key's model
            # id/revision already pins (target modules are resolved since version 3).
            if value is None:
                continue
            if name not in config:
                return f"method config lacks {name}"
            if config[name] != value:
                return f"method config {name}={config[name]!r} != {value!r}"
    return None


def migrate_runs(runs: pd.DataFrame, specs: list[TrialSpec]) -> tuple[pd.DataFrame, int]:
    """Re-key earlier-version rows that provably match a resolved spec; returns (runs,
    count). Version-1 rows are found by their legacy key, version-2 rows by the key the
    spec had under version 2; either must then prove it is the setting (`_same_setting`).

    The first old key is kept in `legacy_key` (a version-1 row's v1 key survives a later
    migration). Rows that match no spec are left as they are.
    """
    if runs.empty:
        return runs, 0
    by_v1 = {spec.legacy_key(): spec for spec in specs}
    by_v2: dict[str, TrialSpec] = {}
    for spec in specs:
        config = v2_method_config(spec)
        if config is not None:
            by_v2[spec.earlier_key(2, config)] = spec
    runs = runs.copy()
    for col in ("key_version", "setting_key", "data_fingerprint", "legacy_key"):
        if col not in runs.columns:
            runs[col] = pd.NA
    migrated = 0
    for i, row in runs.iterrows():
        version = row["key_version"]
        if pd.isna(version):
            spec = by_v1.get(row["key"])
        elif int(version) == 2:
            spec = by_v2.get(row["key"])
        else:
            continue
        if spec is None or _same_setting(row, spec) is not None:
            continue
        old = row["legacy_key"] if pd.notna(row["legacy_key"]) else row["key"]
        runs.loc[i, ["legacy_key", "key", "setting_key", "data_fingerprint"]] = [
            old,
            spec.key(),
            spec.setting_key(),
            spec.data_fingerprint,
        ]
        runs.loc[i, "key_version"] = KEY_VERSION
        migrated += 1
    return runs, migrated


def numeric_versions(packages: Any) -> dict[str, str]:
    """The number-changing packages of a row's `packages` JSON (or a dict)."""
    found = packages if isinstance(packages, dict) else (_loads(packages) or {})
    return {
        name: found[name]
        for name in NUMERIC_PACKAGES
        if name in found and found[name] != "absent"  # not installed: it ran nothing
    }


def mixed_versions(packages: Iterable[Any]) -> dict[str, set[str]]:
    """Packages recorded at more than one version among these rows (a package a row did
    not record is unknown there, not different)."""
    seen: dict[str, set[str]] = {}
    for value in packages:
        for name, version in numeric_versions(value).items():
            seen.setdefault(name, set()).add(version)
    return {name: versions for name, versions in seen.items() if len(versions) > 1}


def version_conflicts(
    runs: pd.DataFrame, specs: list[TrialSpec], current: Mapping[str, str]
) -> list[str]:
    """(method, task) settings of this sweep whose recorded ok runs were made with other
    versions of a number-changing package than this environment has."""
    if runs.empty or "packages" not in runs.columns:
        return []
    wanted = {(s.method, s.task) for s in specs}
    now = numeric_versions(dict(current))
    problems = []
    ok = runs[runs["status"] == "ok"]
    for (method, task), group in ok.groupby(["method", "task"], sort=True):
        if (method, task) not in wanted:
            continue
        differ = sorted(
            f"{name} {sorted(versions - {now[name]})} (here {now[name]})"
            for name, versions in mixed_versions([*group["packages"], now]).items()
            if name in now
        )
        if differ:
            problems.append(f"{method} on {task}: runs recorded with " + ", ".join(differ))
    return problems


def setting_conflicts(runs: pd.DataFrame, specs: list[TrialSpec]) -> list[str]:
    """Rows in the output dir for a (method, task) of this sweep but another setting."""
    if runs.empty:
        return []
    wanted = {(s.method, s.task): s.setting_key() for s in specs}
    problems = []
    for (method, task), group in runs.groupby(["method", "task"], sort=True):
        setting = wanted.get((method, task))
        if setting is None:
            continue
        recorded = group["setting_key"] if "setting_key" in group else pd.Series(dtype=object)
        others = group[recorded.isna() | (recorded != setting)]
        if len(others):
            problems.append(
                f"{method} on {task}: {len(others)} recorded run(s) of another setting "
                f"({_describe(others.iloc[0])})"
            )
    return problems


def _describe(row: pd.Series) -> str:
    if "key_version" not in row or pd.isna(row.get("key_version")):
        return "recorded before key version 2 and not provably this setting"
    return f"setting {row['setting_key']}, git {str(row.get('git_commit'))[:8]}"
