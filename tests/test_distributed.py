"""Issue #6: DeepSpeed configs, the large-model presets on the meta device, 2-worker ZeRO-3
trials through Ray Train over gloo, and the cluster storage rule."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from harness.deepspeed.config import render
from harness.deepspeed.launch import derived_max_concurrent
from harness.deepspeed.storage import check_storage, is_shared_storage
from harness.spec import identity
from harness.spec.config import ConfigError, DistributedConfig, load_config, validate_config
from harness.spec.identity import KEY_VERSION, expand
from harness.sweeps.memory_estimate import estimate, meta_model
from harness.training.batching import BatchError, BatchPlan, batch_plan
from tests.builders import sweep_config, two_rank_sweep_file
from tests.conftest import REPO, with_identity

# ---------------------------------------------------------------- (a) DeepSpeed configs


@pytest.mark.parametrize(
    ("global_batch", "world", "micro", "plan"),
    [
        (32, 8, None, BatchPlan(32, 8, 4, 1)),
        (32, 8, 2, BatchPlan(32, 8, 2, 2)),
        (32, 4, 1, BatchPlan(32, 4, 1, 8)),
        (32, 1, 4, BatchPlan(32, 1, 4, 8)),
        (8, 2, 2, BatchPlan(8, 2, 2, 2)),
    ],
)
def test_micro_batch_and_accumulation_from_global_batch_and_world(global_batch, world, micro, plan):
    got = batch_plan(global_batch, world, micro)
    assert got == plan
    assert got.micro_batch * got.accumulation * got.world_size == global_batch


@pytest.mark.parametrize(
    ("global_batch", "world", "micro", "message"),
    [
        (32, 3, None, "does not divide over 3 ranks"),
        (30, 4, None, "does not divide over 4 ranks"),
        (32, 8, 3, "no integer accumulation"),
        (32, 2, 5, "use a micro-batch that divides 16"),
    ],
)
def test_indivisible_batches_are_errors(global_batch, world, micro, message):
    with pytest.raises(BatchError, match=message):
        batch_plan(global_batch, world, micro)


def test_zero3_config_fields():
    dist = DistributedConfig(gpus_per_trial=8, zero_stage=3, micro_batch_size=2,
                             offload_optimizer=True, offload_params=True)  # fmt: skip
    ds = render(dist, global_batch=32, max_grad_norm=1.0)
    json.dumps(ds)  # plain JSON
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8 == 32
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}  # GPU
    assert ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the method's torch optimizer is kept


def test_zero2_config_and_fp32_on_cpu():
    dist = DistributedConfig(workers=2, zero_stage=2)
    ds = render(dist, global_batch=8, max_grad_norm=None)
    assert not dist.use_gpu and ds["bf16"] == {"enabled": False}  # CPU: fp32
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_scatter"] is True
    assert not any(k.startswith("stage3_") for k in zero) and "offload_param" not in zero
    forced = render(DistributedConfig(workers=2, precision="bf16"), global_batch=8,
                    max_grad_norm=1.0)  # fmt: skip
    assert forced["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"distributed": {"workers": 4}, "budget": {"max_steps": 2, "batch_size": 30}},
         "does not divide over 4 ranks"),
        ({"distributed": {"workers": 2, "micro_batch_size": 3}}, "no integer accumulation"),
        ({"distributed": {"gpus_per_trial": 8, "zero_stage": 2, "offload_params": True}},
         "offload_params needs zero_stage 3"),
        ({"distributed": {"workers": 4, "gpus_per_trial": 8}}, "disagree"),
        ({"resources": {"gpus_per_trial": 0.5}}, "allowed only with `smoke: true`"),
        ({"distributed": {"workers": 2},
          "budget": {"max_steps": 2, "batch_size": 8, "train_rows": 4}},
         "smaller than one global batch"),
    ],
)  # fmt: skip
def test_distributed_section_is_validated_before_ray_starts(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(sweep_config(**changes))


def test_valid_distributed_and_smoke_configs():
    # LoRA-One's preconditioned optimizers run under ZeRO (tests/test_zero_gradients.py).
    precond = {"lora_one": {"lrs": [1e-3], "overrides": {"optimizer": "precond_sgd"}}}
    assert validate_config(sweep_config(distributed={"workers": 2}, methods=precond))
    cfg = validate_config(sweep_config(distributed={"workers": 2, "micro_batch_size": 2}))
    (spec,) = expand(cfg)
    assert spec.distributed.world_size == 2 and spec.distributed.enabled
    smoke = validate_config(sweep_config(resources={"gpus_per_trial": 0.25, "smoke": True}))
    assert expand(smoke)[0].smoke
    # A distributed section on one GPU keeps the single-device path.
    single = validate_config(
        sweep_config(distributed={"gpus_per_trial": 1}, resources={"gpus_per_trial": 1})
    )
    assert expand(single)[0].distributed is None
    with pytest.raises(ConfigError, match="takes the single-device path"):
        validate_config(sweep_config(distributed={"gpus_per_trial": 1}))  # no GPU reserved


@pytest.mark.parametrize(
    "name",
    [
        "glue-minilm-long", "glue-minilm-main", "glue-minilm-seed-methods",
        "glue-minilm-seed-methods-cls",
        "glue-minilm-seed-methods-pilot", "glue-minilm-seed-methods-pilot-cg-scale-none",
        "glue-minilm-study-pilot-mean", "glue-minilm-study-pilot-cls",
        "glue-minilm-study-pilot-cola-long", "glue-minilm-study",
    ],
)
def test_committed_results_keep_their_keys(mirror_dir, name):
    """The committed runs were re-keyed to the current key version (the long sweep's from
    version 1, through 2): their config still expands to exactly those keys, so resuming or
    extending them runs nothing twice. The long sweep's rows keep their first (version-1)
    key; LoRA-GA's spec now pins its old behaviour through the `legacy` preset, so only the
    other methods' specs still hash to it."""
    runs = pd.read_parquet(REPO / "results" / name / "runs.parquet")
    config = name.replace("-", "_") + ".yaml"
    cfg = load_config(REPO / "harness" / "configs" / config, {"data_dir": mirror_dir})
    specs = identity.resolve(expand(cfg))
    assert {s.key() for s in specs} == set(runs["key"])
    assert set(runs["key_version"]) == {KEY_VERSION}
    assert {s.setting_key() for s in specs} == set(runs["setting_key"])
    # Rows record the budget as they did (options added later only when set).
    assert {identity.recorded_budget(s.budget) for s in specs} == set(runs["budget"])
    if name == "glue-minilm-long":
        unchanged = [s for s in specs if s.method != "lora_ga"]
        recorded = set(runs.loc[runs["method"] != "lora_ga", "legacy_key"])
        assert {s.legacy_key() for s in unchanged} == recorded


def test_distributed_settings_that_change_numbers_enter_the_key_and_others_do_not():
    def key(**dist):
        cfg = validate_config(sweep_config(distributed={"workers": 2, **dist}))
        return with_identity(expand(cfg))[0].key()

    plain = with_identity(expand(validate_config(sweep_config())))[0].key()
    base = key()
    assert base != plain
    assert key(zero_stage=2) != base and key(micro_batch_size=2) != base
    assert key(cpus_per_worker=4, max_failures=3, checkpoint_every_steps=10) == base
    assert (
        with_identity(
            expand(validate_config(sweep_config(resources={"gpus_per_trial": 0.5, "smoke": True})))
        )[0].key()
        != plain
    )  # smoke rows never stand in for real ones


# ---------------------------------------------------------------- (b) presets on the meta device

# Published config.json dimensions (hub ids below), written out here because the hub is not
# reachable from CI, and the models' known parameter totals.
ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 8_030_261_248),
    "google/gemma-2b": ("GemmaConfig", dict(
        hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, vocab_size=256000, tie_word_embeddings=True),
        2_506_172_416),
    "mistralai/Mistral-7B-v0.1": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False), 7_241_732_096),
    "google/gemma-2-9b": ("Gemma2Config", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True),
        9_241_705_984),
}  # fmt: skip


def _config(model_id: str):
    import transformers

    cls, dims, _ = ARCHITECTURES[model_id]
    return getattr(transformers, cls)(**dims)


@pytest.mark.parametrize("model_id", list(ARCHITECTURES))
def test_architecture_cards_build_on_meta_with_the_published_parameter_counts(model_id):
    from harness.spec.presets import KNOWN_PARAMS, architecture_config

    expected = ARCHITECTURES[model_id][2]
    for config in (_config(model_id), architecture_config(model_id)):
        model = meta_model(config)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == expected == KNOWN_PARAMS[model_id]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """config.json-only folders (no weights) for every preset model."""
    from harness.spec.presets import ARCHITECTURES as CARDS
    from harness.spec.presets import write_config_folder

    folder = tmp_path_factory.mktemp("models")
    for model_id in CARDS:
        write_config_folder(model_id, folder)
    return folder


@pytest.mark.parametrize(
    ("preset", "world", "stage", "lrs"),
    [
        ("llama3-8b-sds", 8, 3, {"full_ft": 1e-5, "lora": 1e-4, "rslora": 1e-4}),
        ("gemma-2b-sds", 4, 2, {"full_ft": 2e-5, "lora": 2e-4, "dora": 2e-4}),
        ("mistral-7b-lorasb", 8, 3, {"lora_sb": 1e-4}),
        ("gemma2-9b-lorasb", 8, 3, {"lora_sb": 1e-4}),
    ],
)
def test_presets_validate_offline_and_render(preset, world, stage, lrs, model_dir):
    pytest.importorskip("deepspeed")  # validation checks the distributed path can run
    from harness.spec.presets import load_preset

    cfg = load_preset(preset, {"model_dir": str(model_dir)})  # meta-device structure checks
    assert cfg.budget.schedule == "cosine" and cfg.budget.epochs == 1
    assert cfg.budget.batch_size == 32 and cfg.budget.weight_decay == 0.0
    for method, lr in lrs.items():
        assert cfg.methods[method].lrs == [lr]
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"}
    for name, sweep in cfg.methods.items():
        if name != "full_ft":
            assert set(sweep.overrides["target_modules"]) == targets
    specs = expand(cfg)
    assert len(specs) == len(cfg.methods) * len(cfg.seeds) and len(cfg.seeds) == 3
    for spec in specs:
        assert spec.distributed.world_size == world and spec.distributed.zero_stage == stage
        ds = render(spec.distributed, global_batch=spec.budget.batch_size, max_grad_norm=1.0)
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == 32 // world
        assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 32


def test_sds_presets_scaling_follows_the_paper(model_dir):
    import math

    from harness.spec.presets import preset_path

    raw = yaml.safe_load(preset_path("llama3-8b-sds").read_text())
    methods = raw["methods"]
    assert methods["lora"]["overrides"]["alpha"] / 32 == 2  # LoRA: s = 2
    assert methods["rslora"]["overrides"]["alpha"] == 4  # rsLoRA: s = 4 / sqrt(r)
    for name in ("lora_plus", "pissa", "dora"):  # s = alpha / r must equal 4 / sqrt(r)
        assert methods[name]["overrides"]["alpha"] / 32 == pytest.approx(4 / math.sqrt(32))
    assert methods["lora_plus"]["overrides"]["loraplus_lr_ratio"] == 4


LLAMA = "meta-llama/Meta-Llama-3-8B"


@pytest.mark.parametrize(("method", "overrides"), [("lora", {"rank": 32}), ("full_ft", {})])
def test_per_rank_memory_decreases_with_world_size_under_zero3(method, overrides):
    config = _config(LLAMA)
    model = meta_model(config)
    totals = [
        estimate(config, method, overrides, zero_stage=3, world_size=n, micro_batch=4,
                 seq_len=512, model=model).total_bytes
        for n in (1, 2, 4, 8, 16)
    ]  # fmt: skip
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False))
    # ZeRO-2 keeps a full bf16 replica of the parameters on every rank.
    z2 = [estimate(config, method, overrides, zero_stage=2, world_size=n, model=model)
          for n in (1, 8)]  # fmt: skip
    assert z2[0].param_bytes == z2[1].param_bytes == 2 * 8_030_261_248


def test_memory_estimate_matches_a_hand_computation():
    """LLaMA3-8B, LoRA r = 32 on q,k,v,o,gate,up,down, ZeRO-3 over 8 ranks, bf16, micro-batch
    4 x 512 tokens, gradient checkpointing (formula: harness/sweeps/memory_estimate.py)."""
    est = estimate(
        _config(LLAMA), "lora", {"rank": 32}, zero_stage=3, world_size=8, dtype="bf16",
        micro_batch=4, seq_len=512, gradient_checkpointing=True,
    )  # fmt: skip
    P, N = 8_030_261_248, 8
    # r(m + n) per projection: q, o 4096->4096; k, v 4096->1024; gate, up 4096->14336; down back.
    per_block = 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    T = 32 * per_block
    assert est.total_params == P and est.trainable_params == T == 83_886_080
    assert est.param_bytes == 2 * P // N == 2_007_565_312
    assert est.grad_bytes == 2 * T // N == 20_971_520
    assert est.optimizer_bytes == 12 * T // N == 125_829_120  # fp32 master + Adam m, v
    assert est.zero3_working_bytes == 2 * 2 * 128256 * 4096  # embedding (= untied LM head)
    s, b, h, L, V = 512, 4, 4096, 32, 128256
    acts = L * 2 * s * b * h + s * b * 34 * h + s * b * V * (2 + 8)
    assert est.activation_bytes == acts == 3_448_766_464
    assert est.total_bytes == 7_704_478_720  # 7.18 GiB per rank
    assert est.init_peak_bytes == 4 * P  # prepared on the full fp32 model before partitioning


def test_init_memory_follows_the_load_dtype_and_statistics_offload():
    """LoRA-GA on LLaMA3-8B: loading bf16 halves the model held at init; offloading the
    gradient accumulators (4 sum(m n)) moves them to host memory."""
    config, P = _config(LLAMA), 8_030_261_248
    kw = {"zero_stage": 3, "world_size": 8, "micro_batch": 1, "seq_len": 512}
    fp32 = estimate(config, "lora_ga", {"rank": 32}, **kw)
    bf16 = estimate(config, "lora_ga", {"rank": 32}, load_dtype="bf16", **kw)
    off = estimate(
        config, "lora_ga", {"rank": 32}, load_dtype="bf16", offload_init_statistics=True, **kw
    )
    from harness.sweeps.memory_estimate import activation_bytes

    accumulators = 4 * fp32.target_weight_params
    acts = {e: activation_bytes(config, 1, 512, e, True) for e in (2, 4)}
    assert fp32.init_peak_bytes == 4 * P + accumulators + acts[4]
    assert bf16.init_peak_bytes == 2 * P + accumulators + acts[2]
    assert off.init_peak_bytes == 2 * P + acts[2] and off.init_host_bytes == accumulators
    assert fp32.init_host_bytes == 0
    # CG-LoRA's init passes run without checkpointing: a full micro-batch of activations.
    # It holds no m x n accumulator, only the pooled K-FAC rows of its N = 256 init examples
    # (micro-batch 1, 1 Hutchinson sample): X (N, n) and Gs (N, m) per layer, as Grams once
    # N >= the dimension. LLaMA3-8B's 7 projections per layer, 32 layers:
    cg = estimate(config, "cg_lora", {"rank": 32}, load_dtype="bf16", **kw)
    h, kv, ff = 4096, 1024, 14336
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)]  # (out, in)
    rows = sum(min(256, n) * n + min(256, m) * m for m, n in shapes)
    assert cg.init_statistics_bytes == 32 * 4 * rows
    assert cg.init_peak_bytes == 2 * P + 32 * 4 * rows + activation_bytes(config, 1, 512, 2, False)
    assert cg.init_statistics_bytes < accumulators / 10  # the paper's memory claim, in the model


def test_load_dtype_follows_training_precision_unless_set():
    from harness.deepspeed.config import resolve_load_dtype

    assert resolve_load_dtype(DistributedConfig(workers=2), on_gpu=True) == "bf16"
    assert resolve_load_dtype(DistributedConfig(workers=2), on_gpu=False) == "fp32"
    assert resolve_load_dtype(DistributedConfig(workers=2, precision="fp32"), True) == "fp32"
    assert resolve_load_dtype(DistributedConfig(workers=2, load_dtype="fp32"), True) == "fp32"
    offload = DistributedConfig(workers=2, zero_stage=3, offload_params=True)
    assert offload.offloads_init_statistics and not DistributedConfig().offloads_init_statistics
    assert not DistributedConfig(
        offload_optimizer=True, offload_init_statistics=False
    ).offloads_init_statistics


# ---------------------------------------------------------------- (c) 2 workers, ZeRO-3, gloo


@pytest.mark.slow
def test_a_two_worker_zero3_sweep_trains_saves_its_adapter_and_reports_live(
    tmp_path, mirror_dir, capsys, monkeypatch
):
    """The sweep path of a distributed trial end to end: Tune driver -> TorchTrainer on 2
    gloo workers under ZeRO-3 -> row, adapter saved from the gathered trainable parameters
    (loadable by plain peft), rank 0's live reports in MLflow, a rerun runs nothing. The
    other methods' rank-side mechanics: tests/test_distributed_methods.py."""
    pytest.importorskip("deepspeed")
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from harness.cli import main
    from harness.sweeps import tracking
    from harness.training import adapters

    config = two_rank_sweep_file(tmp_path, mirror_dir, {"lora": {"lrs": [1e-2], "overrides": {
        "rank": 4, "alpha": 8}}})  # fmt: skip
    raw = yaml.safe_load(config.read_text())
    raw["save_adapters"] = "all"
    raw["tracking"] = {"report_every": 5}  # the default logger: an MLflow file store
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["sweep", str(config)]) == 0
    assert "1 trials to run" in capsys.readouterr().out
    row = pd.read_parquet(out / "runs.parquet").iloc[0]
    assert row["status"] == "ok", (row["error"], row["traceback"])
    dist = json.loads(row["distributed"])
    assert dist["world_size"] == 2 and dist["zero_stage"] == 3 and dist["precision"] == "fp32"
    assert dist["micro_batch"] == 2 and dist["accumulation"] == 2
    assert dist["grad_clipping"] == "deepspeed"
    # Both ranks hold bit-identical adapters after the (seeded Kaiming A) init.
    assert len(dist["init_digests"]) == 2 and len(set(dist["init_digests"])) == 1
    curve = json.loads(row["loss_curve"])
    losses = [loss for _, loss in curve]
    assert len(losses) == 10 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses  # the loss decreases
    assert row["steps"] == 10 and row["trainable_params"] == row["expected_trainable_params"]
    assert row["sanity_init"].startswith("identity")
    assert row["sanity_merge"].startswith("merged == unmerged")  # gathered under ZeRO-3
    assert row["peak_memory_kind"].endswith("(max over 2 ranks)")
    # Evaluation was sharded over the 2 ranks and gathered: every test item is there.
    assert dist["eval_sharded_over"] == 2
    assert len(json.loads(row["test_items"])["test/validation"]["pred"]) == 16

    # The adapter: the gathered trainable parameters only, copied beside the runs.
    folder = out / "adapters" / row["key"]
    assert Path(row["adapter_path"]) == folder
    assert row["adapter_bytes"] == adapters.folder_bytes(folder / "adapter") > 0
    meta = adapters.read_meta(folder)
    assert meta["format"] == "peft" and meta["key"] == row["key"]
    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert any("classifier" in k for k in keys)
    assert not any(k.endswith("query.weight") or "base_layer" in k for k in keys)  # no base
    base = AutoModelForSequenceClassification.from_pretrained(meta["model_id"], num_labels=2)
    head_before = base.classifier.weight.detach().clone()
    loaded = PeftModel.from_pretrained(base, folder / "adapter")
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    trained_head = loaded.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(trained_head, head_before)  # the trained head came with it

    # Rank 0's live reports reached Tune (Ray's TuneReportCallback) and the MLflow logger.
    monkeypatch.setenv(tracking.MLFLOW_FILE_STORE_ENV, "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dist").experiment_id])
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [5, 10]
    assert [m.value for m in loss] == pytest.approx([curve[4][1], curve[9][1]])

    # The same command again runs nothing.
    assert main(["sweep", str(config)]) == 0
    assert "0 trials to run (1 already done)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_worker_group_restarts_from_its_deepspeed_checkpoint(
    tmp_path, mirror_dir, monkeypatch
):
    pytest.importorskip("deepspeed")
    from harness.cli import main
    from harness.deepspeed.checkpoint import FAIL_ONCE_ENV

    monkeypatch.setenv(FAIL_ONCE_ENV, "6")  # both workers raise at step 6, once
    methods = {"lora": {"lrs": [1e-2], "overrides": {"rank": 4, "alpha": 8}}}
    config = two_rank_sweep_file(
        tmp_path, mirror_dir, methods, checkpoint_every_steps=4, max_failures=1
    )
    assert main(["sweep", str(config)]) == 0
    row = pd.read_parquet(tmp_path / "out" / "runs.parquet").iloc[0]
    assert row["status"] == "ok", row["error"]
    dist = json.loads(row["distributed"])
    assert dist["restored_from_step"] == 4  # the Train run restarted from its checkpoint
    assert [step for step, _ in json.loads(row["loss_curve"])] == list(range(1, 11))


# ---------------------------------------------------------------- (d) storage on a cluster


@pytest.mark.parametrize("path", ["s3://bucket/runs", "gs://bucket/runs", "abfss://c@a/x"])
def test_cloud_storage_is_shared(path):
    assert is_shared_storage(path)
    check_storage(path, alive_nodes=4)


def test_local_disk_is_refused_on_a_multi_node_cluster_only(tmp_path):
    local = str(tmp_path / "ray")
    assert not is_shared_storage(local)
    check_storage(local, alive_nodes=1)  # one machine: fine
    with pytest.raises(ConfigError, match="has 3 nodes but the storage path .* is on local disk"):
        check_storage(local, alive_nodes=3)
    check_storage(local, alive_nodes=3, declared_shared=True)  # vouched for by the user


def test_sweep_on_a_two_node_cluster_with_local_storage_stops_before_any_trial(
    tmp_path, monkeypatch, capsys
):
    import ray

    from harness.cli import main

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_config(output_dir=str(tmp_path / "out"))))
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "has 2 nodes but the storage path" in err and "s3://" in err
    assert calls == ["init", "shutdown"] and not (tmp_path / "out" / "runs.parquet").exists()


def test_concurrency_is_cluster_gpus_over_gpus_per_trial():
    eight = DistributedConfig(gpus_per_trial=8, cpus_per_worker=8)
    assert derived_max_concurrent(eight, {"CPU": 512, "GPU": 32}) == 4
    assert derived_max_concurrent(eight, {"CPU": 512, "GPU": 12}) == 1
    assert derived_max_concurrent(eight, {"CPU": 100, "GPU": 32}) == 1  # CPU-bound
    assert derived_max_concurrent(eight, {"CPU": 0, "GPU": 0}) == 1  # autoscaling from zero
    cpu = DistributedConfig(workers=2, cpus_per_worker=0.5)
    assert derived_max_concurrent(cpu, {"CPU": 2}) == 1


def test_cluster_manifests_are_valid():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(launcher))  # Ray 2.60's cluster-launcher schema
    assert any("'.[cluster]'" in c for c in launcher["setup_commands"])
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "harness sweep" in job["spec"]["entrypoint"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"]["mode"] == "token"
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"


@pytest.mark.parametrize(("rows", "world", "micro"), [(70, 2, 4), (100, 4, None), (64, 2, 2)])
def test_ranks_together_see_the_single_device_batches(rows, world, micro):
    """Step by step, across epoch boundaries and with an incomplete last batch (70 rows,
    batch 16), the ranks' micro-batches together are the single-device loader's batch, and
    the data-informed init batches are the same examples on both paths."""
    from itertools import islice

    from harness.deepspeed.rank_data import RankShares
    from harness.heads.pipelines import Pipeline
    from harness.training.batching import batch_plan
    from harness.training.train import cycle

    batch, seed, steps = 16, 3, 3 * rows // 16 + 2  # > 2 epochs
    pipeline = Pipeline(
        loaded=None,
        train_rows=[{"idx": i} for i in range(rows)],
        collate=lambda rs: {"idx": torch.tensor([r["idx"] for r in rs])},
        evaluators={},
        loss_terms=lambda b: len(b["idx"]),
    )
    single = [b["idx"].tolist() for b in islice(cycle(pipeline.loader(batch, seed)), steps)]
    assert all(len(b) == batch for b in single)  # the incomplete last batch is dropped
    plan = batch_plan(batch, world, micro)
    shares = [RankShares(pipeline, plan, rank, "cpu") for rank in range(world)]
    per_rank = [list(islice(share.steps(seed), steps)) for share in shares]
    for step in range(steps):
        joined = [i for rank in range(world) for mb in per_rank[rank][step] for i in mb]
        assert joined == single[step], step
    # Init batches: n batches from seed + 1, cycling past an epoch on both paths.
    n = rows // batch + 2
    single_init = [b["idx"].tolist() for b in islice(pipeline.batches(batch, seed + 1, "cpu"), n)]
    dist_init = [b["idx"].tolist() for share in shares for b in share.init_batches(seed + 1)(n)]
    assert sorted(i for b in single_init for i in b) == sorted(i for b in dist_init for i in b)


def test_planned_steps_count_full_batches():
    from harness.spec.config import Budget
    from harness.training.trial import planned_steps

    assert planned_steps(Budget(epochs=1, batch_size=32), 50_000) == 1562  # 50000 // 32
    assert planned_steps(Budget(epochs=2, batch_size=16), 70) == 8
    assert planned_steps(Budget(max_steps=5, batch_size=16), 70) == 5
    with pytest.raises(ValueError, match="cannot fill one batch"):
        planned_steps(Budget(max_steps=5, batch_size=16), 10)
