"""Save, find, resume and rotate checkpoints.

Layout of a run:
    <output_dir>/checkpoints/step00001000/   DeepSpeed's files (every rank's ZeRO partition)
        rng/rank00000.json                    each rank's RNG states (python, numpy, torch, CUDA)
        ztsnr_state.json                      step, world size, sampler position, config, UNet config
        universal/                            DeepSpeed's universal form, made when a run with
                                              another number of ranks resumes from this tag
    <output_dir>/checkpoints/latest           name of the newest complete tag

`ztsnr_state.json` is written last, after a barrier and after checksums.json (sha256 of every
file, the marker's own bytes included: see integrity.py), so its presence marks a tag as complete; a
run killed mid-save leaves a tag without it, and resume skips that tag. A tag saved again loses its
marker before anything is rewritten. Older tags are deleted only after the new one is complete, never
the one just written, and never the last one holding a state folder (ema/) the new tags lack.
`universal/` gets its own checksums.json before it is renamed into place, checked on every load.
`latest` must hold a plain tag name of its own folder. Every .pt file is checked against an
allow-list before DeepSpeed unpickles it, with weights_only forced (safe_load.py): a shared checkpoint
cannot run code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ztsnr_ds import integrity, safe_load
from ztsnr_ds.ema import SNAPSHOT_DIR
from ztsnr_ds.engine import any_rank, build_ds_config, wait_group

STATE_FILE = "ztsnr_state.json"
LATEST_FILE = "latest"
TAG_PREFIX = "step"
UNIVERSAL_DIR = "universal"

# Keys of ztsnr_state.json.
STEP, EPOCH_KEY, SAMPLER, CONFIG, UNET_CONFIG, COUNTERS, WORLD_SIZE = (
    "step", "epoch", "sampler", "config", "unet_config", "counters", "world_size")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed (a full disk)


def _encode_tensor_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_tensor_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This rank's global random streams as JSON (python, numpy, torch CPU and CUDA)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _encode_tensor_state(torch.get_rng_state()),
        "cuda": [_encode_tensor_state(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(_decode_tensor_state(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_tensor_state(s) for s in state["cuda"]])


def complete_tags(checkpoint_dir: Path) -> list[Path]:
    """Complete tag folders, oldest first; incomplete ones are reported and ignored."""
    if not checkpoint_dir.is_dir():
        return []
    tags = sorted(p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    for tag in tags:
        if not (tag / STATE_FILE).is_file():
            warnings.warn(f"ignoring incomplete checkpoint {tag} (no {STATE_FILE}: killed while saving?)",
                          stacklevel=2)
    return [t for t in tags if (t / STATE_FILE).is_file()]


def find_resume_tag(output_dir: Path, resume: str) -> Path | None:
    """Resolve trainer.resume: 'none', 'auto' (latest complete tag, if any) or a tag folder."""
    if resume == "none":
        return None
    if resume != "auto":
        tag = Path(resume)
        if not (tag / STATE_FILE).is_file():
            raise FileNotFoundError(f"trainer.resume = {resume}: not a complete checkpoint tag folder "
                                    f"(no {STATE_FILE}); use 'auto' or a folder like "
                                    "checkpoints/step00000100")
        return tag
    tags = complete_tags(output_dir / "checkpoints")
    return tags[-1] if tags else None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names the file and the fix."""


OLDER_TAG = "pass an older complete tag folder"


def read_state(tag_dir: Path) -> dict:
    """The marker's state, its bytes checked against their sha256 in checksums.json (a tag saved before
    the marker was covered loads with a one-line warning)."""
    path = Path(tag_dir) / STATE_FILE
    try:
        data = path.read_bytes()
        state = json.loads(data)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{path} is unreadable ({err}); the tag is damaged: {OLDER_TAG}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds {type(state).__name__}, not the state object save() writes")
    try:
        expected = (integrity.read_checksums(Path(tag_dir), OLDER_TAG) or {}).get(STATE_FILE)
    except integrity.IntegrityError as err:
        raise CheckpointError(str(err)) from None
    if expected is None:
        warnings.warn(f"{path} is not covered by {integrity.CHECKSUM_FILE} (saved by an older version): "
                      "its step and settings cannot be verified", stacklevel=2)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path} does not match its sha256 in {integrity.CHECKSUM_FILE} (damaged or "
                              f"edited); {OLDER_TAG}")
    return state


def read_latest(checkpoint_dir: Path) -> Path | None:
    """The tag `latest` names (None without the file): a plain tag name of this folder, nothing else."""
    path = Path(checkpoint_dir) / LATEST_FILE
    if not path.is_file():
        return None
    name = path.read_text(errors="replace").strip()
    if not re.fullmatch(rf"{TAG_PREFIX}\d{{8,}}", name):
        raise CheckpointError(f"{path} holds {name[:80]!r}, not a tag name like {tag_for(100)} of its own "
                              "folder; write the newest complete tag's name into it, or pass that tag folder")
    return Path(checkpoint_dir) / name


def foreign_tags(output_dir: Path, resume: str) -> list[Path]:
    """Tags in output_dir that a run with this trainer.resume would not continue (it would mix runs).

    resume none: every tag; a tag folder inside output_dir: the newer ones; a tag elsewhere:
    every tag of output_dir; auto: none (it continues the newest complete one).
    """
    return _not_continued(Path(output_dir) / "checkpoints", output_dir, resume)


def foreign_snapshots(output_dir: Path, resume: str) -> list[Path]:
    """Post-hoc EMA snapshots (<output_dir>/ema_snapshots/step<N>/) of the branch `foreign_tags` leaves:
    the same rule on the step in the folder name. Left in place, posthoc_ema.py would combine two runs
    (and by default rebuild at the abandoned branch's last snapshot)."""
    return _not_continued(Path(output_dir) / SNAPSHOT_DIR, output_dir, resume)


def _not_continued(folder: Path, output_dir: Path, resume: str) -> list[Path]:
    """The step<N> folders of `folder` (tags or snapshots) that a run with this trainer.resume drops."""
    if resume == "auto" or not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    source = Path(resume)
    if resume != "none" and source.parent.resolve() == (Path(output_dir) / "checkpoints").resolve():
        return [p for p in found if p.name > source.name]
    return found


def folder_names(paths: list[Path]) -> str:
    """"checkpoints/step00000010, ema_snapshots/step00000010": the folders as a message names them."""
    return ", ".join(f"{p.parent.name}/{p.name}" for p in paths)


def move_aside(output_dir: Path, paths: list[Path]) -> Path:
    """Move tags (and `latest`) to output_dir/replaced/<UTC time>/, and snapshots to its ema_snapshots/;
    returns that folder."""
    dest = Path(output_dir) / "replaced" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    latest = Path(output_dir) / "checkpoints" / LATEST_FILE
    for path in [*paths, latest] if latest.is_file() else paths:
        target = dest / SNAPSHOT_DIR if path.parent.name == SNAPSHOT_DIR else dest
        target.mkdir(exist_ok=True)
        os.replace(path, target / path.name)
    return dest


def save(engine, output_dir: Path, step: int, state: dict, keep_last: int, is_main: bool,
         write_extra: Callable[[Path], None] | None = None, extra_bytes: int = 0) -> Path:
    """Collective save of tag step<N>: DeepSpeed files, every rank's RNG, checksums, then the state marker.

    `state` is this trainer's JSON-able state (STEP, SAMPLER, CONFIG, ...). Every rank calls this.
    `write_extra(tag_dir)` writes more of this rank's files into the tag (the EMA slices, `extra_bytes`
    on all ranks together), covered by the same checksums and marker.
    Raises CheckpointError (on every rank) when the disk lacks room, before writing or when any write
    fails for lack of space; the partial tag is then removed.
    """
    checkpoint_dir = Path(output_dir) / "checkpoints"
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag
    need = _check_space(engine, checkpoint_dir, extra_bytes)
    if is_main and tag_dir.exists():  # saved again (e.g. after a resume): unmark it before rewriting
        (tag_dir / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    torch.distributed.barrier()
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank()
        write_atomic(tag_dir / "rng" / f"rank{rank:05d}.json", json.dumps(rng_state()))
        if write_extra is not None:
            write_extra(tag_dir)
        failed = None
    except Exception as err:  # any type: safetensors reports a full disk as SafetensorError
        failed = err
    _raise_if_any_failed(failed, tag_dir, need, is_main)  # every rank's partition and RNG file is on disk
    marker = json.dumps(state, indent=1)  # its sha256 goes into checksums.json, written before it
    checksums = _gather_checksums(tag_dir) | {STATE_FILE: hashlib.sha256(marker.encode()).hexdigest()}
    failed = None
    if is_main:
        try:
            write_atomic(tag_dir / integrity.CHECKSUM_FILE, json.dumps(checksums, indent=1))
            write_atomic(tag_dir / STATE_FILE, marker)
            write_atomic(checkpoint_dir / LATEST_FILE, tag)
        except OSError as err:
            failed = err
    _raise_if_any_failed(failed, tag_dir, need, is_main)
    if is_main:
        _rotate(checkpoint_dir, keep_last, tag_dir)
    torch.distributed.barrier()
    return tag_dir


def _estimate_size(engine, checkpoint_dir: Path, extra_bytes: int) -> int:
    """Bytes the next tag takes: the newest complete tag's size, else integrity.BYTES_PER_PARAM each
    plus `extra_bytes` (the EMA: 4 bytes per parameter and track in fp32)."""
    tags = complete_tags(checkpoint_dir)
    if tags:
        return integrity.dir_size(tags[-1]) - integrity.dir_size(tags[-1] / UNIVERSAL_DIR)
    return integrity.BYTES_PER_PARAM * sum(p.numel() for p in engine.module.parameters()) + extra_bytes


def _check_space(engine, checkpoint_dir: Path, extra_bytes: int) -> int:
    """Fail on every rank, before writing, if any rank sees less free space than a tag needs."""
    need = _estimate_size(engine, checkpoint_dir, extra_bytes)
    if any_rank(integrity.free_bytes(checkpoint_dir) < need):  # host sync, once per save
        raise CheckpointError(integrity.no_space_message(checkpoint_dir, need))
    return need


def _raise_if_any_failed(failed: BaseException | None, tag_dir: Path, need: int, is_main: bool) -> None:
    """Collective: if a rank's write failed, every rank raises; a full disk gets its partial tag removed."""
    if not any_rank(failed is not None):  # host sync, once per save
        return
    no_space = integrity.is_no_space(failed or OSError(), tag_dir.parent)
    torch.distributed.barrier()
    if is_main and no_space:
        shutil.rmtree(tag_dir, ignore_errors=True)
    if no_space:
        raise CheckpointError(integrity.no_space_message(tag_dir.parent, need)
                              + f" (partial {tag_dir.name} removed)") from failed
    raise CheckpointError(f"saving {tag_dir} failed on this rank: {failed}") from failed


def _gather_checksums(tag_dir: Path) -> dict[str, str]:
    """sha256 of every file of the tag; each rank hashes its share, the dicts are gathered."""
    names = integrity.tag_files(tag_dir, skip=(STATE_FILE, integrity.CHECKSUM_FILE, UNIVERSAL_DIR))
    world_size = torch.distributed.get_world_size()
    share = integrity.hash_share(tag_dir, names, torch.distributed.get_rank(), world_size)
    shares: list = [None] * world_size
    torch.distributed.all_gather_object(shares, share)  # a few hundred bytes per rank, once per save
    return {name: digest for part in shares for name, digest in part.items()}


def verify(tag_dir: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems in this rank's share of the tag's files: checksum mismatches, else unsafe .pt files.

    A tag saved before checksums were recorded is only checked for unsafe files (with a warning).
    """
    tag_dir = Path(tag_dir)
    try:
        expected = integrity.read_checksums(tag_dir)
    except integrity.IntegrityError as err:  # torn or not a map of sha256s
        return [str(err)]
    if expected is None:
        warnings.warn(f"{tag_dir} has no {integrity.CHECKSUM_FILE} (saved by an older version): "
                      "its files cannot be verified", stacklevel=2)
        names = sorted(p.name for p in tag_dir.glob("*.pt"))
    else:
        problems = integrity.mismatches(tag_dir, expected, rank, world_size)
        if problems:
            return problems
        names = sorted(expected)
    try:
        safe_load.check_files(tag_dir / name for name in names[rank::world_size] if name.endswith(".pt"))
    except safe_load.UnsafeCheckpoint as err:
        return [str(err)]
    return []


def verify_universal(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems in this rank's share of a universal/ folder: every file must be listed and match."""
    try:
        expected = integrity.read_checksums(folder, f"delete {folder}; a resume converts it again") or {}
    except integrity.IntegrityError as err:
        return [str(err)]
    names = integrity.tag_files(folder, skip=(integrity.CHECKSUM_FILE,))
    extra = [f"{folder / n} is not in its {integrity.CHECKSUM_FILE}" for n in names if n not in expected]
    return extra[rank::world_size] + integrity.mismatches(folder, expected, rank, world_size)


def _verify_collectively(tag_dir: Path, universal: bool = False) -> None:
    """Every rank checks its share of the files; all raise the same CheckpointError if any failed."""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problems: list = [None] * world_size
    check = verify_universal if universal else verify
    torch.distributed.all_gather_object(problems, check(tag_dir, rank, world_size))  # short strings
    found = [p for part in problems for p in part]
    if found:
        fix = f"; delete {tag_dir} and resume again: it is converted anew" if universal else ""
        raise CheckpointError(f"cannot resume from {tag_dir}: {'; '.join(found)}{fix}")


def _state_folders(tag: Path) -> set[str]:
    """Top-level folders of a tag that hold state (ema/, rng/), universal/ (derived) left out."""
    return {p.name for p in tag.iterdir() if p.is_dir() and p.name != UNIVERSAL_DIR}


def _rotate(checkpoint_dir: Path, keep_last: int, current: Path) -> None:
    """Keep `current` and the keep_last - 1 newest complete tags before it; delete older tags, except the
    newest one holding a state folder no kept tag has (the EMA of a run resumed with ema.enabled false).

    Tags newer than `current` (which trainer start-up refuses or moves aside) are never touched.
    """
    older = [t for t in complete_tags(checkpoint_dir) if t.name < current.name]
    keep = {current, *older[max(0, len(older) - keep_last + 1):]}
    held = set().union(*map(_state_folders, keep))
    for tag in reversed(older):  # newest first
        if tag not in keep and (only := _state_folders(tag) - held):
            keep.add(tag)
            held |= only
            warnings.warn(f"rotation keeps {tag}: the last tag holding {', '.join(sorted(only))}/, which "
                          "this run does not write; delete it by hand once it is not needed", stacklevel=2)
    for tag in checkpoint_dir.glob(f"{TAG_PREFIX}*"):
        if tag.is_dir() and tag not in keep and tag.name < current.name:
            shutil.rmtree(tag, ignore_errors=True)


def resume_ds_config(path: str | Path, micro_batch: int, grad_accum: int, world_size: int,
                     tag_dir: Path | None) -> dict:
    """engine.build_ds_config for an engine that will load ``tag_dir`` (None: a fresh start): a tag saved
    by another number of ranks needs ``"checkpoint": {"load_universal": true}`` (`needs_universal`)."""
    ds_config = build_ds_config(path, micro_batch, grad_accum, world_size)
    if needs_universal(tag_dir, world_size):
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config


def needs_universal(tag_dir: Path | None, world_size: int) -> bool:
    """True when tag_dir was saved by another number of ranks (DeepSpeed then needs its universal form).

    The engine must be built with `"checkpoint": {"load_universal": true}` for such a tag.
    Tags written before the world size was recorded count as same-size (DeepSpeed checks that).
    """
    if tag_dir is None:
        return False
    saved = read_state(tag_dir).get(WORLD_SIZE)
    return saved is not None and saved != world_size


def to_universal(tag_dir: Path, is_main: bool) -> Path:
    """tag_dir/universal, converted once by the main process with DeepSpeed's ds_to_universal.

    The converter merges every rank's ZeRO partition into per-parameter files (weights, exp_avg,
    exp_avg_sq, step; optimizer param_groups), which any number of ranks can load. It does not
    carry other optimizer state: AdamWSR's Kahan buffer restarts from zero. Converted into a
    temporary folder and renamed, so a crash mid-conversion never leaves a half folder in use.
    """
    out = Path(tag_dir) / UNIVERSAL_DIR
    if is_main and out.is_dir() and not (out / integrity.CHECKSUM_FILE).is_file():
        warnings.warn(f"{out} has no {integrity.CHECKSUM_FILE} (converted by an older version): converting "
                      "it again", stacklevel=2)
        shutil.rmtree(out)
    if is_main and not out.is_dir():
        tmp = out.with_name(UNIVERSAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ztsnr_ds.safe_load", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder",
                        str(tag_dir), "--output_folder", str(tmp), "--inject_missing_state"],
                       check=True, stdout=subprocess.DEVNULL)
        sums = {name: integrity.sha256(tmp / name) for name in integrity.tag_files(tmp, skip=())}
        write_atomic(tmp / integrity.CHECKSUM_FILE, json.dumps(sums, indent=1))  # before the rename
        os.replace(tmp, out)
    # Nobody loads before the folder is complete. Converting an SDXL tag takes minutes: wait in gloo with
    # a long timeout (engine.wait_group), not in an NCCL barrier that the watchdog would abort.
    torch.distributed.barrier(group=wait_group())
    _verify_collectively(out, universal=True)
    return out


def load(engine, tag_dir: Path, is_main: bool) -> dict:
    """Load weights, optimizer and RNG into the live engine; returns the trainer state.

    An engine built with load_universal (see needs_universal) loads the tag's universal form.
    """
    tag_dir = Path(tag_dir)
    _verify_collectively(tag_dir)
    with safe_load.weights_only():
        folder = to_universal(tag_dir, is_main) if engine.load_universal_checkpoint() else tag_dir
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rank = torch.distributed.get_rank()
    rng_file = tag_dir / "rng" / f"rank{rank:05d}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    else:
        warnings.warn(f"{rng_file} missing (the checkpoint had fewer ranks): random streams restart "
                      "from the seed for this rank", stacklevel=2)
    return read_state(tag_dir)
