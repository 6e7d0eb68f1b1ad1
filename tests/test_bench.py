"""harness bench --all, MFU and the LLM-width comparison: structure and arithmetic, no timing
thresholds (timings on a shared machine are not a test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from harness.bench.mfu import (
    achieved_flops_per_s,
    known_gpu_peak,
    matmul_peak_flops_per_s,
    mfu,
    train_step_flops,
)
from harness.bench.suite import (
    TINY_RANDOM,
    Settings,
    find_bench_json,
    load_bench_model,
    markdown,
    non_embedding_params,
    run_suite,
    targets,
)
from harness.bench.width import WidthSettings, comparison_row, llama_config, predicted
from harness.reporting.report import write_report

COMMITTED_BOARD = (
    Path(__file__).resolve().parents[1] / "results/glue-minilm-main/leaderboard.parquet"
)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> dict:
    """`harness bench --all` on a tiny random BERT, 1 round, in this process (quick)."""
    settings = Settings(
        model=TINY_RANDOM, init_batches=2, warm_steps=1, timed_steps=1, bare_steps=1,
        peak_matmul_size=128,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("bench_root") / "bench"
    return run_suite(settings, 1, out_root=root, progress=lambda _: None, isolate=False)


def test_all_table_has_every_method_and_the_four_targets(tiny_bench):
    payload = tiny_bench

    names = methods.method_names()
    assert list(payload["methods"]) == names
    failed = {m: r["error"] for m, r in payload["methods"].items() if "error" in r}
    assert not failed
    assert payload["methods"]["lora"]["x_lora"]["step_s"] == pytest.approx(1.0)
    # The data-informed inits all read the same batches; LoRA and full FT none.
    for name in ("lora_ga", "lora_one", "lora_sb", "cg_lora", "lora", "full_ft"):
        wanted = 2 if methods.get_method(name).needs_init_batches else 0
        assert payload["methods"][name]["init_batches"] == wanted, name
    everything = sum(p.numel() for p in load_bench_model(TINY_RANDOM).model.parameters())
    assert payload["methods"]["full_ft"]["trainable_params"] == everything

    assert len(payload["targets"]) == 4
    for t in payload["targets"]:  # met follows from measured and bound
        for part in t["parts"]:
            value, bound = part["measured"], part["bound"]
            if value is None:
                # Measured in one process (isolate=False), an init need not raise the
                # process's peak RSS, so its memory ratio is not measured: the target must
                # then say so (None), never claim met.
                assert not payload["isolated"] and "memory" in part["what"], part
                assert part["met"] is None
                continue
            assert part["met"] == (value <= bound if part["op"] == "<=" else value < bound)
        parts = [p["met"] for p in t["parts"]]
        assert t["met"] == (None if None in parts else all(parts))

    table = markdown(payload)
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()]
    assert all(name in rows for name in names)
    for text in ("SDS-LoRA", "LoRA-SB", "CG-LoRA", "bare peft"):
        assert sum(text in line for line in table.splitlines() if "<" in line) >= 1, text
    json_path, md_path = map(str, payload["written"])
    assert json.loads(open(json_path).read())["kind"] == "harness-bench-all"
    assert open(md_path).read() == table


def test_targets_met_only_when_every_part_is():
    summary = {  # CPU-clock ratios decide on CPU; the wall ones must not
        "sds_lora": {"x_lora": {"step_cpu_s": 1.04, "step_s": 9.0, "step_held_mib": 1.02}},
        "lora_sb": {"init_epoch_fraction": 0.013},
        "lora_ga": {"init_cpu_s": {"median": 10.0}, "init_s": {"median": 1.0},
                    "init_extra_mib": {"median": 100.0}},
        "cg_lora": {"init_cpu_s": {"median": 5.0}, "init_s": {"median": 9.0},
                    "init_extra_mib": {"median": 30.0}},
    }  # fmt: skip
    sds, sb, cg, harness = targets(summary, None, "cpu")
    assert [p["met"] for p in sds["parts"]] == [True, False] and sds["met"] is False
    assert sb["met"] is True
    assert [p["measured"] for p in cg["parts"]] == [0.5, 0.3] and cg["met"] is True
    assert harness["parts"][0]["measured"] is None and harness["met"] is None
    assert targets(summary, 1.0, "wall")[2]["parts"][0]["measured"] == 9.0


def test_mfu_against_a_hand_count():
    # 1,000 params x 50 tokens: forward 2 x 1000 x 50 = 100,000 FLOPs, backward 200,000.
    assert train_step_flops(1000, 50) == 300_000
    assert achieved_flops_per_s(1000, 50, 2.0) == 150_000
    assert mfu(1000, 50, 2.0, 300_000) == pytest.approx(0.5)
    # Embedding tables are lookups: only the Linear's 4 x 3 + 3 count.
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    assert non_embedding_params(model) == 15
    assert known_gpu_peak("NVIDIA H200") == 989e12
    assert known_gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert known_gpu_peak("NVIDIA H100 PCIe") == 756e12  # the longer name wins over "H100"
    assert known_gpu_peak("some CPU") is None
    peak = matmul_peak_flops_per_s(torch.float32, "cpu", size=64, repeats=2, calls=2)
    assert 1e6 < peak < 1e15


def test_memory_estimate_comparison_row_math():
    row = comparison_row(
        {"measured_total_bytes": 300, "measured_extra_bytes": 50},
        {"predicted_total_bytes": 200, "predicted_extra_bytes": 100},
    )
    assert row["total_ratio"] == pytest.approx(1.5) and row["extra_ratio"] == pytest.approx(0.5)

    # The prediction for the bench's shapes, by hand: fp32 model 4 P + one init micro-batch's
    # activations (no checkpointing) + fp32 accumulators 4 sum(m n) over the 7 projections.
    s = WidthSettings(hidden=256)
    h, inter, vocab, layers, b, t = 256, 512, s.vocab, 2, s.micro_batch, s.seq_len
    per_layer_weights = 4 * h * h + 3 * h * inter
    params = 2 * vocab * h + layers * (per_layer_weights + 2 * h) + h
    activations = layers * t * b * 34 * h * 4 // 2 + t * b * vocab * (4 + 8)
    got = predicted("lora_ga", s)
    assert got["predicted_statistics_bytes"] == 4 * layers * per_layer_weights
    assert got["predicted_total_bytes"] == 4 * params + activations + 4 * layers * (
        per_layer_weights
    )
    assert got["predicted_extra_bytes"] == got["predicted_total_bytes"] - 4 * params
    assert llama_config(s).num_attention_heads == 2


def test_report_shows_the_bench_table_found_beside_the_output_dir(tiny_bench, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    shutil.copy(COMMITTED_BOARD, out / "leaderboard.parquet")
    assert find_bench_json(out) is None
    bench_json = Path(tiny_bench["written"][0])
    shutil.copytree(bench_json.parents[1], tmp_path / "bench")  # results/bench/<machine>/
    assert find_bench_json(out) == tmp_path / "bench" / bench_json.parent.name / bench_json.name
    _, md_path = write_report(out)
    md = md_path.read_text()
    section = md[md.index("## Cost benchmark") :]
    for name in methods.method_names():
        assert f"| {name} |" in section, name
    target_rows = [line for line in section.splitlines() if "| &lt;" in line]  # the bounds
    assert len(target_rows) == 6  # SDS-LoRA 2 parts, LoRA-SB 1, CG-LoRA 2, harness 1
    assert all(row.endswith(("| met |", "| not met |", "| not measured |")) for row in target_rows)


def test_benches_that_read_the_mirror_directly_refuse_to_guess_its_path(monkeypatch):
    """No hard-coded ../shared/data: without HARNESS_DATA_DIR they stop with one message."""
    from harness.bench import trainer_compare, width

    monkeypatch.setattr(trainer_compare, "DATA_DIR", None)
    with pytest.raises(SystemExit, match="HARNESS_DATA_DIR"):
        trainer_compare.main([])
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    with pytest.raises(SystemExit, match="HARNESS_DATA_DIR"):
        width.text_batches(WidthSettings())
