"""Per-rank GPU memory estimate for a distributed trial, from the model built on the meta
device (shapes only, no weights).

With P parameters, T of them trainable (the method's closed-form count: LoRA r(m + n) per
targeted layer plus the task head; full FT all of P), N ranks, e bytes per element of the
compute dtype (bf16 2, fp32 4), per rank:

  parameters   e P            / N under ZeRO-3 (0 on the GPU with offload_params)
  gradients    e T            / N under ZeRO-2 and ZeRO-3
  optimizer    K T            / N under ZeRO-2 and ZeRO-3 (0 on the GPU with offload_optimizer)
               K = 12 with bf16 (fp32 master copy + Adam m and v), 8 with fp32 (m and v)
  ZeRO-3 working set   2 e x (largest single module's own parameters): the gathered
               module plus the prefetched next one (an untied embedding or LM head dominates)
  activations  b = micro-batch, s = sequence length, h = hidden, L = layers, V = vocab:
               per layer A = s b (34 h [+ 5 a s]) e/2 bytes (Korthikanti et al. 2022, 16-bit;
               the 5 a s term only when attention scores are materialised - not with SDPA or
               FlashAttention, the default here); with gradient checkpointing
               L (2 s b h e/2) + A (stored layer inputs + one layer recomputed), else L A;
               plus the logits s b V (e + 8) (logits, their fp32 copy for the loss and its
               gradient). Rough: it ignores the wider gated MLPs of Llama-style blocks,
               allocator fragmentation, CUDA context and communication buffers.

`init_peak_bytes`: before ZeRO partitions anything every rank holds the model as the
pipeline loads it (`load_dtype`: fp32 4 P, bf16 2 P); a data-informed init adds what it holds
(`Method.init_statistics_bytes`: fp32 gradient accumulators for every targeted weight, 4
sum(m n) over targets, for LoRA-GA, LoRA-One, LoRA-SB; CG-LoRA's pooled K-FAC rows, 4 sum
(min(N, n) n + min(N K, m) m) for N init examples and K Hutchinson samples; in host memory
instead with `offload_init_statistics`, counted in `init_host_bytes`) and the activations of
one init micro-batch in the load dtype (without gradient checkpointing for CG-LoRA, whose
K-FAC passes switch it off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    model_type: str
    method: str
    zero_stage: int
    world_size: int
    dtype: str
    micro_batch: int
    seq_len: int
    total_params: int
    trainable_params: int
    target_weight_params: int  # sum of m n over the targeted linear layers
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    zero3_working_bytes: int
    activation_bytes: int
    cpu_offload_bytes: int  # what offload moves to host memory, per rank
    init_peak_bytes: int  # load + method init, before partitioning (see module doc)
    init_host_bytes: int = 0  # init statistics offloaded to host memory, per rank
    init_statistics_bytes: int = 0  # held by a data-informed init (Method.init_statistics_bytes)

    @property
    def total_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.zero3_working_bytes
            + self.activation_bytes
        )

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total_bytes": self.total_bytes, "total_gib": self.total_gib}


def meta_model(config) -> nn.Module:
    """The causal LM of a transformers config on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def activation_bytes(
    config,
    micro_batch: int,
    seq_len: int,
    dtype_bytes: int,
    gradient_checkpointing: bool,
    attention_scores_stored: bool = False,
) -> int:
    """The rough activation formula of the module doc, per rank."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, vocab = config.num_attention_heads, config.vocab_size
    s, b, half = seq_len, micro_batch, dtype_bytes / 2
    per_layer = s * b * (34 * h + (5 * heads * s if attention_scores_stored else 0)) * half
    if gradient_checkpointing:
        stored = layers * 2 * s * b * h * half + per_layer
    else:
        stored = layers * per_layer
    logits = s * b * vocab * (dtype_bytes + 8)
    return int(stored + logits)


def estimate(
    config,
    method: str,
    overrides: dict[str, Any] | None = None,
    *,
    zero_stage: int,
    world_size: int,
    dtype: str = "bf16",
    micro_batch: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    load_dtype: str = "fp32",
    offload_init_statistics: bool = False,
    model: nn.Module | None = None,
) -> MemoryEstimate:
    """Per-rank estimate for `method` (registry id) with `overrides` on the model of `config`."""
    import methods
    from methods.peft_lora import matching_linear_layers

    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage}")
    model = model if model is not None else meta_model(config)
    e = DTYPE_BYTES[dtype]
    n = world_size
    total = sum(p.numel() for p in model.parameters())
    m = methods.get_method(method)
    hp = m.hyperparams(overrides or {})
    targets = m.family_target_modules(config.model_type)
    ctx = methods.PrepareContext(head_modules=[], default_target_modules=targets)
    trainable = m.expected_trainable_params(model, hp, ctx)
    target_keys = getattr(hp, "target_modules", None) or targets
    layer_shapes = [
        tuple(layer.weight.shape) for _, layer in matching_linear_layers(model, list(target_keys))
    ]
    target_weights = sum(out_dim * in_dim for out_dim, in_dim in layer_shapes)

    param = e * total
    if zero_stage == 3:
        param //= n
    grad = e * trainable // n
    k = 12 if e == 2 else 8
    optim = k * trainable // n
    offloaded = 0
    if offload_optimizer:
        offloaded += optim
        optim = 0
    if offload_params:
        offloaded += param
        param = 0
    largest = max(
        sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()
    )
    working = 2 * e * largest if zero_stage == 3 else 0
    acts = activation_bytes(config, micro_batch, seq_len, e, gradient_checkpointing)
    load_bytes = DTYPE_BYTES[load_dtype]
    init_peak = load_bytes * total  # every rank holds the model as loaded until ZeRO partitions
    init_host = statistics = 0
    if m.needs_init_batches:
        init_checkpointed = gradient_checkpointing and m.init_keeps_gradient_checkpointing
        init_peak += activation_bytes(config, micro_batch, seq_len, load_bytes, init_checkpointed)
        # init batches of `micro_batch` examples each, on this rank
        examples = m.init_batches_wanted(hp, SimpleNamespace(batch_size=micro_batch)) * micro_batch
        statistics = m.init_statistics_bytes(hp, layer_shapes, examples)
        if offload_init_statistics:
            init_host = statistics
        else:
            init_peak += statistics
    return MemoryEstimate(
        model_type=config.model_type,
        method=method,
        zero_stage=zero_stage,
        world_size=n,
        dtype=dtype,
        micro_batch=micro_batch,
        seq_len=seq_len,
        total_params=total,
        trainable_params=trainable,
        target_weight_params=target_weights,
        param_bytes=param,
        grad_bytes=grad,
        optimizer_bytes=optim,
        zero3_working_bytes=working,
        activation_bytes=acts,
        cpu_offload_bytes=offloaded,
        init_peak_bytes=init_peak,
        init_host_bytes=init_host,
        init_statistics_bytes=statistics,
    )


def estimate_for_sweep(cfg, config=None) -> list[MemoryEstimate]:
    """One estimate per method of a sweep with a distributed section (GPU precision).

    `config`: the model's transformers config; default: read from the model's folder or the
    hub (config.json only), else the architecture card in harness.spec.presets.
    """
    from harness.deepspeed.config import resolve_load_dtype
    from harness.training.batching import batch_plan

    dist = cfg.distributed
    if dist is None:
        raise ValueError("the sweep has no distributed section")
    if config is None:
        config = _model_config(cfg)
    # The largest task's budget bounds every trial's memory (task_budgets may differ).
    budget = max(cfg.budgets().values(), key=lambda b: (b.max_length, b.batch_size))
    plan = batch_plan(budget.batch_size, dist.world_size, dist.micro_batch_size)
    dtype = "bf16" if dist.precision in ("auto", "bf16") else "fp32"
    model = meta_model(config)
    return [
        estimate(
            config,
            name,
            sweep.overrides,
            zero_stage=dist.zero_stage,
            world_size=dist.world_size,
            dtype=dtype,
            micro_batch=plan.micro_batch,
            seq_len=budget.max_length,
            gradient_checkpointing=dist.gradient_checkpointing,
            offload_optimizer=dist.offload_optimizer,
            offload_params=dist.offload_params,
            load_dtype=resolve_load_dtype(dist, on_gpu=True),
            offload_init_statistics=dist.offloads_init_statistics,
            model=model,
        )
        for name, sweep in cfg.methods.items()
    ]


def _model_config(cfg):
    from transformers import AutoConfig

    from harness.modeling.models import resolve_model
    from harness.spec.presets import ARCHITECTURES, architecture_config

    try:
        source = resolve_model(cfg.model.id, cfg.model.revision, cfg.resolved_model_dir())
        return AutoConfig.from_pretrained(source.location)
    except Exception:  # noqa: BLE001 - offline: fall back to the published dimensions
        if cfg.model.id in ARCHITECTURES:
            return architecture_config(cfg.model.id)
        raise


def format_estimates(estimates: list[MemoryEstimate]) -> str:
    lines = [
        f"{'method':10s} {'params':>10s} {'trainable':>12s} {'param':>7s} {'grad':>7s} "
        f"{'optim':>7s} {'z3 work':>7s} {'acts':>7s} {'total':>7s} {'init':>7s}  GiB per rank"
    ]
    for est in estimates:
        gib = [
            x / GIB
            for x in (est.param_bytes, est.grad_bytes, est.optimizer_bytes,
                      est.zero3_working_bytes, est.activation_bytes, est.total_bytes,
                      est.init_peak_bytes)
        ]  # fmt: skip
        lines.append(
            f"{est.method:10s} {est.total_params / 1e9:9.2f}B {est.trainable_params:12,d} "
            + " ".join(f"{g:7.2f}" for g in gib)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.sweeps.memory_estimate SWEEP.yaml`: the per-rank table of a distributed
    sweep (config.json only: from the model folder, the hub, or the preset's card)."""
    import argparse

    from harness.spec.config import SweepConfig

    parser = argparse.ArgumentParser(prog="python -m harness.sweeps.memory_estimate")
    parser.add_argument("config", help="sweep YAML with a distributed section")
    args = parser.parse_args(argv)
    import yaml

    cfg = SweepConfig(**yaml.safe_load(Path(args.config).read_text()))
    print(format_estimates(estimate_for_sweep(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
