"""Adapters as artifacts (harness/training/adapters.py): each saved adapter, loaded with plain peft
(or the plug-in loader) onto a freshly loaded stock base model, computes what the trained
model computed on the probe batch; W0-moving methods through peft's stock conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from harness.reporting.results import normalise_runs, read_runs
from harness.spec import identity
from harness.spec.config import Budget, EvalConfig
from harness.spec.identity import TrialSpec
from harness.training import adapters
from harness.training.trial import load_data_and_model, run_trial
from tests.conftest import MINILM

ATOL = 1e-5  # float32


def _spec(method: str, data_dir: str, overrides: dict | None = None) -> TrialSpec:
    spec = TrialSpec(
        sweep="adapters", method=method, method_overrides=overrides or {}, task="glue/sst2",
        lr=5e-3,
        seed=0, model_id=MINILM, model_revision=None,
        budget=Budget(max_steps=2, batch_size=8, max_length=24, train_rows=16,
                      selection_rows=8, test_rows=8),
        eval=EvalConfig(batch_size=16), data_dir=data_dir, model_dir=None,
    )  # fmt: skip
    return identity.resolve([spec])[0]


def _fresh_base(spec: TrialSpec) -> torch.nn.Module:
    """The stock base model with its task head, loaded anew (another seed: the saved
    adapter must bring the trained head along)."""
    torch.manual_seed(12345)
    _, _, pipeline = load_data_and_model(spec, {}, torch.device("cpu"))
    return pipeline.model


def _trained(
    method: str, mirror_dir: str, root: Path, overrides: dict | None = None
) -> tuple[TrialSpec, Path, dict]:
    spec = _spec(method, mirror_dir, overrides)
    row = run_trial(spec, adapters_dir=str(root))
    assert row["status"] == "ok", row.get("error")
    folder = Path(row["adapter_path"])
    assert folder == root / spec.key()
    assert row["adapter_bytes"] == adapters.folder_bytes(folder / adapters.ADAPTER) > 0
    return spec, folder, row


def test_lora_adapter_loads_with_plain_peft_and_matches(tmp_path: Path, mirror_dir: str):
    from peft import PeftModel

    spec, folder, _ = _trained("lora", mirror_dir, tmp_path)
    meta = adapters.read_meta(folder)
    assert meta["format"] == "peft" and meta["moved_base_tensors"] == 0
    assert not (folder / adapters.STOCK_LORA).exists()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    base = _fresh_base(spec)
    untrained = adapters.check_saved_adapter(base, folder)
    loaded = PeftModel.from_pretrained(base, folder / "adapter")
    assert adapters.check_saved_adapter(loaded, folder) < ATOL < untrained


def _stock_conversion(folder: Path) -> dict:
    meta = adapters.read_meta(folder)
    assert meta["moved_base_tensors"] > 0 and meta["stock_lora"] == adapters.STOCK_LORA
    assert not (folder / adapters.INITIAL).exists()  # used for the conversion, then removed
    raw = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    stock = json.loads((folder / "stock_lora" / "adapter_config.json").read_text())
    # A plain LoRA (no init of its own on load) of rank 2r: [B | -B0] [A ; A0].
    assert stock["r"] == 2 * raw["r"] and stock["init_lora_weights"] is True
    return raw


def test_pissa_moves_w0_and_its_stock_conversion_matches(tmp_path: Path, mirror_dir: str):
    from peft import PeftModel

    spec, folder, _ = _trained("pissa", mirror_dir, tmp_path)
    # (peft re-runs PiSSA's exact SVD when loading the raw adapter; the conversion does not
    # depend on that.)
    assert _stock_conversion(folder)["init_lora_weights"] == "pissa"
    stock = PeftModel.from_pretrained(_fresh_base(spec), folder / "stock_lora")
    assert adapters.check_saved_adapter(stock, folder) < ATOL


def test_lora_ga_needs_the_stock_conversion_and_it_matches(tmp_path: Path, mirror_dir: str):
    from peft import PeftModel

    spec, folder, _ = _trained("lora_ga", mirror_dir, tmp_path, {"init_batches": 1})
    _stock_conversion(folder)
    # The raw adapter assumes LoRA-GA's shifted W0: on the stock base it computes otherwise.
    raw = PeftModel.from_pretrained(_fresh_base(spec), folder / "adapter")
    assert adapters.check_saved_adapter(raw, folder) > 1e-3
    stock = adapters.load_saved_adapter(_fresh_base(spec), folder)  # picks stock_lora/
    assert adapters.check_saved_adapter(stock, folder) < ATOL


def test_plugin_adapter_loads_with_its_loader_and_matches(tmp_path: Path, mirror_dir: str):
    spec, folder, _ = _trained("lora_xs", mirror_dir, tmp_path)
    meta = adapters.read_meta(folder)
    assert meta["format"] == "plug-in" and meta["plugin_module"] == "methods.lora_xs"
    assert meta["moved_base_tensors"] == 0
    assert (folder / "adapter" / adapters.HEAD_FILE).is_file()
    model = adapters.load_saved_adapter(_fresh_base(spec), folder)
    assert adapters.check_saved_adapter(model, folder) < ATOL


def _run_rows(tmp_path: Path, lrs: list[float]) -> list[dict]:
    rows = []
    for lr in lrs:
        folder = tmp_path / "adapters" / f"k{lr}"
        (folder / "adapter").mkdir(parents=True)
        rows.append({
            "key": f"k{lr}", "setting_key": "s", "method": "lora", "task": "glue/sst2", "lr": lr,
            "seed": 0, "status": "ok", "selection_score": lr * 100, "test_score": 0.5,
            "test_metrics": json.dumps({"accuracy": 0.5}), "majority_baseline": 0.5,
            "trainable_params": 1, "init_time_s": 0.0, "train_time_s": 1.0,
            "peak_memory_mb": 1.0, "samples_per_s": 1.0, "adapter_path": str(folder),
            "adapter_bytes": 10,
        })  # fmt: skip
    return rows


def test_chosen_keeps_only_the_chosen_lrs_adapters(tmp_path: Path):
    from harness.reporting.results import build_leaderboard

    runs = normalise_runs(_run_rows(tmp_path, [1e-3, 2e-3, 4e-3]))
    board = build_leaderboard(runs, compare=False)
    assert board.loc[0, "chosen_lr"] == 4e-3
    assert adapters.prune_to_chosen(runs, board) == 2
    left = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert left == ["k0.004"]


def test_rows_without_adapter_columns_still_load(tmp_path: Path):
    old = normalise_runs(_run_rows(tmp_path, [1e-3]))
    old = old.drop(columns=["adapter_path", "adapter_bytes"])
    old.to_parquet(tmp_path / "runs.parquet")
    runs = read_runs(tmp_path)
    assert runs["adapter_bytes"].isna().all() and str(runs["adapter_bytes"].dtype) == "Int64"
    assert pd.isna(runs.loc[0, "adapter_path"])


# A distributed trial's adapter (gathered under ZeRO-3, loaded by plain peft) is tested
# with the sweep path in tests/test_distributed.py.
