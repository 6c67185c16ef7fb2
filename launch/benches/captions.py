"""Cost of long captions (CLIP context concatenation, ztsnr_ds/text.py): text encoding and a UNet
training step at 1, 2, 3 chunks of 75 tokens, and a micro-batch of mixed chunk counts (zero padding +
cross-attention mask), as ratios to 1 chunk; and which SDPA backends run a masked cross-attention."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from launch.benches import arg, benchmark, interleaved_times


def _caption(chunks: int) -> str:
    """A caption of `chunks` chunks with the tiny tokenizer (6 tokens a tag: "tagNN, ")."""
    return ", ".join(f"tag{i:02d}" for i in range({1: 10, 2: 20, 3: 34}[chunks]))


def masked_backends(device: torch.device) -> dict[str, str]:
    """Which SDPA backends run cross-attention with a key mask (SDXL-like shapes, fp32 / bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 10, 256, 64, device=device, dtype=dtype)
    kv = torch.randn(2, 10, 231, 64, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 1, 231, dtype=torch.bool, device=device)
    mask[0, ..., 77:] = False
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -10000.0)  # diffusers' form
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                F.scaled_dot_product_attention(q, kv, kv, attn_mask=bias)
            out[name] = "runs"
        except RuntimeError as err:
            out[name] = "no: " + str(err).splitlines()[0][:60]
    return out


@benchmark(
    arg("--micro-batch", type=int, default=4, help="samples per step (latents 4x16x16, tiny SDXL)"),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=10),
)
def bench_captions(args: argparse.Namespace) -> None:
    """Text encoding and UNet fwd+bwd at 1, 2, 3 chunks and mixed 1-3, tiny SDXL, ratios to 1 chunk."""
    from ztsnr_ds.models import load_frozen, load_unet, write_tiny_sdxl
    from ztsnr_ds.text import PromptEncoder, TextConditioning

    b = args.micro_batch
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_sdxl(Path(tmp) / "model")
        parts = load_frozen(root, dtype=torch.float32)
        unet = load_unet(root, dtype=torch.float32).train()
    encoder = PromptEncoder.from_parts(parts, max_chunks=3)
    mixed = [_caption(1 + i % 3) for i in range(b)]  # chunks 1, 2, 3, 1, ...
    batches = {f"{k} chunk{'s' if k > 1 else ''}": [_caption(k)] * b for k in (1, 2, 3)}
    batches["mixed 1-3"] = mixed
    conds = {name: encoder.encode(captions) for name, captions in batches.items()}
    assert [c.chunks.tolist() for c in conds.values()][:3] == [[k] * b for k in (1, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 4, 16, 16, generator=gen), torch.randint(0, 1000, (b,), generator=gen).float()
    time_ids = torch.tensor([[128, 128, 0, 0, 128, 128]], dtype=torch.float32).expand(b, -1)

    def step(cond: TextConditioning) -> None:
        v = unet(x, t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask(),
                 added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
        v.square().mean().backward()
        unet.zero_grad(set_to_none=True)

    encode = interleaved_times({n: (lambda c=c: encoder.encode(c)) for n, c in batches.items()},
                               args.warmup, args.repeats)
    steps = interleaved_times({n: (lambda c=c: step(c)) for n, c in conds.items()}, args.warmup, args.repeats)
    base_e, base_s = (statistics.median(times["1 chunk"]) for times in (encode, steps))
    print(f"micro-batch {b}, tiny SDXL (text hidden 32+32, UNet 32/64/64 channels), fp32, median of "
          f"{args.repeats}\n")
    print("| captions | context | mask | encode ms | encode / 1 chunk | UNet fwd+bwd ms | step / 1 chunk |")
    print("|---|---|---|---|---|---|---|")
    for name, cond in conds.items():
        e, s = statistics.median(encode[name]), statistics.median(steps[name])
        print(f"| {name} | {cond.embeds.shape[1]} | {'yes' if cond.mask() is not None else 'no'} | "
              f"{1e3 * e:.1f} | {e / base_e:.2f} | {1e3 * s:.1f} | {s / base_s:.2f} |")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nSDPA backends with a cross-attention key mask on {device.type}: "
          + ", ".join(f"{k} {v}" for k, v in masked_backends(device).items()))
