"""Sweep configuration: parse a YAML file, validate everything, expand into trial specs.

Validation happens here, before Ray starts, so bad input costs nothing: every problem is
collected into one `ConfigError` message (the CLI exits with code 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATA_DIR_ENV = "HARNESS_DATA_DIR"
MODEL_DIR_ENV = "HARNESS_MODEL_DIR"


class ConfigError(ValueError):
    """A sweep config that cannot run; the message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    id: str = Field(description="hub id or local folder of the pretrained model")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")


class MethodSweep(_Strict):
    lrs: list[float] = Field(description="learning-rate grid for this method")
    overrides: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, lrs: list[float]) -> list[float]:
        if not lrs:
            raise ValueError("empty learning-rate grid")
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"learning rates must be > 0, got {lrs}")
        return lrs


class Budget(_Strict):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps per trial")
    epochs: float | None = Field(None, gt=0, description="epochs over the train subset")
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0, description="max tokens per example")
    train_rows: int | None = Field(None, gt=0, description="fixed train subset size")
    selection_rows: int | None = Field(None, gt=0, description="selection split size")
    test_rows: int | None = Field(None, gt=0, description="fixed test subsample size")
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)

    def model_post_init(self, __context: Any) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("budget needs exactly one of max_steps or epochs")


class EvalConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    every_steps: int | None = Field(
        None, gt=0, description="also evaluate the selection split every N steps (curves)"
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="generative tasks: decoding cap (None = the task's protocol)"
    )


class Resources(_Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster address; None = local Ray")
    max_concurrent_trials: int | None = Field(None, gt=0)


class SweepConfig(_Strict):
    name: str
    model: ModelConfig
    tasks: list[str] = Field(min_length=1)
    methods: dict[str, MethodSweep] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    budget: Budget
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: Resources = Field(default_factory=Resources)
    ray: RayConfig = Field(default_factory=RayConfig)
    output_dir: str
    data_dir: str | None = Field(None, description=f"data mirror; default ${DATA_DIR_ENV}")
    model_dir: str | None = Field(None, description=f"local model folders; ${MODEL_DIR_ENV}")

    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or None

    def resolved_model_dir(self) -> str | None:
        return self.model_dir or os.environ.get(MODEL_DIR_ENV) or None


_LATER_OPTIONS = (("eval", "max_new_tokens"),)


class TrialSpec(BaseModel):
    """Everything one trial needs; plain data so it crosses to Ray workers as a dict."""

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

    def key(self) -> str:
        """Content key: identical specs (same data location aside) share results."""
        payload = self.model_dump(exclude={"sweep", "data_dir", "model_dir", "threads"})
        # Options added after results were published count only when set, so the keys of
        # existing runs (and with them resumption) stay valid.
        for section, option in _LATER_OPTIONS:
            if payload[section].get(option) is None:
                payload[section].pop(option, None)
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and fully validate a sweep file; raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.update(overrides or {})
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> SweepConfig:
    try:
        cfg = SweepConfig(**raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid sweep config:\n{_format(err)}") from err
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(
            f"{source}: invalid sweep config:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return cfg


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"  - {where}: {e['msg']}")
    return "\n".join(lines)


def _semantic_problems(cfg: SweepConfig) -> list[str]:
    """Checks that need the registries or the model's structure."""
    import methods
    import tasks
    from harness.models import model_structure

    problems: list[str] = []
    for task_id in cfg.tasks:
        if task_id not in tasks.task_ids():
            problems.append(f"unknown task {task_id!r}; known: {', '.join(tasks.task_ids())}")
    known_methods = methods.method_names()
    valid_methods: dict[str, Any] = {}
    for name, sweep in cfg.methods.items():
        if name not in known_methods:
            problems.append(f"unknown method {name!r}; known: {', '.join(known_methods)}")
            continue
        method = methods.get_method(name)
        try:
            valid_methods[name] = method.hyperparams(sweep.overrides)
        except ValidationError as err:
            problems.append(f"methods.{name}.overrides: " + _format(err).strip().lstrip("- "))
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        problems.append(f"data_dir {cfg.data_dir!r} is not a directory")
    if problems:
        return problems
    try:
        structure = model_structure(cfg.model.id, cfg.model.revision, cfg.resolved_model_dir())
    except Exception as err:  # noqa: BLE001 - any load failure is a config problem
        return [f"model {cfg.model.id!r} cannot be resolved: {err}"]
    for name, hp in valid_methods.items():
        targets = getattr(hp, "target_modules", None) or structure.default_target_modules
        if getattr(hp, "target_modules", None) is None and not hasattr(hp, "rank"):
            continue  # methods without target modules (full fine-tuning)
        missing = [t for t in targets if not structure.matches(t)]
        if missing:
            problems.append(
                f"methods.{name}: target modules {missing} are absent from {cfg.model.id} "
                f"(its linear layers end in: {', '.join(structure.linear_suffixes())})"
            )
    return problems


def expand(cfg: SweepConfig) -> list[TrialSpec]:
    """The grid: method x task x lr x seed, in a stable order."""
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
            budget=cfg.budget,
            eval=cfg.eval,
            data_dir=cfg.resolved_data_dir(),
            model_dir=cfg.resolved_model_dir(),
            threads=threads,
        )
        for task in cfg.tasks
        for method, sweep in cfg.methods.items()
        for lr in sweep.lrs
        for seed in cfg.seeds
    ]
