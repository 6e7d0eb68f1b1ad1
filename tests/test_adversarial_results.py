"""A hostile tester's findings on runs.parquet / leaderboard.parquet, each reproduced.

Wrong numbers (duplicated keys, a stale leaderboard), lost rows (concurrent writers, a full
disk), unreadable files, tracebacks instead of one `error:` line, and 0600 files.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.reporting import results
from harness.reporting.report import write_report
from harness.reporting.results import (
    JOURNAL_DIR,
    LEADERBOARD_FILE,
    RUNS_FILE,
    NotCompactedError,
    ResultsError,
    RunRecorder,
    append_runs,
    build_leaderboard,
    read_runs,
    write_leaderboard,
)

REPO = Path(__file__).resolve().parents[1]


def _run(seed: int, test: float, *, key: str | None = None, task: str = "glue/sst2", **kw):
    row = {
        "key": key or f"lora-{task}-0.001-{seed}",
        "status": "ok", "method": "lora", "task": task, "model_id": "m", "lr": 1e-3,
        "seed": seed, "selection_metric": "accuracy", "selection_score": test,
        "test_metric": "accuracy", "test_score": test,
        "test_metrics": json.dumps({"accuracy": test}), "majority_baseline": 0.5,
        "trainable_params": 10, "init_time_s": 0.1, "train_time_s": 1.0,
        "peak_memory_mb": 100.0, "samples_per_s": 50.0, "protocol": "p", "git_commit": "abc",
        "packages": "{}", "device": "cpu", "data_kind": "mirror", "data_source": "{}",
        "model_revision": "r", "method_config": "{}",
    }  # fmt: skip
    row.update(kw)
    return row


def _cli(*argv: str) -> tuple[int, str, str]:
    """`harness ...` in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------- wrong numbers, silently
def test_a_duplicated_key_is_one_run_not_two_seeds():
    runs = pd.DataFrame([_run(0, 0.9), _run(0, 0.9)])  # the same run, twice
    row = build_leaderboard(runs).iloc[0]
    assert row["n_seeds"] == 1 and json.loads(row["seeds"]) == [0]
    assert pd.isna(row["test_std"]) and pd.isna(row["test_ci_low"])  # no zero-width CI
    assert row["n_duplicate_rows"] == 1
    assert any("1 duplicate" in n for n in results.leaderboard_warnings(build_leaderboard(runs)))


def test_a_duplicated_key_keeps_the_latest_ok_row():
    runs = pd.DataFrame([_run(0, 0.2), _run(0, 0.4, status="failed"), _run(0, 0.6), _run(1, 0.8)])
    row = build_leaderboard(runs).iloc[0]
    assert row["n_seeds"] == 2 and row["n_duplicate_rows"] == 2 and row["n_failed"] == 0
    assert row["test_mean"] == pytest.approx(0.7)


def test_an_interrupted_sweeps_leaderboard_is_marked_partial_in_the_file():
    runs = pd.DataFrame([_run(0, 0.9), _run(1, 0.8, status="failed")])
    planned = {("lora", "glue/sst2"): {"lora-glue/sst2-0.001-0", "lora-glue/sst2-0.001-1",
                                       "lora-glue/sst2-0.001-2"}}  # fmt: skip
    row = build_leaderboard(runs, planned=planned).iloc[0]
    # seed 1 finished (failed) and is not missing; seed 2 never ran
    assert (row["n_planned"], row["n_missing"], bool(row["partial"])) == (3, 1, True)
    shown = results.format_leaderboard(build_leaderboard(runs, planned=planned))
    assert "PARTIAL 1/3 missing" in shown
    runs_done = pd.concat([runs, pd.DataFrame([_run(2, 0.7)])])
    done = build_leaderboard(runs_done, planned=planned)
    assert done.iloc[0]["n_missing"] == 0 and not bool(done.iloc[0]["partial"])
    assert "PARTIAL" not in results.format_leaderboard(done)
    assert pd.isna(build_leaderboard(runs).iloc[0]["partial"])  # no plan: not known


def test_a_chosen_lr_at_the_edge_of_its_grid_is_flagged():
    def board(scores: dict[float, float]) -> pd.DataFrame:
        return build_leaderboard(
            pd.DataFrame([_run(0, v, key=f"k{lr}", lr=lr) for lr, v in scores.items()])
        )

    assert bool(board({1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.9}).iloc[0]["lr_at_grid_edge"])
    assert bool(board({1e-4: 0.9, 1e-3: 0.6, 1e-2: 0.5}).iloc[0]["lr_at_grid_edge"])
    inner = board({1e-4: 0.5, 1e-3: 0.9, 1e-2: 0.6})
    assert not bool(inner.iloc[0]["lr_at_grid_edge"])
    assert "(edge)" not in results.format_leaderboard(inner)
    assert "1e-02 (edge)" in results.format_leaderboard(board({1e-4: 0.5, 1e-2: 0.9}))


def test_a_row_run_with_a_doubted_default_is_marked_in_board_table_and_report(tmp_path: Path):
    """CG-LoRA no-shift at `scale: stable` (doubted in methods/DEFAULTS.md) is marked; its
    shift variant and a no-shift run with the scale overridden are not."""

    def cg(seed: int, method: str = "cg_lora", **config) -> dict:
        config = {"variant": "no_shift", "scale": "stable", "seed": seed} | config
        return _run(seed, 0.7, key=f"{method}-{json.dumps(config)}", method=method,
                    method_config=json.dumps(config))  # fmt: skip

    runs = pd.DataFrame(
        [cg(0), cg(1)]
        + [cg(s, "cg_lora_shift", variant="shift") for s in (0, 1)]
        + [_run(s, 0.8) for s in (0, 1)]
    )
    board = build_leaderboard(runs, compare=False).set_index("method")
    doubts = json.loads(board.loc["cg_lora", "doubted_defaults"])
    assert len(doubts) == 1 and doubts[0].startswith("cg_lora.scale=stable: ")  # once, not per seed
    assert json.loads(board.loc["cg_lora_shift", "doubted_defaults"]) == []
    assert json.loads(board.loc["lora", "doubted_defaults"]) == []
    shown = results.format_leaderboard(board.reset_index())
    marked = [c.strip() for line in shown.splitlines() for c in line.split("|") if "†" in c]
    assert "cg_lora †" in marked and "cg_lora_shift †" not in marked and "lora †" not in marked
    assert results.DOUBT_NOTE in shown
    rescaled = build_leaderboard(pd.DataFrame([cg(0, scale="none"), cg(1, scale="none")]))
    assert json.loads(rescaled.iloc[0]["doubted_defaults"]) == []
    assert "†" not in results.format_leaderboard(rescaled)
    append_runs(tmp_path, runs.to_dict("records"))
    escaped = doubts[0].replace("|", "\\|")  # as a Markdown cell holds it
    md = write_report(tmp_path)[1].read_text()
    assert "| glue/sst2 | cg_lora † |" in md and escaped in md
    # A current board written before the column (or before the doubt) still shows it.
    write_leaderboard(tmp_path)
    stored = pd.read_parquet(tmp_path / "leaderboard.parquet").drop(columns="doubted_defaults")
    stored.to_parquet(tmp_path / "leaderboard.parquet", index=False)
    md = write_report(tmp_path)[1].read_text()
    assert "out of date" not in md
    assert "| glue/sst2 | cg_lora † |" in md and escaped in md


def test_report_rebuilds_a_leaderboard_older_than_the_runs(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.9)])
    write_leaderboard(tmp_path)  # 1 seed: 0.9000
    append_runs(tmp_path, [_run(1, 0.1)])  # a seed appended afterwards
    md = write_report(tmp_path)[1].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| glue/sst2 | lora"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("0.5000 ± ") and cells[4] == "2", row
    assert "0.9000" not in row
    assert "out of date" in md


def test_report_keeps_a_current_leaderboard(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.9), _run(1, 0.7)])
    write_leaderboard(tmp_path)
    md = write_report(tmp_path)[1].read_text()
    assert "out of date" not in md and "0.8000 ± " in md


# ------------------------------------------------------------------- lost rows and crashes
def _writer(out: str, wid: int, n: int) -> None:
    for i in range(n):
        append_runs(out, [_run(1000 * wid + i, 0.5)])


def _reader(out: str, stop, errors, counts) -> None:
    last = 0
    while not stop.is_set():
        try:
            n = len(read_runs(out))
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors.append(repr(err))
            return
        if n < last:
            errors.append(f"row count went down: {last} -> {n}")
        last = n
        counts.append(n)


def test_concurrent_writers_keep_every_row_and_a_reader_never_crashes(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        stop, errors, counts = manager.Event(), manager.list(), manager.list()
        reader = ctx.Process(target=_reader, args=(str(tmp_path), stop, errors, counts))
        reader.start()
        writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in (1, 2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(240)
        stop.set()
        reader.join(60)
        assert [w.exitcode for w in writers] == [0, 0]
        assert list(errors) == [] and len(counts) > 0
    runs = pd.read_parquet(tmp_path / RUNS_FILE)
    assert len(runs) == 80 and runs["key"].is_unique
    assert not (tmp_path / JOURNAL_DIR).exists()


def test_a_sweep_records_rows_without_rewriting_runs_parquet_each_time(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.5)])
    before = (tmp_path / RUNS_FILE).read_bytes()
    recorder = RunRecorder(tmp_path, compact_every_s=3600, log=lambda msg: None, overhead=0)
    for seed in range(1, 6):
        recorder.record(_run(seed, 0.5))
    assert (tmp_path / RUNS_FILE).read_bytes() == before  # journal only
    assert len(list((tmp_path / JOURNAL_DIR).glob("*.json"))) == 5
    assert sorted(read_runs(tmp_path)["seed"]) == [0, 1, 2, 3, 4, 5]  # readers merge it
    assert recorder.close()
    assert len(pd.read_parquet(tmp_path / RUNS_FILE)) == 6


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_keeps_the_finished_row_and_says_where(tmp_path: Path, monkeypatch):
    append_runs(tmp_path, [_run(0, 0.5)])
    monkeypatch.setattr(results, "atomic_write_parquet", _disk_full)
    with pytest.raises(NotCompactedError, match=r"No space left.*kept in .*runs\.journal"):
        append_runs(tmp_path, [_run(1, 0.7)])
    assert sorted(read_runs(tmp_path)["seed"]) == [0, 1]  # not lost
    monkeypatch.undo()
    append_runs(tmp_path, [_run(2, 0.9)])  # the next write folds it in, once
    runs = pd.read_parquet(tmp_path / RUNS_FILE)
    assert sorted(runs["seed"]) == [0, 1, 2] and runs["key"].is_unique


def test_disk_full_everywhere_is_retried_and_never_stops_the_sweep(tmp_path: Path, monkeypatch):
    logged: list[str] = []
    recorder = RunRecorder(tmp_path, compact_every_s=0, log=logged.append, overhead=0)
    monkeypatch.setattr(results, "_stage", _disk_full)  # journal and runs.parquet both fail
    recorder.record(_run(0, 0.5))
    assert len(logged) == 1 and logged[0].startswith("error: ") and "NOT saved" in logged[0]
    monkeypatch.undo()
    recorder.record(_run(1, 0.5))  # retried with the next trial
    assert recorder.close()
    assert sorted(pd.read_parquet(tmp_path / RUNS_FILE)["seed"]) == [0, 1]


@pytest.mark.parametrize("content", [b"PAR1garbage", b""], ids=["garbage", "empty"])
def test_an_unreadable_runs_parquet_is_one_error_and_never_overwritten(tmp_path, content):
    append_runs(tmp_path, [_run(0, 0.5)])
    path = tmp_path / RUNS_FILE
    data = path.read_bytes()
    broken = data[: len(data) // 2] if content == b"" else content  # truncated, or garbage
    path.write_bytes(broken)
    with pytest.raises(ResultsError, match=r"runs\.parquet is not a readable Parquet file"):
        read_runs(tmp_path)
    with pytest.raises(ResultsError, match="left untouched"):
        append_runs(tmp_path, [_run(1, 0.5)])
    assert path.read_bytes() == broken
    rc, out, err = _cli("leaderboard", str(tmp_path))
    _assert_one_error_line(rc, err, str(path), "restore it")
    assert path.read_bytes() == broken and not (tmp_path / LEADERBOARD_FILE).exists()


def test_mixed_settings_are_one_error_line(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.5, setting_key="a"), _run(1, 0.5, setting_key="b")])
    rc, out, err = _cli("leaderboard", str(tmp_path))
    _assert_one_error_line(rc, err, "2 different settings")
    rc, out, err = _cli("report", str(tmp_path))
    _assert_one_error_line(rc, err, "2 different settings")


def test_an_unwritable_markdown_path_is_one_error_and_changes_nothing(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.5)])
    write_leaderboard(tmp_path)
    append_runs(tmp_path, [_run(1, 0.9)])
    board = (tmp_path / LEADERBOARD_FILE).read_bytes()
    for target in (tmp_path / "no-such-dir" / "x.md", tmp_path):
        rc, out, err = _cli("leaderboard", str(tmp_path), "--markdown", str(target))
        _assert_one_error_line(rc, err, str(target))
        assert (tmp_path / LEADERBOARD_FILE).read_bytes() == board


def _read_only(folder: Path, *argv: str) -> tuple[int, str, str]:
    """`harness ...` with `folder` mounted read-only in a private mount namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a read-only bind mount")
    script = (
        f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && '
        f'exec "{sys.executable}" -m harness.cli "$@"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_a_read_only_output_dir_is_one_error_line(tmp_path: Path):
    out = tmp_path / "out"
    append_runs(out, [_run(0, 0.5)])
    write_leaderboard(out)
    append_runs(out, [_run(1, 0.9)])
    rc, _, err = _read_only(out, "leaderboard", str(out))
    _assert_one_error_line(rc, err, "Read-only file system")
    rc, _, err = _read_only(out, "report", str(out))
    _assert_one_error_line(rc, err, "Read-only file system")


def test_an_existing_report_is_not_changed_when_writing_fails(tmp_path: Path, monkeypatch):
    append_runs(tmp_path, [_run(0, 0.5), _run(1, 0.7)])
    html, md = write_report(tmp_path)
    before = {p.name: p.read_bytes() for p in html.parent.iterdir()}
    append_runs(tmp_path, [_run(2, 0.9)])
    real, calls = results._stage, []

    def fail_on_second(path, write):
        calls.append(path)
        if len(calls) == 2:
            _disk_full()
        return real(path, write)

    monkeypatch.setattr(results, "_stage", fail_on_second)
    with pytest.raises(ResultsError, match="no existing report file was changed"):
        write_report(tmp_path)
    assert {p.name: p.read_bytes() for p in html.parent.iterdir()} == before


def test_a_report_blocked_by_a_folder_is_one_error_and_changes_nothing(tmp_path: Path):
    append_runs(tmp_path, [_run(0, 0.5), _run(1, 0.7)])
    html, md = write_report(tmp_path)
    md.unlink()
    md.mkdir()  # report.md cannot be written
    before = {p.name: p.is_dir() or p.read_bytes() for p in html.parent.iterdir()}
    append_runs(tmp_path, [_run(2, 0.9)])
    rc, _, err = _cli("report", str(tmp_path))
    _assert_one_error_line(rc, err, "Is a directory", "no existing report file was changed")
    assert {p.name: p.is_dir() or p.read_bytes() for p in html.parent.iterdir()} == before


def test_a_task_this_checkout_no_longer_knows_is_a_warning_not_a_traceback(tmp_path: Path):
    items = json.dumps({"test": {"pred": [0.1, 0.5, 0.9, 0.3], "label": [0.0, 0.6, 1.0, 0.2]}})
    rows = [
        _run(s, 0.5, task="glue/retired", method=m, key=f"{m}-{s}", test_metric="pearson",
             test_items=items)
        for m in ("lora", "dora")
        for s in (0, 1)
    ]  # fmt: skip
    append_runs(tmp_path, rows)
    rc, out, err = _cli("leaderboard", str(tmp_path))
    assert rc == 0 and "Traceback" not in err, err
    assert "warning: dora on glue/retired" in err and "not known to this checkout" in err
    assert "dora" in out and (tmp_path / LEADERBOARD_FILE).is_file()


def test_both_parquet_files_follow_the_umask(tmp_path: Path):
    old = os.umask(0o022)
    try:
        append_runs(tmp_path, [_run(0, 0.5)])
        write_leaderboard(tmp_path)
    finally:
        os.umask(old)
    for name in (RUNS_FILE, LEADERBOARD_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_rows_survive_a_killed_writer_between_journal_and_parquet(tmp_path: Path, monkeypatch):
    """A writer dying after the journal entry is fsynced loses nothing (no duplicate)."""
    append_runs(tmp_path, [_run(0, 0.5)])
    monkeypatch.setattr(results, "_compact_locked", lambda *a: (_ for _ in ()).throw(SystemExit))
    with pytest.raises(SystemExit):
        append_runs(tmp_path, [_run(1, 0.5)])
    monkeypatch.undo()
    time.sleep(0.01)
    append_runs(tmp_path, [_run(1, 0.6)])  # the rerun of the same key replaces it
    runs = pd.read_parquet(tmp_path / RUNS_FILE)
    assert sorted(runs["seed"]) == [0, 1] and runs["key"].is_unique
    assert runs.loc[runs["seed"] == 1, "test_score"].item() == pytest.approx(0.6)
