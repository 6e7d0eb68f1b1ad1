"""`harness eval ADAPTER_OR_RUN --lm-eval TASKS`: a trained model through lm-evaluation-harness.

Puts any lm-eval task beside the harness's own protocols: the model is loaded here (base
model + adapter, exactly as the trial trained it) and handed to lm-eval's `HFLM` as an
instance, then `lm_eval.simple_evaluate` runs the tasks. ADAPTER_OR_RUN is one of

- a saved run artifact, `<output_dir>/adapters/<run key>/` (`save_adapters`,
  harness/training/adapters.py): its base model from `harness_adapter.json` (or `--model`), the
  adapter applied to the stock base model (for W0-moving methods, the converted stock LoRA);
- a peft adapter folder (`adapter_config.json`): the base from its
  `base_model_name_or_path` (or `--model`), then `PeftModel.from_pretrained`;
- a model folder or model id (evaluates that model as it is, e.g. the base for comparison).

Base models resolve as in a sweep (`HARNESS_MODEL_DIR`, the hub, the packaged offline
copies). The output JSON records lm-eval's version, a SHA-256 of each task's config (as
lm-eval resolved it, without the YAML's location), the results and where the model came
from. lm-eval is an optional extra: `pip install '.[lmeval]'`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.spec import provenance
from harness.spec.config import MODEL_DIR_ENV, ConfigError

INSTALL_HINT = "lm-eval is an optional extra: pip install '.[lmeval]' (or 'lm_eval[hf]')"


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)  # what was loaded, for the JSON


def _base(model_id: str, revision: str | None, model_dir: str | None):
    from harness.modeling.models import load_causal_lm, resolve_model

    return load_causal_lm(resolve_model(model_id, revision, model_dir))


def load_model(target: str, model_id: str | None = None, model_dir: str | None = None) -> EvalModel:
    """The causal LM that `target` names (module docstring), in eval mode; what cannot be
    loaded (no such model, an adapter that applies only to a moved base) is a ConfigError."""
    try:
        return _load_model(target, model_id, model_dir)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError(f"cannot load {target} for lm-eval: {err}") from err


def _load_model(target: str, model_id: str | None, model_dir: str | None) -> EvalModel:
    from harness.training import adapters

    folder = Path(target)
    model_dir = model_dir or os.environ.get(MODEL_DIR_ENV) or None
    if (folder / adapters.META_FILE).is_file():  # a harness run artifact
        meta = adapters.read_meta(folder)
        _require_causal_lm_task(meta.get("task"), folder)
        base_id = model_id or meta["model_id"]
        loaded = _base(base_id, None if model_id else meta.get("model_revision"), model_dir)
        if meta["format"] == adapters.FORMAT_FULL:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder / adapters.ADAPTER)
        else:
            model = adapters.load_saved_adapter(loaded.model, folder)
        source = {"kind": "harness run", "path": str(folder), "run": meta}
    elif (folder / "adapter_config.json").is_file():  # a plain peft adapter
        from peft import PeftModel

        config = json.loads((folder / "adapter_config.json").read_text())
        base_id = model_id or config.get("base_model_name_or_path")
        if not base_id:
            raise ConfigError(f"{folder}: adapter_config.json names no base model; pass --model")
        loaded = _base(base_id, config.get("revision"), model_dir)
        model = PeftModel.from_pretrained(loaded.model, folder)
        source = {"kind": "peft adapter", "path": str(folder), "peft_type": config.get("peft_type")}
    else:  # a model folder or id, as it is
        if model_id:
            raise ConfigError(f"--model applies to an adapter; {target} is not an adapter folder")
        base_id = target
        loaded = _base(target, None, model_dir)
        model = loaded.model
        source = {"kind": "model"}
    src = loaded.source
    source.update(
        base_model=base_id, base_location=f"{src.kind}:{src.location}", base_revision=src.revision
    )
    return EvalModel(model.eval(), loaded.tokenizer, source)


def _require_causal_lm_task(task_id: str | None, folder: Path) -> None:
    import tasks

    if task_id is None:
        return
    head = tasks.get_task(task_id).head
    if head != "causal_lm":
        raise ConfigError(
            f"{folder} was trained on {task_id} (head {head!r}); lm-eval evaluates causal LMs"
        )


def task_config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a task's config as lm-eval resolved it, without where its YAML lay."""
    config = json.loads(json.dumps(config, default=str))
    if isinstance(config.get("metadata"), dict):
        config["metadata"].pop("config_source", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def evaluate(
    loaded: EvalModel,
    task_names: list[str],
    *,
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results for `task_names` on `loaded`, as a JSON-ready dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"{INSTALL_HINT} ({err})") from err

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)

    def unknown_to(manager) -> list[str]:
        # Names, groups, tags and glob patterns lm-eval indexes, or a task YAML's path.
        return [t for t in task_names if not Path(t).is_file() and not manager.match_tasks([t])]

    # Indexing lm-eval's thousands of built-in task YAMLs takes tens of seconds: skipped
    # when the local folder has every task asked for.
    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if unknown_to(manager):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = unknown_to(manager)
    if unknown:
        raise ConfigError(
            f"lm-eval knows no task {', '.join(unknown)}"
            + ("" if include_path else " (local task YAMLs: --include-path DIR)")
        )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
    )
    configs = results.get("configs", {})
    out: dict[str, Any] = {
        "lm_eval_version": lm_eval.__version__,
        "tasks": {
            name: {
                "config_sha256": task_config_hash(cfg),
                "version": results.get("versions", {}).get(name),
                "n_shot": results.get("n-shot", {}).get(name),
                "n_samples": results.get("n-samples", {}).get(name),
            }
            for name, cfg in configs.items()
        },
        "results": results["results"],
        "configs": configs,
        "model": loaded.source,
        "limit": limit,
        "packages": provenance.package_versions(),
        "git_commit": provenance.git_commit(),
    }
    if log_samples:  # per document: the loglikelihoods or generations lm-eval scored
        out["samples"] = {
            name: [{"doc_id": s["doc_id"], "target": s["target"], "resps": s["resps"]}
                   for s in samples]
            for name, samples in results.get("samples", {}).items()
        }  # fmt: skip
    return json.loads(json.dumps(out, default=str))


def summary_lines(out: dict[str, Any]) -> list[str]:
    """One line per task and metric, for the terminal."""
    model = out["model"].get("path") or out["model"]["base_model"]
    lines = [f"lm-eval {out['lm_eval_version']} on {model}"]
    for name, metrics in out["results"].items():
        for metric, value in sorted(metrics.items()):
            if metric in ("alias", "name", "sample_len") or "_stderr" in metric:
                continue
            lines.append(f"  {name:24s} {metric:18s} {value}")
    return lines
