"""Peak-memory measurement that can be reset between phases of one process."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux >= 4.0: writing 5 resets VmHWM (peak RSS), so a reused worker's earlier trials
    # do not leak into this one's number.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB since the last reset, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process_peak_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss_lifetime"
