"""This CPU's limits: dense matmul peak (torch, fp32 and bf16) and memory bandwidth.

    python bench/bench_cpu.py            # prints JSON
The training MFU and the chat bandwidth bound are measured against these numbers, taken in the same run.
Each figure is the best of several repeats: on a shared machine the best run is the one least disturbed.
"""
import json
import os
import platform
import time

import torch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def matmul_flops(dtype, max_n=2048, repeats=5, min_time=0.5):
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOP), each repeat timed over >= min_time seconds.
    n doubles from 256 up to max_n while one product takes under 0.1 s, so a dtype this CPU runs slowly
    (bf16 without native instructions) is measured at a size that finishes, not for minutes."""
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b, out=out)  # also the warm-up: oneDNN / BLAS picks its kernels
        if n >= max_n or time.perf_counter() - start > 0.1:
            break
        n *= 2
    best = 0.0
    for _ in range(repeats):
        iters, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = max(best, 2 * n**3 * iters / elapsed)
    return best, n


def memory_bandwidth(mbytes=256, repeats=8):
    """Best bytes/s of a large tensor copy (read + write counted), far bigger than any cache."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * src.numel() * 4 / elapsed)
    return best


def run(quick=False):
    max_n = 1024 if quick else 2048
    repeats = 2 if quick else 5
    fp32, n32 = matmul_flops(torch.float32, max_n, repeats)
    bf16, n16 = matmul_flops(torch.bfloat16, max_n, repeats)
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_fp32_n": n32,
        "matmul_bf16_n": n16,
        "matmul_fp32_flops": fp32,
        "matmul_bf16_flops": bf16,
        "memory_bandwidth_bytes_s": memory_bandwidth(64 if quick else 256, repeats + 3),
        "loadavg_1min": os.getloadavg()[0],
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
