"""Checks of a whole run's inputs that need more than one field, run by config.parse before any model loads.

Each raises ValueError naming the key to change (config.check_inputs turns it into ConfigError, exit 2):
the DeepSpeed JSON (readable, batch sizes that agree with trainer.*, a ZeRO stage this trainer runs),
trainer.resume (a complete tag; never a silent mix of two runs in one output_dir), validation.holdout
(images left to train on; the held-out images of the checkpoint resumed) and whether the sampler can plan
an epoch on the cache's buckets less the held-out images (every rank needs a sample in every step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ztsnr_ds import checkpoint, safe_load
from ztsnr_ds.data.cache_files import CacheError
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.engine import build_ds_config
from ztsnr_ds.holdout import holdout_count, holdout_ids, training_buckets

ZERO_STAGES = (0, 1, 2)  # validation and export read full weights from every rank: no ZeRO-3


def world_size() -> int:
    """The launcher's WORLD_SIZE (deepspeed, torchrun, slurm export it before start), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_run(config) -> None:
    """All checks below, for a parsed TrainConfig."""
    check_deepspeed_json(config.deepspeed_config, config.trainer.micro_batch, config.trainer.grad_accum)
    tag = check_resume(Path(config.trainer.output_dir), config.trainer.resume, config.trainer.overwrite)
    check_buckets(config, tag)


def check_deepspeed_json(path: str, micro_batch: int, grad_accum: int) -> None:
    try:
        ds_config = build_ds_config(path, micro_batch, grad_accum, world_size())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed_config: {path} is not valid JSON: {err}") from err
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed_config: {path} sets zero_optimization.stage = {stage!r}; ztsnr_ds runs "
                         f"stages {', '.join(map(str, ZERO_STAGES))} (ds_configs/zero2_bf16.json uses 2)")


def check_resume(output_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """trainer.resume must name a complete tag, and must not leave other runs' tags in output_dir.
    Returns the tag the run will resume, if any."""
    if resume not in ("auto", "none") and not (Path(resume) / checkpoint.STATE_FILE).is_file():
        raise ValueError(f"trainer.resume = {resume}: not a complete checkpoint tag folder (no "
                         f"{checkpoint.STATE_FILE}); use 'auto' or a folder like checkpoints/step00000100")
    tag = checkpoint.find_resume_tag(output_dir, resume)
    try:
        safe_load.check_files(sorted(tag.glob("*.pt")) if tag else [])  # reads pickle opcodes, runs nothing
    except safe_load.UnsafeCheckpoint as err:
        raise ValueError(f"trainer.resume = {resume}: {err}") from err
    foreign = checkpoint.foreign_tags(output_dir, resume)
    if foreign and not overwrite:
        raise ValueError(
            f"trainer.resume = {resume}, but trainer.output_dir {output_dir} already holds checkpoints this "
            f"run would not continue ({', '.join(t.name for t in foreign)}); a later resume or export "
            "could pick those up. Use a new trainer.output_dir, --trainer.resume auto to continue the "
            "newest one, or --trainer.overwrite true to move them to <output_dir>/replaced/")
    return tag


def check_buckets(config, tag: Path | None) -> None:
    """The held-out count must fit the cache (and match the resumed checkpoint's); the configured sampler
    must plan an epoch on the buckets left for training, for this world size."""
    try:
        index = CacheIndex(Path(config.data.cache_dir))
    except CacheError as err:
        raise ValueError(f"data.cache_dir: {err}") from err
    if index.rows == 0:
        raise ValueError(f"data.cache_dir {config.data.cache_dir} holds no images: the build skipped every "
                         "file of data.source; its report.json lists each with the reason "
                         "(docs/data-and-captions.md)")
    val = config.validation
    count = holdout_count(val.holdout, index.rows)
    if tag is not None:
        check_resumed_holdout(tag, count, val.holdout_seed, index.rows)
    held = holdout_ids(index.columns["key_hash"], count, val.holdout_seed)
    try:
        config.sampler(training_buckets(index.buckets, held, index.rows), config.trainer.micro_batch,
                       world_size(), 0)
    except ValueError as err:
        raise ValueError(f"trainer.micro_batch = {config.trainer.micro_batch} (x {world_size()} ranks): "
                         f"{err}; lower trainer.micro_batch, use fewer ranks or add images") from err


def check_resumed_holdout(tag: Path, count: int, seed: int, rows: int) -> None:
    """A resumed run holds out what its checkpoint's run did: other images would mix trained-on and
    held-out ones, and the loss curve would jump."""
    saved = checkpoint.read_state(tag)[checkpoint.CONFIG].get("validation", {})
    saved_count, saved_seed = holdout_count(saved.get("holdout", 0), rows), saved.get("holdout_seed", 0)
    if saved_count != count or (count and saved_seed != seed):
        raise ValueError(f"validation.holdout: {tag} was trained holding out {saved_count} images (holdout "
                         f"{saved.get('holdout', 0):g}, holdout_seed {saved_seed}), this run "
                         f"would hold out {count} (seed {seed}); keep the checkpoint's validation.holdout "
                         "and validation.holdout_seed, or start a new run in a new trainer.output_dir")
