"""CG-LoRA vs LoRA-GA: init time and init peak memory, side by side, on real MiniLM.

    .venv/bin/python harness/bench/cg_lora_init.py [--batches 32] [--batch-size 8] [--repeats 3]
        [--rank 8] [--targets query value] [--threads N]

Paper (Table 3, RoBERTa-base, CoLA, 256 examples = batch 8 x 32, A40 GPU): CG-LoRA 3.58 s /
509.95 MiB peak vs LoRA-GA 7.01 s / 1.28 GiB, i.e. 0.51x time and 0.39x memory.

Here: sentence-transformers/all-MiniLM-L6-v2 with a fresh 2-class head, the same real SST-2
batches for both methods (harness/bench's `real_batches`: the data mirror at
HARNESS_DATA_DIR, as `make bench` sets it; a fixed sentence when unset), by default the paper's
256 examples as 32 batches of 8, rank 8, the harness's default targets (all six linear
layers of each block; `--targets query value` for the paper's q/v setting). Both methods go
through the registry exactly as a trial runs them (`method.prepare` on a fresh model).

Fairness on CPU. Every measurement runs in a fresh subprocess that loads the model and the
batches, runs one forward + backward (so lazy initialisation - autograd engine, kernels,
first-touched library pages - is in neither number), then times `prepare` and takes memory
from the kernel:
- memory = VmHWM (peak resident set) after resetting it (/proc/self/clear_refs, as
  harness/training/memory.py does) minus the resident set just before `prepare`. The memory runs use
  a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072): every tensor above 128 KiB
  is its own mapping, returned to the kernel when freed, so the peak resident set tracks
  the bytes live at once instead of what the allocator happened to keep; without it a
  method's peak could hide in memory freed (but kept) by the previous phase.
- time = wall clock and process CPU time (all threads) of `prepare`, in separate runs with
  the default allocator; methods are interleaved (GA, CG, GA, CG, ...) so machine drift
  hits both; medians are reported. On a shared machine the CPU time is the steadier of the
  two (wall time also counts waiting for cores other processes hold).
- threads: on a loaded machine pass `--threads 1`. With two OpenMP threads competing with
  other processes for two cores, every small op waits on a descheduled thread; CG-LoRA's
  hooks run many small ops, so both numbers balloon (measured here under a load of ~5:
  LoRA-GA 89 s / CG-LoRA 153 s wall at 2 threads vs 9.9 s / 16.0 s at 1 thread).
- "peak total" is the process's whole peak resident set (interpreter, libraries, model,
  batches included), closer to what the paper's GPU numbers count (its CG-LoRA peak of
  510 MiB is about RoBERTa-base's own float32 weights plus little).
The lines "statistics held" give the exact float32 bytes each method keeps across the whole
pass over the data: LoRA-GA's full gradient accumulators (sum of m x n) vs CG-LoRA's pooled
K-FAC rows (min(N, n) x n + min(N, m) x m per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER = {"cg_s": 3.58, "cg_mib": 509.95, "ga_s": 7.01, "ga_mib": 1.28 * 1024}
METHODS = ("lora_ga", "cg_lora")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """One measurement of one method in this (fresh) process; returns a JSON-able dict."""
    import torch

    import methods
    import methods.cg_lora as cg
    from harness.bench import MODEL_ID, real_batches
    from harness.modeling.models import load_sequence_model, resolve_model
    from harness.training import memory
    from methods.peft_lora import matching_linear_layers
    from methods.targets import default_target_modules

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    batches, train_size = real_batches(
        loaded.tokenizer, args.batches, batch_size=args.batch_size, max_length=args.max_length
    )
    targets = args.targets or default_target_modules(loaded.model_type)
    ctx = methods.PrepareContext(
        head_modules=loaded.head_modules,
        default_target_modules=targets,
        init_batches=lambda n: iter(batches[:n]),
        learning_rate=1e-4,
        train_examples=train_size,
        batch_size=args.batch_size,
    )
    impl = methods.get_method(args.child)
    hp = impl.hyperparams({"rank": args.rank, "init_batches": args.batches})
    model = loaded.model
    layers = dict(matching_linear_layers(model, targets, loaded.head_modules))
    phases: dict[str, float] = {}
    if args.child == "cg_lora":  # per-phase wall clock, by wrapping the module's functions
        for fn in ("collect_kfac", "randomized_eigh", "projected_gradients", "cg_lora_factors"):
            original = getattr(cg, fn)

            def timed(*a, _fn=fn, _original=original, **k):
                started = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    phases[_fn] = phases.get(_fn, 0.0) + time.perf_counter() - started

            setattr(cg, fn, timed)
    # Warm-up, identical for both: one forward + backward, so lazy initialisation (autograd
    # engine, kernels, first-touched library pages) is in neither number.
    model.train()
    model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    device = torch.device("cpu")
    before_kib = _status_kib("VmRSS")
    memory.reset_peak(device)
    if _status_kib("VmHWM") > before_kib + 1024:
        raise RuntimeError("could not reset the peak resident set (/proc/self/clear_refs)")
    started, cpu_started = time.perf_counter(), time.process_time()
    impl.prepare(model, hp, ctx)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kib = _status_kib("VmHWM")
    n_examples = sum(len(b["input_ids"]) for b in batches)
    held = 0
    for layer in layers.values():
        n, m = layer.in_features, layer.out_features
        if args.child == "lora_ga":
            held += 4 * m * n
        else:
            held += 4 * (min(n_examples, n) * n + min(n_examples, m) * m)
    return {
        "method": args.child,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "extra_mib": (peak_kib - before_kib) / 1024,
        "peak_total_mib": peak_kib / 1024,
        "held_mib": held / 2**20,
        "phases": phases,
        "layers": len(layers),
        "examples": n_examples,
        "threads": torch.get_num_threads(),
        "max_tokens": max(b["input_ids"].shape[1] for b in batches),
    }


def run_child(method: str, args, fixed_mmap: bool) -> dict:
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, __file__, "--child", method, "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--rank", str(args.rank),
           "--max-length", str(args.max_length), "--threads", str(args.threads)]  # fmt: skip
    if args.targets:
        cmd += ["--targets", *args.targets]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    times: dict[str, list[dict]] = {m: [] for m in METHODS}
    mems: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            times[method].append(run_child(method, args, fixed_mmap=False))
        for method in METHODS:
            mems[method].append(run_child(method, args, fixed_mmap=True))

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    info = times["cg_lora"][0]
    print(
        f"model sentence-transformers/all-MiniLM-L6-v2, {info['layers']} target layers "
        f"({' '.join(args.targets) if args.targets else 'harness default: 6 per block'}), "
        f"rank {args.rank}, {info['examples']} SST-2 examples = {args.batches} batches of "
        f"{args.batch_size} (<= {info['max_tokens']} tokens), CPU, {info['threads']} threads, "
        f"{args.repeats} fresh-process runs per method and measure (medians)"
    )
    print(
        f"{'method':8s} {'wall s':>7s} {'(min..max)':>15s} {'CPU s':>7s} {'(min..max)':>15s} "
        f"{'peak extra MiB':>14s} {'peak total MiB':>14s} {'stats held MiB':>14s}"
    )
    for method in METHODS:
        t = [r["seconds"] for r in times[method]]
        c = [r["cpu_seconds"] for r in times[method]]
        m = [r["extra_mib"] for r in mems[method]]
        total = statistics.median(r["peak_total_mib"] for r in mems[method])
        print(
            f"{method:8s} {statistics.median(t):7.1f} {f'({min(t):.1f}..{max(t):.1f})':>15s} "
            f"{statistics.median(c):7.1f} {f'({min(c):.1f}..{max(c):.1f})':>15s} "
            f"{statistics.median(m):14.1f} {total:14.1f} {times[method][0]['held_mib']:14.1f}"
        )
    ratio = {
        key: med(runs["cg_lora"], key) / med(runs["lora_ga"], key)
        for key, runs in (("seconds", times), ("cpu_seconds", times), ("extra_mib", mems),
                          ("peak_total_mib", mems))
    }  # fmt: skip
    h_ratio = times["cg_lora"][0]["held_mib"] / times["lora_ga"][0]["held_mib"]
    print(
        f"ratio cg_lora / lora_ga: wall time {ratio['seconds']:.2f}x, CPU time "
        f"{ratio['cpu_seconds']:.2f}x, peak extra memory {ratio['extra_mib']:.2f}x, peak total "
        f"{ratio['peak_total_mib']:.2f}x, statistics held {h_ratio:.2f}x"
    )
    print(
        f"paper (Table 3, RoBERTa-base, A40): time {PAPER['cg_s'] / PAPER['ga_s']:.2f}x "
        f"({PAPER['cg_s']} s vs {PAPER['ga_s']} s), peak memory "
        f"{PAPER['cg_mib'] / PAPER['ga_mib']:.2f}x ({PAPER['cg_mib']} MiB vs 1.28 GiB)"
    )
    phases = {
        k: statistics.median(r["phases"].get(k, 0.0) for r in times["cg_lora"])
        for k in times["cg_lora"][0]["phases"]
    }
    print(
        "cg_lora phases (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        + " (collect_kfac = forward + Hutchinson backward; projected_gradients = forward + "
        "loss backward; the rest of init is peft wrapping and copying)"
    )


if __name__ == "__main__":
    main()
