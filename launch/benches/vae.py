"""VAE decoder fine-tune (ztsnr_ds/vae_trainer.py): a measured step on the tiny VAE (CPU) and an SDXL-size
estimate (parameters, FLOPs per sample from torch's FlopCounterMode on the real SDXL VAE config, meta
tensors: nothing is allocated)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from launch.benches import ROOT, arg, benchmark, interleaved_times

SDXL_VAE_CONFIG = ROOT / "configs" / "sdxl_vae" / "config.json"  # stabilityai/sdxl-vae's config.json
UNET_TFLOP_1024 = 20.2  # SDXL UNet fwd+bwd per 1024 x 1024 sample (DESIGN.md sec. 9), for scale


def tiny_trainer(root: Path, name: str, crop: int, micro_batch: int, lpips: float, widths: list[int],
                 ds_config: str):
    """A VAETrainer on the tiny SDXL's VAE and 16 generated images; fixed crop side; no validation."""
    import yaml

    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.vae_config import parse
    from ztsnr_ds.vae_trainer import VAETrainer

    config = yaml.safe_load((ROOT / "configs" / "vae_demo.yaml").read_text())
    config["model"]["pretrained"] = str(root / "model")
    config["data"] |= {"source": str(root / "data"), "crop_min": crop, "crop_max": crop}
    config["loss"]["lpips"] = lpips
    config["perceptual"]["widths"] = widths
    config["optimizer"]["fused"] = False
    config["trainer"] |= {"output_dir": str(root / name), "micro_batch": micro_batch}
    config["validation"] = {"every": 0, "holdout": 0, "crop": crop}
    config["deepspeed_config"] = str(ROOT / "ds_configs" / ds_config)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg, config_dict = parse(["--config", str(path)])
    return VAETrainer(cfg, config_dict, init_distributed())


def state_bytes(trainer) -> int:
    """Bytes of every distinct tensor storage the run holds for the decoder: module weights, ZeRO flat
    partitions (weights, gradients), optimizer moments, EMA."""
    tensors = [*trainer.engine.module.parameters(), *trainer.ema.state["ema"]]
    optimizer = trainer.optimizer
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def sdxl_flops(crop: int) -> dict[str, float]:
    """TFLOP per sample at a crop side: decoder fwd+bwd, frozen encoder fwd, LPIPS (VGG16) fwd+bwd."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from ztsnr_ds.perceptual import LPIPS
    from ztsnr_ds.vae_decoder import Decoder

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads(SDXL_VAE_CONFIG.read_text()))
        lpips = LPIPS()
    decoder, out = Decoder(vae), {}
    x = torch.randn(1, 3, crop, crop, device="meta")
    z = torch.randn(1, 4, crop // 8, crop // 8, device="meta")
    cases = {"decoder fwd+bwd": lambda: decoder(z).mean().backward(),
             "encoder fwd": lambda: vae.encode(x),
             "LPIPS VGG16 fwd+bwd": lambda: lpips(x.clone().requires_grad_(True), x).sum().backward()}
    for name, run in cases.items():
        with FlopCounterMode(display=False) as counter:
            run()
        out[name] = counter.get_total_flops() / 1e12
    return out | {"params": sum(p.numel() for p in decoder.parameters())}


@benchmark(
    arg("--crop", type=int, default=64, help="tiny run: crop side in pixels"),
    arg("--micro-batch", type=int, default=4),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=8),
)
def bench_vae(args: argparse.Namespace) -> None:
    """VAE decoder step: tiny VAE on the CPU (time, bytes/param), SDXL-size FLOPs per sample."""
    import warnings

    from ztsnr_ds.data.synthetic import write_dataset
    from ztsnr_ds.models import write_tiny_sdxl

    warnings.filterwarnings("ignore", "perceptual.backbone = random")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_sdxl(root / "model")
        write_dataset(root / "data", n=16)
        runs = {
            "L1 only (baseline)": tiny_trainer(root, "l1", args.crop, args.micro_batch, 0.0, [8] * 5,
                                               "zero2_fp32.json"),
            "L1 + LPIPS, VGG at 1/8 width": tiny_trainer(root, "vgg8", args.crop, args.micro_batch, 1.0,
                                                         [8, 16, 32, 64, 64], "zero2_fp32.json"),
            "L1 + LPIPS, full VGG16 width": tiny_trainer(root, "vgg16", args.crop, args.micro_batch, 1.0,
                                                         [64, 128, 256, 512, 512], "zero2_fp32.json"),
            "L1, pure bf16": tiny_trainer(root, "bf16", args.crop, args.micro_batch, 0.0, [8] * 5,
                                          "zero2_bf16.json"),
        }
        for run in runs.values():
            run.ema = run.ema or _ema(run)
        step = 0

        def one(run):
            nonlocal step
            step += 1
            run.step = step
            return run.train_step()

        cases = {name: (lambda r=run: one(r)) for name, run in runs.items()}
        times = interleaved_times(cases, args.warmup, args.repeats)
        params = sum(p.numel() for p in runs["L1 only (baseline)"].engine.module.parameters())
        base = statistics.median(times["L1 only (baseline)"])
        print(f"Tiny VAE decoder ({params:,} parameters), crops {args.crop} px, micro-batch "
              f"{args.micro_batch}, 1 rank, ZeRO-2, AdamWSR, EMA fp32; median of the step times.\n")
        print("| case | ms/step | vs baseline | bytes/param (weights, grads, moments, EMA) |")
        print("|---|---|---|---|")
        for name, run in runs.items():
            median = statistics.median(times[name])
            print(f"| {name} | {median * 1e3:.1f} | {median / base:.2f} | {state_bytes(run) / params:.1f} |")
    print(f"\nSDXL VAE ({SDXL_VAE_CONFIG.relative_to(ROOT)}), TFLOP per sample (FlopCounterMode, meta "
          "tensors):\n")
    print("| crop | decoder params | decoder fwd+bwd | encoder fwd | LPIPS VGG16 fwd+bwd | step total | "
          "vs UNet step at 1024 px |")
    print("|---|---|---|---|---|---|---|")
    for crop in (256, 512):
        f = sdxl_flops(crop)
        total = f["decoder fwd+bwd"] + f["encoder fwd"] + f["LPIPS VGG16 fwd+bwd"]
        print(f"| {crop} | {f['params'] / 1e6:.1f} M | {f['decoder fwd+bwd']:.2f} | {f['encoder fwd']:.2f} | "
              f"{f['LPIPS VGG16 fwd+bwd']:.2f} | {total:.2f} | {total / UNET_TFLOP_1024:.2f} |")


def _ema(run):
    """An EMA for runs built without one, so every case holds the same state (bytes/param)."""
    from ztsnr_ds.ema import EMAConfig, ShardedEMA

    return ShardedEMA(EMAConfig(enabled=True), run.engine, run.optimizer, run.dist.rank, run.dist.world_size)
