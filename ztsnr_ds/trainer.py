"""The training loop: one step from cached latents to an optimizer update, readable top to bottom.

    batch (one bucket) -> text conditioning (cached or live) -> sigma per sample
    (resolution-scaled for the bucket) -> x = x0 + sigma * eps -> UNet(c_in * x, t(sigma))
    -> weighted v loss (B,) -> mean -> engine.backward -> engine.step

`Trainer.__init__` assembles the components through small `build_*` helpers;
`Trainer.train()` is the loop. Rank-dependent behaviour comes from `DistInfo` only.

Every random draw of a sample (sigma, noise, caption dropout and tag shuffle) comes from
streams seeded by (seed, epoch, sample id) alone (`sample_streams`), so a global batch trains
on the same numbers whatever the number of ranks, and resume needs no state for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import time
import warnings
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from ztsnr_ds import checkpoint, init_from, kernels
from ztsnr_ds.config import TrainConfig, TrainerConfig
from ztsnr_ds.data_checks import open_cache
from ztsnr_ds.device import to_device
from ztsnr_ds.ema import EMA_DIR, ShardedEMA
from ztsnr_ds.engine import DistInfo, any_rank, initialize, is_pure_bf16, wait_group
from ztsnr_ds.generate import SampleSpec, generate
from ztsnr_ds.holdout import HoldoutLoss, holdout_count, holdout_ids, training_buckets
from ztsnr_ds.metrics import BandMeter, MetricLogger
from ztsnr_ds.mixing import caption_control, sampler_options
from ztsnr_ds.models import load_frozen, load_unet
from ztsnr_ds.objective import VObjective, add_noise, append_dims, c_in
from ztsnr_ds.run_folder import SAMPLES_DIR, save_validation_grid
from ztsnr_ds.schedule import NoiseSchedule
from ztsnr_ds.text import PromptEncoder, TextConditioning
from ztsnr_ds.text_training import TextTraining

READY_LINE = "ztsnr_ds: training loop started"


def lr_at(step: int, cfg: TrainerConfig, peak: float) -> float:
    """Linear warmup to `peak`, then constant or cosine down to min_lr_ratio * peak."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return peak
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_streams(seed: int, epoch: int, sample_id: int) -> tuple[torch.Generator, random.Random]:
    """The random streams of one use of one sample: torch (sigma, noise) and Python (caption edits).

    Seeded from (seed, epoch, id) only, not from the rank or the position in a batch, so 1 rank
    with micro-batch 4 and 2 ranks with micro-batch 2 draw the same numbers for the same global
    batch. A repeated image's uses in one epoch have distinct use ids (data/repeats.py): fresh draws.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{sample_id}".encode()).digest()
    return (torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")),
            random.Random(int.from_bytes(digest[8:16], "little")))


class StopTraining(RuntimeError):
    """Raised when the run cannot go on (e.g. too many non-finite losses in a row)."""


class Trainer:
    def __init__(self, cfg: TrainConfig, config_dict: dict, dist: DistInfo) -> None:
        self.cfg, self.config_dict, self.dist = cfg, config_dict, dist
        if cfg.trainer.deterministic:
            kernels.make_deterministic()  # before the first matmul (cuBLAS workspace)
        self.wait_group = wait_group()  # collective: every rank, here
        self.output_dir = Path(cfg.trainer.output_dir)
        self.device = torch.device(get_accelerator().device_name(dist.local_rank))
        self.cache = open_cache(cfg.data.cache_dir, cfg.trainer.max_bad_samples, dist)  # checked, collective
        self.schedule = NoiseSchedule(cfg.noise.ztsnr, cfg.noise.sigma_max,
                                      cfg.noise.base_area if cfg.noise.resolution_scaling else None)
        self.objective = VObjective(cfg.loss.weighting, cfg.loss.gamma, cfg.loss.terminal_weight,
                                    cfg.noise.sigma_max)
        self.parts = load_frozen(cfg.model.pretrained, dtype=torch.bfloat16)
        for module in (self.parts.vae, self.parts.text_encoder, self.parts.text_encoder_2):
            module.to(self.device)
        self.text_training = TextTraining(cfg.text_encoders, self.parts)  # trained encoders (none by default)
        self.prompts = PromptEncoder.from_parts(self.parts, cfg.captions.max_chunks)
        self.resume_tag = checkpoint.find_resume_tag(self.output_dir, cfg.trainer.resume)
        self.build_engine()
        self.ema = (ShardedEMA(cfg.ema, self.engine, self.optimizer, dist.rank, dist.world_size,
                               cfg.trainer.seed) if cfg.ema.enabled else None)
        self.sampler = cfg.sampler(self.build_holdout(), cfg.trainer.micro_batch, dist.world_size, dist.rank,
                                   **sampler_options(cfg, self.cache.index))
        self.captions = caption_control(cfg, self.cache.index.sources)  # per-use edits of live captions
        self.step_samples = 0  # samples of all ranks in the last optimizer step
        self.step = 0
        self.nonfinite_total = 0
        self.stop_requested = False
        self.bands = BandMeter(self.device)
        self.logger = MetricLogger(self.output_dir, config_dict, dist.is_main, cfg.logging.tensorboard,
                                   cfg.logging.wandb, cfg.logging.wandb_project, cfg.logging.wandb_mode)

    # ----------------------------------------------------------------------------- set-up
    def build_engine(self) -> None:
        cfg = self.cfg
        loads = self.resume_tag or init_from.source_tag(cfg.trainer.init_from)  # the tag the engine loads
        ds_config = checkpoint.resume_ds_config(cfg.deepspeed_config, cfg.trainer.micro_batch,
                                                cfg.trainer.grad_accum, self.dist.world_size, loads)
        # Pure bf16 never holds fp32 weights, so load bf16; the fp32-master mode keeps full precision.
        dtype = torch.bfloat16 if is_pure_bf16(ds_config) else torch.float32
        unet = load_unet(cfg.model.unet_path or cfg.model.pretrained, dtype=dtype)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        kernels.set_attention(unet, cfg.model.attention)  # PyTorch SDPA, backend as configured
        kernels.compile_unet(unet, cfg.model.compile)
        unet.train()
        # AdamWSR, one group for the UNet and one per trained text encoder (attached to the UNet module)
        self.optimizer = self.text_training.optimizer(unet, cfg.optimizer, cfg.trainer.seed, self.dist.rank)
        self.unet_config = dict(unet.config)
        self.engine = initialize(unet, self.optimizer, ds_config)
        self.dtype = self.engine.module.dtype  # UNet inputs: bf16 as DeepSpeed cast it, fp32 without bf16

    def build_holdout(self) -> dict:
        """Held-out images (validation.holdout; self.holdout None without); returns the training buckets."""
        val = self.cfg.validation
        held = holdout_ids(self.cache.key_hash, holdout_count(val.holdout, len(self.cache)), val.holdout_seed)
        self.holdout = HoldoutLoss(held, self.cache, self.schedule, self.objective, self.prompts,
                                   val.holdout_seed, self.dist.rank, self.dist.world_size,
                                   self.device) if len(held) else None
        return training_buckets(self.cache.buckets, held, len(self.cache))

    def state(self) -> dict:
        return {
            checkpoint.STEP: self.step,
            checkpoint.WORLD_SIZE: self.dist.world_size,
            checkpoint.EPOCH_KEY: self.sampler.epoch,
            checkpoint.SAMPLER: self.sampler.state_dict(),
            checkpoint.CONFIG: self.config_dict,
            checkpoint.UNET_CONFIG: json.loads(json.dumps(self.unet_config, default=str)),
            checkpoint.COUNTERS: {"nonfinite_total": self.nonfinite_total},
        }

    def save(self) -> Path:
        # The per-sample streams are a function of (seed, epoch, id): no generator state to save.
        ema = (lambda tag_dir: self.ema.save(tag_dir / EMA_DIR), self.ema.nbytes()) if self.ema else (None, 0)
        return checkpoint.save(self.engine, self.output_dir, self.step, self.state(),
                               self.cfg.trainer.keep_last, self.dist.is_main, *ema)

    def resume(self) -> None:
        """Load the tag found at start-up (self.resume_tag), if any: weights, optimizer, step, sampler."""
        if self.resume_tag is None:
            return init_from.start(self)  # trainer.init_from: a new run from another run's state
        state = checkpoint.load(self.engine, self.resume_tag, self.dist.is_main)
        self.step = state[checkpoint.STEP]
        saved = state[checkpoint.SAMPLER]
        if not self.sampler.same_global_batches(saved):
            warnings.warn(f"{self.resume_tag} was saved with global batch {saved['global_batch']} "
                          f"(micro_batch x world size, batch by area {saved.get('base_area')}), now "
                          f"{self.sampler.global_batch} (by area {self.sampler.base_area}): the sampler "
                          "keeps epoch and samples consumed, but the rest of this epoch may repeat or skip "
                          "some samples (keep micro_batch x world size for an exact continuation)",
                          stacklevel=2)
        self.sampler.load_state_dict(saved)
        self.nonfinite_total = state[checkpoint.COUNTERS]["nonfinite_total"]
        if self.ema is not None:
            self.resume_ema(self.resume_tag / EMA_DIR)
        if self.dist.is_main:
            print(f"resumed from {self.resume_tag} at step {self.step}")

    def resume_ema(self, folder: Path) -> None:
        """The EMA of the tag (any world size); a tag saved without EMA starts it from the loaded weights."""
        if folder.is_dir():
            self.ema.load(folder)
            return
        self.ema.reset()
        if self.dist.is_main:
            warnings.warn(f"{folder.parent} holds no EMA (trained without ema.enabled): the EMA starts from "
                          "its weights now", stacklevel=2)

    def after_update(self, applied: bool) -> None:
        """EMA bookkeeping after optimizer step self.step: an update every ema.every steps (only if the
        step was applied: DeepSpeed skips inf-gradient steps), and post-hoc snapshots."""
        ema = self.cfg.ema
        if applied and self.step % ema.every == 0:
            self.ema.update()
        if ema.posthoc and self.step % ema.snapshot_every == 0:
            self.ema.snapshot(self.output_dir, self.step)

    # ----------------------------------------------------------------------------- one step
    def conditioning(self, batch: dict, rngs: list[random.Random]) -> TextConditioning:
        """Text conditioning (embeds (B, 77 K, D), pooled (B, P), chunks (B,)): cached or encoded live
        (edited, then chunked), with caption dropout. rngs: one Python stream per sample (dropout draw,
        then the edits of data/caption_control.py)."""
        cap = self.cfg.captions
        drop = torch.tensor([rng.random() < cap.dropout for rng in rngs])
        cached = "embeds" in batch
        if cached:
            embeds, pooled = to_device(self.device, batch["embeds"], batch["pooled"])
            cond = TextConditioning(embeds, pooled, batch["chunks"])
        else:
            captions = self.captions.edit(batch["captions"], batch["source"].tolist(), drop.tolist(), rngs)
            cond = self.prompts.encode(captions)
        if cached or cap.dropout_mode == "zeros":  # live "" rows are already the encoded ""
            cond = self.prompts.with_dropout(cond, drop, cap.dropout_mode)
        return cond

    def forward_loss(self, batch: dict, bucket: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weighted v loss (B,) and the sigmas drawn for it (B,)."""
        x0 = batch["latents"].float()  # (B, 4, h/8, w/8), already * scaling
        height, width = self.cache.height_width(bucket)
        streams = [sample_streams(self.cfg.trainer.seed, self.sampler.epoch, i) for i in ids]
        sigma = torch.cat([self.schedule.sample_sigmas(1, height, width, gen) for gen, _ in streams])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=gen) for gen, _ in streams])
        # Drawn on the CPU, per sample; one non-blocking copy of the whole micro-batch (ztsnr_ds/device.py).
        x0, noise, sigma, t, weight, time_ids = to_device(
            self.device, x0, noise, sigma, self.schedule.timestep(sigma), batch["weight"], batch["time_ids"])
        text = self.conditioning(batch, [rng for _, rng in streams])
        x = add_noise(x0, noise, sigma)
        model_in = (c_in(append_dims(sigma, x.ndim)) * x).to(self.dtype)
        v_pred = self.engine(model_in, t, encoder_hidden_states=text.embeds.to(self.dtype),
                             encoder_attention_mask=text.mask(),  # None unless chunk counts differ
                             added_cond_kwargs={"text_embeds": text.pooled.to(self.dtype),
                                                "time_ids": time_ids}).sample
        return self.objective.loss(v_pred.float(), x0, noise, sigma, weight), sigma

    def train_step(self, batches) -> float:
        """One optimizer step over grad_accum good micro-batches; returns the global mean loss.

        Each sample weighs 1 / (samples of all ranks in this optimizer step), C, which every rank reads
        from the sampler's plan. DeepSpeed divides by grad_accum and averages over W ranks, so a rank's
        micro-batch loss is sum(per-sample) * W * grad_accum / C: the gradient of the global mean.
        A micro-batch whose loss is non-finite on any rank is dropped on all ranks before backward (an inf
        gradient from a finite loss is DeepSpeed's to skip), its graph freed, and the next one takes its
        place (C counts the planned micro-batches: the weighting is off by the swapped sizes, see README).
        """
        accum = self.cfg.trainer.grad_accum
        scale = self.dist.world_size * accum / self.sampler.upcoming_samples(accum)
        loss_sum, samples, good, consecutive = 0.0, 0, 0, 0
        while good < accum:
            bucket, ids = next(batches)
            per_sample, sigma = self.forward_loss(self.cache.batch(ids), bucket, ids)
            loss = per_sample.sum() * scale
            flags = torch.stack([per_sample.detach().float().sum(), (~torch.isfinite(loss)).float(),
                                 loss.new_full((), float(len(ids)))])  # a fill: no host-to-device copy
            torch.distributed.all_reduce(flags)  # sums over ranks: loss, non-finite ranks, samples
            total, nonfinite, count = flags.tolist()  # host sync: every rank must agree before backward
            if nonfinite:
                del per_sample, sigma, loss  # the skipped graph's activations: not alive in the next forward
                consecutive, self.nonfinite_total = consecutive + 1, self.nonfinite_total + 1
                if self.dist.is_main:
                    tqdm.write(f"step {self.step}: non-finite loss on {int(nonfinite)} rank(s), "
                               f"micro-batch skipped ({self.nonfinite_total} so far)")
                if consecutive >= self.cfg.trainer.max_nonfinite:
                    raise StopTraining(f"{consecutive} non-finite losses in a row at step {self.step}; "
                                       "stopping. The last complete checkpoint is intact; lower "
                                       "optimizer.lr or check the data, then resume.")
                continue
            consecutive, good = 0, good + 1
            self.engine.backward(loss)
            self.engine.step()
            self.bands.add(per_sample, sigma)
            loss_sum, samples = loss_sum + total, samples + int(count)
        self.step_samples = samples
        return loss_sum / samples

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, weights: str = "model") -> Path | None:
        """Rank 0 samples the fixed prompts with the ZTSNR Euler sampler and writes a PNG grid.

        weights: "model", or "ema" when the EMA is swapped into the module (grid name ..._ema.png)."""
        if not self.dist.is_main:
            return None
        val = self.cfg.validation
        spec = SampleSpec(prompts=list(val.prompts), negative=val.negative, seed=val.seed, steps=val.steps,
                          schedule=val.schedule, cfg=val.cfg_scale, cfg_rescale=val.cfg_rescale,
                          width=val.width, height=val.height, dropout_mode=self.cfg.captions.dropout_mode,
                          max_chunks=self.cfg.captions.max_chunks)
        unet = self.engine.module  # ZeRO-2 keeps full weights on every rank
        unet.eval()
        samples = generate(unet, self.parts, self.schedule, spec, progress=False)
        unet.train()
        suffix = "" if weights == "model" else f"_{weights}"
        out = self.output_dir / SAMPLES_DIR / f"step{self.step:08d}{suffix}.png"
        grid = save_validation_grid(samples, spec, out, self.step)  # labelled, with PNG text chunks
        self.logger.image(f"validation{suffix}", grid, self.step, caption=" | ".join(val.prompts))
        return out

    def holdout_metrics(self, prefix: str = "holdout/") -> dict[str, float]:
        """Held-out loss (ztsnr_ds/holdout.py) of the weights now in self.engine.module (ZeRO-2: full
        weights on every rank), keys prefixed; {} without validation.holdout. Collective: every rank."""
        if self.holdout is None:
            return {}
        return {prefix + key: value for key, value in self.holdout.evaluate(self.engine.module).items()}

    def _log_holdout(self, metrics_file) -> None:
        """Evaluate the held-out loss; log it, and add a record {"step", "holdout/..."} to metrics.jsonl.
        With the EMA on (and validation.use_ema) also for the EMA weights, as "ema_holdout/..."."""
        metrics = self.holdout_metrics()
        if self.ema is not None and self.cfg.validation.use_ema and metrics:
            with self.ema.swapped_in():
                metrics |= self.holdout_metrics("ema_holdout/")
        self.logger.scalars(metrics, self.step)
        if self.dist.is_main:
            metrics_file.write(json.dumps({"step": self.step} | metrics) + "\n")
            metrics_file.flush()
            tqdm.write(f"step {self.step}: held-out loss {metrics['holdout/loss']:.5f}")

    def _validate_while_others_wait(self) -> None:
        """Rank 0 validates while the others wait in a barrier of the gloo wait group (long timeout),
        not in the next step's NCCL collective, whose timeout (30 min) would kill the job if sampling
        took longer. No device work is in flight meanwhile: every step ends with a host sync.
        With the EMA on (and validation.use_ema), a second grid from the EMA, swapped in on all ranks."""
        self.validate()
        torch.distributed.barrier(group=self.wait_group)
        if self.ema is not None and self.cfg.validation.use_ema:
            with self.ema.swapped_in():
                self.validate("ema")
                torch.distributed.barrier(group=self.wait_group)

    # ----------------------------------------------------------------------------- the loop
    def _request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        if self.dist.is_main:
            tqdm.write(f"signal {signum}: finishing this step, saving a checkpoint, then exiting")

    def _agree_to_stop(self) -> bool:
        return any_rank(self.stop_requested or self.cache.faults.stop)  # host sync per step: all save, stop

    def _report_sampler(self) -> None:
        """Rank 0: the per-bucket batching table on stdout and in <output_dir>/sampler_summary.json."""
        if self.dist.is_main:
            print(self.sampler.summary())
            summary = json.dumps(self.sampler.summary_dict, indent=1)
            (self.output_dir / "sampler_summary.json").write_text(summary)

    def _log(self, metrics_file, loss: float, lr: float, seconds: float) -> None:
        record = {"step": self.step, "loss": loss, "lr": lr, "epoch": self.sampler.epoch,
                  "samples_per_step": self.step_samples, **self.sampler.samples_seen()}
        if self.step % self.cfg.trainer.log_every == 0:
            grad_norm = self.engine.get_global_grad_norm()
            record |= {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "step_time": seconds, "samples_per_s": self.step_samples / seconds,
                       "nonfinite_total": self.nonfinite_total, "skipped_steps": self.engine.skipped_steps}
            record |= self.bands.read_and_reset()
            self.logger.scalars({k: v for k, v in record.items() if k != "step"}, self.step)
        if self.dist.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def train(self) -> None:
        cfg = self.cfg.trainer
        self.resume()
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        if self.dist.is_main:  # from here a signal means "save, then exit"; tests and schedulers wait for it
            print(READY_LINE, flush=True)
        batches = iter(self.sampler)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._report_sampler()
        metrics_file = open(self.output_dir / "metrics.jsonl", "a") if self.dist.is_main else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.logging.progress))
        saved_at = self.step
        val = self.cfg.validation
        holdout_every = (val.loss_every or val.every) if self.holdout is not None else 0
        try:
            if holdout_every and self.step == 0:  # the starting point of a new run's held-out curve
                self._log_holdout(metrics_file)
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                # The schedule counts updates applied: DeepSpeed skips (and counts) inf-gradient steps.
                lr = lr_at(self.step - self.engine.skipped_steps, cfg, self.cfg.optimizer.lr)
                self.text_training.set_lr(self.optimizer, self.step, lr)  # encoders: scaled; frozen past stop
                skipped = self.engine.skipped_steps
                loss = self.train_step(batches)
                self.step += 1
                if self.ema is not None:
                    self.after_update(applied=self.engine.skipped_steps == skipped)
                self._log(metrics_file, loss, lr, time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=self.sampler.epoch)
                stop = self._agree_to_stop()
                if self.step % cfg.save_every == 0 or stop:
                    self.save()
                    saved_at = self.step
                if stop:
                    return
                if holdout_every and self.step % holdout_every == 0:
                    self._log_holdout(metrics_file)
                if self.cfg.validation.every and self.step % self.cfg.validation.every == 0:
                    self._validate_while_others_wait()
            if saved_at != self.step:
                self.save()
            if holdout_every and self.step % holdout_every:
                self._log_holdout(metrics_file)
            if self.cfg.validation.every and self.step % self.cfg.validation.every:
                self._validate_while_others_wait()
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
            self.logger.close()
