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


def matmul_flops(dtype, n=2048, repeats=5, min_time=0.5):
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOP), each repeat timed over >= min_time seconds."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: oneDNN / BLAS picks its kernels
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
    return best


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
    n = 1024 if quick else 2048
    repeats = 2 if quick else 5
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_n": n,
        "matmul_fp32_flops": matmul_flops(torch.float32, n, repeats),
        "matmul_bf16_flops": matmul_flops(torch.bfloat16, n, repeats),
        "memory_bandwidth_bytes_s": memory_bandwidth(64 if quick else 256, repeats + 3),
        "loadavg_1min": os.getloadavg()[0],
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
