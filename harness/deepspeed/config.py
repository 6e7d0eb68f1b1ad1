"""DeepSpeed JSON configs for distributed trials, rendered from the sweep's `distributed`
section.

Batch arithmetic (global = micro x accumulation x world, exact or an error) is
harness.training.batching's.

Precision: bf16 (DeepSpeed keeps fp32 master weights and optimizer states for the trainable
parameters) on GPU, fp32 on CPU (`precision: auto`). ZeRO-2 partitions gradients and
optimizer states across ranks, ZeRO-3 also the parameters; optional CPU offload of the
optimizer states (2 and 3) and of the parameters (3 only). Under ZeRO-3,
`stage3_gather_16bit_weights_on_model_save` lets `engine.save_16bit_model` consolidate the
weights on rank 0. Gradient checkpointing is applied to the Hugging Face model itself (not a
DeepSpeed key); it is carried in the plan, not in this JSON.
"""

from __future__ import annotations

from typing import Any

from harness.spec.config import DistributedConfig
from harness.training.batching import batch_plan

# Bucket sizes (elements): DeepSpeed's documented defaults, written out so the rendered file
# is self-contained and recorded in the run row as used.
BUCKET = 500_000_000
STAGE3_PARAM_PERSISTENCE = 1_000_000  # params below this stay gathered (biases, norms)
STAGE3_MAX_LIVE = 1_000_000_000


def resolve_precision(dist: DistributedConfig, on_gpu: bool) -> str:
    if dist.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return dist.precision


def resolve_load_dtype(dist: DistributedConfig, on_gpu: bool) -> str:
    """How the weights are loaded: `auto` follows the training precision."""
    if dist.load_dtype == "auto":
        return "bf16" if resolve_precision(dist, on_gpu) == "bf16" else "fp32"
    return dist.load_dtype


def render(
    dist: DistributedConfig,
    *,
    global_batch: int,
    max_grad_norm: float | None,
    on_gpu: bool | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict (JSON-serialisable) for one trial."""
    on_gpu = dist.use_gpu if on_gpu is None else on_gpu
    plan = batch_plan(global_batch, dist.world_size, dist.micro_batch_size)
    precision = resolve_precision(dist, on_gpu)
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        "overlap_comm": on_gpu,  # overlapping needs streams; gloo on CPU gains nothing
        "contiguous_gradients": True,
        "reduce_bucket_size": BUCKET,
    }
    if dist.zero_stage == 2:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": BUCKET,
                 "reduce_scatter": True}  # fmt: skip
    else:
        zero |= {
            "stage3_prefetch_bucket_size": BUCKET,
            "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE,
            "stage3_max_live_parameters": STAGE3_MAX_LIVE,
            "stage3_max_reuse_distance": STAGE3_MAX_LIVE,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # The method builds its own torch optimizer (LoRA+ param groups, AdamW); ZeRO wraps
        # it. With offload, DeepSpeed would insist on its compiled CPU Adam otherwise.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
