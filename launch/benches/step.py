"""One training step through the Trainer against a bare loop over the same UNet call, with a profile."""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launch.benches import ROOT, arg, benchmark, interleaved_times
from ztsnr_ds.optim import AdamWSR


def tiny_training_config(root: Path, micro_batch: int) -> Path:
    """configs/demo.yaml on a fresh tiny SDXL and 16 generated images cached with text embeddings."""
    import yaml

    from ztsnr_ds.data.buckets import BucketConfig
    from ztsnr_ds.data.cache import CacheConfig
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.data.synthetic import write_dataset
    from ztsnr_ds.models import load_frozen, write_tiny_sdxl

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["pretrained"] = str(write_tiny_sdxl(root / "model"))
    config["data"] |= {"source": str(write_dataset(root / "data", n=16)), "cache_dir": str(root / "cache"),
                       "cache_text": True}
    config["trainer"] |= {"output_dir": str(root / "run"), "micro_batch": micro_batch}
    config["validation"] |= {"holdout": 0, "loss_every": 0}  # all 16 images train
    config["logging"] = {"tensorboard": False, "progress": False}
    data = config["data"] | {"buckets": BucketConfig(**config["data"]["buckets"])}
    build_cache(CacheConfig(**data), load_frozen(root / "model", dtype=torch.float32), progress=False)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def unet_call(trainer, batch: dict, bucket: str, ids: list[int]) -> tuple[tuple, dict]:
    """The arguments trainer.forward_loss passes to the UNet for this batch (caught by a pre-hook)."""
    caught: dict = {}
    handle = trainer.engine.module.register_forward_pre_hook(
        lambda _module, args, kwargs: caught.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        trainer.forward_loss(batch, bucket, ids)
    handle.remove()
    return caught["args"], caught["kwargs"]


class BareLoop:
    """The trainer's forward, loss, backward, clipping and AdamW on a plain UNet: no DeepSpeed, no
    data or draws per step (one fixed batch, the trainer's own inputs for it)."""

    def __init__(self, trainer, bucket: str, ids: list[int], optimizer: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        from ztsnr_ds.models import load_unet
        from ztsnr_ds.trainer import sample_streams

        batch = trainer.cache.batch(ids)
        self.args, self.kwargs = unet_call(trainer, batch, bucket, ids)
        height, width = trainer.cache.height_width(bucket)
        gens = [sample_streams(trainer.cfg.trainer.seed, trainer.sampler.epoch, i)[0] for i in ids]
        self.sigma = torch.cat([trainer.schedule.sample_sigmas(1, height, width, g) for g in gens])
        self.x0 = batch["latents"].float()  # (B, 4, h/8, w/8)
        self.noise = torch.stack([torch.randn(self.x0.shape[1:], generator=g) for g in gens])
        self.weight, self.objective = batch["weight"], trainer.objective
        self.unet = load_unet(trainer.cfg.model.pretrained, dtype=torch.bfloat16)
        self.unet.set_attn_processor(AttnProcessor2_0())
        self.unet.train()
        opt = trainer.cfg.optimizer
        kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
        self.optimizer = (torch.optim.AdamW(self.unet.parameters(), foreach=True, **kwargs)
                          if optimizer == "torch" else AdamWSR(self.unet.parameters(), **kwargs))

    def step(self) -> None:
        v_pred = self.unet(*self.args, **self.kwargs).sample
        loss = self.objective.loss(v_pred.float(), self.x0, self.noise, self.sigma, self.weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)  # gradient_clipping in ds_configs
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def profile_ms(fn: Callable[[], Any], steps: int) -> dict[tuple[str, str], float]:
    """cProfile cumulative milliseconds per call of fn, for every function it ran, keyed (file, name)."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(steps)])
    out: dict[tuple[str, str], float] = {}
    for (file, _line, name), (_cc, _nc, _tt, cumtime, _callers) in pstats.Stats(profiler).stats.items():
        out[(file, name)] = out.get((file, name), 0.0) + 1e3 * cumtime / steps
    return out


def cumulative(profile: dict[tuple[str, str], float], *functions: tuple[str, str]) -> float:
    """Sum of the profile's times of functions given as (file suffix, name prefix)."""
    return sum(ms for (file, name), ms in profile.items()
               for suffix, prefix in functions if file.endswith(suffix) and name.startswith(prefix))


UNET_FORWARD = ("diffusers/models/unets/unet_2d_condition.py", "forward")
RUN_BACKWARD = ("~", "<method 'run_backward'")
LOSS = ("ztsnr_ds/objective.py", "loss")
ADAMWSR_STEP = ("ztsnr_ds/optim.py", "step")
ZERO = "deepspeed/runtime/zero/stage_1_and_2.py"
ZERO_CLIP = ((ZERO, "scaled_global_norm"), (ZERO, "unscale_and_clip_grads"))
ZERO_OVERFLOW = (ZERO, "check_overflow")
ZERO_COPY_BACK = (ZERO, "_update_model_bit16_weights")
# (component, trainer functions, trainer functions to subtract, bare-loop functions)
PROFILE_ROWS: tuple[tuple[str, tuple, tuple, tuple], ...] = (
    ("cache read, per-sample draws, conditioning",
     (("ztsnr_ds/data/cache.py", "batch"), ("ztsnr_ds/trainer.py", "sample_streams"),
      ("ztsnr_ds/schedule.py", "sample_sigmas"), ("~", "<built-in method randn"),
      ("ztsnr_ds/trainer.py", "conditioning")), (), ()),
    ("UNet forward", (UNET_FORWARD,), (), (UNET_FORWARD,)),
    ("DeepSpeed engine forward, outside the UNet", (("deepspeed/runtime/engine.py", "forward"),),
     (UNET_FORWARD,), ()),
    ("loss (VObjective.loss)", (LOSS,), (), (LOSS,)),
    ("autograd backward, without DeepSpeed's hooks", (RUN_BACKWARD,),
     ((ZERO, "grad_handling_hook"),), (RUN_BACKWARD,)),
    ("DeepSpeed gradient hooks (copy into the reduce bucket)", ((ZERO, "grad_handling_hook"),), (), ()),
    ("DeepSpeed backward, outside autograd (bucket reduce, epilogue)",
     (("deepspeed/runtime/engine.py", "backward"),), (("torch/_tensor.py", "backward"),), ()),
    ("gradient norm and clipping", ZERO_CLIP, (), (("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),)),
    ("optimizer math", (ADAMWSR_STEP,), (), (("torch/optim/adam.py", "step"),)),
    ("DeepSpeed overflow check (inf/nan scan of the gradients)", (ZERO_OVERFLOW,), (), ()),
    ("DeepSpeed copy of the updated partition into the weights", (ZERO_COPY_BACK,), (), ()),
    ("DeepSpeed step, the rest", (("deepspeed/runtime/engine.py", "step"),),
     (ADAMWSR_STEP, ZERO_OVERFLOW, ZERO_COPY_BACK, *ZERO_CLIP), ()),
)


def print_profile(trainer_profile: dict, bare_profile: dict) -> None:
    """Table of PROFILE_ROWS in ms per step; what the rows miss is listed as the rest."""
    whole = (cumulative(trainer_profile, ("ztsnr_ds/trainer.py", "train_step")),
             cumulative(bare_profile, ("launch/bench.py", "step")))
    print("| component | bare loop ms/step | trainer ms/step | trainer - bare |")
    print("|---|---|---|---|")
    listed = [0.0, 0.0]
    for name, functions, minus, bare_functions in PROFILE_ROWS:
        ms = (cumulative(trainer_profile, *functions) - cumulative(trainer_profile, *minus),
              cumulative(bare_profile, *bare_functions))
        listed = [listed[0] + ms[0], listed[1] + ms[1]]
        print(f"| {name} | {ms[1]:.1f} | {ms[0]:.1f} | {ms[0] - ms[1]:+.1f} |")
    for name, ms in (("rest (non-finite check all_reduce + host sync, Python glue)",
                      (whole[0] - listed[0], whole[1] - listed[1])),
                     ("**whole step (under cProfile)**", whole)):
        print(f"| {name} | {ms[1]:.1f} | {ms[0]:.1f} | {ms[0] - ms[1]:+.1f} |")


@benchmark(
    arg("--micro-batch", type=int, default=4, help="samples per step (latents 4x16x16)"),
    arg("--warmup", type=int, default=2),
    arg("--repeats", type=int, default=10),
    arg("--profile-steps", type=int, default=3, help="steps under cProfile for the breakdown"),
)
def bench_step(args: argparse.Namespace) -> None:
    """Trainer step (DeepSpeed ZeRO-2, AdamWSR, ZTSNR loss, cached batch) vs a bare PyTorch loop.

    Tiny SDXL-shaped UNet, one batch of cached latents and text embeddings, every case in one process.
    """
    from ztsnr_ds.config import parse
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg, config_dict = parse(["--config", str(tiny_training_config(Path(tmp), args.micro_batch))])
        trainer = Trainer(cfg, config_dict, init_distributed())
        bucket, ids = next(iter(trainer.sampler))
        same_batch = itertools.repeat((bucket, ids))
        bare = {name: BareLoop(trainer, bucket, ids, name) for name in ("torch", "sr")}
        captions = trainer.cache.batch(ids)["captions"]
        cases = {"bare loop, torch.optim.AdamW (bf16 params)": bare["torch"].step,
                 "bare loop, AdamWSR per tensor": bare["sr"].step,
                 "trainer.train_step (DeepSpeed ZeRO-2 pure bf16, AdamWSR on the flat partition)":
                     lambda: trainer.train_step(same_batch),
                 "live text encoding of the batch (cache_text: false)":
                     lambda: trainer.prompts.encode(captions)}
        runs = interleaved_times(cases, args.warmup, args.repeats)
        profiles = (profile_ms(lambda: trainer.train_step(same_batch), args.profile_steps),
                    profile_ms(bare["torch"].step, args.profile_steps))
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    print(f"Tiny SDXL UNet ({n_params / 1e6:.2f}M parameters), batch {args.micro_batch} of 4x16x16 latents "
          f"(bucket {bucket}), bf16, SDPA attention; median (min) of {args.repeats} steps after "
          f"{args.warmup} warmup, cases interleaved.\n")
    base = statistics.median(runs[next(iter(cases))])
    print("| case | ms/step median (min) | x bare torch |")
    print("|---|---|---|")
    for name, seconds in runs.items():
        med = statistics.median(seconds)
        print(f"| {name} | {1e3 * med:.0f} ({1e3 * min(seconds):.0f}) | {med / base:.3f} |")
    print(f"\nWhere the time goes (cProfile, {args.profile_steps} steps each; the profiler inflates "
          "Python-heavy rows):\n")
    print_profile(*profiles)
