"""Checkpoints and the adapter artifact of a distributed trial, through Ray Train storage.

`FailureConfig(max_failures)` at the Train level restarts the worker group from the latest
DeepSpeed checkpoint (when `checkpoint_every_steps` is set); the Train run is named after
the trial's content key (harness.deepspeed.storage's `train_run_name`), so any restart - a
retry, or rerunning the sweep command - finds and restores the same run. Rank 0's adapter
(the gathered trainable parameters) is uploaded as the run's final checkpoint and copied
beside the single-device trials' adapters by the driver.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.deepspeed.collectives import state_digest
from harness.deepspeed.zero_access import gathered_trainable_state
from harness.spec.identity import TrialSpec
from harness.training.train import TrainState

# Test hook: a worker raises at this step once (not after a restore), to exercise restarts.
FAIL_ONCE_ENV = "HARNESS_TEST_FAIL_ONCE_AT_STEP"
# What a DeepSpeed checkpoint carries besides the weights, optimizer and scheduler.
CLIENT_STATE = ("step", "losses", "curve", "eval_curve", "train_time", "tokens")


def fail_once_step(state: TrainState) -> int:
    """The step FAIL_ONCE_ENV asks to fail at (0: none, and never after a restore)."""
    return 0 if state.restored else int(os.environ.get(FAIL_ONCE_ENV) or 0)


def save_checkpoint(engine, state: TrainState, metrics: dict[str, Any]) -> None:
    """A DeepSpeed checkpoint of the trainable state (frozen base weights excluded), every
    rank's shard uploaded by Ray Train into one checkpoint folder of the run."""
    import ray.train

    client = {k: getattr(state, k) for k in CLIENT_STATE}
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state=client, exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, global_batch: int) -> TrainState | None:
    """Resume from the run's latest DeepSpeed checkpoint (a Train or Tune restart, or a rerun
    of the sweep): trainable weights, optimizer and scheduler state, step, loss history."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / "ds").is_dir():
            return None  # the final adapter of a finished run: train again from the start
        _, client = engine.load_checkpoint(
            folder, tag="ds", load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )  # fmt: skip
    # DeepSpeed hands back its own metadata with the client state; keep only ours.
    state = TrainState(**{k: client[k] for k in CLIENT_STATE if k in (client or {})})
    state.samples, state.restored = state.step * global_batch, True  # full batches only
    return state


class RankAdapterSaver:
    """harness.training.backend's ArtifactSaver for a rank: gathers only the trainable parameters
    (adapter + head; all of them for full FT), rank 0 writes them and Ray Train uploads."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.digest: str | None = None  # of rank 0's saved tensors, for the run record

    def before_init(self, model: torch.nn.Module) -> None:
        pass

    def after_init(self, model: torch.nn.Module) -> None:
        pass

    def save(self, model, method, spec, probe, outputs, head_modules) -> dict[str, Any]:
        """Report the adapter; the driver copies it (`copy_adapter`) and adds its columns."""
        state = gathered_trainable_state(model, self.rank)
        report_adapter(model, state, spec, self.rank)
        self.digest = state_digest(state) if state else None
        return {}


def report_adapter(module, state: dict[str, torch.Tensor], spec: TrialSpec, rank: int) -> None:
    """Rank 0 writes the adapter (peft layout when the model is a peft model) and Ray Train
    uploads it to the run's storage; the other ranks join the report empty-handed."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            if hasattr(module, "peft_config") and hasattr(module, "save_pretrained"):
                module.save_pretrained(folder, state_dict=state, safe_serialization=True)
            else:
                save_file({k: v.contiguous() for k, v in state.items()},
                          str(folder / "trainable_params.safetensors"))  # fmt: skip
            (folder / "harness_trial.json").write_text(
                json.dumps(
                    {"key": spec.key(), "method": spec.method, "model_id": spec.model_id,
                     "model_revision": spec.model_revision, "overrides": spec.method_overrides,
                     "lr": spec.lr, "seed": spec.seed, "task": spec.task},
                    indent=2, sort_keys=True, default=str,
                )
            )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"adapter": rank == 0}, checkpoint=checkpoint)


def copy_adapter(checkpoint, folder: Path) -> dict[str, Any]:
    """The adapter Ray Train stored, copied beside the single-device trials' adapters
    (harness.training.adapters layout: `adapter/` + `harness_adapter.json`; no probe file and no
    stock-base conversion on this path yet)."""
    import shutil

    from harness.training.adapters import FORMAT_PEFT, META_FILE, folder_bytes

    if folder.exists():
        shutil.rmtree(folder)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.to_directory(tmp)
        shutil.copytree(Path(tmp) / "adapter", folder / "adapter")
    adapter = folder / "adapter"
    meta = json.loads((adapter / "harness_trial.json").read_text())
    peft_format = (adapter / "adapter_config.json").is_file()
    meta |= {
        "format": FORMAT_PEFT if peft_format else "trainable parameters (safetensors)",
        "applies_to": "adapter/: the base model as the method's init left it",
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return {"adapter_path": str(folder), "adapter_bytes": folder_bytes(adapter)}
