"""What the machine is, read before torch is imported: CPU threads and bf16 units.

Every launch script calls :func:`one_thread_per_process` before its first torch import. On a machine
without GPUs, OpenMP threads of several processes (ranks, or one process next to others) spin against
each other: a demo training step took 19-36 s instead of 0.6-1.4 s with one thread (measured, 2-core
AMD EPYC). A user's own OMP_NUM_THREADS always wins. No torch import here, so it is cheap and can run first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

GPU_DEVICE_FILES = ("nvidia[0-9]*", "kfd")  # NVIDIA (/dev/nvidia0, ...) and ROCm (/dev/kfd)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX; Arm's "bf16" in /proc/cpuinfo
BF16_SLOWDOWN = "2.5-4.7 s against 0.6-1.3 s per step for the demo UNet, measured on a 2-core AMD EPYC"
FP32_JSON = "ds_configs/zero2_fp32.json"


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the one process that says things once."""
    return os.environ.get("RANK", "0") == "0"


def cpu_only() -> bool:
    """No GPU device file under /dev (checked without importing torch or touching a driver)."""
    dev = Path("/dev")
    return not any(next(dev.glob(pattern), None) for pattern in GPU_DEVICE_FILES)


def one_thread_per_process() -> None:
    """On a CPU-only machine set OMP_NUM_THREADS=1 unless the user set it, and say so once."""
    if "OMP_NUM_THREADS" in os.environ or not cpu_only():
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    if is_main_process():
        print("ztsnr_ds: no GPU: OMP_NUM_THREADS=1 (one OpenMP thread per process; set OMP_NUM_THREADS "
              "to choose another number)", file=sys.stderr, flush=True)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bf16 arithmetic units (flags line of /proc/cpuinfo; False where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for flag in line.split(":", 1)[-1].split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def bf16_on_slow_cpu(ds_config_path: str, cpuinfo: str | None = None) -> str | None:
    """The warning for a bf16 DeepSpeed JSON on a CPU-only machine without bf16 units, else None.

    We warn rather than switch: the JSON decides the numerics the checkpoints hold, and a run that
    quietly trained in fp32 would not be the run its config describes.
    """
    if not cpu_only() or cpu_has_bf16(cpuinfo):
        return None
    try:
        bf16 = json.loads(Path(ds_config_path).read_text()).get("bf16", {}).get("enabled", False)
    except (OSError, ValueError, AttributeError):
        return None  # preflight names an unreadable JSON
    if not bf16:
        return None
    return (f"warning: deepspeed_config {ds_config_path} trains in bf16, and this CPU has no bf16 units: "
            f"every step is several times slower ({BF16_SLOWDOWN}). For CPU runs use "
            f"--deepspeed_config {FP32_JSON}")
