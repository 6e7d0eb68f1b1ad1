"""The run record: every column of runs.parquet, in order, with its type and meaning.

`RUN_FIELDS` is the one definition of a trial's result row. From it come `RUN_COLUMNS`
(the column order of every runs.parquet), the Arrow schema the file is written with
(`arrow_schema`), the check every appended row passes (`validate_row`) and the README's
"Output schema" table (`render_readme_section`). A trial that writes a new column adds it
here first; a row with a column not listed here is refused.

Kinds: `str`, `int`, `float`, `bool`, and `json` (a string holding JSON; nested data).
This module imports nothing heavy at import time (no torch, ray, pandas or pyarrow).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["str", "int", "float", "bool", "json"]

README_START = "<!-- run-schema:start -->"
README_END = "<!-- run-schema:end -->"


class RunRecordError(ValueError):
    """A result row that does not fit the run record (unknown column, wrong type)."""


@dataclass(frozen=True)
class RunField:
    name: str
    kind: Kind
    description: str
    nullable: bool = True

    def arrow_type(self):
        import pyarrow as pa

        # large_string: what pandas' string columns have always been written as.
        return {
            "str": pa.large_string(),
            "json": pa.large_string(),
            "int": pa.int64(),
            "float": pa.float64(),
            "bool": pa.bool_(),
        }[self.kind]

    @property
    def pandas_dtype(self) -> str:
        return {
            "str": "string",
            "json": "string",
            "int": "Int64",
            "float": "float64",
            "bool": "boolean",
        }[self.kind]


def _f(name: str, kind: Kind, description: str, *, nullable: bool = True) -> RunField:
    return RunField(name, kind, description, nullable)


RUN_FIELDS: tuple[RunField, ...] = (
    _f("key", "str", 'content key of the run (16 hex, version 3: see "Running it yourself")',
       nullable=False),
    _f("sweep", "str", "name of the sweep that ran the trial"),
    _f("status", "str", "`ok`, `failed` (exception or failed sanity check, with text), "
       "`diverged` (non-finite or exploded loss) or `stopped` (ended early by ASHA)",
       nullable=False),
    _f("error", "str", "why the trial failed, diverged or stopped (empty when ok)"),
    _f("method", "str", "method registry id", nullable=False),
    _f("method_config", "json", "the method's resolved hyperparameters"),
    _f("task", "str", "task registry id", nullable=False),
    _f("protocol", "str", "eval protocol id and version"),
    _f("model_id", "str", "hub id of the model"),
    _f("model_revision", "str", "commit sha (or packaged-copy version and what it is, or "
       "`random-init: NOT pretrained`)"),
    _f("model_source", "str", "`hub:`/`local:`/`pypi-package:`/`random-init:` + location"),
    _f("head_pooling", "str", "what a sequence head read: `cls` (the model's own head) or "
       "`mean` (masked mean of the last hidden states); empty for other heads and older runs"),
    _f("data_kind", "str", "`hub`, `mirror` or `url` (`+`-joined when the splits differ)"),
    _f("data_source", "json", "provenance per split (path or hub revision, rows, fingerprint, "
       "`stand_in`/`subset` notes, decoding)"),
    _f("train_rows", "int", "train rows actually used"),
    _f("selection_rows", "int", "selection rows actually used"),
    _f("test_rows", "json", "test rows actually used, per test split"),
    _f("seed", "int", "trial seed"),
    _f("lr", "float", "learning rate"),
    _f("budget", "json", "the budget (steps or epochs, batch size, rows, ...)"),
    _f("trainable_params", "int", "trainable parameters; the trial fails if this is not "
       "`expected_trainable_params`"),
    _f("total_params", "int", "all parameters of the prepared model"),
    _f("expected_trainable_params", "int", "the method's closed-form count"),
    _f("init_time_s", "float", "method init, incl. data-informed init (seconds)"),
    _f("train_time_s", "float", "optimizer steps only (seconds)"),
    _f("eval_time_s", "float", "evaluation (seconds)"),
    _f("wall_time_s", "float", "the whole trial (seconds)"),
    _f("peak_memory_mb", "float", "peak memory (MB) of the kind in `peak_memory_kind`"),
    _f("peak_memory_kind", "str", "`cuda_max_allocated` on GPU; `process_peak_rss` (reset at "
       "init) on CPU"),
    _f("steps", "int", "optimizer steps taken"),
    _f("samples_per_s", "float", "throughput over train time"),
    _f("tokens_per_s", "float", "throughput over train time"),
    _f("final_train_loss", "float", "mean loss of the last 10% of steps"),
    _f("selection_metric", "str", "the metric the LR is chosen by, on the selection split"),
    _f("selection_score", "float", "`selection_metric` on the selection split"),
    _f("selection_metrics", "json", "all metrics on the selection split"),
    _f("test_metric", "str", "headline metric"),
    _f("test_score", "float", "`test_metric` on the test split(s)"),
    _f("test_metrics", "json", "all metrics on the test split(s)"),
    _f("majority_baseline", "float", "headline test metric of always predicting the train "
       "majority class (classification only)"),
    _f("loss_curve", "json", "train loss as [[step, value], ...]"),
    _f("eval_curve", "json", "selection metric during training as [[step, value], ...]"),
    _f("test_items", "json", 'per test split: `{"pred": [...], "label": [...]}` or '
       '`{"correct": [...]}` per item, in a fixed order (paired statistics)'),
    _f("sanity_init", "str", "the init check (`identity: ...` / `offset: ...`) with the "
       "measured gap"),
    _f("sanity_merge", "str", "the merge check (`merged == unmerged: ...` or `not mergeable`)"),
    _f("sanity_callbacks", "str", "the check of any training callback that promises to keep "
       "the function (SDS-LoRA's reparameterisation; `none` otherwise), with the measured gaps"),
    _f("packages", "json", "versions of the packages that can change a number"),
    _f("git_commit", "str", "commit of the code (`+dirty` marks uncommitted code)"),
    _f("hostname", "str", "machine that ran the trial"),
    _f("device", "str", "GPU name, or `cpu:` + the CPU model name (older rows: the architecture)"),
    _f("threads", "str", "torch threads of the trial"),
    _f("started_at", "str", "start time, UTC, ISO 8601"),
    _f("traceback", "str", "the failure's traceback (failed trials only)"),
    _f("key_version", "int", "version of `key`'s recipe"),
    _f("setting_key", "str", "the key without seed and LR (runs aggregated into one leaderboard "
       "row share it)"),
    _f("data_fingerprint", "str", "fingerprint of the task's data files"),
    _f("legacy_key", "str", "the first earlier-version key of a re-keyed run"),
    _f("adapter_path", "str", "with `save_adapters`: the saved adapter's folder (else empty)"),
    _f("adapter_bytes", "int", "with `save_adapters`: the size of its `adapter/` (else empty)"),
    _f("distributed", "json", "multi-GPU (DeepSpeed) trials only, else empty: world size, ZeRO "
       "stage, precision, micro-batch x accumulation x world, offload and checkpointing flags, "
       "`grad_clipping` (`deepspeed`, or the harness before a method's gradient transform), "
       "load dtype, per-rank adapter digests after init, buffer digests after training, eval "
       "sharding, callback events, restored step, Train run name, DeepSpeed version and the "
       "rendered config; where the saved adapter is in Ray storage"),
    _f("forgetting", "float", "causal-LM tasks only: general-text LM loss after - before"),
    _f("forgetting_lm_loss_before", "float", "causal-LM tasks only: general-text LM loss of "
       "the base model"),
    _f("forgetting_lm_loss_after", "float", "causal-LM tasks only: general-text LM loss of "
       "the trained model"),
    _f("forgetting_corpus", "json", "causal-LM tasks only: the corpus (source, path, SHA-256)"),
    _f("forgetting_corpus_fingerprint", "str", "causal-LM tasks only: a hash of the exact "
       "token ids measured"),
    _f("forgetting_tokens", "int", "causal-LM tasks only: tokens predicted"),
    _f("forgetting_window", "int", "causal-LM tasks only: window length"),
    _f("ray_node_ip", "str", "trials run through Ray Tune: IP of the node that ran it"),
    _f("ray_node_id", "str", "trials run through Ray Tune: id of the node that ran it"),
)  # fmt: skip

FIELDS_BY_NAME: dict[str, RunField] = {f.name: f for f in RUN_FIELDS}
RUN_COLUMNS: list[str] = [f.name for f in RUN_FIELDS]


def arrow_schema(columns: Iterable[str] | None = None):
    """The pyarrow schema of runs.parquet (or of `columns` of it, in the order given)."""
    import pyarrow as pa

    names = RUN_COLUMNS if columns is None else list(columns)
    unknown = [n for n in names if n not in FIELDS_BY_NAME]
    if unknown:
        raise RunRecordError(f"not run-record columns: {', '.join(unknown)}")
    fields = [FIELDS_BY_NAME[n] for n in names]
    return pa.schema([pa.field(f.name, f.arrow_type(), nullable=f.nullable) for f in fields])


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool


def _is_number(value: Any) -> bool:
    # bool is an Integral, but True is not a parameter count or a loss
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _checked(field: RunField, value: Any) -> Any:
    """`value` as a plain Python value of the field's kind; RunRecordError if it is not one."""
    if value is None:
        if not field.nullable:
            raise RunRecordError(f"run column {field.name!r} may not be empty (got None)")
        return None
    kind = field.kind
    if kind in ("str", "json") and isinstance(value, str):
        if kind == "json":
            try:
                json.loads(value)
            except ValueError as err:
                raise RunRecordError(
                    f"run column {field.name!r} must hold a JSON string; "
                    f"{value[:80]!r} is not JSON ({err})"
                ) from None
        return str(value)
    if kind == "int" and _is_number(value) and isinstance(value, numbers.Integral):
        return int(value)
    if kind == "float" and _is_number(value):  # NaN and inf too: a diverged run's loss
        return float(value)
    if kind == "bool" and _is_bool(value):
        return bool(value)
    wanted = {"str": "a string", "json": "a JSON string", "int": "an integer",
              "float": "a number", "bool": "a boolean"}[kind]  # fmt: skip
    empty = " or None" if field.nullable else ""
    raise RunRecordError(
        f"run column {field.name!r} must be {wanted}{empty}, not "
        f"{type(value).__name__} {str(value)[:80]!r}"
    )


def validate_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with every run column, in order, as plain Python values (None where the row
    has no value). RunRecordError naming the column for a column not in the run record, a
    value of the wrong kind, or an empty non-nullable column."""
    unknown = [name for name in row if name not in FIELDS_BY_NAME]
    if unknown:
        raise RunRecordError(
            f"unknown run column(s) {', '.join(map(repr, unknown))}: every column of "
            "runs.parquet is defined in harness/reporting/run_record.py (RUN_FIELDS); add it there"
        )
    return {f.name: _checked(f, row.get(f.name)) for f in RUN_FIELDS}


def render_readme_section() -> str:
    """The README's runs.parquet schema table (between README_START and README_END)."""
    lines = [
        "`runs.parquet`, one row per trial, one line per column in the file's order; `json`",
        "columns hold nested data as a JSON string; every column may be empty unless marked",
        "`required`. Generated from `harness/reporting/run_record.py` (`render_readme_section`);",
        "a test checks this table against it.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    for f in RUN_FIELDS:
        kind = f.kind if f.nullable else f"{f.kind}, required"
        meaning = f.description.replace("|", "\\|")  # a table cell
        lines.append(f"| {f.name} | {kind} | {meaning} |")
    return "\n".join(lines) + "\n"
