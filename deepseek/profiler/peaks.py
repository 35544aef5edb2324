"""Measured peaks of a device: matmul GFLOP/s and copy GB/s, once per process.

The roofline needs two numbers: how fast the device multiplies (a large
float32 matmul) and how fast it moves memory (a large copy, counting the
bytes read plus written, as ``deepseek.runtime.plan`` counts traffic). They
are measured, not looked up, so they reflect this machine, its thread count
and its load; the best of a few repetitions is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePeaks:
    """Peak float32 matmul throughput and memory bandwidth of one device."""

    device: str
    gflops: float  # GFLOP/s of a large float32 matmul
    gbps: float  # GB/s (1e9 bytes/s) read plus written by a large copy
    threads: int = 0  # PyTorch intra-op threads during the measurement (CPU)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where an op stops being memory-bound."""
        return self.gflops / self.gbps

    def attainable_gflops(self, intensity: float) -> float:
        """The roofline: min(peak compute, intensity * peak bandwidth)."""
        return min(self.gflops, intensity * self.gbps)

    def to_dict(self) -> dict:
        return {**asdict(self), "ridge_flop_per_byte": self.ridge}


_CACHE: dict[tuple[str, int], DevicePeaks] = {}


def _best_seconds(fn, device: str, reps: int) -> float:
    fn()  # warm-up (allocation, thread pool start)
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: str = "cpu", *, refresh: bool = False) -> DevicePeaks:
    """Measure (once per process, device and thread count) the device's peaks.

    Takes about 0.3 s on a CPU. ``refresh=True`` measures again.
    """
    threads = torch.get_num_threads()
    key = (device, threads)
    if key in _CACHE and not refresh:
        return _CACHE[key]
    gpu = device.startswith("cuda")
    n = 8192 if gpu else 1024
    copy_elems = (256 if gpu else 16) * 2**20  # 1 GiB on a GPU, 64 MiB on a CPU
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32 if gpu else None
    if gpu:  # the float32 peak, not TF32's
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            mm_s = _best_seconds(lambda: torch.mm(a, b), device, 3)
            src = torch.empty(copy_elems, device=device).fill_(1.0)
            dst = torch.empty_like(src)
            copy_s = _best_seconds(lambda: dst.copy_(src), device, 5)
    finally:
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    peaks = DevicePeaks(device=device, gflops=2 * n ** 3 / mm_s / 1e9,
                        gbps=2 * src.numel() * src.element_size() / copy_s / 1e9, threads=threads)
    log.info("measured peaks of %s: %.1f GFLOP/s, %.1f GB/s", device, peaks.gflops, peaks.gbps)
    _CACHE[key] = peaks
    return peaks
