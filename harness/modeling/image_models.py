"""Image classifiers: a pretrained checkpoint with a new head, or a small random-init ViT.

Pretrained (the papers' setting): `AutoModelForImageClassification.from_pretrained` on a
resolved `ModelSource` (default hub id google/vit-base-patch16-224-in21k), a fresh
`num_labels` head (`ignore_mismatched_sizes`), and the transforms' size/mean/std read from
the checkpoint's image-processor config. The head modules are those whose weights the
checkpoint did not provide or did not fit (`classifier` for ViT).

Random init (offline smoke runs only: no pretrained ViT is reachable here): a small
`ViTForImageClassification` from `RANDOM_VIT_CONFIG`, seeded. Its description starts with
"random-init" and its id is `RANDOM_INIT_ID`; results from it are not comparable to the
papers' and must be labelled as such.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from harness.modeling.models import (
    RANDOM_VIT_CONFIG,
    RANDOM_VIT_ID,
    ModelSource,
    hub_revision,
    label_maps,
    random_init_vit,
    resolve_model,
)
from tasks.vision import ImageSettings

# The random-init ViT itself lives in harness.modeling.models (its structure is read there too).
RANDOM_INIT_ID = RANDOM_VIT_ID

DEFAULT_IMAGE_MODEL = "google/vit-base-patch16-224-in21k"
# ViTImageProcessor's defaults (also what the in21k checkpoint ships).
RANDOM_INIT_MEAN = (0.5, 0.5, 0.5)
RANDOM_INIT_STD = (0.5, 0.5, 0.5)


class LoadedImageClassifier(NamedTuple):
    model: nn.Module
    settings: ImageSettings  # input size and normalisation for tasks.vision's transforms
    head_modules: list[str]  # freshly initialised modules: always trainable
    model_type: str  # config.model_type, the key of methods/targets.py
    description: str  # "random-init ..." or "<model id>@<revision> (<source kind>)"


def _processor_settings(source: ModelSource, image_size: int | None) -> ImageSettings:
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(
            source.location, revision=hub_revision(source)
        )
    except OSError as err:
        raise FileNotFoundError(
            f"{source.model_id} has no image-processor config (preprocessor_config.json); "
            "the transforms need its size and mean/std"
        ) from err
    size = cfg.get("crop_size") or cfg.get("size") or {}
    if isinstance(size, int):
        side = size
    else:
        side = size.get("height") or size.get("shortest_edge") or image_size
    if not side:
        raise ValueError(f"{source.model_id}: no input size in its image-processor config")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if mean is None or std is None or not cfg.get("do_normalize", True):
        raise ValueError(f"{source.model_id}: image-processor config has no mean/std")
    return ImageSettings(int(side), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def load_image_classifier(
    source: ModelSource | None,
    num_labels: int,
    *,
    random_init: bool,
    image_size: int = 224,
    seed: int = 0,
    label_names: list[str] | None = None,
) -> LoadedImageClassifier:
    """A classifier with a fresh `num_labels` head, its transform settings and head modules.

    `source=None` with `random_init=False` resolves `DEFAULT_IMAGE_MODEL` (HARNESS_MODEL_DIR,
    hub). `image_size` applies to the random-init model only; a checkpoint keeps its own.
    `seed` fixes the new head's (or the whole random model's) initialisation.
    """
    if random_init:
        if source is not None:
            raise ValueError("random_init builds its own small ViT; pass source=None")
        model = random_init_vit(num_labels, image_size, seed, label_names)
        settings = ImageSettings(image_size, RANDOM_INIT_MEAN, RANDOM_INIT_STD)
        c = RANDOM_VIT_CONFIG
        description = (
            f"random-init ViT (NOT pretrained): {RANDOM_INIT_ID}, hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, patch {c['patch_size']}, {image_size}px, "
            f"seed {seed}"
        )
        return LoadedImageClassifier(model, settings, ["classifier"], "vit", description)

    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    if source is None:
        source = resolve_model(DEFAULT_IMAGE_MODEL, None, os.environ.get("HARNESS_MODEL_DIR"))
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = AutoModelForImageClassification.from_pretrained(
            source.location,
            revision=hub_revision(source),
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            dtype=torch.float32,
            **label_maps(num_labels, label_names),
        )
    # The head is whatever the checkpoint did not provide (in21k: no classifier) or did not
    # fit (a classifier for another label count); it must train under every method.
    keys = list(info["missing_keys"]) + [
        k[0] if isinstance(k, (tuple, list)) else k for k in info["mismatched_keys"]
    ]
    head = sorted({k.rsplit(".", 1)[0] for k in keys})
    settings = _processor_settings(source, image_size)
    description = f"{source.model_id}@{source.revision} ({source.kind})"
    return LoadedImageClassifier(model, settings, head, model.config.model_type, description)
