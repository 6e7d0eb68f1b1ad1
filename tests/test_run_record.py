"""The run record (harness.reporting.run_record) is the one definition of runs.parquet's columns.

Checked here: the README's schema table is rendered from it; rows that do not fit it are
refused with nothing written; the committed results fit it; and every key the trial code
puts in a row is one of its columns (read from the code with ast, and from a real trial).
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.reporting import results
from harness.reporting.results import (
    JOURNAL_DIR,
    RUNS_FILE,
    RowRefusedError,
    RunRecorder,
    append_runs,
    read_runs,
)
from harness.reporting.run_record import (
    FIELDS_BY_NAME,
    README_END,
    README_START,
    RUN_COLUMNS,
    RUN_FIELDS,
    RunRecordError,
    arrow_schema,
    render_readme_section,
    validate_row,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "results").glob("**/runs.parquet"))


def _row(n: int = 0, **changes) -> dict:
    row = {
        "key": f"k{n}", "status": "ok", "method": "lora", "task": "glue/sst2",
        "model_id": "m", "seed": n, "lr": 1e-3, "selection_metric": "accuracy",
        "selection_score": 0.5, "test_metric": "accuracy", "test_score": 0.5,
        "test_metrics": json.dumps({"accuracy": 0.5}), "trainable_params": 10,
        "budget": json.dumps({"max_steps": 2}), "threads": "2",
    }  # fmt: skip
    return {**row, **changes}


# ----------------------------------------------------------------- (a) the README table
def _readme_section(text: str) -> str:
    assert text.count(README_START) == 1 and text.count(README_END) == 1, (
        f"README.md must hold the runs.parquet schema between {README_START} and {README_END} "
        "once (paste harness.reporting.run_record.render_readme_section() there)"
    )
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"


def test_the_readme_schema_section_is_rendered_from_the_run_record():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert _readme_section(readme) == render_readme_section(), (
        "README.md's runs.parquet table differs from harness/reporting/run_record.py: paste "
        "render_readme_section() between the markers"
    )


def test_the_rendered_table_has_one_line_per_column_in_order():
    lines = [line for line in render_readme_section().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]
    assert [c[0] for c in cells] == RUN_COLUMNS
    for cell, field in zip(cells, RUN_FIELDS, strict=True):
        assert cell[1].split(",")[0] == field.kind
        assert ("required" in cell[1]) == (not field.nullable)
        assert cell[2] == field.description


# ----------------------------------------------------------------- the definition itself
def test_the_run_record_has_unique_columns_a_description_each_and_cheap_imports():
    assert len(set(RUN_COLUMNS)) == len(RUN_COLUMNS) == len(RUN_FIELDS)
    assert all(f.description and "\n" not in f.description for f in RUN_FIELDS)
    assert results.RUN_COLUMNS is RUN_COLUMNS  # still importable from harness.reporting.results
    import subprocess
    import sys

    heavy = "('torch', 'ray', 'pandas', 'pyarrow')"
    code = (
        f"import sys, harness.reporting.run_record; "
        f"print(sorted(set({heavy}) & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_validate_row_fills_every_column_in_order_with_plain_values():
    row = _row(seed=np.int64(3), test_score=np.float32(0.25), lr=1)
    checked = validate_row(row)
    assert list(checked) == RUN_COLUMNS
    assert {k: v for k, v in checked.items() if v is not None} == {
        **row,
        "seed": 3,
        "test_score": 0.25,
        "lr": 1.0,
    }
    assert type(checked["seed"]) is int and type(checked["test_score"]) is float
    assert type(checked["lr"]) is float
    assert math.isnan(validate_row(_row(final_train_loss=float("nan")))["final_train_loss"])


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"seeed": 0}, "seeed"),  # a typo is a new column, never silently added
        ({"seed": "0"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"trainable_params": True}, "trainable_params"),
        ({"test_score": "0.5"}, "test_score"),
        ({"method_config": {"rank": 8}}, "method_config"),
        ({"method_config": "rank=8"}, "method_config"),  # not JSON
        ({"threads": 2}, "threads"),
        ({"status": None}, "status"),  # required
    ],
)
def test_validate_row_names_the_column_it_refuses(change, column):
    with pytest.raises(RunRecordError, match=repr(column)):
        validate_row(_row(**change))


# ----------------------------------------------------------------- (b) refused, nothing lost
def _snapshot(out: Path) -> tuple[bytes, list[str]]:
    journal = out / JOURNAL_DIR
    entries = sorted(p.name for p in journal.iterdir()) if journal.is_dir() else []
    return (out / RUNS_FILE).read_bytes(), entries


@pytest.mark.parametrize(
    "bad",
    [
        _row(9, new_column="x"),
        _row(9, seed="9"),
        _row(9, test_rows="{broken"),
        _row(9, key=None),
    ],  # fmt: skip
)
def test_a_refused_row_writes_nothing_and_leaves_runs_parquet_byte_identical(tmp_path, bad):
    append_runs(tmp_path, [_row(0), _row(1)])
    before = _snapshot(tmp_path)
    for compact in (True, False):
        with pytest.raises(RowRefusedError, match="row 2 of 2 .*no row was written"):
            append_runs(tmp_path, [_row(2), bad], compact=compact)  # the good row neither
        assert _snapshot(tmp_path) == before
    assert sorted(read_runs(tmp_path)["key"]) == ["k0", "k1"]


def test_a_refused_row_does_not_hold_up_the_sweeps_later_rows(tmp_path):
    logged: list[str] = []
    recorder = RunRecorder(tmp_path, compact_every_s=0, log=logged.append, overhead=0)
    recorder.record(_row(0, seed="0"))
    recorder.record(_row(1))
    assert not recorder.close()  # not every row reached runs.parquet
    assert read_runs(tmp_path)["key"].tolist() == ["k1"]
    refused = [line for line in logged if line.startswith("refused row: ")]
    assert [json.loads(line.removeprefix("refused row: "))["key"] for line in refused] == ["k0"]
    assert any("'seed'" in line for line in logged)


def test_runs_parquet_is_written_with_the_run_records_schema(tmp_path):
    # Partial rows: most columns are all-null, which pandas alone would type by guessing.
    append_runs(tmp_path, [_row(0), _row(1, adapter_path=None, forgetting_tokens=None)])
    schema = pq.read_schema(tmp_path / RUNS_FILE)
    expected = {
        "str": pa.large_string(), "json": pa.large_string(), "int": pa.int64(),
        "float": pa.float64(), "bool": pa.bool_(),
    }  # fmt: skip
    assert schema.names == RUN_COLUMNS
    for field in RUN_FIELDS:
        assert schema.field(field.name).type == expected[field.kind], field.name
        assert schema.field(field.name).nullable == field.nullable, field.name
    assert schema.remove_metadata().equals(arrow_schema().remove_metadata())


# ----------------------------------------------------------------- (c) the committed results
def _compatible(arrow_type: pa.DataType, kind: str) -> bool:
    if kind in ("str", "json"):
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if kind == "int":
        return pa.types.is_integer(arrow_type)
    if kind == "float":
        return pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type)
    return pa.types.is_boolean(arrow_type)


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(REPO)) for p in COMMITTED])
def test_every_committed_runs_column_is_in_the_run_record_with_a_compatible_type(path, tmp_path):
    schema = pq.read_schema(path)
    unknown = [name for name in schema.names if name not in FIELDS_BY_NAME]
    assert not unknown, f"{path}: columns not in harness/reporting/run_record.py: {unknown}"
    df = pd.read_parquet(path)
    for name in schema.names:
        field = FIELDS_BY_NAME[name]
        assert _compatible(schema.field(name).type, field.kind), (name, schema.field(name).type)
        values = df[name].dropna()
        if not field.nullable:
            assert len(values) == len(df), f"{path}: {name} has empty values"
        if field.kind == "json":
            for value in values:
                json.loads(value)
    # Rewritten with the run record's schema, every committed key and value is kept.
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(path, out / RUNS_FILE)
    results.compact_runs(out)  # nothing to fold in: the file is not touched
    assert (out / RUNS_FILE).read_bytes() == path.read_bytes()
    results.write_runs(out, read_runs(out))
    again = pd.read_parquet(out / RUNS_FILE)
    assert pq.read_schema(out / RUNS_FILE).names == RUN_COLUMNS
    pd.testing.assert_frame_equal(again[df.columns], df, check_dtype=False)


def test_there_are_committed_results_to_check():
    assert COMMITTED, "no results/**/runs.parquet found"


# ----------------------------------------------------------------- (d) what the code writes
ROW_WRITERS = ("harness/training/trial.py", "harness/deepspeed/launch.py",
               "harness/deepspeed/engine.py", "harness/training/forgetting.py",
               "harness/sweeps/sweep.py")  # fmt: skip
# Functions whose returned dict is merged into a row (row.update(f(...))): where they live.
ROW_PRODUCERS = {
    "hardware": "harness/spec/provenance.py",
    "save": "harness/training/adapters.py",
    "copy_adapter": "harness/deepspeed/checkpoint.py",
    "ray_node": "harness/sweeps/sweep.py",
    "base_row": "harness/training/trial.py",
}


def _tree(relpath: str) -> ast.Module:
    return ast.parse((REPO / relpath).read_text(encoding="utf-8"))


def _literal_keys(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return set()


def _returned_keys(relpath: str, function: str) -> set[str]:
    keys: set[str] = set()
    for node in ast.walk(_tree(relpath)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and sub.value is not None:
                    keys |= _literal_keys(sub.value)
    assert keys, f"{relpath}: {function} returns no dict literal"
    return keys


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "?")


def _row_keys(relpath: str) -> set[str]:
    """Keys put in a dict named `row` in one module: row["k"] = ..., row.update(k=...),
    row.update({...}), row.update(producer(...)), {**row, **dict.fromkeys(NAMES)}."""
    tree = _tree(relpath)
    constants = {
        target.id: {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple | ast.List)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "row":
                assert isinstance(node.slice, ast.Constant), ast.unparse(node)
                keys.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "row"):
                continue
            if node.func.attr != "update":
                continue
            keys |= {kw.arg for kw in node.keywords if kw.arg}
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    keys |= _literal_keys(arg)
                elif isinstance(arg, ast.Call):
                    name = _called_name(arg)
                    assert name in ROW_PRODUCERS, (
                        f"{relpath}: row.update({ast.unparse(arg)}) - add {name} to "
                        "ROW_PRODUCERS so its keys are checked"
                    )
                    keys |= _returned_keys(ROW_PRODUCERS[name], name)
                else:
                    raise AssertionError(f"{relpath}: row.update({ast.unparse(arg)}) unread")
        elif isinstance(node, ast.Dict) and any(
            isinstance(v, ast.Name) and v.id == "row" for k, v in zip(node.keys, node.values,
                                                                      strict=True) if k is None
        ):  # fmt: skip
            for value in node.values:
                if isinstance(value, ast.Call) and ast.unparse(value.func) == "dict.fromkeys":
                    keys |= constants[value.args[0].id]
    return keys


def test_every_key_the_trial_code_puts_in_a_row_is_a_run_column():
    found = {path: _row_keys(path) for path in ROW_WRITERS}
    found["base_row"] = _returned_keys(ROW_PRODUCERS["base_row"], "base_row")
    for path, keys in found.items():
        assert keys, f"nothing found in {path}: the reader above no longer sees its rows"
        assert keys <= set(RUN_COLUMNS), f"{path} writes {sorted(keys - set(RUN_COLUMNS))}"
    # The other way round: every column is written by that code, or by the re-keying of
    # old runs (harness.spec.identity), so the run record holds no dead column.
    written = set().union(*found.values())
    identity_tree = _tree("harness/spec/identity.py")
    rekeyed = {
        e.value
        for node in ast.walk(identity_tree)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
        and isinstance(node.slice, ast.Tuple)
        for part in node.slice.elts if isinstance(part, ast.List)
        for e in part.elts if isinstance(e, ast.Constant)
    }  # fmt: skip
    assert set(RUN_COLUMNS) - written <= rekeyed, sorted(set(RUN_COLUMNS) - written - rekeyed)


def test_a_real_trials_rows_fit_the_run_record(mirror_dir, tmp_path):
    """A real (tiny) trial on the single-device path, ok and failed, as the sweep records
    it: through the JSON a Ray worker reports it in, then appended and read back."""
    from harness.spec.config import Budget, EvalConfig
    from harness.spec.identity import TrialSpec
    from harness.training.trial import run_trial
    from tests.conftest import MINILM

    def spec(data_dir: str) -> TrialSpec:
        return TrialSpec(
            sweep="t", method="lora", method_overrides={}, task="glue/sst2", lr=1e-3, seed=0,
            model_id=MINILM, model_revision=None,
            budget=Budget(max_steps=2, batch_size=4, max_length=16, train_rows=16,
                          selection_rows=8, test_rows=8),
            eval=EvalConfig(batch_size=8), data_dir=data_dir, model_dir=None,
        )  # fmt: skip

    ok = run_trial(spec(mirror_dir), adapters_dir=str(tmp_path / "adapters"))
    assert ok["status"] == "ok", ok.get("traceback")
    failed = run_trial(spec(str(tmp_path / "no-data")))
    assert failed["status"] == "failed"
    for row in (ok, failed):
        assert set(row) <= set(RUN_COLUMNS), sorted(set(row) - set(RUN_COLUMNS))
        reported = json.loads(json.dumps(row, default=str))  # harness.sweeps.sweep's final report
        assert validate_row(reported) == validate_row(row)
    append_runs(tmp_path / "out", [json.loads(json.dumps(r, default=str)) for r in (ok, failed)])
    runs = read_runs(tmp_path / "out").set_index("status")
    for column in ("seed", "steps", "adapter_bytes", "test_score", "wall_time_s"):
        assert runs.loc["ok", column] == pytest.approx(ok[column]), column
    assert runs.loc["failed", "error"] == failed["error"]


def test_a_cpu_row_names_the_cpu_model(tmp_path, monkeypatch):
    """Float32 CPU results differ in the last bits between CPU models (same code and
    packages), so a row's `device` names the model, read from /proc/cpuinfo."""
    import builtins

    import torch

    from harness.spec import provenance

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000 @ 3GHz\n")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert provenance.hardware(torch.device("cpu"))["device"] == "cpu:Test CPU 9000 @ 3GHz"
    cpuinfo.unlink()  # no /proc/cpuinfo: the platform's string, still prefixed
    assert provenance.hardware(torch.device("cpu"))["device"].startswith("cpu:")
