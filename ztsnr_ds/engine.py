"""Distributed set-up and the DeepSpeed engine, in one place.

Everything that asks "which rank am I" lives here; model and math code never do.
The DeepSpeed JSON holds the ZeRO/BF16 settings; batch sizes come from the
training YAML and are written into the dict, so the two can never silently disagree.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from ztsnr_ds import locks

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
WAIT_TIMEOUT = timedelta(hours=6)  # how long ranks wait for rank 0's validation images


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 does the logging, validation images and file writes outside DeepSpeed."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout: timedelta | None = None) -> DistInfo:
    """Join (or create) the process group; plain `python launch/train.py` becomes a world of one.

    The deepspeed launcher, torchrun, slurm and mpirun all export RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them we fill in a single-process world.
    DeepSpeed picks nccl on CUDA and gloo on its CPU accelerator unless `backend` says otherwise.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():  # first: NCCL's communicators and barriers use the current device
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        locks.check_build_locks()  # DeepSpeed JIT-builds its CPU shm op here: never wait on a stale lock
        kwargs = {"timeout": timeout} if timeout is not None else {}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: a MAX all-reduce, then one host sync (the answer).

    The tensor lives where the process group's backend wants it: NCCL (and the other accelerator
    backends) accept device tensors only, gloo CPU ones. On GPUs gloo is used only by launch/cache.py.
    """
    gloo = torch.distributed.get_backend() == "gloo"
    device = "cpu" if gloo else get_accelerator().current_device_name()
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def wait_group(timeout: timedelta = WAIT_TIMEOUT) -> torch.distributed.ProcessGroup:
    """A gloo group of all ranks for waiting while one rank works alone (rank 0's validation images).

    A rank blocked in an NCCL collective for longer than the default group's timeout (DeepSpeed: 30 min)
    is aborted by NCCL's watchdog; a gloo barrier waits on the CPU, up to `timeout`, with nothing queued
    on the GPU. Gloo talks TCP between the hosts (set GLOO_SOCKET_IFNAME if it picks the wrong interface).
    Collective: every rank calls it, at the same point.
    """
    return torch.distributed.new_group(backend="gloo", timeout=timeout)


def build_ds_config(path: str | Path, micro_batch: int, grad_accum: int, world_size: int) -> dict:
    """Read a DeepSpeed JSON and write the trainer's batch settings into it.

    train_batch_size = micro_batch * grad_accum * world_size. A JSON value other than
    "auto" (or absent) that disagrees is an error: which number wins would be a guess.
    With grad_accum > 1 gradients accumulate in fp32 (`data_types.grad_accum_dtype`, unless the JSON
    sets it): DeepSpeed would otherwise sum them in the model's bf16. In ZeRO-2 that buffer is this
    rank's gradient partition, so it costs 2/N more bytes per parameter; weights stay bf16.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (set --deepspeed_config)")
    config = json.loads(path.read_text())
    wanted = dict(zip(BATCH_KEYS, (micro_batch, grad_accum, micro_batch * grad_accum * world_size)))
    for key, value in wanted.items():
        found = config.get(key, "auto")
        if found != "auto" and found != value:
            raise ValueError(
                f"{path}: {key} = {found} disagrees with the training config's value {value} "
                f"(micro_batch={micro_batch}, grad_accum={grad_accum}, world_size={world_size}); "
                f'set it to "auto" in the JSON or change trainer.micro_batch / trainer.grad_accum'
            )
        config[key] = value
    if grad_accum > 1:  # bf16 sums of k micro-batch gradients lose low bits k-1 times: accumulate in fp32
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return config


def is_pure_bf16(ds_config: dict) -> bool:
    """True when DeepSpeed keeps bf16 masters and bf16 moments (no fp32 copy of the weights)."""
    bf16 = ds_config.get("bf16", {})
    return bool(bf16.get("enabled") and bf16.get("bf16_master_weights_and_grads"))


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """Wrap the model and our client optimizer in a DeepSpeed engine; returns the engine.

    With bf16 enabled DeepSpeed casts the module to bf16 itself; in pure-bf16 mode the
    client optimizer then sees one flat bf16 partition per rank, otherwise fp32 masters.
    Without a bf16 section (ds_configs/zero2_fp32.json, a CPU convenience: CPUs without bf16 units
    run a bf16 step several times slower) module, gradients and optimizer stay fp32.
    """
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
