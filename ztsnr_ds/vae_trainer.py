"""The VAE decoder fine-tune (NAI V3): a thin second loop beside trainer.py, sharing its components.

    crops of the source images (vae_data) -> frozen encoder, posterior mean z -> engine(z) = decoder
    (post_quant_conv + decoder) -> l1 |x_hat - x| + mse (x_hat - x)^2 + lpips LPIPS(x_hat, x), per sample
    -> mean -> engine.backward -> engine.step

Why a second loop and not a pluggable trainer.py: the UNet step (buckets from a latent cache, sigmas,
text conditioning, a bucket sampler with a saved position) shares almost nothing with this one (images
straight from the source, no noise, no text, a stateless crop stream). What they do share is imported, not
copied: the engine and process group (engine.py), checkpoints, resume and rotation (checkpoint.py), the
sharded EMA (ema.py), the metric sinks (metrics.py), the optimizer (optim.py) and lr_at / StopTraining.

The engine holds only the decoder: the encoder and quant_conv live outside it, frozen, so they can
neither change nor take optimizer state. Checkpoints are UNet-run tags with "kind": "vae_decoder".
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ztsnr_ds import checkpoint
from ztsnr_ds.data.sources import MISSING_CAPTION, BadImage, load_image, scan_share
from ztsnr_ds.ema import EMA_DIR, ShardedEMA
from ztsnr_ds.engine import DistInfo, any_rank, initialize, is_pure_bf16, wait_group
from ztsnr_ds.image_metrics import psnr, ssim
from ztsnr_ds.metrics import MetricLogger, image_grid
from ztsnr_ds.optim import AdamWSR
from ztsnr_ds.patch_gan import GAN_FILE, PatchGAN
from ztsnr_ds.perceptual import LPIPS
from ztsnr_ds.trainer import READY_LINE, StopTraining, lr_at
from ztsnr_ds.vae_config import VAETrainConfig
from ztsnr_ds.vae_data import CropStream, centre_crop, held_out, holdout_candidates, to_tensor
from ztsnr_ds.vae_decoder import KIND, Decoder, encode_mean, load_vae

VAE_CONFIG = "vae_config"  # ztsnr_state.json key: the AutoencoderKL config
DATA_REPORT = "data_report.json"
TERMS = ("loss", "l1", "mse", "lpips", "gan")


class VAETrainer:
    def __init__(self, cfg: VAETrainConfig, config_dict: dict, dist: DistInfo) -> None:
        self.cfg, self.config_dict, self.dist = cfg, config_dict, dist
        self.wait_group = wait_group()  # collective: every rank, here
        self.output_dir = Path(cfg.trainer.output_dir)
        self.device = torch.device(get_accelerator().device_name(dist.local_rank))
        self.resume_tag = checkpoint.find_resume_tag(self.output_dir, cfg.trainer.resume)
        self.build_engine()
        per = cfg.perceptual
        # No backbone named (loss.lpips 0): no LPIPS at all, rather than a random one's numbers in the logs.
        self.lpips = (LPIPS(per.backbone, per.linear, tuple(per.widths)).to(self.device, self.dtype)
                      if per.backbone else None)
        self.ema = (ShardedEMA(cfg.ema, self.engine, self.optimizer, dist.rank, dist.world_size,
                               cfg.trainer.seed) if cfg.ema.enabled else None)
        self.gan = PatchGAN(cfg.gan, self.device, cfg.trainer.seed) if cfg.gan.weight else None
        self.build_data()
        self.step = 0
        self.nonfinite_total = 0
        self.stop_requested = False
        self.logger = MetricLogger(self.output_dir, config_dict, dist.is_main, cfg.logging.tensorboard,
                                   cfg.logging.wandb, cfg.logging.wandb_project, cfg.logging.wandb_mode)

    # ----------------------------------------------------------------------------- set-up
    def build_engine(self) -> None:
        """Decoder + post_quant_conv into the DeepSpeed engine; the encoder side frozen beside it."""
        cfg = self.cfg
        ds_config = checkpoint.resume_ds_config(cfg.deepspeed_config, cfg.trainer.micro_batch,
                                                cfg.trainer.grad_accum, self.dist.world_size, self.resume_tag)
        dtype = torch.bfloat16 if is_pure_bf16(ds_config) else torch.float32
        vae = load_vae(cfg.model.pretrained, dtype)
        self.vae_config = json.loads(json.dumps(dict(vae.config), default=str))
        if cfg.model.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        decoder = Decoder(vae).train()
        vae.decoder, vae.post_quant_conv = torch.nn.Identity(), torch.nn.Identity()  # the engine owns them
        self.vae = vae.requires_grad_(False).eval().to(self.device)  # encoder + quant_conv, frozen
        opt = cfg.optimizer
        self.optimizer = AdamWSR(decoder.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                 weight_decay=opt.weight_decay, kahan=opt.kahan, seed=cfg.trainer.seed,
                                 rank=self.dist.rank, fused=opt.fused)
        self.engine = initialize(decoder, self.optimizer, ds_config)
        self.dtype = next(self.engine.module.parameters()).dtype

    def build_data(self) -> None:
        """This rank's share of the source less the held-out images; rank 0 encodes the held-out crops."""
        data, val = self.cfg.data, self.cfg.validation
        scan = scan_share(data.source, self.dist.rank, self.dist.world_size)
        self.scan_problems = [p for p in scan.problems if p.reason != MISSING_CAPTION]  # captions unused
        gathered: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, holdout_candidates(scan.records, val.holdout, val.seed))
        self.held = held_out(gathered, val.holdout)  # a few (key, path) pairs, the same on every rank
        held_keys = {key for key, _ in self.held}
        records = [r for r in scan.records if r.key not in held_keys]
        self.crops = CropStream(records, data.sides, data.seed, self.dist.rank, data.max_pixels)
        self.val_images = self.val_latents = None
        if self.dist.is_main and self.held:
            images = []
            for key, path in self.held:
                try:
                    img = load_image(path, data.max_pixels, val.crop)
                    images.append(to_tensor(centre_crop(img, val.crop)))
                except BadImage as err:
                    tqdm.write(f"validation: held-out image {key} skipped: {err.reason}")
            if not images:
                raise ValueError(f"no held-out image is usable at validation.crop = {val.crop}; lower it")
            self.val_images = torch.stack(images)  # (N, 3, S, S)
            self.val_latents = torch.cat([encode_mean(self.vae, chunk.to(self.device))
                                          for chunk in self.val_images.split(self.cfg.trainer.micro_batch)])

    def state(self) -> dict:
        return {
            checkpoint.STEP: self.step,
            checkpoint.WORLD_SIZE: self.dist.world_size,
            checkpoint.CONFIG: self.config_dict,
            VAE_CONFIG: self.vae_config,
            checkpoint.COUNTERS: {"nonfinite_total": self.nonfinite_total},
            "kind": KIND,
        }

    def save(self) -> Path:
        self.write_data_report()
        return checkpoint.save(self.engine, self.output_dir, self.step, self.state(),
                               self.cfg.trainer.keep_last, self.dist.is_main, self.write_extra)

    def write_extra(self, tag_dir: Path) -> None:
        """This rank's EMA slices; the discriminator (replicated) from rank 0."""
        if self.ema is not None:
            self.ema.save(tag_dir / EMA_DIR)
        if self.gan is not None and self.dist.is_main:
            save_file(self.gan.state(), str(tag_dir / GAN_FILE))

    def resume(self) -> None:
        """Weights, optimizer, RNG, step and EMA of the tag found at start-up; the crops need no state."""
        if self.resume_tag is None:
            return
        state = checkpoint.load(self.engine, self.resume_tag, self.dist.is_main)
        if state.get("kind") != KIND:
            raise checkpoint.CheckpointError(f"{self.resume_tag} is not a VAE decoder checkpoint (a UNet "
                                             "run's?); use another trainer.output_dir")
        self.step = state[checkpoint.STEP]
        self.nonfinite_total = state[checkpoint.COUNTERS]["nonfinite_total"]
        if self.ema is not None:
            folder = self.resume_tag / EMA_DIR
            if folder.is_dir():
                self.ema.load(folder)
            else:
                self.ema.reset()
                warnings.warn(f"{self.resume_tag} holds no EMA: it starts from its weights now", stacklevel=2)
        if self.gan is not None and (self.resume_tag / GAN_FILE).is_file():
            self.gan.load(load_file(str(self.resume_tag / GAN_FILE)))
        elif self.gan is not None:
            warnings.warn(f"{self.resume_tag} holds no discriminator: it starts untrained", stacklevel=2)
        if self.dist.is_main:
            print(f"resumed from {self.resume_tag} at step {self.step}")

    def write_data_report(self) -> None:
        """Collective: every rank's skipped images into <output_dir>/data_report.json (rank 0), as the cache
        build's report.json lists them; new ones are printed with the fix."""
        parts: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(parts, [self.crops.problems, self.scan_problems])  # short lists
        if not self.dist.is_main:
            return
        as_dicts = [[{"key": p.key, "path": str(p.path), "reason": p.reason} for p in part[i]]
                    for i in (0, 1) for part in parts]
        bad, scan = as_dicts[:self.dist.world_size], as_dicts[self.dist.world_size:]
        report = {"bad": sorted((d for part in bad for d in part), key=lambda d: d["key"]),
                  "scan_problems": sorted((d for part in scan for d in part), key=lambda d: d["key"])}
        path = self.output_dir / DATA_REPORT
        old = json.loads(path.read_text()) if path.is_file() else {"bad": [], "scan_problems": []}
        if report != old:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(path, json.dumps(report, indent=1))
            tqdm.write(f"data: {len(report['bad'])} images skipped, {len(report['scan_problems'])} source "
                       f"entries unusable so far; listed in {path} (fix or remove them)")

    # ----------------------------------------------------------------------------- one step
    def terms(self, images: torch.Tensor, z: torch.Tensor | None = None,
              gan: bool = False) -> dict[str, torch.Tensor]:
        """Per-sample loss terms (B,) of decoding the frozen encoder's posterior mean of `images`; with
        `gan` also the generator's hinge term. "x" and "rec" (detached): the images and their decoding."""
        x = images.to(self.device, non_blocking=True)
        if z is None:
            z = encode_mean(self.vae, x)  # (B, 4, S/8, S/8), no gradient into the encoder
        rec = self.engine(z.to(self.dtype)).float()  # (B, 3, S, S)
        weights = self.cfg.loss
        out = {"l1": (rec - x).abs().flatten(1).mean(1), "mse": (rec - x).square().flatten(1).mean(1)}
        out["lpips"] = self.lpips(rec, x).float() if weights.lpips else torch.zeros_like(out["l1"])
        out["gan"] = self.gan.generator_term(rec) if gan else torch.zeros_like(out["l1"])
        out["loss"] = (weights.l1 * out["l1"] + weights.mse * out["mse"] + weights.lpips * out["lpips"]
                       + self.cfg.gan.weight * out["gan"])
        return out | {"x": x, "rec": rec.detach()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum finite micro-batches; returns the global mean of each term.

        Every micro-batch has micro_batch samples, so each rank's mean, averaged by DeepSpeed over ranks and
        micro-batches, is the global batch mean. A micro-batch whose loss is non-finite on any rank is
        dropped on all before backward and the next one of the stream takes its place.
        """
        accum, size = self.cfg.trainer.grad_accum, self.cfg.trainer.micro_batch
        sums, good, micro, consecutive = torch.zeros(len(TERMS), dtype=torch.float64), 0, 0, 0
        gan = self.gan is not None and self.gan.active(self.step)
        disc = torch.zeros((), device=self.device)
        while good < accum:
            terms = self.terms(self.crops.batch(self.step, micro, size), gan=gan)
            micro += 1
            loss = terms["loss"].mean()
            flags = torch.stack([*(terms[t].detach().sum() for t in TERMS), (~torch.isfinite(loss)).float()])
            torch.distributed.all_reduce(flags)  # sums over ranks
            *values, nonfinite = flags.tolist()  # host sync: every rank must agree before backward
            if nonfinite:
                consecutive += 1
                self.nonfinite_total += 1
                if consecutive >= self.cfg.trainer.max_nonfinite:
                    raise StopTraining(f"{consecutive} non-finite losses in a row at step {self.step}; the "
                                       "last complete checkpoint is intact; lower optimizer.lr, then resume")
                continue
            consecutive, good = 0, good + 1
            self.engine.backward(loss)
            self.engine.step()
            if gan:  # the discriminator's step on the same crops, after the decoder's
                disc += self.gan.update(terms["x"], terms["rec"]).sum()
            sums += torch.tensor(values, dtype=torch.float64)
        samples = accum * size * self.dist.world_size
        out = {t: v / samples for t, v in zip(TERMS, sums.tolist())}
        if gan:
            torch.distributed.all_reduce(disc)
            out["disc"] = disc.item() / samples  # host sync, once per step with the GAN on
        return out

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self, prefix: str) -> dict[str, float]:
        """Rank 0: PSNR, SSIM, LPIPS, L1 of the held-out crops decoded now, and their labelled PNG grid."""
        module = self.engine.module
        module.eval()
        recs, scores = [], {"psnr": [], "ssim": [], "l1": []} | ({"lpips": []} if self.lpips else {})
        size = self.cfg.trainer.micro_batch
        for images, z in zip(self.val_images.split(size), self.val_latents.split(size)):
            terms = self.terms(images, z)
            x = terms["x"]
            scores["psnr"].append(psnr(terms["rec"], x))
            scores["ssim"].append(ssim(terms["rec"], x))
            if self.lpips is not None:
                scores["lpips"].append(self.lpips(terms["rec"], x).float())
            scores["l1"].append(terms["l1"])
            recs.append(terms["rec"].cpu())
        module.train()
        metrics = {prefix + k: torch.cat(v).mean().item() for k, v in scores.items()}
        ema = "ema" in prefix
        grid = pairs_grid(self.val_images, torch.cat(recs), f"step {self.step}{' EMA' if ema else ''}",
                          torch.cat(scores["psnr"]).tolist())
        out = self.output_dir / "samples" / f"step{self.step:08d}{'_ema' if ema else ''}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        self.logger.image(prefix.rstrip("/"), grid, self.step)
        return metrics

    def validate(self, metrics_file) -> None:
        """Collective: rank 0 evaluates (the model, then the EMA swapped in on every rank) while the others
        wait in the gloo group; one metrics.jsonl record {"step", "holdout/...", "ema_holdout/..."}."""
        metrics = self.evaluate("holdout/") if self.dist.is_main else {}
        torch.distributed.barrier(group=self.wait_group)
        if self.ema is not None and self.cfg.validation.use_ema:
            with self.ema.swapped_in():
                metrics |= self.evaluate("ema_holdout/") if self.dist.is_main else {}
                torch.distributed.barrier(group=self.wait_group)
        if self.dist.is_main:
            self.logger.scalars(metrics, self.step)
            metrics_file.write(json.dumps({"step": self.step} | metrics) + "\n")
            metrics_file.flush()
            lpips = f", LPIPS {metrics['holdout/lpips']:.4f}" if "holdout/lpips" in metrics else ""
            tqdm.write(f"step {self.step}: held-out PSNR {metrics['holdout/psnr']:.2f} dB, SSIM "
                       f"{metrics['holdout/ssim']:.4f}{lpips}")

    # ----------------------------------------------------------------------------- the loop
    def _request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        if self.dist.is_main:
            tqdm.write(f"signal {signum}: finishing this step, saving a checkpoint, then exiting")

    def after_update(self, applied: bool) -> None:
        """EMA update every ema.every applied steps; post-hoc snapshots (as trainer.Trainer.after_update)."""
        if applied and self.step % self.cfg.ema.every == 0:
            self.ema.update()
        if self.cfg.ema.posthoc and self.step % self.cfg.ema.snapshot_every == 0:
            self.ema.snapshot(self.output_dir, self.step)

    def _log(self, metrics_file, terms: dict[str, float], lr: float, seconds: float) -> None:
        record = {"step": self.step, **terms, "lr": lr}
        if self.step % self.cfg.trainer.log_every == 0:
            grad_norm = self.engine.get_global_grad_norm()
            record |= {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "step_time": seconds, "nonfinite_total": self.nonfinite_total,
                       "skipped_steps": self.engine.skipped_steps}
            self.logger.scalars({f"train/{k}": v for k, v in record.items() if k != "step"}, self.step)
        if self.dist.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def train(self) -> None:
        cfg, val = self.cfg.trainer, self.cfg.validation
        self.resume()
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        if self.dist.is_main:
            print(READY_LINE, flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(self.output_dir / "metrics.jsonl", "a") if self.dist.is_main else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train vae", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.logging.progress))
        saved_at = self.step
        try:
            if val.every and self.step == 0:
                self.validate(metrics_file)
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                lr = lr_at(self.step - self.engine.skipped_steps, cfg, self.cfg.optimizer.lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                skipped = self.engine.skipped_steps
                terms = self.train_step()
                self.step += 1
                if self.ema is not None:
                    self.after_update(applied=self.engine.skipped_steps == skipped)
                self._log(metrics_file, terms, lr, time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}")
                stop = any_rank(self.stop_requested)  # host sync once per step: all ranks stop together
                if self.step % cfg.save_every == 0 or stop:
                    self.save()
                    saved_at = self.step
                if stop:
                    return
                if val.every and self.step % val.every == 0:
                    self.validate(metrics_file)
            if saved_at != self.step:
                self.save()
            if val.every and self.step % val.every:
                self.validate(metrics_file)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
            self.logger.close()


def pairs_grid(inputs: torch.Tensor, outputs: torch.Tensor, title: str, psnrs: list[float]) -> Image.Image:
    """Inputs beside their reconstructions, one pair a row, with a header line and each row's PSNR.

    Shape: (N, 3, S, S) x2 in [-1, 1] -> PIL image 2S wide."""
    pairs = torch.stack([inputs, outputs.float()], 1).flatten(0, 1)  # (2N, 3, S, S): input, output, ...
    body = image_grid(pairs, columns=2)
    header = 14  # pixels: one line of PIL's default font
    canvas = Image.new("RGB", (body.width, body.height + header), (255, 255, 255))
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    side = inputs.shape[-1]
    draw.text((2, 1), f"in | out, {title}", fill=(0, 0, 0))
    for row, value in enumerate(psnrs):
        draw.text((side + 2, header + row * side + 1), f"{value:.1f} dB", fill=(255, 0, 255))
    return canvas
