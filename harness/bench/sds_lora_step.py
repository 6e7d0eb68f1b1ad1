"""SDS-LoRA vs LoRA: time of one training step and training memory, side by side.

    .venv/bin/python harness/bench/sds_lora_step.py [--steps 40] [--threads 1] [--rank 8]

Real MiniLM (sentence-transformers/all-MiniLM-L6-v2) and one real SST-2 batch of 16 from the
data mirror (HARNESS_DATA_DIR, as `make bench` sets it; a fixed sentence when unset), loaded
with harness/bench.py's helpers. Both methods go through the registry and the harness's own
`train_step` (AdamW, grad clipping), same batch, same rank, default target modules (all six
linear layers per block).

Timed one step at a time, round-robin (LoRA, SDS, refresh, LoRA, ...) so drift on a
shared machine hits all alike; medians of wall time and of process CPU time (the steadier
number when other jobs compete for the cores; 1 torch thread by default for the same reason):
- `lora`: peft LoRA (the baseline the ratios divide by).
- `lora form of the plug-in`: the SDS-LoRA module during warm-up, W0 + s B A: separates the
  cost of the parameterisation from that of peft's own wrapper code.
- `sds_lora, no refresh`: SDS-LoRA after its warm-up (the rank-2r form).
- `basis refresh`: one refresh of all layers' bases (QR + Procrustes, batched by shape).
- refresh every step (phase 1 of the schedule) = sds + refresh; amortized over the paper's
  schedule = sds + (H_K/K) x refresh (K = 5: 46% of the steps refresh).
Memory: (1) the exact bytes a step holds, counted without an allocator: parameters, their
gradients, optimizer state, buffers, and the tensors autograd saves for backward (unique
storages, via saved-tensor hooks); (2) CUDA max_memory_allocated on a GPU, else each
method's peak RSS in a fresh subprocess (coarse: includes the interpreter and libraries).
Paper (Table 6, LLMs on H200): +4-5% time, +0.5-0.8% memory over LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model copy; no hub round-trip
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import methods  # noqa: E402
import methods.sds_lora as sds  # noqa: E402
from harness.bench import MODEL_ID, real_batches  # noqa: E402
from harness.modeling.models import load_sequence_model, resolve_model  # noqa: E402
from harness.training import memory  # noqa: E402
from harness.training.train import train_step  # noqa: E402
from methods.targets import default_target_modules  # noqa: E402

PHASES = 5  # the paper's K


def setup(method: str, rank: int, device: torch.device, warmup: int = 1):
    """(model, optimizer, batch, step function) for one method, past SDS-LoRA's warm-up
    (`warmup` > 1: still in it, i.e. the same plug-in module computing plain LoRA)."""
    torch.manual_seed(0)
    loaded = load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    batch = {k: v.to(device) for k, v in real_batches(loaded.tokenizer, 1)[0][0].items()}
    impl = methods.get_method(method)
    overrides = {"rank": rank} | ({"warmup_steps": warmup} if method == "sds_lora" else {})
    hp = impl.hyperparams(overrides)
    ctx = methods.PrepareContext(
        head_modules=loaded.head_modules,
        default_target_modules=default_target_modules(loaded.model_type),
    )
    model = impl.prepare(copy.deepcopy(loaded.model), hp, ctx).to(device).train()
    optimizer = impl.build_optimizer(model, 1e-4, hp)
    with warnings.catch_warnings():  # warm-up >= run length: plain LoRA, deliberately
        warnings.simplefilter("ignore")
        callbacks = impl.callbacks(hp, 10**6)
    train_step(model, batch, optimizer, None, 1.0)
    for cb in callbacks:  # SDS-LoRA: the reparameterization after the 1-step warm-up
        cb.on_step_end(1, model, optimizer)
    if method == "sds_lora":
        states = {layer.reparameterized for layer in sds.adapter_layers(model).values()}
        assert states == {warmup == 1}

    def step() -> None:
        train_step(model, batch, optimizer, None, 1.0)

    return model, optimizer, batch, step


def held_bytes(model, optimizer, batch) -> dict[str, int]:
    """Exact bytes of one training step's state, independent of any allocator."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    params = {p.data_ptr(): p.nbytes for p in model.parameters()}
    owned = set(params) | {b.data_ptr() for b in model.buffers()}  # counted once, below
    saved = sum(n for (ptr, _), n in seen.items() if ptr not in owned)
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(
        v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    buffers = sum(b.nbytes for b in model.buffers())
    optimizer.zero_grad(set_to_none=True)
    parts = {
        "params": sum(params.values()),
        "buffers": buffers,
        "grads": grads,
        "optimizer": state,
        "saved_activations": saved,
    }
    return parts | {"total": sum(parts.values())}


def child_peak(method: str, rank: int, steps: int) -> float:
    """Peak RSS (MiB) of `steps` training steps, in this (fresh) process."""
    device = torch.device("cpu")
    _, _, _, step = setup(method, rank, device)
    step()
    memory.reset_peak(device)
    for _ in range(steps):
        step()
    return memory.peak_mb(device)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child-peak", choices=["lora", "sds_lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peak:
        print(json.dumps({"peak_mb": child_peak(args.child_peak, args.rank, args.steps)}))
        return

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora_model, lora_opt, batch, lora_step = setup("lora", args.rank, device)
    sds_model, sds_opt, _, sds_step = setup("sds_lora", args.rank, device)
    _, _, _, plain_step = setup("sds_lora", args.rank, device, warmup=10**6)
    layers = list(sds.adapter_layers(sds_model).values())

    def refresh() -> None:
        sds.refresh_bases(layers)

    def measure(fn) -> tuple[float, float]:
        """(wall s, process CPU s) of one call, synchronised on a GPU."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    variants = {"lora": lora_step, "plain": plain_step, "sds": sds_step, "refresh": refresh}
    for fn in variants.values():  # warm-up
        for _ in range(3):
            measure(fn)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.steps):  # round-robin, one step at a time
        for name, fn in variants.items():
            samples[name].append(measure(fn))
    wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
    fraction = sum(1 / k for k in range(1, PHASES + 1)) / PHASES

    print(
        f"model {MODEL_ID}, rank {args.rank}, {len(layers)} adapted layers, batch "
        f"{tuple(batch['input_ids'].shape)} tokens, device {device}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps each, interleaved one by one"
    )
    print(f"{'median per step':36s} {'wall ms':>9s} {'x lora':>7s} {'CPU ms':>9s} {'x lora':>7s}")
    rows = {
        "lora (peft)": ("lora",),
        "lora form of the plug-in (warm-up)": ("plain",),
        "sds_lora, no refresh": ("sds",),
        "basis refresh alone (all layers)": ("refresh",),
        "sds_lora, refresh every step": ("sds", "refresh"),
    }
    for label, parts in rows.items():
        w, c = sum(wall[p] for p in parts), sum(cpu[p] for p in parts)
        print(
            f"{label:36s} {w * 1e3:9.2f} {w / wall['lora']:7.3f} {c * 1e3:9.2f} "
            f"{c / cpu['lora']:7.3f}"
        )
    w = wall["sds"] + fraction * wall["refresh"]
    c = cpu["sds"] + fraction * cpu["refresh"]
    label = f"sds_lora amortized (K={PHASES}: {fraction:.3f})"
    print(
        f"{label:36s} {w * 1e3:9.2f} {w / wall['lora']:7.3f} {c * 1e3:9.2f} "
        f"{c / cpu['lora']:7.3f}   (target <= 1.05; paper +4-5%)"
    )

    mem = {
        "lora": held_bytes(lora_model, lora_opt, batch),
        "sds": held_bytes(sds_model, sds_opt, batch),
    }
    print("\nbytes held by a training step (MiB)")
    print(f"{'part':18s} {'lora':>9s} {'sds_lora':>9s} {'ratio':>7s}")
    for part in mem["lora"]:
        a, b = mem["lora"][part] / 2**20, mem["sds"][part] / 2**20
        print(f"{part:18s} {a:9.2f} {b:9.2f} {b / a if a else float('nan'):7.3f}")
    ratio = mem["sds"]["total"] / mem["lora"]["total"]
    print(f"memory ratio sds_lora/lora: {ratio:.4f} (target <= 1.01; paper +0.5-0.8%)")

    if device.type == "cuda":
        peaks = {}
        for name, fns in (("lora", [lora_step]), ("sds", [sds_step, refresh])):
            torch.cuda.reset_peak_memory_stats(device)
            for fn in fns:
                fn()
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "CUDA max_memory_allocated"
    else:
        peaks = {}
        for name, method in (("lora", "lora"), ("sds", "sds_lora")):
            out = subprocess.run(
                [sys.executable, __file__, "--child-peak", method, "--rank", str(args.rank),
                 "--steps", "5"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        kind = "peak RSS, fresh process each"
    print(
        f"peak memory ({kind}): lora {peaks['lora']:.0f} MiB, sds_lora {peaks['sds']:.0f} MiB, "
        f"ratio {peaks['sds'] / peaks['lora']:.4f}"
    )


if __name__ == "__main__":
    main()
