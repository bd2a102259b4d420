"""What this CPU can do, for benchmarks/run.py: the facts lscpu shows, the theoretical float32 peak they
give, and the best measured kernels beside it.

"Fraction of peak" divides executed FLOP/s by the theoretical peak, an upper bound, not by a measured
kernel: a measurement is not a limit (oneDNN's convolutions can beat MKL's matmul, and on a shared machine
a few short repetitions can all land while another process holds a core).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

MATMUL_N = 2048
CONV_SHAPE = (4, 256, 64, 64)  # batch, channels, side: the FPN and RPN 3x3 convolutions at P2 of a 256 px image
# Vector FMA pipes per core: cpuinfo does not say. Two is the most any x86 core has (Intel server cores since
# Skylake-SP at 512 bit, AMD Zen 2 to 5), so with the widest vector unit the flags allow the bound is not
# exceeded; where a core has fewer or narrower units (Zen 4 runs AVX-512 on 256-bit pipes) it is loose.
FMA_UNITS = 2


def machine_info(clock_ghz: float | None = None) -> dict:
    """What lscpu shows (read from the same /proc and /sys files), and the theoretical peak from it."""
    info: dict = {"cpu_model": platform.processor() or platform.machine(), "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and "cpu_model_from_proc" not in info:
                info["cpu_model"] = info["cpu_model_from_proc"] = value
            elif key == "flags" and not info["flags"]:
                flags = set(value.split())
                info["flags"] = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
            elif key == "cpu MHz" and "mhz" not in info:
                info["mhz"] = round(float(value))
            elif key in ("siblings", "cpu cores") and key not in info:
                info[key] = int(value)
    except (OSError, ValueError):
        pass
    info.pop("cpu_model_from_proc", None)
    info["threads_per_core"] = max(1, info.pop("siblings", 1) // max(1, info.pop("cpu cores", 1)))
    try:  # what lscpu calls "CPU max MHz"; absent in most virtual machines
        info["max_mhz"] = round(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000)
    except (OSError, ValueError):
        pass
    info["cpu_count"] = os.cpu_count()
    info["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["memory_total_gb"] = round(int(fields["MemTotal"].split()[0]) / 1024**2, 1)
        info["memory_available_gb"] = round(int(fields["MemAvailable"].split()[0]) / 1024**2, 1)
    except (OSError, KeyError, ValueError):
        pass
    import numpy as np
    import sklearn
    import torch
    import torchvision

    info.update({
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "kernel": platform.release(),
    })
    info["theoretical"] = theoretical_peak(info, clock_ghz)
    theory = info["theoretical"]
    print(f"theoretical float32 peak: {theory['gflops'] or 0:.1f} GFLOP/s = {theory['cores']} core(s) x "
          f"{theory['clock_ghz'] or 0:.2f} GHz ({theory['clock_source']}) x {FMA_UNITS} FMA units x {theory['lanes']} "
          "lanes x 2", flush=True)
    return info


def theoretical_peak(info: dict, clock_ghz: float | None = None) -> dict:
    """float32 FLOP/s no code can exceed on the cores the benchmarks use: cores x clock x FMA units x
    float32 lanes per vector (16 with AVX-512, 8 with AVX, else 4) x 2 (an FMA is a multiply and an add).
    Cores: torch threads, at most the usable logical CPUs / SMT threads per core (SMT siblings share one
    core's FMA units). Clock: ``clock_ghz`` if given, else the maximum clock (cpufreq), else cpuinfo's
    "cpu MHz", which in a virtual machine is the nominal clock the hypervisor reports: a turbo clock
    above it would break the bound, and then a measured kernel exceeds it (the report says so)."""
    flags = info.get("flags", [])
    lanes = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    cores = max(1, min(info["torch_threads"], info["usable_cpus"] // info.get("threads_per_core", 1)))
    if clock_ghz:
        clock, source = clock_ghz, "given with --clock-ghz"
    elif info.get("max_mhz"):
        clock, source = info["max_mhz"] / 1000, "maximum clock, cpufreq"
    elif info.get("mhz"):
        clock, source = info["mhz"] / 1000, "cpuinfo 'cpu MHz'; no cpufreq maximum here (a virtual machine?)"
    else:
        return {"gflops": None, "cores": cores, "lanes": lanes, "clock_ghz": None, "clock_source": "unknown"}
    return {"gflops": cores * clock * FMA_UNITS * lanes * 2, "cores": cores, "lanes": lanes, "clock_ghz": clock,
            "clock_source": source}


def kernel_peak(reps: int) -> dict:
    """Best-of-``reps`` GFLOP/s of the two kernels the stages are made of, on all torch threads: a float32
    2048x2048 matmul (MKL) and a 3x3 convolution of the detector's shape (oneDNN, channels-last, as
    ``detect`` runs it). Either can be the faster one; ``gflops_best`` is the better of the two."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=generator)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=generator)
    out = torch.empty(MATMUL_N, MATMUL_N)
    batch, channels, height, width = CONV_SHAPE
    x = torch.randn(CONV_SHAPE, generator=generator).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    kernels = {"mm": (lambda: torch.mm(a, b, out=out), 2 * MATMUL_N**3),
               "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2 * batch * channels * channels * 9 * height * width)}
    result: dict = {"reps": reps}
    with torch.inference_mode():
        for name, (kernel, flops) in kernels.items():
            kernel()  # warm-up
            rates = []
            for _ in range(reps):
                started = time.perf_counter()
                kernel()
                rates.append(flops / (time.perf_counter() - started) / 1e9)
            result[name] = {"gflops_best": round(max(rates), 1), "gflops_median": round(statistics.median(rates), 1)}
            print(f"float32 {name} on {torch.get_num_threads()} threads: best {max(rates):.1f} GFLOP/s, "
                  f"median {statistics.median(rates):.1f} of {reps}", flush=True)
    result["gflops_best"] = max(result[name]["gflops_best"] for name in kernels)
    return result
