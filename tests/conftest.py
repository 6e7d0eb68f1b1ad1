"""Shared test fixtures: the real data mirror beside the checkout and the packaged MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def with_identity(specs, data_fingerprint: str = "fixed-data"):
    """Specs resolved without reading data: for tests of what else enters the key."""
    from harness.spec import identity

    return [
        s.model_copy(update={"data_fingerprint": data_fingerprint})
        for s in identity.resolve(specs, read_data=False)
    ]


@pytest.fixture(scope="session")
def mirror_dir() -> str:
    if not (MIRROR / "nyu-mll" / "glue").is_dir():
        pytest.skip(f"data mirror not found at {MIRROR}")
    return str(MIRROR)


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    # Tests never wait on the hub: the packaged model copy is the offline path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
