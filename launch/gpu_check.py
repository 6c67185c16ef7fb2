"""Prove the GPU path on one GPU in one command; `--dry-run` runs the same code with tiny sizes.

    deepspeed --num_gpus 1 launch/gpu_check.py --out gpu_check_out     # one H100/H200: NCCL, one rank
    python launch/gpu_check.py --dry-run --out /tmp/gpu_check          # tiny sizes (the test suite runs it)

The checks run in this order; the first that fails stops the run, and the report says which and why:
  1 resume     a 30-step tiny run through launch/train.py, checkpoint at step 10, kill -9 once it is past
               step 15, resume: its per-step losses equal an uninterrupted run's bit for bit (both runs
               with trainer.deterministic and math attention, so that the comparison is meaningful on GPUs)
  2 optimizer  AdamWSR's compiled kernel (Triton on CUDA, C++ on the CPU) against its eager chunks on 2^26
               bf16 elements: params, moments and Kahan buffers bitwise equal after 3 steps; the
               stochastic-rounding error of one compiled step, over 10^6 elements, within 4 standard errors
  3 sdxl       configs/sdxl_unet/config.json (random init, 2.567e9 params) through Trainer.train_step under
               ZeRO-2 pure bf16 at 1024x1024, batch 1/4/8/16 as they fit, without and with gradient
               checkpointing: samples/s, MFU (model FLOP counted on the meta device, 20.2e12 per sample
               as in DESIGN.md, over the bf16 matmul peak measured here), peak GPU memory, bytes per
               parameter of live tensors; saves the checkpoint check 5 exports
  4 kernels    model.attention (flash, cudnn, efficient) and model.compile (regional, full) in that step
  5 export     check 3's checkpoint to single-file and diffusers (what launch/export.py runs), then
               4 images through launch/sample.py from the single file
  6 ema        a small UNet for 4 steps with the EMA and post-hoc tracks: held-out losses of the weights
               and of the EMA swapped in, the swap undone bit for bit, snapshots rebuilt by posthoc
Check 3 runs without the EMA (its tracks would add 12 B/param of HBM and ~21 GB of checkpoint), and
refuses to start when --out lacks room for its checkpoint and check 5's exports.
The dry run: the tiny SDXL-shaped UNet at 128x128, batches 1 and 2, math and flash attention, no compile
(a CPU compile of the UNet takes minutes). Writes <out>/gpu_check.json and <out>/gpu_check.md after every
check, so a run stopped by a time limit keeps what it measured. Work files go to <out>/work.

A bare GPU machine often has torch and Triton but not deepspeed, diffusers or jsonargparse, and no
network; this script checks its imports first. Fetch wheels elsewhere for the machine's Python and
platform (PyPI has DeepSpeed as an sdist only; its wheel is pure Python, ops JIT-built at run time):

    grep -v -E '^(torch|deepspeed)' requirements.txt > req.txt
    pip download -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        -r req.txt einops hjson msgpack ninja psutil py-cpuinfo 'pydantic>=2'
    pip wheel -w wheels --no-deps deepspeed==0.19.8
    # copy wheels/ and req.txt over, then on the GPU machine (its CUDA torch stays):
    pip install --no-index --find-links wheels -r req.txt deepspeed==0.19.8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402  (no dependencies: safe on a bare machine)

one_thread_per_process()  # --dry-run on a CPU: before torch is imported
quiet_deepspeed()  # DeepSpeed's expected warnings: one line
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEEDED = ("torch", "deepspeed", "diffusers", "transformers", "jsonargparse", "safetensors", "yaml", "numpy",
          "PIL", "tqdm", "accelerate")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK")


def missing_imports() -> list[str]:
    """Modules this script needs that are not installed (triton too where CUDA is)."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if "torch" not in missing:
        import torch

        if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
            missing.append("triton")
    return missing


class CheckFailed(RuntimeError):
    """A check's claim does not hold; the message says what was measured."""


@dataclass
class Context:
    """What the checks share: options, folders, device, and what an earlier check left for a later one."""

    args: argparse.Namespace
    out: Path
    work: Path
    device: object  # torch.device, imported after the import check
    dry: bool
    started: float = field(default_factory=time.monotonic)
    shared: dict = field(default_factory=dict)

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.args.budget_s


def train_py_env() -> dict[str, str]:
    """This environment without the launcher's rank variables: each launch/train.py is a world of one.
    One CPU thread: the model is tiny, and two runs at once with OpenMP spin-waits stall each other."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"OMP_NUM_THREADS": "1"}


def step_losses(output_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a resumed run appends, so the last record of a step wins."""
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines if line.endswith("}")]  # a killed writer's last line
    return {r["step"]: r["loss"] for r in records}


def train_command(config: Path, output_dir: Path, steps: int, save_every: int) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config),
            "--trainer.output_dir", str(output_dir), "--trainer.max_steps", str(steps),
            "--trainer.save_every", str(save_every), "--trainer.log_every", "1", "--validation.every", "0",
            "--trainer.deterministic", "true", "--model.attention", "math",
            "--deepspeed_config", str(ROOT / "ds_configs" / "zero2_bf16.json")]


def start_train(ctx: Context, config: Path, output_dir: Path):
    import subprocess

    command = train_command(config, output_dir, *ctx.args.resume[:2])
    with open(output_dir.with_suffix(".log"), "a") as log:  # a file, not a pipe: nothing blocks the child
        return subprocess.Popen(command, cwd=ROOT, env=train_py_env(), stdout=log, stderr=subprocess.STDOUT)


def finish(proc, output_dir: Path, timeout: float | None) -> None:
    """Wait for a launch/train.py run; a failure quotes the end of its log."""
    if proc.wait(timeout=timeout) != 0:
        tail = output_dir.with_suffix(".log").read_text()[-3000:]
        raise CheckFailed(f"launch/train.py for {output_dir.name} exited {proc.returncode}:\n{tail}")


def kill_in_loop(proc, output_dir: Path, kill_step: int, timeout: float | None) -> int:
    """SIGKILL our own child once it is in its training loop (long past DeepSpeed's JIT build) and has
    logged step `kill_step` (after the save before it: that tag is complete); returns its last step."""
    from ztsnr_ds.trainer import READY_LINE

    log, deadline = output_dir.with_suffix(".log"), time.monotonic() + (timeout or float("inf"))
    while proc.poll() is None and time.monotonic() < deadline:
        if READY_LINE in log.read_text() and max(step_losses(output_dir), default=0) >= kill_step:
            proc.kill()  # this pid only: no handler runs, nothing is saved
            proc.wait()
            return max(step_losses(output_dir))
        time.sleep(0.05)
    raise CheckFailed(f"the run to kill did not reach step {kill_step} (exit {proc.poll()}):\n"
                      f"{log.read_text()[-3000:]}")


def check_resume(ctx: Context) -> tuple[str, dict]:
    from launch.benches.step import tiny_training_config
    from ztsnr_ds import checkpoint

    root = ctx.work / "resume"
    config = tiny_training_config(root, micro_batch=2)
    straight, killed = root / "straight", root / "killed"
    n_steps, _, kill_step = ctx.args.resume
    first = start_train(ctx, config, straight)  # both at once: the machine has cores to spare
    victim = start_train(ctx, config, killed)
    limit = None if ctx.dry else 600.0  # the suite runs the dry run: no clock (a loaded machine is slower)
    killed_at = kill_in_loop(victim, killed, kill_step, limit)
    finish(first, straight, limit)
    tags = [t.name for t in checkpoint.complete_tags(killed / "checkpoints")]
    if not tags:
        raise CheckFailed(f"no complete checkpoint after the kill at step {killed_at}")
    resumed_from = checkpoint.read_state(killed / "checkpoints" / tags[-1])[checkpoint.STEP]
    finish(start_train(ctx, config, killed), killed, limit)  # resume: auto, from tags[-1]
    a, b = step_losses(straight), step_losses(killed)
    steps = range(1, n_steps + 1)
    differ = [(s, a.get(s), b.get(s)) for s in steps if a.get(s) is None or a.get(s) != b.get(s)]
    details = {"killed_after_step": killed_at, "returncode": victim.returncode, "resumed_from": resumed_from,
               "complete_tags_at_kill": tags, "steps_compared": len(steps)}
    if differ or victim.returncode != -9:
        raise CheckFailed(f"exit {victim.returncode}; steps whose losses differ (step, straight, resumed): "
                          f"{differ[:5]}")
    return (f"killed (-9) after step {killed_at}, resumed from step {resumed_from}: all {len(steps)} "
            f"per-step losses bitwise equal ({n_steps - resumed_from} after the resume)"), details


def optimizer_run(numel: int, device, kahan: bool, fused: bool, steps: int = 3) -> dict:
    """AdamWSR on one flat bf16 tensor from a fixed start and fixed grads; its param and state after."""
    import torch

    from ztsnr_ds.optim import AdamWSR

    gen = torch.Generator(device).manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, device=device, generator=gen).to(torch.bfloat16))
    opt = AdamWSR([p], lr=1e-3, kahan=kahan, fused=fused, seed=1)
    for _ in range(steps):
        p.grad = torch.randn(numel, device=device, generator=gen).to(torch.bfloat16)
        opt.step()
    return {"param": p.detach()} | {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}


def sr_error_in_se(numel: int, device) -> float:
    """Mean error of one compiled step's stochastic rounding, in standard errors: the bf16 param it wrote
    minus the fp32 value it rounded (adamw_fp32 of the same inputs, eager; sub-ulp updates at lr 1e-3)."""
    import torch

    from ztsnr_ds.optim import AdamWSR, adamw_coefficients, adamw_fp32

    gen = torch.Generator(device).manual_seed(2)
    p = torch.nn.Parameter(torch.randn(numel, device=device, generator=gen).to(torch.bfloat16))
    p.grad = torch.randn(numel, device=device, generator=gen).to(torch.bfloat16)
    opt = AdamWSR([p], lr=1e-3, fused=True, seed=3)
    coef = torch.tensor(adamw_coefficients(opt.param_groups[0], 1), device=device)
    zeros = torch.zeros_like(p)
    exact, _, _ = adamw_fp32(p.detach(), p.grad, zeros, zeros, coef)
    opt.step()
    err = (p.detach().double() - exact.double())
    return float(err.mean() / (err.std() / numel**0.5))  # host sync: a result


def check_optimizer(ctx: Context) -> tuple[str, dict]:
    import torch

    numel = ctx.args.optim_numel
    details: dict = {"numel": numel, "device": str(ctx.device)}
    for kahan in (False, True):
        eager = optimizer_run(numel, ctx.device, kahan, fused=False)
        fused = optimizer_run(numel, ctx.device, kahan, fused=True)
        diff = {k: int((eager[k].view(torch.int16) != fused[k].view(torch.int16)).sum()) for k in eager}
        details[f"differing_elements{'_kahan' if kahan else ''}"] = diff
        if any(diff.values()):
            raise CheckFailed(f"compiled and eager AdamWSR differ (kahan={kahan}), elements: {diff}")
    z = sr_error_in_se(10**6, ctx.device)
    details["sr_mean_error_in_standard_errors"] = z
    if not abs(z) < 4:
        raise CheckFailed(f"stochastic rounding is biased: mean error {z:.2f} standard errors from 0")
    names = ", ".join(k for k in eager)
    return (f"{numel} elements, 3 steps, with and without Kahan: {names} bitwise equal; SR mean error "
            f"{z:+.2f} standard errors over 10^6 elements"), details


# ----------------------------------------------------------------------------- the SDXL step


def sdxl_trainer(ctx: Context, name: str, *overrides: str):
    """A Trainer on check 3's model folder and latent cache, built through config.parse like train.py;
    without the EMA unless `overrides` turn it on (check 6)."""
    from ztsnr_ds.config import parse
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.trainer import Trainer

    model, cache = (ctx.shared.get(key, ctx.work / f"ema_{key}") for key in ("model", "cache"))
    base = ROOT / "configs" / ("demo.yaml" if ctx.dry else "sdxl_ztsnr.yaml")
    argv = ["--config", str(base), "--model.pretrained", str(model), "--data.source", str(cache),
            "--data.cache_dir", str(cache), "--trainer.output_dir", str(ctx.work / name),
            "--trainer.micro_batch", "1", "--validation.every", "0", "--validation.holdout", "0",
            "--validation.loss_every", "0", "--logging.tensorboard", "false",
            "--logging.progress", "false", "--model.gradient_checkpointing", "false",
            "--noise.base_area", str(ctx.args.side**2),
            "--ema.posthoc", "false", "--ema.enabled", "false",  # 12 B/param of tracks would distort check 3
            "--deepspeed_config", str(ROOT / "ds_configs" / "zero2_bf16.json"), *overrides]
    cfg, config_dict = parse(argv)
    return Trainer(cfg, config_dict, init_distributed())


def replace_trainer(ctx: Context, name: str, *overrides: str):
    """Drop the current Trainer (after an OOM or an error its ZeRO buffers may be half filled), build anew."""
    from launch.benches import free_memory

    old = ctx.shared.pop("trainer", None)
    if old is not None:
        old.engine.destroy()
        del old
        free_memory()
    ctx.shared["trainer"] = sdxl_trainer(ctx, name, *overrides)
    return ctx.shared["trainer"]


def measure(ctx: Context, trainer, batch: int, label: dict) -> dict:
    """Trainer.train_step on one batch of `batch` cached latents: the first step's seconds (it compiles
    what is compiled), then the median of --steps steps after one more warm-up step."""
    import itertools
    import math
    import statistics

    import torch

    from launch.benches import peak_gib, synchronize

    bucket = next(iter(trainer.cache.buckets))
    same = itertools.repeat((bucket, trainer.cache.buckets[bucket][:batch]))
    row, times = label | {"batch": batch}, []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(ctx.device)
    for _ in range(2 + ctx.args.steps):
        start = time.perf_counter()
        loss = trainer.train_step(same)  # returns a host float: the step's own sync
        synchronize(ctx.device)
        times.append(time.perf_counter() - start)
    if not math.isfinite(loss):
        raise CheckFailed(f"non-finite loss {loss} at {row}")
    seconds = statistics.median(times[2:])
    rate = batch / seconds
    mfu = rate * ctx.shared["flop"] / ctx.shared["peak"]
    return row | {"first_step_s": round(times[0], 2), "ms_per_step": round(1e3 * seconds, 1),
                  "samples_per_s": round(rate, 3), "mfu": round(mfu, 4), "peak_gib": peak_gib(ctx.device),
                  "loss": loss}


def guarded(ctx: Context, trainer, batch: int, label: dict, name: str, *overrides: str) -> tuple[dict, Any]:
    """`measure`, recording an OOM or a kernel error as the row's result; the Trainer is rebuilt after one."""
    import torch

    try:
        return measure(ctx, trainer, batch, label), trainer
    except torch.OutOfMemoryError:
        row = label | {"batch": batch, "error": "out of memory"}
    except (RuntimeError, NotImplementedError) as err:  # e.g. "No available kernel" for a backend
        row = label | {"batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return row, replace_trainer(ctx, name, *overrides)


def sdxl_inputs(ctx: Context) -> None:
    """The model folder, a latent cache of --side^2 latents and the measured matmul peak (ctx.shared)."""
    from launch.benches.data import sdxl_folder, synthetic_latent_cache
    from launch.benches.mfu import flop_per_sample, matmul_peak
    from ztsnr_ds.models import TINY_UNET_CONFIG

    config_file = ROOT / "configs" / "sdxl_unet" / "config.json"
    unet_config = dict(TINY_UNET_CONFIG) if ctx.dry else json.loads(config_file.read_text())
    ctx.shared["model"] = sdxl_folder(ctx.work / "sdxl_model", unet_config, ctx.device)
    check_disk(ctx, ctx.shared["model"])
    ctx.shared["cache"] = ctx.work / "sdxl_cache"
    synthetic_latent_cache(ctx.shared["cache"], max(ctx.args.batches), ctx.args.side, shard_mb=64.0)
    ctx.shared["peak"] = matmul_peak(ctx.device, 256 if ctx.dry else 8192)
    ctx.shared["flop"] = flop_per_sample(unet_config, ctx.args.side)  # MFU's numerator


def check_disk(ctx: Context, model: Path) -> None:
    """Refuse before the big writes if --out lacks room for what checks 3 and 5 write after the model
    folder: check 3's checkpoint (integrity.BYTES_PER_PARAM, no EMA) and the two exports (bf16 UNet and a
    copy of the frozen parts each)."""
    from ztsnr_ds import integrity

    unet = integrity.dir_size(model / "unet")  # bf16: 2 B/param
    need = unet // 2 * integrity.BYTES_PER_PARAM + 2 * integrity.dir_size(model)
    free = integrity.free_bytes(ctx.work)
    if free < need:
        raise CheckFailed(f"{ctx.work} has {free / 2**30:.1f} GiB free; checks 3 and 5 write "
                          f"~{need / 2**30:.1f} GiB more (checkpoint, single file, diffusers folder): "
                          "point --out at a larger disk")


def check_sdxl(ctx: Context) -> tuple[str, dict]:
    from launch.benches.memory import live_bytes_per_param

    sdxl_inputs(ctx)
    trainer = replace_trainer(ctx, "sdxl")
    unet = trainer.engine.module
    details = {"params": sum(p.numel() for p in unet.parameters()), "side": ctx.args.side,
               "matmul_peak_tflops": round(ctx.shared["peak"] / 1e12, 3),
               "flop_per_sample": ctx.shared["flop"],
               "live_bytes_per_param": live_bytes_per_param(trainer), "rows": []}
    for checkpointing in (False, True):
        for batch in ctx.args.batches:
            label = {"checkpointing": checkpointing, "attention": "sdpa", "compile": "none"}
            if ctx.over_budget():
                details["rows"].append(label | {"batch": batch, "error": "skipped: over --budget-s"})
                continue
            trainer.engine.module.enable_gradient_checkpointing() if checkpointing else \
                trainer.engine.module.disable_gradient_checkpointing()
            row, trainer = guarded(ctx, trainer, batch, label, "sdxl")
            details["rows"].append(row)
            if "error" in row:
                break  # larger batches do not fit either
    trainer.engine.module.disable_gradient_checkpointing()
    if trainer.optimizer.fused is False:  # AdamWSR warned and fell back to its eager chunks
        raise CheckFailed("the fused AdamWSR kernel could not be built in the trainer: the times are eager's")
    ran = [r for r in details["rows"] if "error" not in r]
    smallest = {r["checkpointing"] for r in ran if r["batch"] == min(ctx.args.batches)}
    if smallest != {False, True}:
        raise CheckFailed(f"the smallest batch did not run with and without checkpointing: {details['rows']}")
    trainer.step = len(ran)
    ctx.shared["tag"] = trainer.save()
    best = max(ran, key=lambda r: r["samples_per_s"])
    return (f"{details['params'] / 1e9:.3f}e9 params at {ctx.args.side}^2: best {best['samples_per_s']:.2f} "
            f"samples/s, MFU {best['mfu']:.1%} (batch {best['batch']}, checkpointing "
            f"{best['checkpointing']}); {details['live_bytes_per_param']['all']} bytes/param live"), details


def check_kernels(ctx: Context) -> tuple[str, dict]:
    from launch.benches import free_memory
    from ztsnr_ds.kernels import set_attention

    trainer, batch, rows = ctx.shared["trainer"], ctx.args.kernel_batch, []
    for name in ctx.args.attention:
        set_attention(trainer.engine.module, name)
        row, trainer = guarded(ctx, trainer, batch, {"attention": name, "compile": "none"}, "sdxl")
        rows.append(row)
    for mode in ctx.args.compile:
        label = {"attention": "sdpa", "compile": mode}
        if ctx.over_budget():
            rows.append(label | {"batch": batch, "error": "skipped: over --budget-s"})
            continue
        trainer = replace_trainer(ctx, f"sdxl_{mode}", "--model.compile", mode)
        row, trainer = guarded(ctx, trainer, batch, label, f"sdxl_{mode}", "--model.compile", mode)
        rows.append(row)
    ctx.shared.pop("trainer").engine.destroy()
    free_memory()
    failed = [r for r in rows if "error" in r]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(rows)} kernel settings failed: {failed}")
    best = max(rows, key=lambda r: r["samples_per_s"])
    skipped = "" if ctx.args.compile else "; compile modes not run (--compile empty)"
    return (f"batch {batch}: fastest attention {best['attention']}, compile {best['compile']}: "
            f"{best['samples_per_s']:.2f} samples/s, MFU {best['mfu']:.1%}{skipped}"), {"rows": rows}


def check_export(ctx: Context) -> tuple[str, dict]:
    import sample
    import torch
    from PIL import Image

    from ztsnr_ds.export import export_diffusers, export_single_file, load_checkpoint

    out, side = ctx.work / "export", ctx.args.side
    start = time.monotonic()
    trained = load_checkpoint(ctx.shared["tag"], torch.bfloat16)  # what launch/export.py runs, read once
    single = export_single_file(trained, ctx.shared["model"], out / "model.safetensors", torch.bfloat16, None)
    folder = export_diffusers(trained, out / "diffusers", None, base=ctx.shared["model"])
    exported = time.monotonic() - start
    argv = ["--model", str(single), "--base", str(ctx.shared["model"]), "--prompt", "1girl, solo", "--n", "4",
            "--steps", "2" if ctx.dry else "8", "--width", str(side), "--height", str(side),
            "--out", str(out / "samples")]
    try:
        sample.main(argv)
    except SystemExit as err:  # argparse's exit on bad input
        raise CheckFailed(f"launch/sample.py {' '.join(argv)} exited {err.code}") from err
    pngs = sorted((out / "samples").glob("0*-seed*.png"))
    sizes = {Image.open(p).size for p in pngs}
    if len(pngs) != 4 or sizes != {(side, side)} or not (out / "samples" / "grid.png").is_file():
        names = [p.name for p in pngs]
        raise CheckFailed(f"expected 4 images of {side}x{side} and grid.png: {names}, sizes {sizes}")
    details = {"single_file_gib": round(single.stat().st_size / 2**30, 2), "diffusers": str(folder),
               "export_s": round(exported, 1), "images": [p.name for p in pngs]}
    return (f"single file ({details['single_file_gib']} GiB) and diffusers export in {exported:.0f} s; "
            f"4 images of {side}x{side} sampled from the single file"), details


def check_ema(ctx: Context) -> tuple[str, dict]:
    """EMA and post-hoc tracks on the device, on a small UNet (4 steps): updates, a held-out loss of the
    weights and of the EMA swapped in (`update_lp_params`), snapshots rebuilt by posthoc, swap-out exact."""
    import math

    import torch

    from launch.benches.data import sdxl_folder, synthetic_latent_cache
    from ztsnr_ds import ema, posthoc
    from ztsnr_ds.models import TINY_UNET_CONFIG

    model, cache, side = ctx.work / "ema_model", ctx.work / "ema_cache", 128
    sdxl_folder(model, dict(TINY_UNET_CONFIG), ctx.device)
    synthetic_latent_cache(cache, 8, side, shard_mb=64.0)
    trainer = sdxl_trainer(ctx, "ema", "--model.pretrained", str(model), "--data.cache_dir", str(cache),
                           "--data.source", str(cache), "--noise.base_area", str(side**2),
                           "--trainer.max_steps", "4", "--trainer.save_every", "4", "--ema.enabled", "true",
                           "--ema.posthoc", "true", "--ema.sigma_rels", "[0.05, 0.10]",
                           "--ema.snapshot_every", "2", "--ema.snapshot_dtype", "fp32",
                           "--validation.holdout", "2", "--validation.loss_every", "2")
    trainer.train()
    records = [json.loads(line) for line in (ctx.work / "ema" / "metrics.jsonl").read_text().splitlines()]
    held = [(r["holdout/loss"], r.get("ema_holdout/loss", math.nan)) for r in records if "holdout/loss" in r]
    if len(held) != 3 or not all(map(math.isfinite, sum(held, ()))):
        raise CheckFailed(f"held-out losses (model, EMA) at steps 0, 2, 4: {held}")
    params = list(trainer.engine.module.parameters())
    before = [p.detach().clone() for p in params]
    with trainer.ema.swapped_in():
        inside = torch.cat([p.detach().flatten() for p in params])
    track = torch.cat(trainer.ema.state[ema.MAIN_TRACK])[:inside.numel()].to(inside.dtype)
    if not torch.equal(inside, track) or not all(torch.equal(b, p) for b, p in zip(before, params)):
        raise CheckFailed("swapped_in did not give the EMA inside and the trained weights back after")
    snapshots = posthoc.find_snapshots(ctx.work / "ema")
    rebuilt, _ = posthoc.reconstruct(snapshots, 0.10, sources=[0.10])  # a tracked width: that track
    tracked = ema.read_named(snapshots[-1].folder, ema.track_name(0.10))
    gap = max(float((rebuilt[k] - v).abs().max()) for k, v in tracked.items())
    if [s.step for s in snapshots] != [2, 4] or gap > 1e-6:
        raise CheckFailed(f"snapshots {[s.step for s in snapshots]}, rebuilt sigma_rel 0.10 off by {gap}")
    trainer.engine.destroy()
    summary = (f"4 steps on {ctx.device}: held-out loss {held[-1][0]:.4f} (EMA {held[-1][1]:.4f}), swap-in "
               f"exact, 2 snapshots, sigma_rel 0.10 rebuilt within {gap:.1e}")
    return summary, {"holdout": held, "rebuilt_gap": gap}


# ----------------------------------------------------------------------------- report

CHECKS: tuple[tuple[int, str, Callable[[Context], tuple[str, dict]]], ...] = (
    (1, "resume", check_resume), (2, "optimizer", check_optimizer), (3, "sdxl", check_sdxl),
    (4, "kernels", check_kernels), (5, "export", check_export), (6, "ema", check_ema))
def run_checks(ctx: Context, report: dict) -> int:
    """Each selected check in order; the report is rewritten after each; stop at the first failure."""
    from launch.benches.report import write_report

    for number, name, check in CHECKS:
        if number not in ctx.args.checks:
            continue
        print(f"gpu_check: {number} {name} ...", flush=True)
        start = time.monotonic()
        try:
            summary, details, ok = *check(ctx), True
        except Exception as err:  # a failed check of any kind is reported, not raised
            summary, ok = f"{type(err).__name__}: {err}", False
            details = {"traceback": traceback.format_exc()[-6000:]}
        report["checks"].append({"id": number, "name": name, "ok": ok, "seconds": time.monotonic() - start,
                                 "summary": summary, "details": details})
        write_report(ctx.out, report)
        print(f"gpu_check: {number} {name}: {'pass' if ok else 'FAIL'}: {summary}", flush=True)
        if not ok:
            report["failed"] = f"{number} {name}"
            write_report(ctx.out, report)
            return 1
    return 0


DEFAULTS = {  # option: (on a GPU, --dry-run)
    "batches": ([1, 4, 8, 16], [1, 2]), "side": (1024, 128), "optim_numel": (1 << 26, 1 << 16),
    "attention": (["flash", "cudnn", "efficient"], ["flash", "math"]), "compile": (["regional", "full"], []),
    "kernel_batch": (8, 2), "steps": (5, 2), "resume": ([30, 10, 15], [12, 4, 6])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, work/")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and few steps (CPU without a GPU)")
    p.add_argument("--checks", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 3, 4, 5, 6],
                   help="which checks, e.g. 1,2 (4 and 5 need 3)")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], help="check 3 batch sizes")
    p.add_argument("--side", type=int, help="image side in pixels (latents side/8)")
    p.add_argument("--optim-numel", type=int, help="check 2 elements")
    p.add_argument("--attention", type=lambda s: [a for a in s.split(",") if a], help="check 4 backends")
    p.add_argument("--compile", type=lambda s: [c for c in s.split(",") if c], help="check 4 compile modes")
    p.add_argument("--kernel-batch", type=int, help="check 4 batch size")
    p.add_argument("--steps", type=int, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--resume", type=lambda s: [int(n) for n in s.split(",")],
                   help="check 1: steps, checkpoint every, kill after (30,10,15; dry run 12,4,6)")
    p.add_argument("--budget-s", type=float, default=480.0, help="rows of checks 3-4 past this are skipped")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ignored")
    args = p.parse_args(argv)
    for key, (gpu, dry) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else gpu)
    if {4, 5} & set(args.checks) and 3 not in args.checks:
        p.error("--checks: 4 and 5 use check 3's trainer and checkpoint; include 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_imports()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)}. Install them first; without a "
              f"network, see the offline recipe in `python {Path(__file__).name} --help`.", file=sys.stderr)
        return 3
    import torch

    from launch.benches import machine
    from launch.benches.report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{max(args.local_rank, 0)}" if torch.cuda.is_available() else "cpu")
    ctx = Context(args, args.out, args.out / "work", device, args.dry_run)
    ctx.work.mkdir(exist_ok=True)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine(), "dry_run": args.dry_run, "date": datetime.now(timezone.utc).isoformat(),
              "checks": [], "failed": None}
    status = run_checks(ctx, report)
    report["total_s"] = time.monotonic() - ctx.started
    write_report(ctx.out, report)
    print(f"gpu_check: {'all checks passed' if status == 0 else 'FAILED: ' + report['failed']} in "
          f"{report['total_s']:.0f} s; report in {ctx.out / 'gpu_check.md'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
