"""Micro-benchmarks: ``python launch/bench.py <name> [options]`` (``--help`` lists the names).

Each benchmark is one function registered with ``@benchmark(arg(...), ...)``: its name is the function
name without ``bench_``, its arguments become the subcommand's options, and it prints a Markdown table
(after the command, machine and date) ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from ztsnr_ds.optim import EAGER_CHUNK, AdamWSR, adamw_coefficients, adamw_fp32  # noqa: E402

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


# ----------------------------------------------------------------------------- step


def tiny_training_config(root: Path, micro_batch: int) -> Path:
    """configs/demo.yaml on a fresh tiny SDXL and 16 generated images cached with text embeddings."""
    import yaml

    from ztsnr_ds.data.buckets import BucketConfig
    from ztsnr_ds.data.cache import CacheConfig, build_cache
    from ztsnr_ds.data.synthetic import write_dataset
    from ztsnr_ds.models import load_frozen, write_tiny_sdxl

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["pretrained"] = str(write_tiny_sdxl(root / "model"))
    config["data"] |= {"source": str(write_dataset(root / "data", n=16)), "cache_dir": str(root / "cache"),
                       "cache_text": True}
    config["trainer"] |= {"output_dir": str(root / "run"), "micro_batch": micro_batch}
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


# ----------------------------------------------------------------------------- memory

MEMORY_CONFIGS = {"pure bf16 (zero2_bf16.json)": "ds_configs/zero2_bf16.json",
                  "fp32 masters (zero2_bf16_fp32master.json)": "ds_configs/zero2_bf16_fp32master.json"}
# DESIGN.md sec. 9, bytes per parameter on one of N ranks: weights + (grads + master + moments) / N.
DESIGN_BYTES = {"ds_configs/zero2_bf16.json": (2, 2 + 2 + 4),
                "ds_configs/zero2_bf16_fp32master.json": (2, 2 + 4 + 8)}


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def held_tensor_bytes(engine, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every distinct tensor storage alive, by role, counted once each (first role wins).

    Storages reachable from Python objects (gc) plus the .grad of module and optimizer params
    (a grad may have no Python object of its own).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    flat = [p for group in optimizer.param_groups for p in group["params"]]
    module = list(engine.module.parameters())
    roles = {
        "optimizer state": [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)],
        "flat partition (master weights)": flat,
        "flat partition grad": [p.grad for p in flat if p.grad is not None],
        "module weights": module,
        "module grads": [p.grad for p in module if p.grad is not None],
        "other (DeepSpeed buffers)": [o for o in gc.get_objects()  # a dead weakref.proxy raises on isinstance
                                      if type(o) not in weakref.ProxyTypes and torch.is_tensor(o)],
    }
    seen: set[int] = set()
    out = dict.fromkeys(roles, 0)
    for role, tensors in roles.items():
        for t in tensors:
            if isinstance(t, FakeTensor):  # torch.compile's stand-ins (the fused optimizer's): no memory
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out[role] += storage.nbytes()
    return out


def memory_case(config: str, width: int, depth: int) -> dict[str, float]:
    """Train a deep bf16 MLP 2 steps under `config` on one rank; bytes per parameter, by role and RSS."""
    from ztsnr_ds.engine import build_ds_config, init_distributed, initialize, is_pure_bf16

    init_distributed()
    ds_config = build_ds_config(ROOT / config, micro_batch=2, grad_accum=1, world_size=1)
    dtype = torch.bfloat16 if is_pure_bf16(ds_config) else torch.float32  # as Trainer.build_engine
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    layers = [torch.nn.Linear(width, width, dtype=dtype) for _ in range(depth)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.GELU())])
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = AdamWSR(model.parameters(), lr=1e-4)
    engine = initialize(model, optimizer, ds_config)
    init_peak = proc_status_kib("VmHWM") - baseline
    held: dict[str, int] = {}
    # At the end of the optimizer step weights, grads, masters and moments are all alive: the peak.
    optimizer.register_step_post_hook(lambda *_: held.update(held_tensor_bytes(engine, optimizer)))
    x = torch.randn(2, width).to(torch.bfloat16)
    for _ in range(2):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    rss = {"peak RSS after initialize - baseline": init_peak,
           "peak RSS after 2 steps - baseline": proc_status_kib("VmHWM") - baseline,
           "RSS after 2 steps - baseline": proc_status_kib("VmRSS") - baseline}
    return {"params": n_params} | {k: v / n_params for k, v in held.items()} | {
        k: 1024 * v / n_params for k, v in rss.items()}


@benchmark(
    arg("--width", type=int, default=3072, help="MLP width"),
    arg("--depth", type=int, default=12, help="Linear layers (12 x 3072^2: 113M parameters)"),
    arg("--case", choices=list(MEMORY_CONFIGS.values()), help=argparse.SUPPRESS),
)
def bench_memory(args: argparse.Namespace) -> None:
    """Bytes per parameter for weights, grads and optimizer state on one rank: pure bf16 vs fp32 masters."""
    if args.case:  # child process: one configuration, a clean RSS baseline
        print(json.dumps(memory_case(args.case, args.width, args.depth)))
        return
    results = {}
    for name, config in MEMORY_CONFIGS.items():
        cmd = [sys.executable, __file__, "memory", "--case", config, "--width", str(args.width),
               "--depth", str(args.depth)] + (["--threads", str(args.threads)] if args.threads else [])
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"Deep MLP: {args.depth} x Linear({args.width}, {args.width}), {first['params'] / 1e6:.1f}M "
          "parameters, ZeRO-2 on one rank, 2 training steps, each configuration in a fresh process. "
          "Tensors are counted at the end of the second optimizer step (every distinct storage once).\n")
    rows = [k for k in first if k != "params"]
    print("| bytes per parameter | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for row in rows:
        print(f"| {row} | " + " | ".join(f"{r[row]:.2f}" for r in results.values()) + " |")
    tensors = [sum(r[k] for k in rows if "RSS" not in k) for r in results.values()]
    print("| **all tensors** | " + " | ".join(f"**{t:.2f}**" for t in tensors) + " |")
    model = [sum(DESIGN_BYTES[c]) for c in MEMORY_CONFIGS.values()]
    print("| DESIGN.md model (N = 1) | " + " | ".join(f"{m}" for m in model) + " |")

# ----------------------------------------------------------------------------- mfu

SDXL_FLOP_PER_SAMPLE = 20.2e12  # DESIGN.md sec. 9: fwd + bwd at latent 128x128, FlopCounterMode, no recompute


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

# ----------------------------------------------------------------------------- data


def synthetic_latent_cache(root: Path, n: int, side: int, shard_mb: float) -> None:
    """n random latents (4, side/8, side/8) bf16 in the side x side bucket, written into a latent cache
    by data/cache.py's own shard writer and merge: a real build minus the images and the VAE."""
    from ztsnr_ds.data import cache
    from ztsnr_ds.data.sources import ImageRecord

    cfg = cache.CacheConfig(source=str(root / "images"), cache_dir=str(root), shard_max_mb=shard_mb)
    (root / cache.SHARD_DIR).mkdir(parents=True)
    (root / cache.PARTS_DIR).mkdir()
    writer = cache._ShardWriter(root, 0, "bench", int(shard_mb * 2**20))
    bucket, time_ids = (side, side), (side, side, 0, 0, side, side)
    generator = torch.Generator().manual_seed(0)
    for lo in range(0, n, 16):
        jobs = [cache._Job(ImageRecord(root / "images" / f"{i:05d}.png", "1girl, solo", f"{i:05d}.png"),
                           f"{i:064x}", bucket) for i in range(lo, min(n, lo + 16))]
        latents = torch.randn(len(jobs), 4, side // 8, side // 8, generator=generator).to(torch.bfloat16)
        rows = [cache._row(job, time_ids) for job in jobs]
        writer.add(cache.bucket_key(bucket), rows, {"latents": latents})
    writer.flush()
    part = {"rank": 0, "world_size": 1, "fingerprint": "bench", "scan": "bench", "cache_text": False,
            "rows": writer.rows, "shards": writer.infos, "bad": [], "corrupt_shards": [], "scan_problems": [],
            "encoded": len(writer.rows), "reused": 0}
    cache._write_atomic(cache._part_path(root, 0, 1), json.dumps(part).encode())
    cache.merge_parts(cfg, world_size=1)


def evict_from_page_cache(folder: Path) -> None:
    """Drop the files' pages from the OS page cache (POSIX_FADV_DONTNEED), so the next read hits the disk."""
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@benchmark(
    arg("--samples", type=int, default=256, help="latents in the synthetic cache"),
    arg("--side", type=int, default=1024, help="image side in pixels (latents side/8)"),
    arg("--batch", type=int, default=8, help="samples per LatentCache.batch call"),
    arg("--shard-mb", type=float, default=64.0, help="data.shard_max_mb (the default)"),
    arg("--repeats", type=int, default=15, help="passes per case"),
    arg("--consumption", type=float, default=20.0, help="samples/s one GPU trains on (SDXL 1024^2)"),
)
def bench_data(args: argparse.Namespace) -> None:
    """Samples/s LatentCache.batch delivers on one core (SDXL-size bf16 latents) vs one GPU's consumption.

    Each pass opens a new reader (no other reader alive: pages mapped by a process cannot be evicted).
    """
    from ztsnr_ds.data.cache import LatentCache
    from ztsnr_ds.data.sampler import BucketBatchSampler

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    torch.set_num_threads(1)
    cases = {"cold page cache, sha256 check on first open (verify=True, the trainer's setting)": (True, True),
             "cold page cache, no check: every read from disk (a cache larger than RAM)": (True, False),
             "warm page cache, reader already open and checked (steady state)": (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_latent_cache(root, args.samples, args.side, args.shard_mb)
        buckets, shards = LatentCache(root).buckets, list((root / "shards").iterdir())
        sampler = BucketBatchSampler(buckets, args.batch, 1, 0, seed=0)

        def one_pass(cold: bool, verify: bool) -> float:
            """Seconds to read one epoch of batches through a new reader."""
            reader = LatentCache(root, verify=verify)
            if cold:
                evict_from_page_cache(root)
            else:
                reader.batch(buckets[next(iter(buckets))][: args.batch])  # open and check beforehand
            start = time.perf_counter()
            for _ in range(len(sampler)):
                reader.batch(next(sampler)[1])
            return time.perf_counter() - start

        runs = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, flags in cases.items():
                runs[name].append(one_pass(*flags))
    per_pass, sample_mib = len(sampler) * args.batch, 4 * (args.side // 8) ** 2 * 2 / 2**20
    print(f"{args.samples} latents of 4x{args.side // 8}x{args.side // 8} bf16 in {len(shards)} shard(s) "
          f"written by data/cache.py's shard writer; batches of {args.batch} in sampler order "
          f"({per_pass * sample_mib:.0f} MiB per pass), 1 core, 1 torch thread; median of {args.repeats} "
          "passes, cases interleaved.\n")
    print(f"| case | samples/s | MiB/s | x {args.consumption:g} samples/s per GPU |")
    print("|---|---|---|---|")
    for name, seconds in runs.items():
        rate = per_pass / statistics.median(seconds)
        print(f"| {name} | {rate:.0f} | {rate * sample_mib:.0f} | {rate / args.consumption:.0f} |")

@benchmark(
    arg("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="cached ids"),
    arg("--world", type=int, default=64, help="ranks simulated (one plans; the plan is the same on all)"),
    arg("--micro-batch", type=int, default=4),
    arg("--repeats", type=int, default=3),
)
def bench_sampler(args: argparse.Namespace) -> None:
    """Epoch plan time of the bucket sampler at 10M ids (NAI's 33 buckets, heavy-tailed sizes).

    Baseline in the same process: one numpy permutation of all N ids, the floor of any shuffled plan.
    """
    import numpy as np

    from ztsnr_ds.data.buckets import BucketConfig, bucket_key, make_buckets
    from ztsnr_ds.data.sampler import BucketBatchSampler

    keys = [bucket_key(b) for b in make_buckets(BucketConfig())]
    share = np.arange(1, len(keys) + 1, dtype=np.float64) ** -1.5  # bucket k holds ~ k^-1.5 of the ids
    print(f"{len(keys)} buckets, sizes ~ k^-1.5, world {args.world}, micro-batch {args.micro_batch}; "
          f"median of {args.repeats}; sampler init includes the uniqueness check, digest and epoch 0.\n")
    print("| ids | sampler init s | plan one epoch s | one permutation of N s | plan / permutation "
          "| steps | rank plan MiB | state bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        sizes = np.maximum(1, (share / share.sum() * rows).astype(np.int64))
        sizes[0] += rows - sizes.sum()
        bounds = np.r_[0, np.cumsum(sizes)]
        buckets = {key: np.arange(bounds[i], bounds[i + 1]) for i, key in enumerate(keys)}
        start = time.perf_counter()
        sampler = BucketBatchSampler(buckets, args.micro_batch, args.world, 0, seed=0)
        init = time.perf_counter() - start
        plan_s, perm_s = [], []
        for epoch in range(1, args.repeats + 1):
            start = time.perf_counter()
            plan = sampler.plan(epoch).rank_plan(0)
            plan_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.random.default_rng(epoch).permutation(rows)
            perm_s.append(time.perf_counter() - start)
        mib = sum(a.nbytes for a in (plan.ids, plan.offsets, plan.bucket, plan.done)) / 2**20
        plan_t, perm_t = statistics.median(plan_s), statistics.median(perm_s)
        print(f"| {rows:,} | {init:.2f} | {plan_t:.2f} | {perm_t:.2f} | {plan_t / perm_t:.1f} | {plan.steps} "
              f"| {mib:.1f} | {len(json.dumps(sampler.state_dict()))} |")


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
