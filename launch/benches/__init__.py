"""The benchmarks of ``launch/bench.py``, one module each; this file holds what they share: the
registry (``@benchmark``), the machine line every result starts with, and interleaved timing."""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

Argument = tuple[tuple[str, ...], dict[str, Any]]
BENCHMARKS: dict[str, tuple[Callable[[argparse.Namespace], None], tuple[Argument, ...]]] = {}


def arg(*flags: str, **kwargs: Any) -> Argument:
    """One option of a benchmark: the arguments of ArgumentParser.add_argument."""
    return flags, kwargs


def benchmark(*arguments: Argument) -> Callable:
    """Register the decorated ``bench_<name>(args)`` as the subcommand ``<name>`` with these options."""

    def register(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        BENCHMARKS[func.__name__.removeprefix("bench_")] = (func, arguments)
        return func

    return register


def machine() -> str:
    """CPU model (lscpu), GPU, torch threads and version, load average and date: every result's header."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    loadavg = Path("/proc/loadavg")
    load = loadavg.read_text().split()[0] if loadavg.exists() else "?"
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {gpu}{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"load average {load}, {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )


def interleaved_times(
    cases: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each case, run round-robin so that machine load hits all cases alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Collect what a released Trainer held and give the GPU memory back to the allocator."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
