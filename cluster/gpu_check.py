#!/usr/bin/env python3
"""The GPU check, one command within 10 minutes (issue 18, item 4).

On a GPU machine whose Python has torch, transformers, peft (and pandas, pyarrow, scipy,
scikit-learn) but not ray, deepspeed or datasets, and no network:

  (a) bf16 single-GPU trials (LoRA and LoRA-GA) on MiniLM and real SST-2, WITHOUT Ray: the
      harness's own trial (harness.training.trial.run_trial with `autocast=torch.bfloat16`: the one
      recipe, init/training/evaluation autocast, fp32 weights); MFU against the device's peak;
  (b) the bench table: `harness bench --all` when the CLI has it, else the classic
      `bench_train_step` + `bench_init_cost` functions; in a subprocess with a time limit;
  (c) a 1-GPU DeepSpeed ZeRO-2 run of a few steps (harness.deepspeed.config.render,
      harness.deepspeed.engine.global_batch_step) against the same steps on one device without
      DeepSpeed, if DeepSpeed can be imported (it travels as a wheel in wheelhouse/).

Each part is recorded as ok / failed / skipped with the reason; one failing does not stop
the others. Writes results/bench/<machine>/gpu_check.json and .md (`--out-dir`), and copies
them to `--copy-to` (the device tool's $OUT). `bash cluster/gpu_bundle.sh` builds
wheelhouse/ here (see cluster/README.md, "GPU check").

`--dry-run`: the same steps on CPU, tiny-sized (tests/test_gpu_script.py runs it with ray,
deepspeed and datasets hidden); writes gpu_check_dry_run.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHEELHOUSE = REPO / "wheelhouse"
SITE_DIR = Path(tempfile.gettempdir()) / "gpu_check_site"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
TASK = "glue/sst2"
HIDDEN_ON_GPU_MACHINE = ("ray", "deepspeed", "datasets")
# Per mode: the trial budget, the ZeRO-2 steps and the bench's time limit (the whole check
# must end within 10 minutes on the GPU machine, within a test's minute on CPU).
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "budget": {"max_steps": 300, "batch_size": 32, "max_length": 64, "train_rows": 8000,
                   "selection_rows": 256, "warmup_ratio": 0.06},
        "eval_batch_size": 256,
        "lora_ga_overrides": {},
        "zero_steps": 10,
        "bench_timeout_s": 330,
    },
    "dry_run": {
        "budget": {"max_steps": 3, "batch_size": 4, "max_length": 16, "train_rows": 32,
                   "selection_rows": 8, "test_rows": 16, "warmup_ratio": 0.0},
        "eval_batch_size": 16,
        "lora_ga_overrides": {"init_batches": 1},
        "zero_steps": 2,
        "bench_timeout_s": 120,
    },
}  # fmt: skip
LR = 5e-4
# ZeRO-2 vs one device on the same batches: relative loss gap allowed. fp32 on CPU is one
# computation reordered; bf16 weights on GPU (DeepSpeed keeps fp32 masters) round each step.
ZERO_LOSS_RTOL = {"fp32": 1e-4, "bf16": 5e-2}
# Bulky row fields a check does not need (per-item outcomes, tracebacks past their tail).
DROPPED_ROW_FIELDS = ("test_items", "packages")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def importable(name: str) -> bool:
    """Whether `import name` would find the module (a blocker may raise instead)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def machine_slug() -> str:
    """results/bench/<machine>: `harness bench --all`'s folder name when this checkout has
    it (so both land together), else the GPU's name or cpu-<n>c."""
    try:
        return importlib.import_module("harness.bench.suite").machine_name()
    except (ImportError, AttributeError):
        import torch

        label = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        label = label if label != "cpu" else f"cpu-{os.cpu_count()}c"
        return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def install_wheelhouse(wheelhouse: Path) -> dict[str, Any]:
    """pip-install wheelhouse/wheels/*.whl into a temp dir put first on sys.path (and on
    PYTHONPATH, for the bench subprocess). No index, no dependencies: all are carried."""
    wheels = sorted((wheelhouse / "wheels").glob("*.whl"))
    if not wheels:
        return {"installed": [], "note": f"no wheels in {wheelhouse / 'wheels'}"}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--target", str(SITE_DIR), *map(str, wheels)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(SITE_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(SITE_DIR), os.environ.get("PYTHONPATH")])
    )
    importlib.invalidate_caches()
    return {"installed": [w.name for w in wheels], "seconds": time.perf_counter() - started}


def setup_environment(dry_run: bool, wheelhouse: Path) -> dict[str, Any]:
    """Offline, with the carried model and data when there (GPU machine), else this
    checkout's: the packaged MiniLM copy in .venv and HARNESS_DATA_DIR or ../shared/data."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env: dict[str, Any] = {}
    if not dry_run and (wheelhouse / "wheels").is_dir():
        env["wheelhouse"] = install_wheelhouse(wheelhouse)
    if not dry_run and (wheelhouse / "models").is_dir():
        os.environ["HARNESS_MODEL_DIR"] = str(wheelhouse / "models")
    if not dry_run and (wheelhouse / "data").is_dir():
        os.environ["HARNESS_DATA_DIR"] = str(wheelhouse / "data")
    os.environ.setdefault("HARNESS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    env["HARNESS_MODEL_DIR"] = os.environ.get("HARNESS_MODEL_DIR")
    env["HARNESS_DATA_DIR"] = os.environ["HARNESS_DATA_DIR"]
    return env


def trial_specs(sizes: dict[str, Any], methods_and_overrides: dict[str, dict], device_kind: str):
    """Resolved TrialSpecs through the sweep's own config path (load_config -> expand ->
    identity.resolve), so keys, fingerprints and method configs are the sweep's."""
    import yaml

    from harness.spec import identity
    from harness.spec.config import load_config
    from harness.spec.identity import expand

    raw = {
        "name": f"gpu-check-{device_kind}",
        "model": {"id": MODEL_ID},
        "tasks": [TASK],
        "methods": {m: {"lrs": [LR], "overrides": o} for m, o in methods_and_overrides.items()},
        "seeds": [0],
        "budget": sizes["budget"],
        "eval": {"batch_size": sizes["eval_batch_size"]},
        "output_dir": str(Path(tempfile.gettempdir()) / "gpu-check-runs"),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle)
    try:
        cfg = load_config(handle.name)
    finally:
        os.unlink(handle.name)
    cfg = cfg.model_copy(
        update={"data_dir": cfg.resolved_data_dir(), "model_dir": cfg.resolved_model_dir()}
    )
    return identity.resolve(expand(cfg))


def compute_dtype(device):
    """bf16 on a GPU; fp32 on CPU (the harness's `precision: auto`; bf16 matmuls on a CPU
    without bf16 units run at a fraction of fp32's speed, too slow for a test)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def first_batches(pipeline, batch_size: int, seed: int, device):
    """The trial's init-batch stream (as harness.training.trial: seed + 1), cut at n."""
    return lambda n: itertools.islice(pipeline.batches(batch_size, seed + 1, device), n)


def peak_flops(device) -> dict[str, Any]:
    """The device's bf16 peak (harness.bench.mfu: published on GPU, measured matmul on CPU)."""
    try:
        from harness.bench import mfu
    except ImportError as err:
        return {"status": "skipped", "reason": f"harness.bench.mfu not importable: {err}"}
    dtype = compute_dtype(device)
    return mfu.machine_peak(device, dtype)


def bf16_trial(spec, device, peak: dict[str, Any]) -> dict[str, Any]:
    """One single-device trial in bf16 autocast (fp32 on CPU), without Ray: the harness's
    own trial (harness.training.trial.run_trial, its one recipe) with init, training and evaluation
    autocast, fp32 weights and optimizer states."""
    import torch

    from harness.training.trial import STATUS_OK, run_trial

    dtype = compute_dtype(device)
    row = run_trial(spec, autocast=dtype if dtype != torch.float32 else None)
    row["precision"] = (
        "bf16 autocast (fp32 weights and optimizer states)" if dtype == torch.bfloat16 else "fp32"
    )
    if row["status"] == STATUS_OK:
        # MFU: 6 x all parameters x tokens / s (harness.bench.mfu's convention), here with
        # the attention-mask tokens (no padding), so a lower bound on the kernels' work.
        achieved = 6 * row["total_params"] * row["tokens_per_s"]
        row["achieved_flops_per_s"] = achieved
        if peak.get("peak_flops_per_s"):
            row["mfu"] = achieved / peak["peak_flops_per_s"]
    return {k: v for k, v in row.items() if k not in DROPPED_ROW_FIELDS}


# ----------------------------------------------------------------------------- bench (b)


# `harness bench --all` (harness/bench/suite.py) on a dry run: one method, tiny sizes, not
# written to results/ (its numbers check the code path, nothing else).
DRY_RUN_SUITE_SETTINGS = {"batch_size": 4, "max_length": 16, "init_batches": 1, "warm_steps": 1,
                          "timed_steps": 2, "bare_steps": 1, "peak_matmul_size": 128}  # fmt: skip
GPU_SUITE_REPEATS = 1  # every registered method once: the whole check must fit 10 minutes


def run_bench(dry_run: bool, out_root: Path | None) -> dict[str, Any]:
    """The bench table: `harness bench --all`'s function (harness.bench.suite.run_suite)
    when this checkout has it, else the classic bench functions. Arguments the installed
    version does not take are left out, so either version runs."""
    record: dict[str, Any] = {}
    out = io.StringIO()
    try:
        suite = importlib.import_module("harness.bench.suite")
    except ImportError as err:
        suite, record["suite_missing"] = None, str(err)
    if suite is not None and hasattr(suite, "run_suite") and hasattr(suite, "Settings"):
        fields = {f.name for f in dataclasses.fields(suite.Settings)}
        # On the GPU machine (16 cores) 8 threads keep every method inside the time limit.
        wanted = DRY_RUN_SUITE_SETTINGS if dry_run else {"threads": min(8, os.cpu_count() or 1)}
        settings = suite.Settings(**{k: v for k, v in wanted.items() if k in fields})
        params = inspect.signature(suite.run_suite).parameters
        kwargs: dict[str, Any] = {
            "repeats": 1 if dry_run else GPU_SUITE_REPEATS,
            "out_root": out_root,
            "isolate": not dry_run,
            "progress": lambda line: print(line, file=sys.stderr, flush=True),
        }
        if dry_run:
            kwargs["method_names"] = ["lora"]
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        record["how"] = f"harness.bench.suite.run_suite({settings}, {kwargs})"
        payload = suite.run_suite(settings, **kwargs)
        record["table"] = suite.markdown(payload) if hasattr(suite, "markdown") else ""
        record["written"] = payload.get("written", [])
        record["methods"] = sorted(payload.get("methods", payload.get("summary", {})))
    else:
        bench = importlib.import_module("harness.bench")
        steps, repeats = (2, 1) if dry_run else (30, 5)
        record["how"] = f"harness.bench.bench_train_step(steps={steps}, repeats={repeats})"
        with contextlib.redirect_stdout(out):
            record["train_step_ratio"] = bench.bench_train_step(steps=steps, repeats=repeats)
            if not dry_run:  # LoRA-SB's paper default wants >= 5 batches: not tiny
                record["how"] += " + bench_init_cost()"
                record["init_cost"] = bench.bench_init_cost()
        record["table"] = out.getvalue()
    # Both versions time the CPU (the suite fixes device cpu): on a GPU machine, its cores.
    record["measured_on"] = "cpu"
    record["status"] = "ok"
    return record


def bench_in_subprocess(dry_run: bool, timeout_s: float, out_root: Path) -> dict[str, Any]:
    """The bench in its own process: a time limit that holds, and its memory peaks are its
    own (not the trials')."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-only", str(path)]
        cmd += ["--dry-run"] if dry_run else ["--bench-out-root", str(out_root)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-2000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"status": "failed", "error": f"timed out after {timeout_s:g} s",
                    "output": tail}  # fmt: skip
        seconds = time.perf_counter() - started
        if not path.is_file():
            return {"status": "failed", "error": f"exit {proc.returncode}, no result",
                    "output": proc.stdout[-3000:], "stderr": proc.stderr[-3000:],
                    "seconds": seconds}  # fmt: skip
        record = json.loads(path.read_text())
        record["seconds"] = seconds
        return record


# ----------------------------------------------------------------------------- ZeRO-2 (c)


def zero2_check(spec, device, steps: int) -> dict[str, Any]:
    """A few DeepSpeed ZeRO-2 steps on one device (world size 1, no Ray), and the same
    batches through harness.training.train.train_step on one device from the same init: the losses
    must agree (ZERO_LOSS_RTOL for the precision)."""
    try:
        import deepspeed
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install
        return {"status": "skipped", "reason": f"deepspeed not importable: {err}"}
    import torch
    import torch.distributed as tdist

    from harness.deepspeed.config import render, resolve_load_dtype, resolve_precision
    from harness.deepspeed.engine import global_batch_step
    from harness.spec.config import DistributedConfig
    from harness.training import memory
    from harness.training.train import SCHEDULES, train_step
    from harness.training.trial import load_data_and_model, prepare_method, seed_everything

    record: dict[str, Any] = {"deepspeed": deepspeed.__version__, "steps": steps}
    on_gpu = device.type == "cuda"
    started = time.perf_counter()
    try:
        if not on_gpu:  # as harness.deepspeed: no JIT-compiled shared-memory all-reduce
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        with socket.socket() as sock:  # a free port for the one-rank process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                            "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
            os.environ.setdefault(name, value)
        deepspeed.init_distributed(
            dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False
        )
        dist = DistributedConfig(
            gpus_per_trial=1 if on_gpu else 0, workers=1, zero_stage=2,
            gradient_checkpointing=False,
        )  # fmt: skip
        spec = spec.model_copy(update={"distributed": dist})
        precision = resolve_precision(dist, on_gpu)
        dtype = torch.bfloat16 if resolve_load_dtype(dist, on_gpu) == "bf16" else torch.float32
        budget = spec.budget
        schedule = SCHEDULES[budget.schedule or "linear"]

        def prepared():
            seed_everything(spec.seed)
            row: dict[str, Any] = {}
            task, splits, pipeline = load_data_and_model(spec, row, device, dtype)
            init = first_batches(pipeline, budget.batch_size, spec.seed, device)
            method, hp, model, _ = prepare_method(spec, pipeline, row, device, init, dtype=dtype)
            optimizer = method.build_optimizer(model, spec.lr, hp, budget.weight_decay)
            batches = list(itertools.islice(pipeline.batches(budget.batch_size, 7, device), steps))
            return pipeline, model, optimizer, batches

        # DeepSpeed ZeRO-2, the config the distributed trials render.
        pipeline, model, optimizer, batches = prepared()
        ds_config = render(
            dist, global_batch=budget.batch_size, max_grad_norm=budget.max_grad_norm,
            on_gpu=on_gpu,
        )  # fmt: skip
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: schedule(opt, steps, budget.warmup_ratio),
        )  # fmt: skip
        memory.reset_peak(device)
        engine.train()
        zero_losses, step_s = [], []
        for batch in batches:
            step_started = time.perf_counter()
            zero_losses.append(global_batch_step(engine, [batch], pipeline.loss_terms))
            if on_gpu:
                torch.cuda.synchronize(device)
            step_s.append(time.perf_counter() - step_started)
        record["peak_memory_mb"], record["peak_memory_kind"] = memory.peak_mb(device)
        del engine, model, optimizer

        # The same steps on one device, without DeepSpeed (weights in the same dtype).
        _, model, optimizer, _ = prepared()
        scheduler = schedule(optimizer, steps, budget.warmup_ratio)
        model.train()
        plain_losses = [
            train_step(model, batch, optimizer, scheduler, budget.max_grad_norm)
            for batch in batches
        ]
        pairs = zip(zero_losses, plain_losses, strict=True)
        gaps = [abs(a - b) / max(abs(b), 1e-8) for a, b in pairs]
        tolerance = ZERO_LOSS_RTOL[precision]
        record.update(
            precision=precision,
            zero_stage=2,
            deepspeed_config=ds_config,
            zero_losses=zero_losses,
            single_device_losses=plain_losses,
            max_relative_loss_gap=max(gaps),
            tolerance=tolerance,
            median_step_s=sorted(step_s)[len(step_s) // 2],
            status="ok" if max(gaps) <= tolerance else "failed",
        )
        if record["status"] == "failed":
            record["error"] = f"ZeRO-2 losses differ from one device's by {max(gaps):.3g}"
    except Exception as err:  # noqa: BLE001 - recorded; the other parts still ran
        record.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8)[-3000:])  # fmt: skip
    finally:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    record["seconds"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({result['mode']}), {result['device']}, {result['started_at']}",
        "",
        f"`python3 cluster/gpu_check.py{' --dry-run' if result['mode'] == 'dry_run' else ''}`"
        f", {result['wall_time_s']:.0f} s; ray imported: {result['ray_imported']}; "
        f"importable: {result['importable']}; packages: {result['packages']}",
        "",
        f"## (a) single-device trials (no Ray), SST-2, {result['trials'][0]['precision']}",
        "",
        "| method | status | init s | train s | steps | tokens/s | MFU | peak MiB | select acc"
        " | test acc (rows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["trials"]:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | {row['status']}: {row.get('error', '')[:120]} |")
            continue
        mfu = f"{row['mfu']:.2%}" if row.get("mfu") is not None else "n/a"
        lines.append(
            f"| {row['method']} | ok | {row['init_time_s']:.2f} | {row['train_time_s']:.1f} | "
            f"{row['steps']} | {row['tokens_per_s']:.0f} | {mfu} | {row['peak_memory_mb']:.0f} |"
            f" {row['selection_score']:.3f} | {row['test_score']:.3f} ({row['test_rows']}) |"
        )
    bench = result["bench"]
    lines += ["", f"## (b) bench: {bench.get('how', '')} ({bench['status']})", "", "```",
              (bench.get("table") or bench.get("error") or "").rstrip(), "```", ""]  # fmt: skip
    zero = result["zero2"]
    lines.append(f"## (c) DeepSpeed ZeRO-2, 1 device: {zero['status']}")
    if zero["status"] == "ok":
        lines.append(
            f"\n{zero['steps']} steps, {zero['precision']}, median step {zero['median_step_s']:.3f}"
            f" s, peak {zero['peak_memory_mb']:.0f} MiB; losses vs one device without "
            f"DeepSpeed: max relative gap {zero['max_relative_loss_gap']:.2g} "
            f"(tolerance {zero['tolerance']:g})"
        )
    else:
        lines.append("\n" + str(zero.get("reason") or zero.get("error")))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results" / "bench",
                        help="results go to OUT_DIR/<machine>/")  # fmt: skip
    parser.add_argument("--copy-to", type=Path, help="also copy the result files here ($OUT)")
    parser.add_argument("--wheelhouse", type=Path, default=WHEELHOUSE)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-only", type=Path, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--bench-out-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available() and not args.dry_run
    if args.bench_only:
        record = run_bench(args.dry_run, args.bench_out_root)
        args.bench_only.write_text(json.dumps(record, default=str))
        return 0

    started = time.perf_counter()
    mode = "dry_run" if args.dry_run else "gpu"
    sizes = SIZES[mode]
    result: dict[str, Any] = {"kind": "gpu_check", "mode": mode, "started_at": now()}
    result["importable"] = {name: importable(name) for name in HIDDEN_ON_GPU_MACHINE}
    result["environment"] = setup_environment(args.dry_run, args.wheelhouse)
    if not args.dry_run and not torch.cuda.is_available():
        print("warning: no CUDA device; running the GPU sizes on CPU", file=sys.stderr)
    device = torch.device("cuda" if on_gpu else "cpu")
    from harness.spec import provenance

    result["device"] = provenance.hardware(device)["device"] if on_gpu else "cpu"
    result["packages"] = provenance.package_versions()
    result["git_commit"] = provenance.git_commit()
    torch.set_num_threads(1)  # the trials' thread count (resources.cpus_per_trial: 1)
    result["peak"] = peak_flops(device)

    specs = trial_specs(sizes, {"lora": {}, "lora_ga": sizes["lora_ga_overrides"]}, device.type)
    result["trials"] = []
    for spec in specs:
        row = bf16_trial(spec, device, result["peak"])
        print(f"(a) {spec.method}: {row['status']} {row.get('error', '')}", flush=True)
        result["trials"].append(row)
    if args.skip_bench:
        result["bench"] = {"status": "skipped", "reason": "--skip-bench"}
    else:
        result["bench"] = bench_in_subprocess(args.dry_run, sizes["bench_timeout_s"], args.out_dir)
    print(f"(b) bench: {result['bench']['status']}", flush=True)
    lora_spec = next(s for s in specs if s.method == "lora")
    result["zero2"] = zero2_check(lora_spec, device, sizes["zero_steps"])
    print(f"(c) ZeRO-2: {result['zero2']['status']}", flush=True)
    result["ray_imported"] = "ray" in sys.modules
    result["wall_time_s"] = time.perf_counter() - started

    result["machine"] = machine_slug()
    out = args.out_dir / result["machine"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    paths[1].write_text(markdown(result))
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for path in [*paths, *map(Path, result["bench"].get("written", []))]:
            if path.is_file() and path.suffix in (".json", ".md"):
                shutil.copy(path, args.copy_to / path.name)
    print("\n".join(map(str, paths)))
    failed = [part for part in ("bench", "zero2") if result[part]["status"] == "failed"]
    failed += [f"trial {r['method']}" for r in result["trials"] if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
