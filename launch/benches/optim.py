"""Optimizer step: AdamWSR (bf16 stochastic rounding) against torch.optim.AdamW, time and state bytes."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from launch.benches import arg, benchmark, interleaved_times, synchronize
from ztsnr_ds.optim import EAGER_CHUNK, AdamWSR, adamw_coefficients, adamw_fp32


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer.state tensors (moments, compensation, step counters)."""
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def _param(numel: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(numel, device=device).to(dtype))
    p.grad = torch.randn(numel, device=device).to(dtype)
    return p


TORCH_ADAMW = "torch.optim.AdamW fp32 (foreach)"
# Least bytes a step must move per element: read p, g, m, v (+ Kahan), write p, m, v (+ Kahan).
FP32_TRAFFIC, BF16_TRAFFIC, KAHAN_TRAFFIC = 4 * 4 + 3 * 4, 4 * 2 + 3 * 2, 5 * 2 + 4 * 2


CAST_ONLY = "Diagnostic: the fused AdamW math with plain bf16 casts in place of the rounding bit tricks"


def cast_only_step(p: torch.nn.Parameter) -> Callable[[], None]:
    """A compiled step that differs from the fused AdamWSR kernel only in how it writes bf16: what the
    float32 <-> int32 bit casts of the rounding cost in inductor's C++ (scalar loops, not vectorised)."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    coef = torch.tensor(adamw_coefficients({"betas": (0.9, 0.999), "lr": 1e-4, "eps": 1e-8,
                                            "weight_decay": 0.01}, step=1), device=p.device)

    def step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor) -> None:
        for dst, x in zip((p, m, v), adamw_fp32(p, g, m, v, coef), strict=True):
            dst.copy_(x)

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    return lambda: compiled(p.data, p.grad, m, v, coef)


@benchmark(
    arg("--numel", type=int, default=1 << 26, help="elements of the flat parameter (default 64M)"),
    arg("--chunk-size", type=int, default=EAGER_CHUNK, help="AdamWSR chunk_size of the eager cases"),
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present"),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=7),
)
def bench_optim(args: argparse.Namespace) -> None:
    """AdamWSR on a flat bf16 tensor vs torch.optim.AdamW (fp32, foreach): time and state per element."""
    n, chunk, device = args.numel, min(args.chunk_size, args.numel), torch.device(args.device)
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    # chunk-sized buffers, as eager temporaries: cache-resident on CPU
    a, b = torch.randn(chunk, device=device), torch.randn(chunk, device=device)
    noise = torch.empty(chunk, dtype=torch.int32, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def cached_passes() -> None:
        for _ in range(n // chunk):
            a.add_(b)

    def randint() -> None:  # what SR noise from a torch.Generator would cost
        for _ in range(n // chunk):
            noise.random_(0, 1 << 16, generator=generator)

    def sr(fused: bool, **kwargs: Any) -> AdamWSR:
        size = None if fused else chunk
        return AdamWSR([_param(n, torch.bfloat16, device)], fused=fused, chunk_size=size, **kwargs)

    def torch_adamw(**kwargs: Any) -> torch.optim.AdamW:
        return torch.optim.AdamW([_param(n, torch.float32, device)], lr=1e-4, **kwargs)

    rows = {  # name: (optimizer, least bytes moved per element)
        TORCH_ADAMW: (torch_adamw(foreach=True), FP32_TRAFFIC),
        "torch.optim.AdamW fp32 (fused=True)": (torch_adamw(fused=True), FP32_TRAFFIC),
        "AdamWSR bf16 SR, fused": (sr(True), BF16_TRAFFIC),
        "AdamWSR bf16 SR + Kahan, fused": (sr(True, kahan=True), KAHAN_TRAFFIC),
        "AdamWSR bf16 SR, eager chunks": (sr(False), BF16_TRAFFIC),
        "AdamWSR bf16 SR + Kahan, eager chunks": (sr(False, kahan=True), KAHAN_TRAFFIC),
    }
    def synced(fn: Callable[[], Any]) -> Callable[[], None]:
        return lambda: (fn(), synchronize(device))

    first_step = {}
    cast_only = cast_only_step(_param(n, torch.bfloat16, device))
    for name, (opt, _) in rows.items():  # the fused ones compile here (or load inductor's disk cache)
        start = time.perf_counter()
        synced(opt.step)()
        first_step[name] = time.perf_counter() - start
    cases = {"copy": lambda: dst.copy_(src), "pass": cached_passes, "randint": randint}
    cases |= {name: opt.step for name, (opt, _) in rows.items()}
    cases[CAST_ONLY] = cast_only
    runs = interleaved_times({name: synced(fn) for name, fn in cases.items()}, args.warmup, args.repeats)
    times = {name: (statistics.median(seconds), min(seconds)) for name, seconds in runs.items()}
    bandwidth = 8 * n / times["copy"][0]
    per_element = {name: 1e9 * times[name][0] / n for name in ("pass", "randint")}
    print(
        f"{device.type}, numel {n}, eager chunk_size {chunk}, median (min) of {args.repeats} steps after "
        f"{args.warmup} warmup, interleaved. Copy bandwidth {bandwidth / 1e9:.1f} GB/s (fp32 copy_, "
        f"read+write, median); one in-cache elementwise pass (add_ on chunk_size fp32 buffers) "
        f"{per_element['pass']:.2f} ns/element; torch.Generator noise (int32 random_(0, 2^16)) "
        f"{per_element['randint']:.2f} ns/element.\n"
    )
    print(
        "| optimizer | first step s | ms/step median (min) | ns/element | x torch | state bytes/param "
        "| min bytes moved/element | bandwidth bound ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (opt, traffic) in rows.items():
        med, low = times[name]
        print(
            f"| {name} | {first_step[name]:.1f} | {1e3 * med:.0f} ({1e3 * low:.0f}) | {1e9 * med / n:.2f} | "
            f"{med / times[TORCH_ADAMW][0]:.2f} | {state_bytes(opt) / n:.2f} | {traffic} | "
            f"{1e3 * traffic * n / bandwidth:.0f} |"
        )
    med, low = times[CAST_ONLY]
    print(f"\n{CAST_ONLY}: {1e3 * med:.0f} ({1e3 * low:.0f}) ms/step, {1e9 * med / n:.2f} ns/element.")
