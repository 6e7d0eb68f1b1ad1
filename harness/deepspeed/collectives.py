"""Small collectives of a distributed trial, and the digests by which its ranks check that
they agree (identical initialisations, identical buffers, the saved adapter)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus every adapter tensor (`lora_` params and buffers)."""
    tensors = {n: p for n, p in module.named_parameters() if p.requires_grad or "lora_" in n}
    tensors |= {n: b for n, b in module.named_buffers() if "lora_" in n}
    return tensors


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_digest(module: torch.nn.Module) -> str:
    """Bitwise digest of the adapter tensors: equal digests = identical initialisations."""
    return state_digest(adapter_tensors(module))


def all_gather_object(value: Any, world: int) -> list[Any]:
    import torch.distributed as tdist

    gathered: list[Any] = [None] * world
    tdist.all_gather_object(gathered, value)
    return gathered


def all_reduce_max(value: float, device) -> float:
    import torch.distributed as tdist

    tensor = torch.tensor(float(value), device=device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return float(tensor)
