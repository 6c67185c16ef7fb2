"""EMA of the weights, sharded like ZeRO-2: each rank averages its own partition of the flat parameters.

Under ZeRO-2 the client optimizer holds one flat tensor per parameter group and rank, the rank's slice of
all weights laid end to end (padded to a multiple of the world size). An average is elementwise, so the
EMA of the weights is the EMA of those slices: every rank keeps the slice it already updates, and an EMA
costs 4/N bytes per parameter (fp32) instead of a full copy per rank. Tracks:

    ema                    theta_ema <- d * theta_ema + (1 - d) * theta,    d = decay, or with warm-up
                           d_t = min(decay, (1 + t) / (10 + t))   (t: updates so far)
    sigma_rel_<s>          EDM2's power-function EMA (Karras et al. 2024, sec. 3): d_t = (1 - 1/t)^(gamma+1),
                           t = 1, 2, ...; gamma from sigma_rel (`power_gamma`). Snapshots of these let
                           launch/posthoc_ema.py rebuild an EMA of any sigma_rel after training (posthoc.py).

Files (a checkpoint's ema/ folder, and each snapshot folder): ema.json (layout: parameter names and shapes
of each group in flat order, the partition size, world size, tracks, updates; sealed with the sha256 of
its canonical JSON, integrity.seal: format 2; format 1 loads with a warning) and rank{r:05d}.safetensors
holding that rank's slice of every track (keys "<track>/<group>"). The layout is what DeepSpeed's
zero_to_fp32 uses for the weights, so `read_named` joins the slices into a UNet state dict, and a run on
another number of ranks re-cuts them (`ShardedEMA.load`): the EMA survives a change of world size.

fp32 is the default storage. bf16 with stochastic rounding halves it (2/N), but each update adds rounding
noise of up to one bf16 ulp that then decays like the weights: its std settles near
ulp * sqrt(1 / (6 (1 - d^2))), about 29 ulp (11% of |w|) at d = 0.9999. Useful only for d <= ~0.99.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ztsnr_ds import integrity
from ztsnr_ds.data.cache_files import sync_dir, write_atomic
from ztsnr_ds.engine import any_rank
from ztsnr_ds.optim import copy_stochastic_

LAYOUT_FILE = "ema.json"
FORMAT = 2  # 2: ema.json sealed (integrity.seal); 1: unsealed, read with a warning
SNAPSHOT_FIX = "free space or move trainer.output_dir (ema_snapshots/), or raise ema.snapshot_every"
EMA_DIR = "ema"
SNAPSHOT_DIR = "ema_snapshots"
MAIN_TRACK = "ema"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHUNK = 1 << 24  # elements per update chunk: bounds the fp32 temporaries (bf16 masters or a bf16 track)


class EMAError(RuntimeError):
    """EMA files that cannot be used; the message names the file and the fix."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an EMA of the weights, sharded over the ranks like the optimizer state (fp32: 4/N bytes/param)."""
    decay: float = 0.9999
    """EMA decay per update."""
    warmup: bool = False
    """Use min(decay, (1 + t) / (10 + t)) at update t: early updates forget the initial weights faster."""
    every: int = 1
    """Optimizer steps between EMA updates (decay applies per update)."""
    dtype: str = "fp32"
    """fp32, or bf16 with stochastic rounding (half the bytes; noisy above decay ~0.99, see ema.py)."""
    posthoc: bool = False
    """Also track EDM2 power-function EMAs and write snapshots for launch/posthoc_ema.py."""
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    """Relative widths of the tracked power-function EMAs (EDM2 tracks 0.05 and 0.10)."""
    snapshot_every: int = 1000
    """Steps between post-hoc snapshots (<output_dir>/ema_snapshots/step<N>/)."""
    snapshot_dtype: str = "bf16"
    """Precision of snapshot files: bf16 (half the disk) or fp32."""
    discard_saved: bool = False
    """Resume a tag whose EMA tracks this config does not keep (enabled or posthoc now false): drop them on
    purpose. Without it such a resume is refused; with it, rotation keeps the last tag holding them."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay = {self.decay} must lie in (0, 1), e.g. 0.9999")
        for key in ("every", "snapshot_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"ema.{key} = {getattr(self, key)} must be >= 1")
        for key in ("dtype", "snapshot_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"ema.{key} = {getattr(self, key)!r} is not one of {', '.join(DTYPES)}")
        if self.posthoc and not self.enabled:
            raise ValueError("ema.posthoc needs ema.enabled: true (the power EMAs are tracked with the EMA)")
        if self.posthoc and not self.sigma_rels:
            raise ValueError("ema.sigma_rels is empty: list the power-EMA widths to track, e.g. [0.05, 0.10]")
        for s in self.sigma_rels:
            if not 0.0 < s < 0.28:
                raise ValueError(f"ema.sigma_rels holds {s}: each must lie in (0, 0.28) (0.28 is gamma = 0)")


# ---------------------------------------------------------------------------------------- the math
def ema_decay(t: int, decay: float, warmup: bool) -> float:
    """Decay of update t (0-based): decay, or min(decay, (1 + t) / (10 + t)) with warm-up."""
    return min(decay, (1 + t) / (10 + t)) if warmup else decay


def power_gamma(sigma_rel: float) -> float:
    """gamma of the power-function EMA with relative std sigma_rel (EDM2 eq. 3):

        sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
    i.e. gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + (12 - 1/sigma_rel^2) = 0; the largest real root.
    """
    k = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_sigma_rel(gamma: float) -> float:
    """The inverse of power_gamma: sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_decay(t: int, gamma: float) -> float:
    """Decay of update t >= 1 of the power-function EMA: (1 - 1/t)^(gamma + 1) (0 at t = 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def track_name(sigma_rel: float) -> str:
    return f"sigma_rel_{sigma_rel:g}"


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where each parameter lies in the flat groups, and how the groups are cut into rank slices."""

    groups: list[list[tuple[str, list[int]]]]  # per group: (name, shape) in flat order
    partition: list[int]  # elements of each rank's slice, per group (padding included)
    world_size: int

    def numel(self, group: int) -> int:
        return sum(math.prod(shape) for _, shape in self.groups[group])

    def spans(self, group: int) -> Iterator[tuple[str, list[int], int, int]]:
        """(name, shape, start, stop) of each parameter in the group's flat vector, in order."""
        start = 0
        for name, shape in self.groups[group]:
            stop = start + math.prod(shape)
            yield name, shape, start, stop
            start = stop

    def to_json(self) -> dict:
        return {"groups": [[[n, list(s)] for n, s in g] for g in self.groups], "partition": self.partition,
                "world_size": self.world_size}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        return cls([[(n, list(s)) for n, s in g] for g in data["groups"]], list(data["partition"]),
                   int(data["world_size"]))

    def same_parameters(self, other: Layout) -> bool:
        return self.groups == other.groups


def engine_layout(engine, optimizer: torch.optim.Optimizer, world_size: int) -> Layout:
    """The flat layout of a ZeRO-1/2 engine: DeepSpeed's own names and order (what zero_to_fp32 reads)."""
    if engine.zero_optimization_stage() not in (1, 2):
        raise EMAError(f"ema.enabled needs ZeRO stage 1 or 2 (flat partitions); the DeepSpeed config has "
                       f"stage {engine.zero_optimization_stage()}")
    shapes = engine._get_zero_param_shapes()  # list of {name: shape}, the order of the flat groups
    partition = [group["params"][0].numel() for group in optimizer.param_groups]
    groups = [[(name, list(shape)) for name, shape in g.items()] for g in shapes]
    return Layout(groups, partition, world_size)


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:05d}.safetensors"


def read_layout(folder: Path) -> tuple[Layout, dict]:
    """The Layout and the whole ema.json of an EMA folder, its seal checked (format 1: a warning)."""
    path = Path(folder) / LAYOUT_FILE
    fix = "the EMA files of this folder cannot be used (export --weights model, or resume from another tag)"
    try:
        data = json.loads(path.read_text())
        if data.get("format") == 1:
            warnings.warn(f"{path} is not sealed (written by an older version): its numbers cannot be "
                          "verified", stacklevel=2)
        else:
            data = integrity.check_seal(data, path, fix)
        return Layout.from_json(data), data
    except integrity.IntegrityError as err:
        raise EMAError(str(err)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise EMAError(f"{path} is missing or unreadable ({err}); {fix}") from err


def read_flat(folder: Path, layout: Layout, track: str, group: int, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of a group's full flat vector (all ranks' slices end to end), fp32.

    Reads only the slices that overlap, lazily: memory is O(stop - start) whatever the model size.
    Positions past the group's parameters (padding) are zero.
    """
    out = torch.zeros(stop - start, dtype=torch.float32)
    size, numel = layout.partition[group], layout.numel(group)
    for r in range(start // size, min(layout.world_size, -(-stop // size))):
        lo, hi = max(start, r * size), min(stop, (r + 1) * size, numel)
        if lo >= hi:
            continue
        path = rank_file(folder, r)
        try:
            with safe_open(str(path), "pt") as f:
                piece = f.get_slice(f"{track}/{group}")[lo - r * size: hi - r * size]
            out[lo - start: hi - start] = piece.float()
        except (OSError, KeyError, RuntimeError) as err:
            raise EMAError(f"{path}: no readable track {track!r} group {group} ({err}); the EMA files are "
                           "damaged or from another run") from err
    return out


def read_named(folder: Path, track: str = MAIN_TRACK,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A track of an EMA folder as a state dict (DeepSpeed's parameter names), one parameter at a time."""
    layout, data = read_layout(folder)
    if track not in data.get("tracks", {}):
        raise EMAError(f"{folder} has no track {track!r} (tracks: {', '.join(data.get('tracks', {}))})")
    return {name: read_flat(folder, layout, track, g, start, stop).view(shape).to(dtype)
            for g in range(len(layout.groups)) for name, shape, start, stop in layout.spans(g)}


def _write_rank_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


# ---------------------------------------------------------------------------------------- the tracker
class ShardedEMA:
    """This rank's slice of every EMA track; updated after optimizer steps, saved with checkpoints.

    `masters`: the client optimizer's flat params (one per group), which DeepSpeed updates in place.
    """

    def __init__(self, cfg: EMAConfig, engine, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
                 seed: int = 0) -> None:
        self.cfg, self.engine, self.rank, self.seed = cfg, engine, rank, seed
        self.masters = [group["params"][0] for group in optimizer.param_groups]
        self.layout = engine_layout(engine, optimizer, world_size)
        self.tracks: dict[str, dict] = {MAIN_TRACK: {"kind": "ema", "decay": cfg.decay, "warmup": cfg.warmup}}
        if cfg.posthoc:
            for s in cfg.sigma_rels:
                self.tracks[track_name(s)] = {"kind": "power", "sigma_rel": s, "gamma": power_gamma(s)}
        self.dtype = DTYPES[cfg.dtype]
        self.updates = 0
        self.state: dict[str, list[torch.Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        """Every track := the current weights (start of training, or a tag saved without EMA)."""
        self.state = {name: [m.detach().to(self.dtype, copy=True) for m in self.masters]
                      for name in self.tracks}
        self.updates = 0

    def decay(self, track: str) -> float:
        """Decay of the next update (self.updates counts those done)."""
        spec = self.tracks[track]
        if spec["kind"] == "ema":
            return ema_decay(self.updates, spec["decay"], spec["warmup"])
        return power_decay(self.updates + 1, spec["gamma"])

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update of every track from the current weights (call after an applied optimizer step)."""
        for name, slices in self.state.items():
            weight = 1.0 - self.decay(name)
            for g, (ema, master) in enumerate(zip(slices, self.masters)):
                for lo in range(0, ema.numel(), CHUNK):  # fp32 math per chunk: bounded temporaries
                    part, target = master[lo: lo + CHUNK].float(), ema[lo: lo + CHUNK]
                    if ema.dtype == torch.float32:
                        target.lerp_(part, weight)  # ema + weight * (master - ema), in place
                    else:  # bf16: stochastic rounding of the fp32 result
                        key = self._rounding_key(name, g, lo)
                        copy_stochastic_(target, target.float().lerp_(part, weight), key)
        self.updates += 1

    def _rounding_key(self, track: str, group: int, offset: int) -> int:
        text = f"ema:{self.seed}:{self.rank}:{track}:{group}:{offset}:{self.updates}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")

    # ------------------------------------------------------------------------------ files
    def _write_slices(self, folder: Path, names: tuple[str, ...], dtype: torch.dtype | None) -> Path:
        path = rank_file(folder, self.rank)
        _write_rank_file(path, {f"{name}/{g}": t if dtype is None else t.to(dtype)
                                for name in names for g, t in enumerate(self.state[name])})
        return path

    def _write_meta(self, folder: Path, names: tuple[str, ...], **extra) -> None:
        meta = {"format": FORMAT, "updates": self.updates, "dtype": self.cfg.dtype,
                "tracks": {n: self.tracks[n] for n in names}, **self.layout.to_json(), **extra}
        write_atomic(Path(folder) / LAYOUT_FILE, json.dumps(integrity.seal(meta), indent=1).encode())

    def nbytes(self, names: tuple[str, ...] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the named tracks (default: all, in their dtype) over every rank's slice: what a save
        (or, for the power tracks in the snapshot dtype, a snapshot) writes."""
        names = tuple(self.state) if names is None else names
        size = (dtype or self.dtype).itemsize
        return sum(self.layout.partition) * self.layout.world_size * len(names) * size

    def save(self, folder: Path) -> None:
        """Every track: this rank's slices into folder/rank{r}.safetensors, and ema.json from rank 0.

        Every rank calls it, inside a checkpoint save (whose marker and checksums make the folder whole).
        """
        self._write_slices(folder, tuple(self.state), None)
        if self.rank == 0:
            self._write_meta(folder, tuple(self.state))

    def snapshot(self, output_dir: Path, step: int) -> Path:
        """Collective: the power-EMA tracks into <output_dir>/ema_snapshots/step<N>/ for posthoc_ema.py.

        ema.json is written last, with every rank file's sha256, so its presence marks a whole snapshot.
        """
        folder = Path(output_dir) / SNAPSHOT_DIR / f"step{step:08d}"
        power = tuple(n for n, spec in self.tracks.items() if spec["kind"] == "power")
        need = self.nbytes(power, DTYPES[self.cfg.snapshot_dtype])
        if any_rank(integrity.free_bytes(folder) < need):  # host sync, once per snapshot
            raise integrity.NoSpaceError(integrity.no_space_message(folder, need, "a snapshot", SNAPSHOT_FIX))
        try:
            (folder / LAYOUT_FILE).unlink(missing_ok=True)
            path = self._write_slices(folder, power, DTYPES[self.cfg.snapshot_dtype])
            digest, failed = integrity.sha256(path), None
        except Exception as err:  # any type: safetensors reports a full disk as SafetensorError
            digest, failed = None, err
        digests: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(digests, digest)  # one short string per rank
        if None not in digests and self.rank == 0:
            try:
                self._write_meta(folder, power, step=step,
                                 sha256={rank_file(folder, r).name: d for r, d in enumerate(digests)})
            except OSError as err:
                failed = err
        if any_rank(failed is not None):  # host sync: rank 0's marker write can fail alone
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            if integrity.is_no_space(failed or OSError(), folder.parent):
                raise integrity.NoSpaceError(integrity.no_space_message(folder.parent, need, "a snapshot",
                                                                        SNAPSHOT_FIX) + " (partial removed)")
            raise EMAError(f"writing snapshot {folder} failed: {failed or 'on another rank'}")
        return folder

    def load(self, folder: Path) -> None:
        """Every track from an EMA folder saved by any number of ranks (same parameters), bit for bit."""
        layout, data = read_layout(folder)
        if not layout.same_parameters(self.layout):
            raise EMAError(f"{folder / LAYOUT_FILE} lists other parameters than this model's; the EMA "
                           "belongs to another model: resume from a tag of this run")
        missing = [n for n in self.tracks if n not in data["tracks"]]
        if missing:
            raise EMAError(f"{folder} lacks the EMA tracks {missing} that this config tracks (ema.posthoc / "
                           "ema.sigma_rels changed?); keep the tracked set of the run, or start a new run")
        for name, slices in self.state.items():
            for g, ema in enumerate(slices):
                if layout.world_size == self.layout.world_size:
                    with safe_open(str(rank_file(folder, self.rank)), "pt") as f:
                        saved = f.get_tensor(f"{name}/{g}")
                else:  # another world size: cut this rank's range out of the saved slices
                    start = self.rank * self.layout.partition[g]
                    saved = read_flat(folder, layout, name, g, start, start + ema.numel())
                ema.copy_(saved.to(ema.dtype).view_as(ema))
        self.updates = int(data["updates"])

    # ------------------------------------------------------------------------------ weights swap
    @contextmanager
    def swapped_in(self, track: str = MAIN_TRACK) -> Iterator[None]:
        """Collective: the module's weights on every rank are the EMA track inside the block.

        The optimizer's slices are kept aside (1/N of the weights), the EMA copied in and gathered into the
        module by DeepSpeed's own all-gather (`update_lp_params`); afterwards the slices go back and are
        gathered again, so the module returns bit for bit to the trained weights.
        """
        kept = [m.detach().clone() for m in self.masters]
        with torch.no_grad():
            for master, ema in zip(self.masters, self.state[track]):
                master.copy_(ema.to(master.dtype))
            self.engine.optimizer.update_lp_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for master, saved in zip(self.masters, kept):
                    master.copy_(saved)
                self.engine.optimizer.update_lp_params()

