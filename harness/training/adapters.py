"""Trained adapters as artifacts: `save_adapters: none | all | chosen`.

Each saved trial gets `<output_dir>/adapters/<run key>/`:

- `adapter/`: the adapter as the method trains it. peft methods: peft's own folder
  (`save_pretrained`, safetensors; the task head rides along as `modules_to_save`), loaded
  with `PeftModel.from_pretrained`. Plug-in methods (LoRA-XS, LoRA-SB, SDS-LoRA): the
  method's `save_adapter` folder (the `Method` contract) plus `head.safetensors` (the
  trained task head), loaded with `load_saved_adapter` (the method's `load_adapter`).
  Methods without an adapter of their own (`save_adapter` raises NotImplementedError:
  full fine-tuning): the whole model (`save_pretrained`).
- `stock_lora/`: only for methods whose init moves the base weights W0 (PiSSA's residual,
  LoRA-GA's and CG-LoRA shift's offsets, LoRA-One with `weight_shift`): a plain LoRA of
  rank 2r that applies to the *stock* base model, from peft's
  `path_initial_model_for_weight_conversion` (B A - B0 A0 = [B | -B0] [A ; A0]); the raw
  `adapter/` applies only to the moved base. Whether W0 moved is measured, not declared:
  every base parameter's bytes are hashed before the init and compared after it.
- `probe.safetensors`: the probe batch's inputs and the trained model's outputs on it, so a
  loaded adapter can be checked against the run (`check_saved_adapter`).
- `harness_adapter.json`: what it is (run key, method, model, format, what it applies to).

The row records `adapter_path` and `adapter_bytes` (bytes of `adapter/` on disk).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from methods.base import Method
from methods.registry import get_method

ADAPTERS_DIR = "adapters"
META_FILE = "harness_adapter.json"
PROBE_FILE = "probe.safetensors"
HEAD_FILE = "head.safetensors"
ADAPTER, STOCK_LORA, INITIAL = "adapter", "stock_lora", "initial"
FORMAT_PEFT, FORMAT_PLUGIN, FORMAT_FULL = "peft", "plug-in", "full model"


def adapters_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / ADAPTERS_DIR


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "save_pretrained")


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class AdapterSaver:
    """Saves one trial's adapter into `folder`; `before_init` on the stock model, then
    `after_init` on the prepared one (notes whether W0 moved; if so keeps peft's initial
    adapter for the conversion), then `save` after training."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.stock: list[tuple[nn.Parameter, str]] = []
        self.moved_tensors = 0

    def before_init(self, model: nn.Module) -> None:
        self.stock = [(p, _digest(p)) for p in model.parameters()]

    def after_init(self, model: nn.Module) -> None:
        # The same Parameter objects: peft and the plug-ins keep the base layers and
        # rewrite weights in place (PiSSA assigns `.data`), so a changed hash is a moved W0.
        self.moved_tensors = sum(1 for p, digest in self.stock if _digest(p) != digest)
        self.stock = []
        if self.folder.exists():  # a rerun of the same key replaces the earlier artifact
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        if self.moved_tensors and is_peft_model(model):
            model.save_pretrained(self.folder / INITIAL, safe_serialization=True)

    def save(
        self,
        model: nn.Module,
        method: Method,
        spec: Any,
        probe: dict[str, torch.Tensor],
        outputs: torch.Tensor,
        head_modules: list[str],
    ) -> dict[str, Any]:
        """Write the artifact; returns the row's columns (adapter_path, adapter_bytes)."""
        adapter = self.folder / ADAPTER
        meta: dict[str, Any] = {
            "key": spec.key(), "method": spec.method, "task": spec.task, "lr": spec.lr,
            "seed": spec.seed, "model_id": spec.model_id, "model_revision": spec.model_revision,
            "method_config": spec.method_config, "head_modules": list(head_modules),
            "moved_base_tensors": self.moved_tensors,
        }  # fmt: skip
        if is_peft_model(model):
            meta["format"] = FORMAT_PEFT
            model.save_pretrained(adapter, safe_serialization=True)
            if self.moved_tensors:
                self._save_stock_lora(model)
                meta["stock_lora"] = STOCK_LORA
                meta["applies_to"] = (
                    f"{ADAPTER}/: the base model with W0 moved by the init; "
                    f"{STOCK_LORA}/: the stock base model (rank 2r, peft's conversion)"
                )
            else:
                meta["applies_to"] = f"{ADAPTER}/: the stock base model"
        elif self._save_plugin(model, method, adapter):
            meta["format"], meta["plugin_module"] = FORMAT_PLUGIN, type(method).__module__
            head = {
                name: p.detach().contiguous().cpu()
                for name, p in model.named_parameters()
                if any(name == h or name.startswith(h + ".") for h in head_modules)
            }
            if head:
                save_file(head, str(adapter / HEAD_FILE))
            meta["applies_to"] = (
                f"{ADAPTER}/: the stock base model"
                if not self.moved_tensors
                else f"{ADAPTER}/: the base model with W0 moved by the init (no stock "
                "conversion for plug-ins yet)"
            )
        else:
            meta["format"] = FORMAT_FULL
            model.save_pretrained(adapter, safe_serialization=True)
            meta["applies_to"] = f"{ADAPTER}/: the whole trained model"
        inputs = {f"input.{k}": v.detach().cpu().contiguous() for k, v in probe.items()
                  if torch.is_tensor(v) and k != "labels"}  # fmt: skip
        save_file({**inputs, **_probe_outputs(outputs)}, str(self.folder / PROBE_FILE))
        (self.folder / META_FILE).write_text(
            json.dumps(meta, indent=2, sort_keys=True, default=str)
        )
        return {"adapter_path": str(self.folder), "adapter_bytes": folder_bytes(adapter)}

    @staticmethod
    def _save_plugin(model: nn.Module, method: Method, adapter: Path) -> bool:
        """The method's own adapter folder (`Method.save_adapter`); False if it has none."""
        try:
            method.save_adapter(model, adapter)
        except NotImplementedError:
            return False
        return True

    def _save_stock_lora(self, model: nn.Module) -> None:
        stock = self.folder / STOCK_LORA
        model.save_pretrained(
            stock,
            safe_serialization=True,
            path_initial_model_for_weight_conversion=str(self.folder / INITIAL),
        )
        # peft's conversion keeps only the lora_A/lora_B tensors; the trained task head
        # (modules_to_save) is the same for the stock base, so it is copied over.
        trained = load_file(str(self.folder / ADAPTER / "adapter_model.safetensors"))
        converted_file = stock / "adapter_model.safetensors"
        converted = load_file(str(converted_file))
        converted |= {k: v for k, v in trained.items() if "lora_" not in k}
        save_file(converted, str(converted_file), metadata={"format": "pt"})
        shutil.rmtree(self.folder / INITIAL)


# A causal LM's probe logits are batch x tokens x vocabulary (hundreds of MB for an 8B
# model): beyond this many values an evenly strided subsample of them is kept.
PROBE_VALUES = 2**18


def _probe_outputs(outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = outputs.detach().cpu().float().reshape(-1)
    stride = max(1, -(-flat.numel() // PROBE_VALUES))
    return {"output": flat[::stride].contiguous(), "output_stride": torch.tensor([stride])}


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_FILE).read_text())


def load_saved_adapter(base_model: nn.Module, folder: str | Path) -> nn.Module:
    """A saved adapter applied to a freshly loaded *stock* base model (for W0-moving peft
    methods, the converted `stock_lora/`)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta["format"] == FORMAT_PEFT:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, folder / meta.get("stock_lora", ADAPTER))
    if meta["format"] == FORMAT_PLUGIN:
        if meta["moved_base_tensors"]:
            raise ValueError(f"{folder}: this plug-in adapter applies only to the moved base")
        model = get_method(meta["method"]).load_adapter(base_model, folder / ADAPTER)
        head_file = folder / ADAPTER / HEAD_FILE
        if head_file.is_file():
            missing = model.load_state_dict(load_file(str(head_file)), strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"head tensors not in the model: {missing.unexpected_keys}")
        return model
    raise ValueError(f"{folder} holds a full model: load it with transformers' from_pretrained")


def saved_probe(folder: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """The probe batch's inputs, the trained model's outputs on it (flattened, every
    `stride`-th value) and that stride."""
    tensors = load_file(str(Path(folder) / PROBE_FILE))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    return inputs, tensors["output"], int(tensors["output_stride"][0])


@torch.no_grad()
def check_saved_adapter(model: nn.Module, folder: str | Path) -> float:
    """Max |outputs - the trained run's outputs| of `model` on the saved probe batch."""
    from harness.training.sanity import outputs

    inputs, expected, stride = saved_probe(folder)
    device = next(model.parameters()).device
    got = outputs(model, {k: v.to(device) for k, v in inputs.items()})
    return float((got.cpu().reshape(-1)[::stride] - expected).abs().max())


def prune_to_chosen(runs, board) -> int:
    """`save_adapters: chosen`: delete the saved adapters of every LR the leaderboard did
    not choose for its (method, task); returns how many were deleted."""
    if "adapter_path" not in runs.columns or board.empty:
        return 0
    chosen = {
        (r.method, r.task): float(r.chosen_lr)
        for r in board.itertuples()
        if r.chosen_lr == r.chosen_lr  # not NaN: no eligible LR keeps nothing
    }
    deleted = 0
    for run in runs[runs["adapter_path"].notna()].itertuples():
        lr = chosen.get((run.method, run.task))
        folder = Path(run.adapter_path)
        if (lr is None or not _same_lr(float(run.lr), lr)) and folder.is_dir():
            shutil.rmtree(folder)
            deleted += 1
    return deleted


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b))
