"""Distance from the machine's limit: achieved FLOP/s of a train step against a peak.

Achieved FLOP/s = 6 x P x tokens / s (forward 2 P per token, backward 4 P; Kaplan et al.
2020), P = the model's non-embedding parameters (frozen ones too: the forward runs through
them and the backward propagates through them; embedding tables are lookups, no matmul),
tokens = the positions processed (padded batch size x sequence length: the work the kernels
do). The convention over-counts a frozen-base
method's backward a little (no weight gradient for frozen layers), the same for every
method, so the column compares methods and machines, not absolute efficiency.

Peak: on CPU, a dense torch matmul of the same dtype and thread count, measured in the same
run (so it is a ratio that stays meaningful on a noisy machine); on CUDA, the device's
published dense bf16 peak (KNOWN_GPU_PEAK_TFLOPS), with the measured matmul beside it.
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
KNOWN_GPU_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
}


def train_step_flops(params: int, tokens: int) -> int:
    """FLOPs of one forward + backward over `tokens` positions: 6 P tokens."""
    return 6 * params * tokens


def achieved_flops_per_s(params: int, tokens: int, seconds: float) -> float:
    return train_step_flops(params, tokens) / seconds


def mfu(params: int, tokens: int, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved / peak (0..1)."""
    return achieved_flops_per_s(params, tokens, seconds) / peak_flops_per_s


def known_gpu_peak(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a device by name (longest matching key), or None."""
    upper = device_name.upper()
    matches = [k for k in KNOWN_GPU_PEAK_TFLOPS if k.upper() in upper]
    if not matches:
        return None
    return KNOWN_GPU_PEAK_TFLOPS[max(matches, key=len)] * 1e12


def matmul_peak_flops_per_s(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    size: int = 1024,
    repeats: int = 5,
    calls: int = 4,
) -> float:
    """Best measured FLOP/s of a dense size x size matmul (2 size^3 FLOPs per call), at the
    current torch thread count; best of `repeats` samples (the peak, not the typical)."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.matmul(a, b, out=out)  # warm-up: kernels, thread pool

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - started) / calls)
    return 2 * size**3 / best


def machine_peak(device: torch.device, dtype: torch.dtype, size: int = 1024) -> dict[str, object]:
    """The peak MFU divides by, and how it was obtained."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = matmul_peak_flops_per_s(torch.bfloat16, device, size=8192, calls=10)
        known = known_gpu_peak(name)
        return {
            "device": name,
            "dtype": "bf16",
            "peak_flops_per_s": known if known is not None else measured,
            "peak_source": "published dense bf16" if known is not None else "measured matmul",
            "measured_matmul_flops_per_s": measured,
        }
    measured = matmul_peak_flops_per_s(dtype, device, size=size)
    return {
        "device": "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "peak_flops_per_s": measured,
        "peak_source": f"measured matmul {size}x{size}, same dtype and threads",
        "measured_matmul_flops_per_s": measured,
    }
