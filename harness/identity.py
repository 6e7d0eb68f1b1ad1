"""What a run *is*: resolving trial specs to their full identity, and recognising old runs.

The content key (`TrialSpec.key`, version 2) hashes the resolved method config (defaults
filled in), the task's eval protocol version, the model id/revision, a fingerprint of the
exact data files the task reads, the budget, eval options, seed and LR. The driver resolves
those before any trial starts (`resolve`), reading each task's data once: unreadable data
is one clear error before work begins, and a trial re-checks that it reads the same data.

Runs recorded under key version 1 (hash of the unresolved spec) are migrated in place
(`migrate_runs`) when their recorded protocol, data fingerprint and method config prove
they are the same setting; otherwise they are reported as a conflict, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pandas as pd

from harness.config import KEY_VERSION, ConfigError, TrialSpec


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


def method_config(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The method's hyperparameters with defaults filled in, as JSON values."""
    import methods

    hp = methods.get_method(method).hyperparams(overrides)
    return json.loads(json.dumps(hp.model_dump(mode="json"), sort_keys=True))


def task_data_fingerprint(task_id: str, spec: TrialSpec) -> str:
    import tasks

    budget = spec.budget
    splits = tasks.get_task(task_id).splits(
        spec.data_dir,
        train_rows=budget.train_rows,
        selection_rows=budget.selection_rows,
        test_rows=budget.test_rows,
    )
    return data_fingerprint(splits.provenance)


NOT_READ = "not-read"


def resolve(specs: Iterable[TrialSpec], read_data: bool = True) -> list[TrialSpec]:
    """Fill in method_config, protocol and data_fingerprint (each task's data read once;
    `read_data=False` marks the fingerprint NOT_READ, which no worker's data matches)."""
    import tasks

    fingerprints: dict[tuple[str, str | None], str] = {}
    problems: list[str] = []
    out: list[TrialSpec] = []
    for spec in specs:
        where = (spec.task, spec.data_dir)
        if where not in fingerprints and not read_data:
            fingerprints[where] = NOT_READ
        elif where not in fingerprints:
            try:
                fingerprints[where] = task_data_fingerprint(spec.task, spec)
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
                    "method_config": method_config(spec.method, spec.method_overrides),
                    "protocol": tasks.get_task(spec.task).protocol,
                    "data_fingerprint": fingerprints[where],
                }
            )
        )
    if problems:
        raise ConfigError("data needed by the sweep cannot be read:\n" + "\n".join(
            f"  - {p}" for p in problems
        ))  # fmt: skip
    return out


# ------------------------------------------------------------------ runs from key version 1


def _loads(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def _same_setting(row: pd.Series, spec: TrialSpec) -> str | None:
    """Why a version-1 row is not the setting `spec` resolves to (None: it is).

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
    config = _loads(row["method_config"])
    if config is not None or strict:
        config = config or {}
        for name, value in (spec.method_config or {}).items():
            # None = resolved at prepare time from the model (e.g. target modules), which
            # the key's model id/revision already pins.
            if value is None:
                continue
            if name not in config:
                return f"method config lacks {name}"
            if config[name] != value:
                return f"method config {name}={config[name]!r} != {value!r}"
    return None


def migrate_runs(runs: pd.DataFrame, specs: list[TrialSpec]) -> tuple[pd.DataFrame, int]:
    """Re-key version-1 rows that provably match a resolved spec; returns (runs, count).

    The old key is kept in `legacy_key`. Rows that match no spec are left as they are.
    """
    if runs.empty:
        return runs, 0
    by_legacy = {spec.legacy_key(): spec for spec in specs}
    runs = runs.copy()
    for col in ("key_version", "setting_key", "data_fingerprint", "legacy_key"):
        if col not in runs.columns:
            runs[col] = pd.NA
    migrated = 0
    for i, row in runs.iterrows():
        if pd.notna(row["key_version"]) or row["key"] not in by_legacy:
            continue
        spec = by_legacy[row["key"]]
        if _same_setting(row, spec) is not None:
            continue
        runs.loc[i, ["legacy_key", "key", "setting_key", "data_fingerprint"]] = [
            row["key"],
            spec.key(),
            spec.setting_key(),
            spec.data_fingerprint,
        ]
        runs.loc[i, "key_version"] = KEY_VERSION
        migrated += 1
    return runs, migrated


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
