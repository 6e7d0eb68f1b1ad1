"""What produced a number: package versions, code version, machine."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

PACKAGES = (
    "torch", "transformers", "peft", "deepspeed", "ray", "datasets", "numpy", "scikit-learn",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD sha, suffixed '+dirty' when tracked files differ (so a row never over-claims)."""
    env_commit = os.environ.get("HARNESS_GIT_COMMIT")  # set by the driver for remote workers
    if env_commit:
        return env_commit
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's processor string.
    Recorded because CPU kernels differ by processor: the same code and packages give
    float32 results that differ in the last bits on another CPU model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu:{cpu_model()}"
    return {
        "hostname": socket.gethostname(),
        "device": name,
        "threads": str(torch.get_num_threads()),
    }
