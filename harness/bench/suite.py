"""`harness bench --all`: every registered method side by side, with the papers' cost targets.

One run, one model, the same batches: for each method a fresh process (forked from the
parent, which has imported everything but run no torch op) loads the model
(packaged MiniLM by default) and the same real SST-2 batches, runs one warm-up forward +
backward (lazy initialisation in no method's number), then
- init: `method.prepare` exactly as a trial calls it (wall and CPU time; peak resident set
  above the level just before, harness/training/memory.py's reset VmHWM), data-informed methods all
  reading the same `init_batches` batches;
- train step: `train_step` + the method's gradient transform and callbacks, as
  harness/training/train.py runs them, over a run compressed to `warm_steps + timed_steps` steps (so
  schedule-driven callbacks such as SDS-LoRA's warm-up and basis refresh happen in their
  paper proportion); the first `warm_steps` untimed, the mean of the rest timed; peak
  resident set of the timed steps (whole process), and the exact bytes a step holds
  (parameters, gradients, optimizer state, buffers, tensors saved for backward).
Every child runs with a fixed glibc mmap threshold (mallopt M_MMAP_THRESHOLD = 128 KiB, as
MALLOC_MMAP_THRESHOLD_=131072: each tensor above 128 KiB is its own mapping, returned when
freed), so a peak resident set tracks
bytes live at once, not what the allocator kept. Methods are interleaved round-robin
(A, B, C, ..., A, B, C, ...) `repeats` times, with one harness-vs-bare-peft sample per
round; medians and min..max over the rounds are reported.

MFU (harness/bench/mfu.py): 6 x params x tokens/s of the train step, against a dense matmul
of the same dtype and threads measured at the start and end of the same run (the larger).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH_KIND = "harness-bench-all"
MINILM = "minilm"
TINY_RANDOM = "tiny-random-bert"  # tests: a 2-layer hidden-32 BERT, seeded, MiniLM's tokenizer
# The 1-epoch run the init is a fraction of: GLUE SST-2's train split at the bench's batch
# size (LoRA-SB's "<= 2% of an epoch" is stated on GLUE; at 8: ceil(67349 / 8) = 8419 steps).
EPOCH_DATASET = "glue/sst2 train"
TARGET_METHODS = ("lora", "sds_lora", "lora_ga", "cg_lora", "lora_sb")


@dataclass(frozen=True)
class Settings:
    # Sized for 2 shared CPU cores (a MiniLM step of 8 x ~40 tokens is ~0.6 CPU-s at one
    # thread); on a GPU or a quiet machine raise them (CG-LoRA's paper: 256 init examples).
    model: str = MINILM
    batch_size: int = 8
    max_length: int = 64
    init_batches: int = 8  # 64 examples for every data-informed init (LoRA-SB's 1/1000: 67)
    warm_steps: int = 3  # untimed; SDS-LoRA's warm-up T_w is set to warm_steps - 1 to fit
    timed_steps: int = 5
    threads: int = 1  # 2 shared cores: one thread each keeps numbers steadier
    bare_steps: int = 5  # per round, harness vs bare peft
    peak_matmul_size: int = 1024  # the square matmul the MFU's peak is measured with


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_bench_model(spec: str):
    """(LoadedModel, SST-2 batches loader) for the bench model `spec`."""
    import torch

    from harness.bench import MODEL_ID
    from harness.modeling.models import LoadedModel, load_sequence_model, resolve_model

    torch.manual_seed(0)
    if spec == MINILM:
        return load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    if spec != TINY_RANDOM:
        raise ValueError(f"unknown bench model {spec!r}; known: {MINILM}, {TINY_RANDOM}")
    from transformers import BertConfig, BertForSequenceClassification

    source = resolve_model(MODEL_ID, None, None)
    tokenizer = _tokenizer(source.location)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    return LoadedModel(model, tokenizer, ["classifier"], source, "bert")


@functools.lru_cache(maxsize=2)
def _tokenizer(location: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)


@functools.lru_cache(maxsize=2)
def bench_batches(settings: Settings) -> tuple[list[dict], int]:
    """The SST-2 batches every method of a run reads (cached: one read per process)."""
    from harness.bench import MODEL_ID, real_batches
    from harness.modeling.models import resolve_model

    tokenizer = _tokenizer(resolve_model(MODEL_ID, None, None).location)
    return real_batches(tokenizer, settings.init_batches, settings.batch_size, settings.max_length)


def non_embedding_params(model) -> int:
    """Parameters that do matmul work per token (embedding tables are lookups)."""
    from torch import nn

    embedded = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def held_bytes(model, optimizer, batch) -> dict[str, int]:
    """Exact bytes of one training step's state, independent of any allocator."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    params = {p.data_ptr(): p.nbytes for p in model.parameters()}
    owned = set(params) | {b.data_ptr() for b in model.buffers()}
    parts = {
        "params": sum(params.values()),
        "buffers": sum(b.nbytes for b in model.buffers()),
        "grads": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer": sum(
            v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
        "saved_activations": sum(n for ptr, n in seen.items() if ptr not in owned),
    }
    optimizer.zero_grad(set_to_none=True)
    return parts | {"total": sum(parts.values())}


def measure_method(name: str, settings: Settings) -> dict[str, Any]:
    """One sample of one method, in this (fresh) process."""
    import torch

    import methods
    from harness.training import memory
    from harness.training.train import linear_warmup_decay, train_step

    torch.set_num_threads(settings.threads)
    loaded = load_bench_model(settings.model)
    batches, train_size = bench_batches(settings)
    impl = methods.get_method(name)
    overrides: dict[str, Any] = {}
    fields = impl.hyperparams_cls.model_fields
    if impl.needs_init_batches and "init_batches" in fields:
        overrides["init_batches"] = settings.init_batches
    if "warmup_steps" in fields:  # SDS-LoRA: reparameterised within the untimed steps
        overrides["warmup_steps"] = max(1, settings.warm_steps - 1)
    hp = impl.hyperparams(overrides)
    total_steps = settings.warm_steps + settings.timed_steps
    ctx = methods.PrepareContext(
        head_modules=loaded.head_modules,
        default_target_modules=impl.family_target_modules(loaded.model_type),
        init_batches=lambda n: iter(batches[:n]),
        learning_rate=1e-4, train_examples=train_size, batch_size=settings.batch_size,
        total_steps=total_steps, warmup_ratio=0.0,
    )  # fmt: skip
    model = loaded.model
    total_params = sum(p.numel() for p in model.parameters())
    flop_params = non_embedding_params(model)
    model.train()
    model(**batches[0]).loss.backward()  # warm-up: lazy init is in no method's number
    model.zero_grad(set_to_none=True)
    device = torch.device("cpu")

    before_kib = _status_kib("VmRSS")
    memory.reset_peak(device)
    wall, cpu = time.perf_counter(), time.process_time()
    model = impl.prepare(model, hp, ctx)
    init_s, init_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    init_extra_mib = (_status_kib("VmHWM") - before_kib) / 1024

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    optimizer = impl.build_optimizer(model, 1e-4, hp)
    scheduler = linear_warmup_decay(optimizer, total_steps, 0.0)
    transform = impl.gradient_transform(hp)
    with warnings.catch_warnings():  # a compressed run may trip schedule-length warnings
        warnings.simplefilter("ignore")
        callbacks = impl.callbacks(hp, total_steps)

    def step(i: int) -> int:  # one step of harness/training/train.py's loop
        batch = batches[(i - 1) % len(batches)]
        train_step(model, batch, optimizer, scheduler, 1.0, transform)
        for cb in callbacks:
            cb.on_step_end(i, model, optimizer)
        return int(batch["input_ids"].numel())

    for i in range(1, settings.warm_steps + 1):
        step(i)
    memory.reset_peak(device)
    tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(settings.warm_steps + 1, total_steps + 1):
        tokens += step(i)
    step_s = (time.perf_counter() - wall) / settings.timed_steps
    step_cpu_s = (time.process_time() - cpu) / settings.timed_steps
    step_peak_mib = _status_kib("VmHWM") / 1024
    held = held_bytes(model, optimizer, batches[0])
    return {
        "method": name,
        "init_batches": impl.init_batches_wanted(hp, ctx),
        "init_s": init_s,
        "init_cpu_s": init_cpu_s,
        "init_extra_mib": init_extra_mib,
        "trainable_params": trainable,
        "total_params": total_params,
        "flop_params": flop_params,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "tokens_per_step": tokens / settings.timed_steps,
        "step_peak_mib": step_peak_mib,
        "step_held_mib": held["total"] / 2**20,
        "train_size": train_size,
    }


def measure_harness_vs_bare(settings: Settings) -> dict[str, Any]:
    import torch

    from harness.bench import harness_vs_bare

    torch.set_num_threads(settings.threads)
    loaded = load_bench_model(settings.model)
    batch = bench_batches(settings)[0][0]
    samples = harness_vs_bare(settings.bare_steps, 1, "lora", loaded=loaded, batch=batch)
    return {"bare_s": samples["bare_s"][0], "harness_s": samples["harness_s"][0]}


MMAP_THRESHOLD_BYTES = 131072
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold() -> None:
    """glibc: every allocation above 128 KiB its own mapping, returned to the kernel when
    freed (as MALLOC_MMAP_THRESHOLD_=131072 at start), so a peak resident set tracks bytes
    live at once rather than what the allocator kept."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except OSError:  # not glibc: the peaks then carry allocator slack
        pass


def in_fresh_process(fn, *args) -> dict[str, Any]:
    """`fn(*args)` (a JSON-able dict) in a forked child: a fresh heap and peak resident set,
    without paying the imports again. The parent has run no torch op (no thread pool to
    fork), so forking is safe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: always leave through os._exit, never back into the caller
        os.close(read_fd)
        try:
            fix_mmap_threshold()
            result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported as the sample's error
            result = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(result))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": f"child died (wait status {status})"}


def _measure(what: str, settings: Settings, isolate: bool) -> dict[str, Any]:
    if isolate:
        return in_fresh_process(_measure, what, settings, False)
    try:
        if what == "--harness-vs-bare":
            return measure_harness_vs_bare(settings)
        return measure_method(what, settings)
    except Exception as err:  # noqa: BLE001 - one method's failure is a row, not the run's
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def machine_name() -> str:
    """A stable folder name for this kind of machine: CPU model and cores, or the GPU."""
    import torch

    if torch.cuda.is_available():
        label = torch.cuda.get_device_name(0)
    else:
        label = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    label = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        label = f"cpu {label} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# Which clock the ratios, the epoch fraction and MFU use: on CPU the process CPU time (one
# thread: the compute itself; wall time also counts waiting for cores other jobs hold), on a
# GPU the wall clock (kernels run asynchronously of the CPU).
STEP_CLOCK = {"cpu": "step_cpu_s", "wall": "step_s"}
INIT_CLOCK = {"cpu": "init_cpu_s", "wall": "init_s"}


def summarise(
    samples: dict[str, list[dict]],
    bare: list[dict],
    peak: dict,
    settings: Settings,
    clock: str = "cpu",
) -> dict[str, Any]:
    """Per-method medians and ranges, ratios to LoRA, MFU, the four targets."""
    from harness.bench.mfu import mfu

    epoch_steps = None
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            summary[name] = {"error": runs[0]["error"] if runs else "not run"}
            continue
        epoch_steps = math.ceil(ok[0]["train_size"] / settings.batch_size)
        row: dict[str, Any] = {"samples": len(ok), "failed_samples": len(runs) - len(ok)}
        for key in ("init_s", "init_cpu_s", "init_extra_mib", "step_s", "step_cpu_s",
                    "step_peak_mib"):  # fmt: skip
            row[key] = spread([r[key] for r in ok])
        for key in ("trainable_params", "total_params", "flop_params", "init_batches",
                    "step_held_mib",
                    "tokens_per_step"):  # fmt: skip
            row[key] = ok[0][key]
        step_t, init_t = row[STEP_CLOCK[clock]]["median"], row[INIT_CLOCK[clock]]["median"]
        row["epoch_s"] = step_t * epoch_steps
        row["init_epoch_fraction"] = init_t / row["epoch_s"]
        row["mfu"] = mfu(
            row["flop_params"], row["tokens_per_step"], step_t, peak["peak_flops_per_s"]
        )
        row["achieved_flops_per_s"] = row["mfu"] * peak["peak_flops_per_s"]
        summary[name] = row
    lora = summary.get("lora", {})
    for row in summary.values():
        if "error" in row or "error" in lora:
            continue
        row["x_lora"] = {
            "init_s": _ratio(row["init_s"]["median"], lora["init_s"]["median"]),
            "init_cpu_s": _ratio(row["init_cpu_s"]["median"], lora["init_cpu_s"]["median"]),
            "step_cpu_s": _ratio(row["step_cpu_s"]["median"], lora["step_cpu_s"]["median"]),
            "init_extra_mib": _ratio(
                row["init_extra_mib"]["median"], lora["init_extra_mib"]["median"]
            ),
            "step_s": _ratio(row["step_s"]["median"], lora["step_s"]["median"]),
            "step_peak_mib": _ratio(
                row["step_peak_mib"]["median"], lora["step_peak_mib"]["median"]
            ),
            "step_held_mib": _ratio(row["step_held_mib"], lora["step_held_mib"]),
        }
    ok_bare = [b for b in bare if "error" not in b]
    harness_ratio = (
        statistics.median(b["harness_s"] for b in ok_bare)
        / statistics.median(b["bare_s"] for b in ok_bare)
        if ok_bare
        else None
    )
    return {
        "epoch": {
            "dataset": EPOCH_DATASET,
            "batch_size": settings.batch_size,
            "steps": epoch_steps,
        },  # fmt: skip
        "methods": summary,
        "harness_vs_bare": {
            "ratio": harness_ratio,
            "bare_s": spread([b["bare_s"] for b in ok_bare]) if ok_bare else None,
            "harness_s": spread([b["harness_s"] for b in ok_bare]) if ok_bare else None,
        },
        "clock": clock,
        "targets": targets(summary, harness_ratio, clock),
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _check(parts: list[tuple[str, float | None, str, float]]) -> tuple[list[dict], bool | None]:
    """(label, measured, op, bound) -> checked parts and whether all are met (None: missing)."""
    out, met = [], True
    for label, value, op, bound in parts:
        ok = None if value is None else (value <= bound if op == "<=" else value < bound)
        out.append({"what": label, "measured": value, "op": op, "bound": bound, "met": ok})
        met = None if ok is None or met is None else met and ok
    return out, met


def targets(
    summary: dict[str, dict], harness_ratio: float | None, clock: str = "cpu"
) -> list[dict[str, Any]]:
    step_t, init_t = STEP_CLOCK[clock], INIT_CLOCK[clock]

    def get(method: str, *path: str) -> float | None:
        value: Any = summary.get(method, {})
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def rel(a: str, b: str, *path: str) -> float | None:
        x, y = get(a, *path), get(b, *path)
        return None if x is None or y is None or not y else x / y

    specs = [
        ("SDS-LoRA step vs LoRA (paper Table 6: +4-5% time, +0.5-0.8% memory)", [
            (f"step time x LoRA ({clock})", get("sds_lora", "x_lora", step_t), "<=", 1.05),
            ("step memory x LoRA (bytes held)", get("sds_lora", "x_lora", "step_held_mib"),
             "<", 1.01),
        ]),
        ("LoRA-SB init as a fraction of a 1-epoch run (paper: 1.1-1.3%)", [
            (f"init / epoch ({clock})", get("lora_sb", "init_epoch_fraction"), "<=", 0.02),
        ]),
        ("CG-LoRA init vs LoRA-GA (paper Table 3: 3.58 s / 510 MiB vs 7.01 s / 1.28 GiB)", [
            (f"init time x LoRA-GA ({clock})", rel("cg_lora", "lora_ga", init_t, "median"),
             "<=", 0.51),
            ("init peak memory x LoRA-GA",
             rel("cg_lora", "lora_ga", "init_extra_mib", "median"), "<=", 0.39),
        ]),
        ("harness train step vs a bare peft + AdamW loop", [
            ("step time x bare (wall, interleaved)", harness_ratio, "<=", 1.05),
        ]),
    ]  # fmt: skip
    out = []
    for text, parts in specs:
        checked, met = _check(parts)
        out.append({"target": text, "parts": checked, "met": met})
    return out


def _fmt_range(r: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return (
        f"{r['median'] * scale:.{digits}f} ({r['min'] * scale:.{digits}f}.."
        f"{r['max'] * scale:.{digits}f})"
    )


def _fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}x"


METHOD_HEADERS = [
    "method", "trainable", "init batches", "init CPU s (min..max)", "init CPU x LoRA",
    "init wall s", "init peak MiB (min..max)", "init mem x LoRA", "step CPU ms (min..max)",
    "step CPU x LoRA", "step wall ms", "step wall x LoRA", "step peak RSS MiB", "RSS x LoRA",
    "step held MiB", "held x LoRA", "init % of epoch", "MFU %",
]  # fmt: skip
TARGET_HEADERS = ["target", "measured", "bound", "met"]


def method_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in payload["methods"].items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"]] + [""] * (len(METHOD_HEADERS) - 2))
            continue
        x = r.get("x_lora", {})
        rows.append([
            name, f"{r['trainable_params']:,}", str(r["init_batches"]),
            _fmt_range(r["init_cpu_s"], digits=3), _fmt_x(x.get("init_cpu_s")),
            f"{r['init_s']['median']:.3f}",
            _fmt_range(r["init_extra_mib"], digits=0), _fmt_x(x.get("init_extra_mib")),
            _fmt_range(r["step_cpu_s"], 1e3, 1), _fmt_x(x.get("step_cpu_s")),
            f"{r['step_s']['median'] * 1e3:.1f}", _fmt_x(x.get("step_s")),
            f"{r['step_peak_mib']['median']:.0f}", _fmt_x(x.get("step_peak_mib")),
            f"{r['step_held_mib']:.1f}", _fmt_x(x.get("step_held_mib")),
            f"{100 * r['init_epoch_fraction']:.3f}", f"{100 * r['mfu']:.1f}",
        ])  # fmt: skip
    return rows


def target_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in payload["targets"]:
        for p in t["parts"]:
            value = "not measured" if p["measured"] is None else f"{p['measured']:.5g}"
            met = {True: "met", False: "not met", None: "not measured"}[p["met"]]
            rows.append([f"{t['target']}: {p['what']}", value, f"{p['op']} {p['bound']}", met])
    return rows


def describe(payload: dict[str, Any]) -> list[str]:
    """The lines that say what was measured, for the Markdown file and the report."""
    s, peak, epoch = payload["settings"], payload["peak"], payload["epoch"]
    hb = payload["harness_vs_bare"]
    lines = [
        f"Machine {payload['machine']}, {payload['date']}, torch {payload['torch']}, "
        f"{s['threads']} thread(s). Model {payload['model_id']}; real SST-2 batches of "
        f"{s['batch_size']} (<= {s['max_length']} tokens, dynamic padding); data-informed "
        f"inits read the same {s['init_batches']} batches; step = mean of {s['timed_steps']} "
        f"steps after {s['warm_steps']} untimed, run compressed to "
        f"{s['warm_steps'] + s['timed_steps']} steps (SDS-LoRA warm-up T_w = "
        f"{max(1, s['warm_steps'] - 1)}); {payload['repeats']} round-robin "
        f"rounds, {'a fresh process per sample' if payload['isolated'] else 'in one process'}"
        ", medians (min..max).",
        "Memory: init peak = peak RSS above the level just before init; step peak RSS = whole "
        "process; held = exact bytes of params, grads, optimizer state, buffers and saved "
        "activations. Fixed glibc mmap threshold (128 KiB) in every process.",
        f"Epoch: {epoch['dataset']} at batch {epoch['batch_size']} = {epoch['steps']} steps x "
        "the method's own measured step time. Ratios, epoch fraction and MFU use "
        + (
            "process CPU time (one thread; wall time also counts waiting for cores other jobs hold)"
            if payload.get("clock", "cpu") == "cpu"
            else "wall time"
        )
        + ".",
        "MFU = 6 x non-embedding params x padded tokens/s over "
        f"{peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['peak_source']}, {peak['device']} {peak['dtype']}).",
    ]
    if hb.get("ratio") is not None:
        lines.append(
            f"Harness vs bare peft: bare {_fmt_range(hb['bare_s'], 1e3, 1)} ms, harness "
            f"{_fmt_range(hb['harness_s'], 1e3, 1)} ms per step, ratio {hb['ratio']:.3f}."
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]

    lines = [f"# harness bench --all: {payload['machine']}, {payload['date']}", ""]
    lines += [line + "\n" for line in describe(payload)]
    lines += table(METHOD_HEADERS, method_rows(payload)) + [""]
    lines += ["## Paper targets", ""] + table(TARGET_HEADERS, target_rows(payload)) + [""]
    return "\n".join(lines)


def run_suite(
    settings: Settings,
    repeats: int = 3,
    method_names: list[str] | None = None,
    out_root: Path | None = REPO / "results" / "bench",
    progress=print,
    isolate: bool = True,
) -> dict[str, Any]:
    """The whole table. `isolate=False` measures in this process (tests: quick, but the
    memory numbers then carry this process's history)."""
    import torch

    import methods
    from harness.bench import MODEL_ID
    from harness.bench.mfu import machine_peak

    names = method_names or methods.method_names()

    def peak() -> dict[str, Any]:  # in a child too: the parent runs no torch op before a fork
        torch.set_num_threads(settings.threads)
        return machine_peak(torch.device("cpu"), torch.float32, settings.peak_matmul_size)

    peaks = [in_fresh_process(peak) if isolate else peak()]
    samples: dict[str, list[dict]] = {m: [] for m in names}
    bare: list[dict] = []
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "kind": BENCH_KIND,
        "version": 1,
        "machine": machine_name(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "model_id": MODEL_ID if settings.model == MINILM else f"{settings.model} (random init)",
        "settings": asdict(settings),
        "repeats": repeats,
        "isolated": isolate,
        "samples": samples,
        "bare_samples": bare,
    }

    def save(rounds_done: float) -> None:
        """Summarise what is measured so far and write it (a stopped run keeps it)."""
        best = max(peaks, key=lambda p: p["peak_flops_per_s"])
        payload["rounds_done"] = rounds_done
        payload["wall_s"] = time.perf_counter() - started
        payload["peak"] = best | {"samples": [p["peak_flops_per_s"] for p in peaks]}
        payload.update(summarise(samples, bare, best, settings))
        if out_root is None:
            return
        folder = out_root / payload["machine"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = payload["date"] + ("" if settings.model == MINILM else f"-{settings.model}")
        stored = {k: v for k, v in payload.items() if k != "written"}
        (folder / f"{stem}.json").write_text(json.dumps(stored, indent=1) + "\n")
        (folder / f"{stem}.md").write_text(markdown(payload))
        payload["written"] = [str(folder / f"{stem}.json"), str(folder / f"{stem}.md")]

    # Each round: harness vs bare, the methods the targets name, then the rest (a run
    # stopped mid-round then still has the targets' samples).
    order = [m for m in TARGET_METHODS if m in names] + [
        m for m in names if m not in TARGET_METHODS
    ]
    for round_ in range(repeats):
        bare.append(_measure("--harness-vs-bare", settings, isolate))
        progress(f"round {round_ + 1}/{repeats} harness vs bare: {_short(bare[-1])}")
        for i, name in enumerate(order):
            samples[name].append(_measure(name, settings, isolate))
            progress(f"round {round_ + 1}/{repeats} {name}: {_short(samples[name][-1])}")
            if isolate:
                save(round_ + (i + 1) / len(order))
    peaks.append(in_fresh_process(peak) if isolate else peak())
    save(repeats)
    return payload


def rebuild(json_path: Path) -> dict[str, Any]:
    """Recompute the summary, targets and Markdown of a stored run from its raw samples
    (after a change to how they are summarised); rewrites the JSON and the .md beside it."""
    payload = json.loads(json_path.read_text())
    settings = Settings(**payload["settings"])
    payload |= summarise(
        payload["samples"], payload["bare_samples"], payload["peak"], settings,
        payload.get("clock", "cpu"),
    )  # fmt: skip
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(markdown(payload))
    return payload


def _short(sample: dict) -> str:
    if "error" in sample:
        return sample["error"]
    return ", ".join(f"{k} {v:.3g}" for k, v in sample.items() if isinstance(v, float))


def find_bench_json(out_dir: Path) -> Path | None:
    """The newest `harness bench --all` JSON in `<out>/bench/` or `<out>/../bench/` (any
    machine folder; on one date a MiniLM run before a tiny test-model run), or None."""
    found = []
    for root in (out_dir / "bench", out_dir.parent / "bench"):
        if root.is_dir():
            found += [p for p in root.rglob("*.json") if _is_bench(p)]

    def newest(path: Path) -> tuple[str, bool, str]:
        date = path.stem[:10]
        return date, path.stem == date, str(path)  # "<date>.json" is the MiniLM run

    return max(found, key=newest) if found else None


def _is_bench(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("kind") == BENCH_KIND
    except (OSError, ValueError, AttributeError):
        return False
