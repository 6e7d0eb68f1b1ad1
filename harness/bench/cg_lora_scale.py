"""CG-LoRA's no-shift start term against the weight it perturbs, per adapted module of MiniLM.

    .venv/bin/python harness/bench/cg_lora_scale.py [--rank 8] [--alpha 16] [--gamma 16]

With `scale: stable` the start term has ||s B0 A0||_2 = s sqrt(m) / gamma exactly
(tests/test_cg_lora.py::test_global_stable_scaling), s = alpha / sqrt(r) (rsLoRA), m the
layer's output width; LoRA-One's is s / gamma_one (gamma_one 128). This prints both next to
the mean spectral norm of the pretrained W0 of each module type (results/README.md cites it).
"""

from __future__ import annotations

import argparse
import math

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--gamma", type=float, default=16.0)
    parser.add_argument("--lora-one-gamma", type=float, default=128.0)
    args = parser.parse_args(argv)
    from transformers import AutoModel

    from harness.bench import MODEL_ID
    from harness.modeling.models import resolve_model

    model = AutoModel.from_pretrained(resolve_model(MODEL_ID, None, None).location)
    s = args.alpha / math.sqrt(args.rank)
    norms: dict[str, list[float]] = {}
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "encoder.layer." in name:
            kind = name.split("encoder.layer.")[1].split(".", 1)[1]
            weight = module.weight.detach().double()
            norms.setdefault(kind, []).append(float(torch.linalg.matrix_norm(weight, 2)))
            widths[kind] = weight.shape[0]
    one = s / args.lora_one_gamma
    print(f"{'module':26s} {'m':>5s} {'||W0||2':>8s} {'cg stable':>9s} {'ratio':>6s} "
          f"{'lora_one':>8s} {'ratio':>7s}")  # fmt: skip
    for kind, values in norms.items():
        w0 = sum(values) / len(values)
        cg = s * math.sqrt(widths[kind]) / args.gamma
        print(f"{kind:26s} {widths[kind]:5d} {w0:8.2f} {cg:9.2f} {cg / w0:6.2f} "
              f"{one:8.3f} {one / w0:7.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
