"""Micro-benchmarks: ``python launch/bench.py <name> [options]`` (``--help`` lists the names).

Each benchmark is one function registered with ``@benchmark(arg(...), ...)``: its name is the function
name without ``bench_``, its arguments become the subcommand's options, and it prints a Markdown table
(after the command, machine and date) ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from ztsnr_ds.optim import DEFAULT_CHUNK, AdamWSR  # noqa: E402

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
    """CPU model (lscpu), torch threads and version, load average and date: every result's header."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    loadavg = Path("/proc/loadavg")
    load = loadavg.read_text().split()[0] if loadavg.exists() else "?"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
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


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer.state tensors (moments, compensation, step counters)."""
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def _param(numel: int, dtype: torch.dtype) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(numel).to(dtype))
    p.grad = torch.randn(numel).to(dtype)
    return p


TORCH_ADAMW = "torch.optim.AdamW fp32 (foreach)"
# Least bytes a step must move per element: read p, g, m, v (+ Kahan), write p, m, v (+ Kahan).
TRAFFIC = {
    TORCH_ADAMW: 4 * 4 + 3 * 4,
    "AdamWSR bf16 SR": 4 * 2 + 3 * 2,
    "AdamWSR bf16 SR + Kahan": 5 * 2 + 4 * 2,
}


@benchmark(
    arg("--numel", type=int, default=1 << 26, help="elements of the flat parameter (default 64M)"),
    arg("--chunk-size", type=int, default=DEFAULT_CHUNK, help="AdamWSR chunk_size"),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=7),
)
def bench_optim(args: argparse.Namespace) -> None:
    """AdamWSR on a flat bf16 tensor vs torch.optim.AdamW (fp32, foreach): time and state per element."""
    n, chunk = args.numel, min(args.chunk_size, args.numel)
    src, dst = torch.randn(n), torch.empty(n)
    a, b = torch.randn(chunk), torch.randn(chunk)  # chunk-sized buffers, as AdamWSR's scratch: cache-resident
    noise, generator = torch.empty(chunk, dtype=torch.int32), torch.Generator().manual_seed(0)

    def cached_passes() -> None:
        for _ in range(n // chunk):
            a.add_(b)

    def randint() -> None:  # what SR noise from a torch.Generator would cost
        for _ in range(n // chunk):
            noise.random_(0, 1 << 16, generator=generator)

    optimizers = {
        TORCH_ADAMW: torch.optim.AdamW([_param(n, torch.float32)], lr=1e-4, foreach=True),
        "AdamWSR bf16 SR": AdamWSR([_param(n, torch.bfloat16)], chunk_size=chunk),
        "AdamWSR bf16 SR + Kahan": AdamWSR([_param(n, torch.bfloat16)], kahan=True, chunk_size=chunk),
    }
    cases = {"copy": lambda: dst.copy_(src), "pass": cached_passes, "randint": randint}
    cases |= {name: opt.step for name, opt in optimizers.items()}
    runs = interleaved_times(cases, args.warmup, args.repeats)
    times = {name: (statistics.median(seconds), min(seconds)) for name, seconds in runs.items()}
    bandwidth = 8 * n / times["copy"][0]
    print(
        f"numel {n}, chunk_size {chunk}, median (min) of {args.repeats} steps after {args.warmup} warmup, "
        f"interleaved. Copy bandwidth {bandwidth / 1e9:.1f} GB/s (fp32 copy_, read+write, median); one "
        f"in-cache elementwise pass (add_ on chunk_size fp32 buffers) {1e9 * times['pass'][0] / n:.2f} "
        f"ns/element; torch.Generator noise (int32 random_(0, 2^16)) {1e9 * times['randint'][0] / n:.2f} "
        "ns/element.\n"
    )
    print(
        "| optimizer | ms/step median (min) | ns/element | x torch | state bytes/param "
        "| min bytes moved/element | bandwidth bound ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, opt in optimizers.items():
        med, low = times[name]
        print(
            f"| {name} | {1e3 * med:.0f} ({1e3 * low:.0f}) | {1e9 * med / n:.2f} | "
            f"{med / times[TORCH_ADAMW][0]:.2f} | {state_bytes(opt) / n:.2f} | {TRAFFIC[name]} | "
            f"{1e3 * TRAFFIC[name] * n / bandwidth:.0f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    commands = parser.add_subparsers(dest="name", required=True, metavar="name")
    for name, (func, arguments) in BENCHMARKS.items():
        sub = commands.add_parser(name, parents=[common], help=func.__doc__.splitlines()[0])
        for flags, kwargs in arguments:
            sub.add_argument(*flags, **kwargs)
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"`python launch/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n{machine()}\n")
    args.func(args)


if __name__ == "__main__":
    main()
