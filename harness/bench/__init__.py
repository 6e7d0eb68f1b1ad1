"""`harness bench`: performance targets, measured side by side in one run.

- `harness bench --all` (harness/bench/suite.py): every registered method in one table,
  with the papers' cost targets and MFU (harness/bench/mfu.py); `--llm-width`
  (harness/bench/width.py): init memory of the data-informed inits at LLM width on CPU vs
  harness/sweeps/memory_estimate.py.

- `bench_train_step`: one harness training step vs a bare peft + torch loop on the same
  batch, interleaved (A, B, A, B, ...) so drift on a shared machine hits both; prints
  median(harness) / median(bare). Target <= 1.05.
- `bench_init_cost`: init time and memory of the data-informed inits (lora_ga, lora_one,
  lora_sb) on the same model and batches, and init time as a fraction of a 1-epoch run.
  Target <= 2% (LoRA-SB reports 1.1-1.3%).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import methods
from harness.modeling.models import load_sequence_model, resolve_model
from harness.training.train import linear_warmup_decay, train_step
from methods.targets import default_target_modules

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _batch(tokenizer, batch_size: int = 16, max_length: int = 64) -> dict[str, torch.Tensor]:
    text = "a gripping , funny and ultimately moving film about the people who make music"
    enc = tokenizer(
        [text] * batch_size, padding="max_length", truncation=True, max_length=max_length,
        return_tensors="pt",
    )  # fmt: skip
    enc["labels"] = torch.arange(batch_size) % 2
    return dict(enc)


def _time_steps(step, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def harness_vs_bare(
    steps: int = 30, repeats: int = 5, method: str = "lora", loaded=None, batch=None
) -> dict[str, list[float]]:
    """Seconds per step, `repeats` interleaved samples of `steps` steps each, of the harness's
    `train_step` and of a bare peft + AdamW loop on the same model and batch."""
    torch.manual_seed(0)
    if loaded is None:
        loaded = load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    batch = batch if batch is not None else _batch(loaded.tokenizer)
    # Harness side: the registry method and the exact train_step the trials use.
    impl = methods.get_method(method)
    targets = impl.family_target_modules(loaded.model_type)
    hp = impl.hyperparams({})
    ctx = methods.PrepareContext(head_modules=loaded.head_modules, default_target_modules=targets)
    harness_model = impl.prepare(copy.deepcopy(loaded.model), hp, ctx)
    harness_model.train()
    harness_opt = impl.build_optimizer(harness_model, 1e-4, hp)
    harness_sched = linear_warmup_decay(harness_opt, 10**9, 0.0)

    # Bare side: peft + AdamW, nothing else.
    from peft import LoraConfig, get_peft_model

    bare_model = get_peft_model(
        copy.deepcopy(loaded.model),
        LoraConfig(
            r=hp.rank, lora_alpha=hp.alpha, target_modules=targets,
            modules_to_save=loaded.head_modules,
        ),
    )  # fmt: skip
    bare_model.train()
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=1e-4)

    def bare_step() -> None:
        loss = bare_model(**batch).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def harness_step() -> None:
        train_step(harness_model, batch, harness_opt, harness_sched, max_grad_norm=1.0)

    for fn in (bare_step, harness_step):  # warm-up
        _time_steps(fn, 3)
    bare, ours = [], []
    for _ in range(repeats):
        bare.append(_time_steps(bare_step, steps))
        ours.append(_time_steps(harness_step, steps))
    return {"bare_s": bare, "harness_s": ours}


def bench_train_step(steps: int = 30, repeats: int = 5, method: str = "lora") -> float:
    samples = harness_vs_bare(steps, repeats, method)
    bare, ours = samples["bare_s"], samples["harness_s"]
    ratio = statistics.median(ours) / statistics.median(bare)
    print(
        f"model {MODEL_ID}, method {method}, batch 16 x 64 tokens, {torch.get_num_threads()} "
        f"threads, {repeats} x {steps} steps interleaved\n"
        f"bare peft+torch step: median {statistics.median(bare) * 1e3:.1f} ms "
        f"(min {min(bare) * 1e3:.1f})\n"
        f"harness train_step:   median {statistics.median(ours) * 1e3:.1f} ms "
        f"(min {min(ours) * 1e3:.1f})\n"
        f"ratio harness/bare: {ratio:.3f} (target <= 1.05)"
    )
    return ratio


def real_batches(tokenizer, n: int, batch_size: int = 16, max_length: int = 64):
    """n SST-2 training batches from the mirror (HARNESS_DATA_DIR), else a fixed sentence."""
    import os

    from transformers import DataCollatorWithPadding

    import tasks

    data_dir = os.environ.get("HARNESS_DATA_DIR")
    if not data_dir:
        return [_batch(tokenizer, batch_size, max_length) for _ in range(n)], 67349
    task = tasks.get_task("glue/sst2")
    splits = task.splits(data_dir, train_rows=n * batch_size)
    enc = task.encode(tokenizer, splits.train, max_length)
    rows = [dict(zip(enc, v, strict=True)) for v in zip(*enc.values(), strict=True)]
    collate = DataCollatorWithPadding(tokenizer)
    batches = [dict(collate(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    return batches, splits.provenance["train"]["rows"]


def bench_init_cost(init_batches: int = 8, step_samples: int = 10) -> dict[str, dict]:
    from harness.training import memory

    torch.manual_seed(0)
    device = torch.device("cpu")
    loaded = load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    batches, train_size = real_batches(loaded.tokenizer, init_batches)
    targets = default_target_modules(loaded.model_type)

    def context(lr: float = 1e-3) -> methods.PrepareContext:
        return methods.PrepareContext(
            head_modules=loaded.head_modules, default_target_modules=targets,
            init_batches=lambda n: iter(batches[:n]), learning_rate=lr,
            train_examples=train_size, batch_size=16,
        )  # fmt: skip

    # One epoch of LoRA training, estimated from measured steps on the same batches.
    lora = methods.get_method("lora")
    hp = lora.hyperparams({})
    model = lora.prepare(copy.deepcopy(loaded.model), hp, context())
    model.train()
    optimizer = lora.build_optimizer(model, 1e-4, hp)
    train_step(model, batches[0], optimizer, None, 1.0)  # warm-up
    started = time.perf_counter()
    for i in range(step_samples):
        train_step(model, batches[i % len(batches)], optimizer, None, 1.0)
    step_s = (time.perf_counter() - started) / step_samples
    epoch_s = step_s * (train_size // 16)

    runs = {
        "lora_ga": {"init_batches": init_batches},
        "lora_one": {"init_batches": init_batches},
        "lora_sb": {"init_batches": init_batches},
        "lora_sb (paper default: 1/1000 of train)": {},
    }
    results: dict[str, dict] = {}
    for label, overrides in runs.items():
        name = label.split(" ")[0]
        impl = methods.get_method(name)
        hp = impl.hyperparams(overrides)
        fresh = copy.deepcopy(loaded.model)
        ctx = context()
        ctx.default_target_modules = impl.family_target_modules(loaded.model_type)
        memory.reset_peak(device)
        before, _ = memory.peak_mb(device)
        started = time.perf_counter()
        impl.prepare(fresh, hp, ctx)
        init_s = time.perf_counter() - started
        peak, kind = memory.peak_mb(device)
        results[label] = {
            "batches": impl.init_batches_wanted(hp, ctx),
            "init_s": init_s,
            "peak_extra_mb": peak - before,
            "epoch_fraction": init_s / epoch_s,
        }
        del fresh
    ga = results["lora_ga"]
    print(
        f"model {MODEL_ID}, SST-2 batches of 16 (<= 64 tokens), {torch.get_num_threads()} "
        f"threads, memory = {kind} above the level before init\n"
        f"1 epoch of LoRA on {train_size} examples ~ {epoch_s:.0f} s "
        f"({step_s * 1e3:.0f} ms/step x {train_size // 16} steps)"
    )
    print(f"{'method':44s} {'batches':>7s} {'init s':>8s} {'x ga':>6s} {'extra MiB':>9s} "
          f"{'x ga':>6s} {'of epoch':>9s}")  # fmt: skip
    for label, r in results.items():
        mem_ratio = (
            r["peak_extra_mb"] / ga["peak_extra_mb"] if ga["peak_extra_mb"] > 0 else float("nan")
        )
        print(
            f"{label:44s} {r['batches']:7d} {r['init_s']:8.2f} {r['init_s'] / ga['init_s']:6.2f} "
            f"{r['peak_extra_mb']:9.0f} {mem_ratio:6.2f} {100 * r['epoch_fraction']:8.2f}%"
        )
    print("target: init <= 2% of a 1-epoch run")
    return results
