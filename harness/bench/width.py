"""`harness bench --llm-width`: init memory of the data-informed inits at LLM width, on CPU,
against harness/sweeps/memory_estimate.py's prediction for the same shapes.

Model: a seeded random-init Llama-style causal LM (transformers LlamaConfig), hidden 2048
and 4096, 2 layers, head dim 128 (16 / 32 heads, no grouped KV), intermediate 2 x hidden
(smaller than Llama's ~2.7x, to bound memory here), vocabulary 8192 (untied LM head), fp32.
Random init, CPU: these rows measure memory and time, not quality.
Batches: real text (GLUE SST-2 train sentences from the data mirror, joined) tokenised with
MiniLM's tokenizer, ids taken mod 8192, cut into `seq_len`-token windows; `micro_batch`
windows a batch, labels = inputs (causal LM loss). Every init reads the same
`init_batches` batches and adapts the 7 decoder projections at its default rank.

Each (width, method) runs in a fresh forked process with a fixed glibc mmap threshold
(128 KiB, as harness/bench/suite.py): resident set before the model is
built (interpreter, libraries, batches), the model built, a small warm-up forward + backward
(lazy initialisation), VmHWM reset (harness/training/memory.py), `prepare`, VmHWM read.
- measured total = peak - resident set before the model: model + init, the quantity of
  `MemoryEstimate.init_peak_bytes` (fp32 load, world size 1, no gradient checkpointing);
- measured extra = peak - resident set just before `prepare`, against the prediction less
  the model's 4 P bytes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.bench.suite import REPO, in_fresh_process, machine_name

DATA_INFORMED = ("lora_ga", "cg_lora", "lora_one", "lora_sb")  # the CG-vs-GA pair first
WIDTHS = (2048, 4096)
MIB = 2**20


@dataclass(frozen=True)
class WidthSettings:
    hidden: int = 2048
    layers: int = 2
    vocab: int = 8192
    # 32 examples of 16 tokens: CG-LoRA needs more examples than its rank (its curvature
    # directions are at most the examples seen); short windows keep 4096-wide CPU passes short
    micro_batch: int = 8
    seq_len: int = 16
    init_batches: int = 4
    threads: int = 1


def llama_config(s: WidthSettings):
    from transformers import LlamaConfig

    heads = s.hidden // 128
    return LlamaConfig(
        hidden_size=s.hidden, intermediate_size=2 * s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=s.vocab,
        max_position_embeddings=max(512, s.seq_len), tie_word_embeddings=False,
    )  # fmt: skip


def text_batches(s: WidthSettings) -> list[dict]:
    """`init_batches` batches of real tokens (see the module doc)."""
    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    from harness.bench import MODEL_ID
    from harness.modeling.models import resolve_model

    data_dir = os.environ.get("HARNESS_DATA_DIR")
    if not data_dir:  # reads the mirror's parquet directly; no hub path here
        raise SystemExit("set HARNESS_DATA_DIR to the data mirror (real SST-2 sentences)")
    sentences = pd.read_parquet(Path(data_dir) / "nyu-mll/glue/sst2/train.parquet")["sentence"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL_ID, None, None).location)
    need = s.init_batches * s.micro_batch * s.seq_len
    ids: list[int] = []
    for sentence in sentences:
        ids += tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    windows = torch.tensor(ids[:need]).remainder(s.vocab).view(-1, s.micro_batch, s.seq_len)
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in windows
    ]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_init(method: str, s: WidthSettings) -> dict[str, Any]:
    """One init in this (fresh) process."""
    import torch
    from transformers import LlamaForCausalLM

    import methods
    from harness.training import memory
    from methods.peft_lora import matching_linear_layers

    torch.set_num_threads(s.threads)
    batches = text_batches(s)
    impl = methods.get_method(method)
    hp = impl.hyperparams({"init_batches": s.init_batches})
    ctx = methods.PrepareContext(
        head_modules=[], default_target_modules=impl.family_target_modules("llama"),
        init_batches=lambda n: iter(batches[:n]), learning_rate=1e-4,
        train_examples=100_000, batch_size=s.micro_batch,
    )  # fmt: skip
    before_model_kib = _status_kib("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(s))
    params = sum(p.numel() for p in model.parameters())
    examples = s.micro_batch * s.init_batches
    held = 0  # the statistics each method keeps over the whole pass (exact fp32 bytes)
    for _, layer in matching_linear_layers(model, list(ctx.default_target_modules)):
        n, m = layer.in_features, layer.out_features
        pooled = min(examples, n) * n + min(examples, m) * m  # CG-LoRA's K-FAC rows
        held += 4 * (pooled if method == "cg_lora" else m * n)
    tiny = {k: v[:1, :8] for k, v in batches[0].items()}
    model(**tiny).loss.backward()  # lazy initialisation, in neither number
    model.zero_grad(set_to_none=True)
    before_kib = _status_kib("VmRSS")
    memory.reset_peak(torch.device("cpu"))
    wall, cpu = time.perf_counter(), time.process_time()
    impl.prepare(model, hp, ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_kib = _status_kib("VmHWM")
    return {
        "method": method,
        "params": params,
        "init_s": wall,
        "init_cpu_s": cpu,
        "measured_total_bytes": (peak_kib - before_model_kib) * 1024,
        "measured_extra_bytes": (peak_kib - before_kib) * 1024,
        "model_rss_bytes": (before_kib - before_model_kib) * 1024,
        "statistics_held_bytes": held,
    }


def predicted(method: str, s: WidthSettings) -> dict[str, int]:
    from harness.sweeps.memory_estimate import estimate

    est = estimate(
        llama_config(s), method, {"init_batches": s.init_batches}, zero_stage=2,
        world_size=1, dtype="fp32", micro_batch=s.micro_batch, seq_len=s.seq_len,
        gradient_checkpointing=False, load_dtype="fp32",
    )  # fmt: skip
    return {
        "predicted_total_bytes": est.init_peak_bytes,
        "predicted_extra_bytes": est.init_peak_bytes - 4 * est.total_params,
        "predicted_statistics_bytes": est.init_statistics_bytes,
    }


def comparison_row(measured: dict[str, Any], prediction: dict[str, int]) -> dict[str, Any]:
    """One row: measured and predicted bytes side by side, measured / predicted."""
    row = dict(measured) | dict(prediction)
    for kind in ("total", "extra"):
        pred = prediction[f"predicted_{kind}_bytes"]
        row[f"{kind}_ratio"] = measured[f"measured_{kind}_bytes"] / pred if pred else None
    return row


HEADERS = [
    "hidden", "method", "params", "init CPU s", "init wall s", "measured total MiB",
    "predicted total MiB", "measured / predicted", "measured extra MiB",
    "predicted extra MiB", "extra measured / predicted", "statistics held MiB", "label",
]  # fmt: skip


def table_rows(payload: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in payload["rows"]:
        if "error" in r:
            out.append([str(r["hidden"]), r["method"], "failed: " + r["error"]] + [""] * 10)
            continue
        out.append([
            str(r["hidden"]), r["method"], f"{r['params'] / 1e6:.0f}M", f"{r['init_cpu_s']:.1f}",
            f"{r['init_s']:.1f}", f"{r['measured_total_bytes'] / MIB:.0f}",
            f"{r['predicted_total_bytes'] / MIB:.0f}", f"{r['total_ratio']:.2f}",
            f"{r['measured_extra_bytes'] / MIB:.0f}", f"{r['predicted_extra_bytes'] / MIB:.0f}",
            f"{r['extra_ratio']:.2f}", f"{r['statistics_held_bytes'] / MIB:.0f}",
            "random init, CPU",
        ])  # fmt: skip
    return out


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        f"# LLM-width init memory: {payload['machine']}, {payload['date']}",
        "",
        "Random init, CPU. Llama-style causal LM, "
        f"{s['layers']} layers, intermediate 2 x hidden, vocabulary {s['vocab']} (untied), "
        f"fp32, {s['threads']} thread(s); {s['init_batches']} batches of {s['micro_batch']} x "
        f"{s['seq_len']} real SST-2 tokens (MiniLM tokenizer, ids mod vocab); default rank; "
        "7 decoder projections. Peak RSS (fixed 128 KiB mmap threshold, fresh process each) vs "
        "harness/sweeps/memory_estimate.py `init_peak_bytes` (fp32 load, no gradient "
        "checkpointing); total = model + init, extra = init alone. Statistics held: the exact "
        "fp32 bytes each method keeps over the pass (LoRA-GA, LoRA-One, LoRA-SB: a gradient "
        "accumulator per targeted weight, sum of m x n; CG-LoRA: pooled K-FAC rows, "
        "min(N, n) x n + min(N, m) x m per layer, N examples); the estimator counts the same "
        "terms (`Method.init_statistics_bytes`).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(payload)]
    return "\n".join(lines) + "\n"


def run_width(
    widths: tuple[int, ...] = WIDTHS,
    method_names: tuple[str, ...] = DATA_INFORMED,
    base: WidthSettings = WidthSettings(),
    out_root: Path | None = REPO / "results" / "bench",
    progress=print,
) -> dict[str, Any]:
    import datetime as dt

    import torch

    payload: dict[str, Any] = {
        "kind": "harness-bench-llm-width",
        "version": 1,
        "machine": machine_name(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "settings": asdict(base) | {"widths": list(widths)},
        "rows": [],
    }
    for hidden in widths:
        s = WidthSettings(**(asdict(base) | {"hidden": hidden}))
        for method in method_names:
            m = in_fresh_process(measure_init, method, s)
            row = {"hidden": s.hidden, "method": method, "label": "random init, CPU"}
            # The prediction builds a meta-device model only: no torch thread pool to fork.
            row |= m if "error" in m else comparison_row(m, predicted(method, s))
            payload["rows"].append(row)
            progress(f"hidden {hidden} {method}: " + (
                row.get("error") or f"measured {row['measured_total_bytes'] / MIB:.0f} MiB, "
                f"predicted {row['predicted_total_bytes'] / MIB:.0f} MiB, "
                f"CPU {row['init_cpu_s']:.1f} s"
            ))  # fmt: skip
            if out_root is not None:  # after every row: a partial run keeps what it measured
                folder = out_root / payload["machine"]
                folder.mkdir(parents=True, exist_ok=True)
                stem = f"{payload['date']}-llm-width"
                stored = {k: v for k, v in payload.items() if k != "written"}
                (folder / f"{stem}.json").write_text(json.dumps(stored, indent=1) + "\n")
                (folder / f"{stem}.md").write_text(markdown(payload))
                payload["written"] = [str(folder / f"{stem}.json"), str(folder / f"{stem}.md")]
    return payload
