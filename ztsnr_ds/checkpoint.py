"""Save, find, resume and rotate checkpoints.

Layout of a run:
    <output_dir>/checkpoints/step00001000/   DeepSpeed's files (every rank's ZeRO partition)
        rng/rank00000.json                    each rank's RNG states (python, numpy, torch, CUDA)
        ztsnr_state.json                      step, world size, sampler position, config, UNet config
        universal/                            DeepSpeed's universal form, made when a run with
                                              another number of ranks resumes from this tag
    <output_dir>/checkpoints/latest           name of the newest complete tag

`ztsnr_state.json` is written last, after a barrier, so its presence marks a tag as
complete; a run killed mid-save leaves a tag without it, and resume skips that tag.
Older tags are deleted only after the new one is complete. Nothing here is unpickled
except by DeepSpeed's own loader, reading files this run wrote.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def read_state(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / STATE_FILE).read_text())


def save(engine, output_dir: Path, step: int, state: dict,
         keep_last: int, is_main: bool) -> Path:
    """Collective save of tag step<N>: DeepSpeed files, every rank's RNG, then the state marker.

    `state` is this trainer's JSON-able state (STEP, SAMPLER, CONFIG, ...). Every rank calls this.
    """
    checkpoint_dir = Path(output_dir) / "checkpoints"
    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    tag_dir = checkpoint_dir / tag
    (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank()
    write_atomic(tag_dir / "rng" / f"rank{rank:05d}.json", json.dumps(rng_state()))
    torch.distributed.barrier()  # every rank's partition and RNG file is on disk
    if is_main:
        write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=1))
        write_atomic(checkpoint_dir / LATEST_FILE, tag)
        _rotate(checkpoint_dir, keep_last)
    torch.distributed.barrier()
    return tag_dir


def _rotate(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete tags, and incomplete tags older than those."""
    complete = complete_tags(checkpoint_dir)
    keep = set(complete[-keep_last:])
    for tag in checkpoint_dir.glob(f"{TAG_PREFIX}*"):
        if tag.is_dir() and tag not in keep and tag.name < complete[-1].name:
            shutil.rmtree(tag, ignore_errors=True)


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
    if is_main and not out.is_dir():
        tmp = out.with_name(UNIVERSAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(tag_dir), "--output_folder", str(tmp), "--inject_missing_state"],
                       check=True, stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    torch.distributed.barrier()  # nobody loads before the folder is complete
    return out


def load(engine, tag_dir: Path, is_main: bool) -> dict:
    """Load weights, optimizer and RNG into the live engine; returns the trainer state.

    An engine built with load_universal (see needs_universal) loads the tag's universal form.
    """
    tag_dir = Path(tag_dir)
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
