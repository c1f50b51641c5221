"""This machine's limits, measured where the benchmarks run, so that "near the limit" is a number.

- `gemm_peak(dtype)`: GFLOPS of a large square torch.mm (2048^3 multiply-adds, best of a few): the compute roof of
  matrix-heavy work (a UNet step, a ViT or GPT-2 forward) in that dtype.
- `read_rate()`: GB/s of summing a 256 MiB float32 tensor (far beyond the caches, best of a few): the roof of
  work that reads every weight once per step, such as decoding one token with the KV cache.
- `flops(fn)`: floating-point operations torch's FlopCounterMode counts in fn() (matrix products, convolutions,
  attention), for work / time / peak.
- `describe()`: one line naming the CPU, the threads, the load and torch, printed above every timing: timings on a
  machine shared with other work say little without it.
"""
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def best_seconds(fn, repeats=5):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak(dtype, n=2048, repeats=5):
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def read_rate(mebibytes=256, repeats=5):
    x = torch.ones(mebibytes * 2**20 // 4)
    return x.numel() * 4 / best_seconds(lambda: x.sum(), repeats) / 1e9


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe():
    bf16 = "AMX" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() \
        else "no bf16 units"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_name()} ({os.cpu_count()} CPUs, {bf16}, {torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads, load average {load:.1f}, torch {torch.__version__}")


def measure(quick=False):
    """(fp32 GEMM GFLOPS, bf16 GEMM GFLOPS, read GB/s), printed as one line."""
    repeats = 4 if quick else 20  # the best of many: on a shared machine some runs find the cores free
    peaks = gemm_peak(torch.float32, repeats=repeats), gemm_peak(torch.bfloat16, repeats=repeats)
    rate = read_rate(repeats=repeats)
    print(f"roofline: fp32 GEMM {peaks[0]:.0f} GFLOPS, bf16 GEMM {peaks[1]:.0f} GFLOPS ({peaks[1] / peaks[0]:.1f}x), "
          f"memory read {rate:.1f} GB/s")
    return (*peaks, rate)
