"""Parameter access under DeepSpeed ZeRO-2/3: full values assembled from (and written back
to) the optimizer's flat partitions, and gathering for the adapter artifact and the merge.

After partitioning, base weights are read only under `deepspeed.zero.GatheredParameters`
(the merge check), and the adapter is saved by gathering only the trainable parameters.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class ZeroParamAccess:
    """methods.base.ParamAccess under DeepSpeed ZeRO-2/3 (every rank calls it alike).

    ZeRO keeps the parameters' fp32 masters in the optimizer's flat partitions, and under
    ZeRO-3 the module's own parameters are partitioned too. `read` assembles the full fp32
    master (collective); `write` sets the master partition and the module parameter (ZeRO-2:
    each rank's full replica; ZeRO-3: gathered, rewritten on rank 0, re-partitioned on exit);
    `reset_optimizer_state` zeroes every state tensor in place (AdamW: moments and step, i.e.
    a fresh optimizer; in place so DeepSpeed's views into the state stay valid).
    """

    def __init__(self, engine, zero_stage: int) -> None:
        self.engine = engine
        self.zero_stage = zero_stage

    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is None:
            raise ValueError("parameter is not managed by the ZeRO optimizer (frozen?)")
        return value.reshape(self.shape(param))

    @torch.no_grad()
    def write(self, updates: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for param, value in updates:
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's slice (see _zero3_slice)
                safe_set_local_fp32_param(param, _zero3_slice(param, value))
            else:
                safe_set_full_fp32_param(param, value.to(torch.float32))
            # Read back: a master copy the optimizer does not see would be lost at its next
            # step (and the rewrite silently undone).
            stored = self.read(param)
            if not torch.equal(
                stored, value.to(stored.device, torch.float32).reshape(stored.shape)
            ):
                raise RuntimeError("ZeRO fp32 master copy did not take the new parameter value")
        params = [param for param, _ in updates]
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=0)
            if self.zero_stage == 3
            else nullcontext()
        )
        with gather:
            for param, value in updates:
                param.data.copy_(value.reshape(param.shape).to(param.dtype))

    def read_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full gradient of this step (between the boundary backward and step())."""
        from deepspeed.utils import safe_get_full_grad

        value = safe_get_full_grad(param)
        if value is None:
            raise ValueError("parameter has no gradient in the ZeRO optimizer (frozen?)")
        return value.reshape(self.shape(param))

    def write_grad(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set the full gradient; each rank keeps its partition for the optimizer step."""
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        if hasattr(param, "ds_tensor"):
            safe_set_local_grad(param, _zero3_slice(param, value))
        else:
            safe_set_full_grad(param, value)

    def reset_optimizer_state(self) -> None:
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = 0

    def shape(self, param: torch.nn.Parameter) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)


def _zero3_slice(param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full fp32 value, zero-padded at the end.

    DeepSpeed's own full setters (`safe_set_full_fp32_param` / `_grad`) slice without the
    padding, so they fail for a parameter whose size does not divide by the world size (a
    1-element bias on 2 ranks); setting the local partition ourselves avoids that."""
    import torch.distributed as tdist

    size = param.ds_tensor.numel()
    rank = tdist.get_rank(group=getattr(param, "ds_process_group", None))
    flat = value.detach().flatten().to(torch.float32)
    part = flat[rank * size : (rank + 1) * size]
    return torch.cat([part, part.new_zeros(size - part.numel())])


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gathered_trainable_state(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The trainable parameters (adapter + head) in full on rank 0, gathering only them -
    never the frozen base weights (ZeRO-3); {} on the other ranks."""
    import deepspeed

    named = trainable_parameters(module)
    params = [p for _, p in named]
    partitioned = any(hasattr(p, "ds_id") for p in params)
    state: dict[str, torch.Tensor] = {}
    context = deepspeed.zero.GatheredParameters(params) if partitioned else nullcontext()
    with context:
        if rank == 0:
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    return state


def merged_outputs(method, module: torch.nn.Module, probe, zero_stage: int):
    """The probe outputs of the merged model (None: the method does not merge). Under
    ZeRO-3 the whole model is gathered on every rank (GatheredParameters) for the merge.
    Merges in place: the trial's last use of the model (evaluated and saved before)."""
    if zero_stage != 3:
        return _merged_outputs(method, module, probe)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return _without_zero_hooks(module, lambda: _merged_outputs(method, module, probe))


def _merged_outputs(method, module, probe) -> torch.Tensor | None:
    """Merges in place: the trial's last use of the model (evaluated and saved before)."""
    from harness.training import sanity

    merged = method.merge(module)
    return None if merged is None else sanity.outputs(merged, probe)


def _without_zero_hooks(module, fn):
    """Run `fn` on a ZeRO-3 module whose parameters are gathered, with the ZeRO forward
    hooks removed (they would release the gathered parameters after each module) and
    restored after."""
    saved = []
    for sub in module.modules():
        saved.append((sub, dict(sub._forward_pre_hooks), dict(sub._forward_hooks)))
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()
    try:
        return fn()
    finally:
        for sub, pre, post in saved:
            sub._forward_pre_hooks.update(pre)
            sub._forward_hooks.update(post)
