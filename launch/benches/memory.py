"""Bytes per parameter held per rank under each DeepSpeed precision config, against DESIGN.md's model."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import torch

from launch.benches import ROOT, arg, benchmark
from ztsnr_ds.optim import AdamWSR

MEMORY_CONFIGS = {"pure bf16 (zero2_bf16.json)": "ds_configs/zero2_bf16.json",
                  "fp32 masters (zero2_bf16_fp32master.json)": "ds_configs/zero2_bf16_fp32master.json"}
BENCH = str(ROOT / "launch" / "bench.py")  # children run one case through the bench's own entry point
# DESIGN.md sec. 9, bytes per parameter on one of N ranks: weights + (grads + master + moments) / N.
DESIGN_BYTES = {"ds_configs/zero2_bf16.json": (2, 2 + 2 + 4),
                "ds_configs/zero2_bf16_fp32master.json": (2, 2 + 4 + 8)}


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def held_tensor_bytes(engine, optimizer: torch.optim.Optimizer,
                      groups: list[dict] | None = None) -> dict[str, int]:
    """Bytes of every distinct tensor storage alive, by role, counted once each (first role wins).

    Storages reachable from Python objects (gc) plus the .grad of module and optimizer params
    (a grad may have no Python object of its own). groups: all the optimizer's param groups (default
    optimizer.param_groups; inside its step ZeRO shows it one group at a time).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    flat = [p for group in groups or optimizer.param_groups for p in group["params"]]
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


# SDXL's trained components in parameters (DESIGN.md sec. 9; CLIP-L and bigG text models with projection):
# the `groups` case splits the MLP's layers into AdamWSR groups in these proportions (text_training.py).
SDXL_COMPONENTS = {"unet": 2.567e9, "clip_l": 123.1e6, "clip_g": 694.7e6}


def component_groups(layers: list[torch.nn.Module]) -> list[dict]:
    """The layers cut into one param group per SDXL component, sizes in SDXL_COMPONENTS' proportions (at
    least one layer each): UNet + both text encoders as text_training.TextTraining groups them."""
    total, cuts, start = sum(SDXL_COMPONENTS.values()), [], 0
    for share in list(SDXL_COMPONENTS.values())[1:]:
        cuts.append(max(1, round(len(layers) * share / total)))
    sizes = [len(layers) - sum(cuts), *cuts]
    groups = []
    for name, size in zip(SDXL_COMPONENTS, sizes, strict=True):
        params = [p for m in layers[start:start + size] for p in m.parameters()]
        groups.append({"name": name, "params": params})
        start += size
    return groups


def memory_case(config: str, width: int, depth: int, groups: bool = False) -> dict[str, float]:
    """Train a deep bf16 MLP 2 steps under `config` on one rank; bytes per parameter, by role and RSS.
    groups: its layers in three AdamWSR groups (UNet, CLIP-L, bigG proportions) instead of one."""
    from ztsnr_ds.engine import build_ds_config, init_distributed, initialize, is_pure_bf16

    init_distributed()
    ds_config = build_ds_config(ROOT / config, micro_batch=2, grad_accum=1, world_size=1)
    dtype = torch.bfloat16 if is_pure_bf16(ds_config) else torch.float32  # as Trainer.build_engine
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    layers = [torch.nn.Linear(width, width, dtype=dtype) for _ in range(depth)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.GELU())])
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = AdamWSR(component_groups(layers) if groups else model.parameters(), lr=1e-4)
    engine = initialize(model, optimizer, ds_config)
    init_peak = proc_status_kib("VmHWM") - baseline
    held: dict[str, int] = {}
    groups = list(optimizer.param_groups)

    def record(*_) -> None:
        """The most bytes seen around a group's step: in the second step weights, grads, masters and
        moments are all alive before ZeRO frees a stepped group's gradient partition."""
        now = held_tensor_bytes(engine, optimizer, groups)
        if sum(now.values()) >= sum(held.values()):
            held.update(now)

    optimizer.register_step_pre_hook(record)
    optimizer.register_step_post_hook(record)
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
    arg("--groups", action="store_true", help=argparse.SUPPRESS),
    arg("--ema-case", action="store_true", help=argparse.SUPPRESS),
)
def bench_memory(args: argparse.Namespace) -> None:
    """Bytes per parameter for weights, grads and optimizer state on one rank: pure bf16 vs fp32 masters."""
    if args.ema_case:  # child process, one of N ranks under the deepspeed launcher
        print(EMA_MARK + json.dumps(ema_case(args.width, args.depth)), flush=True)
        return
    if args.case:  # child process: one configuration, a clean RSS baseline
        print(json.dumps(memory_case(args.case, args.width, args.depth, args.groups)))
        return
    results = {}
    cases = [(name, config, []) for name, config in MEMORY_CONFIGS.items()]
    cases.append((GROUPS_CASE, MEMORY_CONFIGS[next(iter(MEMORY_CONFIGS))], ["--groups"]))
    for name, config, extra in cases:
        cmd = [sys.executable, BENCH, "memory", "--case", config, "--width", str(args.width),
               "--depth", str(args.depth), *extra]
        cmd += ["--threads", str(args.threads)] if args.threads else []
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
    model = [sum(DESIGN_BYTES[config]) for _, config, _ in cases]
    print("| DESIGN.md model (N = 1) | " + " | ".join(f"{m}" for m in model) + " |")
    sdxl_table()
    ema_table(args)


GROUPS_CASE = "pure bf16, 3 groups (UNet + CLIP-L + bigG shares)"


def sdxl_table() -> None:
    """GiB per rank of SDXL's trained state (weights + grads + masters + moments, pure bf16 ZeRO-2) with and
    without the text encoders, from the bytes per parameter above: 2 + 8/N each (DESIGN_BYTES)."""
    weights, sharded = DESIGN_BYTES["ds_configs/zero2_bf16.json"]
    unet, text = SDXL_COMPONENTS["unet"], SDXL_COMPONENTS["clip_l"] + SDXL_COMPONENTS["clip_g"]
    print("\nSDXL, pure bf16 ZeRO-2, GiB per rank (frozen encoders: 2 bytes/param held either way):\n")
    print("| N ranks | UNet trained | UNet + CLIP-L + bigG trained | added by the encoders |")
    print("|---|---|---|---|")
    for n in (1, 8, 64):
        only = (unet * (weights + sharded / n) + text * weights) / 2**30
        both = (unet + text) * (weights + sharded / n) / 2**30
        print(f"| {n} | {only:.1f} | {both:.1f} | {both - only:.2f} |")


EMA_MARK = "ema bytes per parameter: "


def ema_case(width: int, depth: int) -> dict:
    """This rank's EMA bytes per parameter of the whole model, fp32 and bf16, under pure bf16 ZeRO-2."""
    from ztsnr_ds.ema import EMAConfig, ShardedEMA
    from ztsnr_ds.engine import build_ds_config, init_distributed, initialize

    dist = init_distributed()
    ds_config = build_ds_config(ROOT / "ds_configs/zero2_bf16.json", micro_batch=2, grad_accum=1,
                                world_size=dist.world_size)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, dtype=torch.bfloat16) for _ in range(depth)])
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = AdamWSR(model.parameters(), lr=1e-4)
    engine = initialize(model, optimizer, ds_config)
    out = {"rank": dist.rank, "world_size": dist.world_size}
    for dtype in ("fp32", "bf16"):
        ema = ShardedEMA(EMAConfig(enabled=True, dtype=dtype), engine, optimizer, dist.rank, dist.world_size)
        ema.update()
        out[dtype] = sum(t.untyped_storage().nbytes() for ts in ema.state.values() for t in ts) / n_params
        del ema
    return out


def ema_table(args: argparse.Namespace) -> None:
    """The EMA's bytes per parameter per rank at N = 1 and 2 ranks (the deepspeed launcher, this machine)."""
    results = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(n),
               BENCH, "memory", "--ema-case", "--width", str(args.width), "--depth", str(args.depth)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows = [json.loads(line.split(EMA_MARK, 1)[1]) for line in child.stdout.splitlines()
                if EMA_MARK in line]
        results[n] = sorted(rows, key=lambda r: r["rank"])
    print("\nEMA slices per rank (ShardedEMA on the same MLP, pure bf16 ZeRO-2, N ranks via the deepspeed "
          "launcher):\n")
    print("| EMA bytes per parameter, per rank | " + " | ".join(f"N = {n}" for n in results) + " | model |")
    print("|---|" + "---|" * (len(results) + 1))
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        cells = [" / ".join(f"{r[dtype]:.3f}" for r in rows) for rows in results.values()]
        print(f"| {dtype} | " + " | ".join(cells) + f" | {size}/N |")


def live_bytes_per_param(trainer) -> dict[str, float]:
    """Bytes per UNet parameter of every live tensor at the end of an optimizer step, by role."""
    held: dict[str, int] = {}
    hook = trainer.optimizer.register_step_post_hook(
        lambda *_: held.update(held_tensor_bytes(trainer.engine, trainer.optimizer)))
    bucket = next(iter(trainer.cache.buckets))
    trainer.train_step(iter([(bucket, trainer.cache.buckets[bucket][:1])]))
    hook.remove()
    n = sum(p.numel() for p in trainer.engine.module.parameters())
    return {role: round(b / n, 2) for role, b in held.items()} | {"all": round(sum(held.values()) / n, 2)}
