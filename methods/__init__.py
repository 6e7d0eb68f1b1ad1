"""Fine-tuning methods, one module each; importing this package registers them all."""

from methods.base import Batch, Hyperparams, Method, PrepareContext, TrainCallback
from methods.registry import get_method, method_names, register_method

__all__ = [
    "Batch",
    "Hyperparams",
    "Method",
    "PrepareContext",
    "TrainCallback",
    "get_method",
    "method_names",
    "register_method",
]

# Importing a method module registers it.
from methods import (  # noqa: E402,F401
    altlora,
    cg_lora,
    dora,
    full_ft,
    lora,
    lora_ga,
    lora_one,
    lora_plus,
    lora_pro,
    lora_sb,
    lora_xs,
    peft_inits,
    pissa,
    rslora,
    scaled_adamw,
    sds_lora,
)
