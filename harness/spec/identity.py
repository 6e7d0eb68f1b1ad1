"""What a run *is*: its content key and the rule each option follows in it, the trials a
sweep names, their resolution, and recognising runs recorded under earlier keys. Everything
that decides a run's identity is here; `harness.spec.config` is the sweep file's schema and its
validation only.

**The key.** `TrialSpec.key` (version 3) hashes the resolved method config (defaults filled
in, and the target modules resolved from the model's family, so editing a family's default
list is a new key), the task's eval protocol version, the model id/revision, a fingerprint
of the exact data files the task reads, the budget, eval options, seed and LR. `KEY_RULES`
states for every option of a trial how it enters the key; an option added after runs were
recorded is `AddedLater(old_behaviour)` and enters only when it differs from what the code
did before it existed, so those runs keep their keys. An option without a rule is an error
(`key_rule`), never a silent new key.

**Resolution.** The driver resolves specs before any trial starts (`resolve`), reading each
task's data and the model's structure once: unreadable data is one clear error before work
begins, and a trial re-checks that it reads the same data and resolves the same method
config (`check_worker_data`, `check_worker_method_config`).

**Migration.** Runs recorded under earlier key versions (1: hash of the unresolved spec;
2: resolved, but the family's targets left unresolved) are migrated in place
(`migrate_runs`) when their recorded protocol, data fingerprint and method config prove they
are the same setting; otherwise they are reported as a conflict, never mixed in.
Hyperparameters added since are read as the value that reproduces what the old code did
(`FIELDS_ADDED_SINCE_V2`).

Package versions that change numbers (`NUMERIC_PACKAGES`) are not keyed, but one (method,
task) setting never mixes them: `version_conflicts` refuses a sweep whose environment
differs from the runs already recorded for its settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from harness.spec.config import Budget, ConfigError, DistributedConfig, EvalConfig, SweepConfig

# 3: the method config holds the target modules resolved from the model's family (a
# family's default list is part of the run's identity); 2: resolved config, protocol, data;
# 1: the unresolved spec (`TrialSpec.legacy_key`).
KEY_VERSION = 3

# ------------------------------------------------------------ how each option enters the key


class KeyRule(Enum):
    """How an option enters a run's key (besides `AddedLater`)."""

    KEYED = "keyed"  # its value is in the key, whatever it is
    # Filled in by `resolve`; in the key from version 2 on, not in version 1's.
    RESOLVED = "resolved"
    # In version 1's key only: the resolved method config replaces it from version 2 on.
    UNRESOLVED_ONLY = "unresolved only"
    NOT_KEYED = "not keyed"  # where or how the trial runs, not what it computes
    # Measured beside the task's numbers, never trained on nor a reported task number.
    MEASUREMENT_ONLY = "measurement only"


@dataclass(frozen=True)
class AddedLater:
    """An option added after runs were recorded: keyed only when it differs from
    `old_behaviour`, the value that reproduces what the code did before the option existed
    (also its default). At that value it is left out of the key and out of the rows' budget
    JSON (`recorded_budget`), so the runs recorded before keep their keys and rows."""

    old_behaviour: Any


KEYED, RESOLVED, UNRESOLVED_ONLY = KeyRule.KEYED, KeyRule.RESOLVED, KeyRule.UNRESOLVED_ONLY
NOT_KEYED, MEASUREMENT_ONLY = KeyRule.NOT_KEYED, KeyRule.MEASUREMENT_ONLY

# Every field of TrialSpec and of its sections (Budget, EvalConfig, DistributedConfig), by
# dotted path. The sweep file's other sections reach a trial only through TrialSpec's flat
# fields (head.pooling -> head_pooling, resources.smoke -> smoke, resources.cpus_per_trial ->
# threads; see `expand`). A new field needs a rule here: tests/test_identity.py checks the
# table against the models, and keying a spec with a field the table lacks raises.
KEY_RULES: dict[str, KeyRule | AddedLater] = {
    # What the trial computes.
    "method": KEYED,
    "task": KEYED,
    "lr": KEYED,
    "seed": KEYED,
    "model_id": KEYED,
    "model_revision": KEYED,
    "budget": KEYED,
    "eval": KEYED,
    "method_overrides": UNRESOLVED_ONLY,  # {rank: 8} and {} (default 8) are one setting
    "method_config": RESOLVED,
    "protocol": RESOLVED,
    "data_fingerprint": RESOLVED,
    "distributed": AddedLater(old_behaviour=None),  # keyed with its world size (`_payload`)
    "smoke": AddedLater(old_behaviour=False),  # a smoke row never stands in for a real one
    "head_pooling": AddedLater(old_behaviour="cls"),  # the model's own head
    # Where and how it runs: the sweep's name, data and model locations, CPU threads, and
    # the hub commits read (provenance: the data's content fingerprint is keyed instead).
    "sweep": NOT_KEYED,
    "data_dir": NOT_KEYED,
    "model_dir": NOT_KEYED,
    "threads": NOT_KEYED,
    "data_revisions": NOT_KEYED,
    # Budget
    "budget.max_steps": KEYED,
    "budget.epochs": KEYED,
    "budget.batch_size": KEYED,
    "budget.max_length": KEYED,
    "budget.train_rows": KEYED,
    "budget.selection_rows": KEYED,
    "budget.test_rows": KEYED,
    "budget.warmup_ratio": KEYED,
    "budget.weight_decay": KEYED,
    "budget.max_grad_norm": KEYED,
    "budget.schedule": AddedLater(old_behaviour=None),  # linear decay to 0
    # EvalConfig
    "eval.batch_size": KEYED,
    "eval.every_steps": KEYED,
    "eval.max_new_tokens": AddedLater(old_behaviour=None),  # the task's protocol decides
    "eval.forgetting_corpus": MEASUREMENT_ONLY,
    "eval.forgetting_tokens": MEASUREMENT_ONLY,
    "eval.forgetting_window": MEASUREMENT_ONLY,
    # DistributedConfig: what changes a distributed trial's numbers; retries, checkpoint
    # cadence, CPU reservations, adapter saving and where init statistics are kept do not.
    "distributed.gpus_per_trial": KEYED,
    "distributed.workers": KEYED,
    "distributed.zero_stage": KEYED,
    "distributed.offload_optimizer": KEYED,
    "distributed.offload_params": KEYED,
    "distributed.gradient_checkpointing": KEYED,
    "distributed.load_dtype": KEYED,
    "distributed.micro_batch_size": KEYED,
    "distributed.precision": KEYED,
    "distributed.cpus_per_worker": NOT_KEYED,
    "distributed.offload_init_statistics": NOT_KEYED,
    "distributed.max_failures": NOT_KEYED,
    "distributed.trial_max_failures": NOT_KEYED,
    "distributed.checkpoint_every_steps": NOT_KEYED,
    "distributed.save_adapter": NOT_KEYED,
}

RESOLVED_FIELDS = tuple(path for path, rule in KEY_RULES.items() if rule is RESOLVED)
# Rules that keep an option out of version 1's payload (`TrialSpec._payload`).
_OUT_OF_UNRESOLVED_PAYLOAD = (NOT_KEYED, MEASUREMENT_ONLY, RESOLVED)


def key_rule(path: str) -> KeyRule | AddedLater:
    """How the option at dotted `path` enters the key; one without a rule is an error."""
    try:
        return KEY_RULES[path]
    except KeyError:
        raise KeyError(
            f"{path!r} has no rule in harness.spec.identity.KEY_RULES: say how it enters the run's "
            "key (an option added after runs were recorded is AddedLater(<what the code did "
            "before>), so their keys do not change)"
        ) from None


def _is_section(path: str) -> bool:
    return any(name.startswith(f"{path}.") for name in KEY_RULES)


def _keyed_values(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` (a model dump) with only what enters version 1's payload under `KEY_RULES`;
    sections (budget, eval, distributed) are filtered field by field."""
    kept: dict[str, Any] = {}
    for name, value in values.items():
        path = f"{prefix}{name}"
        rule = key_rule(path)
        if rule in _OUT_OF_UNRESOLVED_PAYLOAD:
            continue
        if isinstance(rule, AddedLater) and value == rule.old_behaviour:
            continue
        if isinstance(value, Mapping) and _is_section(path):
            value = _keyed_values(value, f"{path}.")
        kept[name] = value
    return kept


def recorded_budget(budget: Budget) -> str:
    """The budget as rows record it (JSON): options added later appear only when set, so
    rows of one budget written before and after an option existed read the same."""
    at_old_behaviour = {
        name
        for name in Budget.model_fields
        if isinstance(rule := key_rule(f"budget.{name}"), AddedLater)
        and getattr(budget, name) == rule.old_behaviour
    }
    return budget.model_dump_json(exclude=at_old_behaviour)


def _hash(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- the trial


class TrialSpec(BaseModel):
    """Everything one trial needs; plain data so it crosses to Ray workers as a dict.

    `method_config`, `protocol` and `data_fingerprint` are filled in by the driver
    (`resolve`): the method's hyperparameters with defaults, the task's eval protocol
    version, and the fingerprint of the exact data the task reads. They enter the content
    key, so a changed default, protocol or data file is a new key, never a match. How each
    field enters the key: `KEY_RULES`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sweep: str
    method: str
    method_overrides: dict[str, Any]
    task: str
    lr: float
    seed: int
    model_id: str
    model_revision: str | None
    budget: Budget
    eval: EvalConfig
    data_dir: str | None
    model_dir: str | None
    threads: int = 1
    # Hub dataset id -> commit the trial reads it at (provenance: the data's content
    # fingerprint is keyed, so this is not).
    data_revisions: dict[str, str] | None = None
    distributed: DistributedConfig | None = None
    smoke: bool = False
    head_pooling: Literal["cls", "mean"] = "cls"
    method_config: dict[str, Any] | None = None
    protocol: str | None = None
    data_fingerprint: str | None = None

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in RESOLVED_FIELDS)

    def _payload(self) -> dict[str, Any]:
        payload = _keyed_values(self.model_dump())
        if self.distributed is not None:  # the worker count, however it was given
            payload["distributed"]["world_size"] = self.distributed.world_size
        return payload

    def _resolved_payload(
        self, version: int = KEY_VERSION, method_config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if not self.resolved:
            raise ValueError(
                "trial spec is not resolved (method_config/protocol/data_fingerprint unset); "
                "harness.spec.identity.resolve fills them in"
            )
        payload = self._payload()
        for name, rule in KEY_RULES.items():
            if rule is UNRESOLVED_ONLY:
                payload.pop(name)
        payload.update({name: getattr(self, name) for name in RESOLVED_FIELDS})
        if method_config is not None:
            payload["method_config"] = method_config
        payload["key_version"] = version
        return payload

    def key(self) -> str:
        """Content key: hash of the resolved method config, task + protocol version, model
        id/revision, data fingerprint, budget, eval options, seed and lr (data location,
        threads and the sweep's name aside)."""
        return _hash(self._resolved_payload())

    def setting_key(self) -> str:
        """The key without seed and lr: runs that may be aggregated into one leaderboard row
        (LRs are chosen among them, seeds averaged)."""
        payload = self._resolved_payload()
        del payload["seed"], payload["lr"]
        return _hash(payload)

    def earlier_key(self, version: int, method_config: dict[str, Any]) -> str:
        """The key this spec had under an earlier resolved version (2), given the method
        config as that version resolved it (`v2_method_config`): recognises runs recorded
        before a key change so they can be re-keyed, never run again."""
        return _hash(self._resolved_payload(version, method_config))

    def legacy_key(self) -> str:
        """Key version 1 (before the identity fields): hash of the unresolved spec. Used only
        to recognise runs recorded before version 2 (`migrate_runs`)."""
        return _hash(self._payload())


def expand(cfg: SweepConfig) -> list[TrialSpec]:
    """The sweep's trials, unresolved: method x task x lr x seed, in a stable order."""
    threads = max(1, int(cfg.resources.cpus_per_trial))
    return [
        TrialSpec(
            sweep=cfg.name,
            method=method,
            method_overrides=sweep.overrides,
            task=task,
            lr=lr,
            seed=seed,
            model_id=cfg.model.id,
            model_revision=cfg.model.revision,
            budget=cfg.budget_for(task),
            eval=cfg.eval,
            data_dir=cfg.resolved_data_dir(),
            model_dir=cfg.resolved_model_dir(),
            threads=threads,
            data_revisions=dict(cfg.data_revisions) or None,
            distributed=cfg.distributed if cfg.distributed and cfg.distributed.enabled else None,
            smoke=cfg.resources.smoke,
            head_pooling=cfg.head.pooling,
        )
        for task in cfg.tasks
        for method, sweep in cfg.methods.items()
        for lr in sweep.lrs
        for seed in cfg.seeds
    ]


# ------------------------------------------------------------------------------ resolution


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
    from harness.modeling.models import model_structure

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
    from harness.heads.pipelines import pooling_problem, task_protocol

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


def check_worker_data(spec: TrialSpec, protocol: str, fingerprint: str) -> None:
    """The worker must read what the driver keyed the run by (another node's mirror, a file
    replaced mid-sweep, or a worker on other code would otherwise hide under that key)."""
    if protocol != spec.protocol:
        raise ValueError(
            f"task {spec.task}: this worker's eval protocol {protocol!r} is not the driver's "
            f"{spec.protocol!r} (different code on driver and worker?)"
        )
    if fingerprint != spec.data_fingerprint:
        raise ValueError(
            f"task {spec.task}: the data this worker read (fingerprint {fingerprint}) is not "
            f"what the sweep was keyed by ({spec.data_fingerprint}); the data changed or "
            "differs between nodes"
        )


def check_worker_method_config(spec: TrialSpec, resolved: dict[str, Any]) -> None:
    """The worker must run the method config the driver keyed the run by (resolved from
    this model's family: a worker on other code could otherwise adapt other modules)."""
    if resolved != spec.method_config:
        differ = sorted(
            name
            for name in {*resolved, *(spec.method_config or {})}
            if resolved.get(name) != (spec.method_config or {}).get(name)
        )
        raise ValueError(
            f"method {spec.method}: this worker resolves its config to {resolved} and the "
            f"driver keyed the run by {spec.method_config} (differing: {', '.join(differ)}); "
            "different code or model on driver and worker?"
        )


# ------------------------------------------------------------ runs from key versions 1 and 2


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


# ---------------------------------------------- one setting, one environment, per output dir

# Packages whose version can change a number; one setting's runs must agree on them.
NUMERIC_PACKAGES = (
    "torch", "transformers", "peft", "datasets", "numpy", "scikit-learn", "deepspeed",
)  # fmt: skip


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
