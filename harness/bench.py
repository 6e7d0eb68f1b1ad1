"""`harness bench`: one harness training step vs a bare peft + torch loop, same batch.

Both sides run interleaved in one process (A, B, A, B, ...) so drift on a shared machine
hits both; the printed ratio is median(harness step) / median(bare step). Target <= 1.05.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import methods
from harness.models import load_sequence_model, resolve_model
from harness.train import linear_warmup_decay, train_step
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


def bench_train_step(steps: int = 30, repeats: int = 5, method: str = "lora") -> float:
    torch.manual_seed(0)
    loaded = load_sequence_model(resolve_model(MODEL_ID, None, None), 2, regression=False)
    batch = _batch(loaded.tokenizer)
    targets = default_target_modules(loaded.model_type)

    # Harness side: the registry method and the exact train_step the trials use.
    impl = methods.get_method(method)
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
