"""SDXL UNet step time and model FLOP utilisation against a matmul peak (GPU)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from launch.benches import ROOT, arg, benchmark, interleaved_times, synchronize

SDXL_FLOP_PER_SAMPLE = 20.2e12  # DESIGN.md sec. 9: fwd + bwd at latent 128x128, FlopCounterMode, no recompute


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul FLOP/s: the best of `repeats` n x n x n products (2 n^3 FLOP each)."""
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    out, best = torch.empty_like(a), float("inf")
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sdxl_unet_step(config: Path, batch: int, latent: int, checkpointing: bool,
                   device: torch.device) -> tuple[Callable[[], None], torch.nn.Module]:
    """fwd + bwd of a randomly initialised UNet (bf16, SDPA) on SDXL-shaped inputs; returns (step, unet).

    Shapes: latents (B, 4, L, L), text embeddings (B, 77, cross_attention_dim), pooled (B, 1280),
    time_ids (B, 6): the SDXL conditioning of configs/sdxl_unet/config.json.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet_config = json.loads(config.read_text())
    unet = UNet2DConditionModel.from_config(unet_config).to(device, torch.bfloat16)
    unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    x, t = randn(batch, 4, latent, latent), torch.rand(batch, device=device) * 999
    cond = dict(encoder_hidden_states=randn(batch, 77, unet_config["cross_attention_dim"]),
                added_cond_kwargs={"text_embeds": randn(batch, pooled),
                                   "time_ids": torch.full((batch, 6), 1024.0, device=device)})

    def step() -> None:
        unet(x, t, **cond).sample.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    return step, unet


def time_unet(args: argparse.Namespace, device: torch.device, checkpointing: bool
              ) -> tuple[float, float, float]:
    """(seconds per fwd + bwd, FLOP per sample counted without recompute, peak GPU GiB) of one UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _unet = sdxl_unet_step(args.unet_config, args.batch, args.latent, checkpointing, device)
    with FlopCounterMode(display=False) as counter:  # the first call doubles as warmup
        step()
    flop = counter.get_total_flops() / args.batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = interleaved_times({"step": lambda: (step(), synchronize(device))}, args.warmup, args.repeats)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times["step"]), flop, memory


@benchmark(
    arg("--batch", type=int, default=1, help="samples per step"),
    arg("--latent", type=int, default=128, help="latent side (128 = 1024x1024 pixels)"),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=5),
    arg("--unet-config", type=Path, default=ROOT / "configs" / "sdxl_unet" / "config.json"),
    arg("--matmul-size", type=int, default=8192, help="n of the n^3 bf16 matmul that measures the peak"),
    arg("--device", default="cuda", help="cuda; cpu only as a smoke test of this code with a tiny config"),
)
def bench_mfu(args: argparse.Namespace) -> None:
    """SDXL UNet fwd+bwd samples/s and MFU on one GPU (bf16, SDPA), with and without checkpointing.

    MFU = samples/s x model FLOP per sample / measured bf16 matmul peak. Model FLOP are counted by
    FlopCounterMode without recompute (checkpointing adds work, not model FLOP), and also shown at
    DESIGN.md's 20.2 TFLOP per sample.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: `bench.py mfu` needs a CUDA GPU and torch.cuda.is_available() is False here.")
        return
    peak = matmul_peak(device, args.matmul_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; {args.unet_config.name}, random weights, bf16, SDPA, batch {args.batch}, latent "
          f"{args.latent}x{args.latent}; fwd + bwd (no optimizer step), median of {args.repeats} steps after "
          f"{args.warmup} warmup. Measured bf16 matmul peak ({args.matmul_size}^3 torch.mm): "
          f"{peak / 1e12:.1f} TFLOP/s.\n")
    print("| gradient checkpointing | ms/step | samples/s | TFLOP/sample (counted) | TFLOP/s | MFU "
          "| MFU at 20.2 TFLOP/sample | peak GPU memory GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for checkpointing in (False, True):
        seconds, flop, memory = time_unet(args, device, checkpointing)
        rate = args.batch / seconds
        print(f"| {checkpointing} | {1e3 * seconds:.0f} | {rate:.2f} | {flop / 1e12:.2f} | "
              f"{rate * flop / 1e12:.1f} | {rate * flop / peak:.1%} | "
              f"{rate * SDXL_FLOP_PER_SAMPLE / peak:.1%} | {memory:.1f} |")


def flop_per_sample(unet_config: dict, side: int) -> float:
    """Model FLOP of one sample's UNet forward + backward at side x side pixels, as torch counts them
    (matmuls, convolutions, attention), on the meta device: shapes only, no memory, no compute. For
    configs/sdxl_unet/config.json at 1024^2 this gives DESIGN.md's 20.2e12."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from ztsnr_ds.kernels import set_attention

    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        set_attention(unet, "sdpa")
        x, t = torch.randn(1, 4, side // 8, side // 8), torch.rand(1)
        cond = dict(encoder_hidden_states=torch.randn(1, 77, unet_config["cross_attention_dim"]),
                    added_cond_kwargs={"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)})
        with FlopCounterMode(display=False) as counter:
            unet(x, t, **cond).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()
