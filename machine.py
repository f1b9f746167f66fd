"""What this machine is, read from the system and measured: CPU model, cores, ISA flags, memory, GPU, and the
two limits speed is judged against (memory bandwidth, dense matmul peak).

    python machine.py            # the description as JSON, with the measured limits (about 15 s)
    python machine.py --quick    # smaller, shorter measurements

Every sentence a report makes about the hardware (bench/, eval.py's reports, train.py's bf16 choice) comes
from here at run time, never from text typed for one machine: the CPUs of one machine type differ.
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

# CPU flags that give native bf16 matmuls: AVX512-BF16 / AMX (x86), the BF16 extension (Arm).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# The ISA flags a report names: vector width and bf16/int8 support decide matmul speed on a CPU.
REPORTED_FLAG_PREFIXES = ("avx", "amx", "fma", "sve", "asimd", "bf16", "i8mm")


def read_cpuinfo(path="/proc/cpuinfo"):
    """{'model': the CPU's name, 'flags': its ISA flags} from the first processor of /proc/cpuinfo (x86 'flags',
    Arm 'Features'); elsewhere the platform's processor name and no flags."""
    try:
        text = Path(path).read_text()
    except OSError:
        text = ""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if model is None and key in ("model name", "Model", "cpu model"):
            model = value
        elif flags is None and key in ("flags", "Features"):
            flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(), "flags": flags or set()}


def cpu_has_native_bf16(flags=None):
    """True where the CPU has bf16 matmul instructions; without them CPU bf16 autocast is many times slower
    than fp32 (docs/BENCHMARKS.md measures both)."""
    flags = read_cpuinfo()["flags"] if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def memory_bytes():
    """Total RAM, or None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_name():
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def memory_bandwidth(megabytes=256, repeats=8):
    """Best bytes/s of a large tensor copy (read + write counted), far bigger than any cache."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def matmul_flops(dtype, max_n=2048, repeats=5, min_time=0.5):
    """(best FLOP/s, n) of an n x n @ n x n matmul (2 n^3 FLOP), each repeat timed over >= min_time seconds.
    n doubles from 256 up to max_n while one product takes under 0.1 s, so a dtype this CPU runs slowly
    (bf16 without native instructions) is measured at a size that finishes, not for minutes."""
    import torch

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


def describe(measure=False, quick=False):
    """The machine as a dict (JSON-ready). With `measure`: also the fp32 and bf16 matmul peaks and the memory
    bandwidth, each the best of several repeats (on a shared machine the least disturbed one)."""
    import torch

    cpu = read_cpuinfo()
    description = {
        "cpu": cpu["model"],
        "cpu_flags": sorted(f for f in cpu["flags"] if f.startswith(REPORTED_FLAG_PREFIXES)),
        "native_bf16": cpu_has_native_bf16(cpu["flags"]),
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if measure:
        max_n, repeats = (1024, 2) if quick else (2048, 5)
        fp32, n32 = matmul_flops(torch.float32, max_n, repeats)
        bf16, n16 = matmul_flops(torch.bfloat16, max_n, repeats)
        description.update({
            "matmul_fp32_n": n32, "matmul_bf16_n": n16, "matmul_fp32_flops": fp32, "matmul_bf16_flops": bf16,
            "memory_bandwidth_bytes_s": memory_bandwidth(64 if quick else 256, repeats + 3),
            "loadavg_1min": os.getloadavg()[0],
        })
    return description


def native_bf16(description):
    """From a description, also one saved before it recorded 'native_bf16' (then from its flags)."""
    if "native_bf16" in description:
        return description["native_bf16"]
    return cpu_has_native_bf16(set(description.get("cpu_flags", ())))


def summary(description):
    """One line, e.g. 'AMD EPYC (avx, avx2, fma; no native bf16), 2 cores, 23.5 GiB RAM, no GPU, torch 2.13.0 (2
    threads), Python 3.11.7'."""
    d = description
    flags = ", ".join(d.get("cpu_flags") or ["no vector flags read"])
    parts = [f"{d['cpu']} ({flags}; {'native' if native_bf16(d) else 'no native'} bf16)", f"{d['cores']} cores"]
    if d.get("memory_bytes"):
        parts.append(f"{d['memory_bytes'] / 2**30:.1f} GiB RAM")
    if "gpu" in d:
        parts.append(f"GPU {d['gpu']}" if d["gpu"] else "no GPU")
    parts.append(f"torch {d['torch']} ({d['torch_threads']} threads)")
    if d.get("python"):
        parts.append(f"Python {d['python']}")
    return ", ".join(parts)


def bf16_sentence(description):
    """What bf16 means on this CPU, from its flags and (when measured) its two matmul peaks."""
    d = description
    measured = ""
    if d.get("matmul_bf16_flops") and d.get("matmul_fp32_flops"):
        ratio = d["matmul_bf16_flops"] / d["matmul_fp32_flops"]
        measured = f" (measured: the bf16 matmul peak is {ratio:.2f}x the fp32 peak here)"
    if native_bf16(d):
        present = ", ".join(f for f in NATIVE_BF16_FLAGS if f in d.get("cpu_flags", ())) or "bf16"
        return (f"this CPU has native bf16 instructions ({present}){measured}; train.py keeps `--bf16` there as CPU "
                "autocast (`machine.cpu_has_native_bf16`).")
    return (f"this CPU has no native bf16 instructions (none of {', '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo), so "
            f"bf16 matmuls take a slow path{measured}; train.py drops `--bf16` on such CPUs "
            "(`machine.cpu_has_native_bf16`) and trains in fp32.")


if __name__ == "__main__":
    print(json.dumps(describe(measure=True, quick="--quick" in sys.argv), indent=2))
