"""Batch arithmetic of distributed trials: the global batch (`budget.batch_size`, examples
per optimizer step) is micro x accumulation x world. With `micro_batch_size` unset each rank
takes global / world examples in one micro-step; with it set, accumulation = global /
(micro x world). Either division must be exact: a silently rounded batch would change the
experiment. Pure arithmetic, below both harness.spec.config (which validates a sweep with it)
and harness.deepspeed.config (which renders it).
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchError(ValueError):
    """A global batch that does not split evenly into micro-batches over the ranks."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int  # per rank, per micro-step
    accumulation: int  # micro-steps per optimizer step

    @property
    def per_rank(self) -> int:
        """Examples one rank sees per optimizer step."""
        return self.micro_batch * self.accumulation


def batch_plan(global_batch: int, world_size: int, micro_batch: int | None = None) -> BatchPlan:
    """Micro-batch and accumulation from the global batch and world size (exact or an error)."""
    if global_batch < 1 or world_size < 1:
        raise BatchError(f"global batch {global_batch} and world size {world_size} must be >= 1")
    if global_batch % world_size:
        raise BatchError(
            f"global batch {global_batch} does not divide over {world_size} ranks "
            f"({global_batch} / {world_size} = {global_batch / world_size:g}); choose a global "
            f"batch that is a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    if micro_batch is None:
        return BatchPlan(global_batch, world_size, per_rank, 1)
    if per_rank % micro_batch:
        raise BatchError(
            f"global batch {global_batch} = micro-batch {micro_batch} x accumulation x "
            f"{world_size} ranks has no integer accumulation ({per_rank} examples per rank "
            f"/ micro-batch {micro_batch} = {per_rank / micro_batch:g}); use a micro-batch "
            f"that divides {per_rank}"
        )
    return BatchPlan(global_batch, world_size, micro_batch, per_rank // micro_batch)
