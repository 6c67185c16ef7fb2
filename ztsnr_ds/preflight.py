"""Checks of a whole run's inputs that need more than one field, run by config.parse before any model loads.

Each raises ValueError naming the key to change (config.check_inputs turns it into ConfigError, exit 2):
the DeepSpeed JSON (readable, batch sizes that agree with trainer.*, a ZeRO stage this trainer runs),
the model paths (model.pretrained a diffusers SDXL folder, model.unet_path a readable UNet: checked from
headers, before any text encoder loads), trainer.output_dir (a folder), trainer.resume (a complete tag;
never a silent mix of two runs in one output_dir; never a silent drop of its EMA), validation.holdout
(images left to train on; the held-out images of the checkpoint resumed) and whether the sampler can plan
an epoch on the cache's buckets less the held-out images (every rank needs a sample in every step).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ztsnr_ds import checkpoint, ema, safe_load
from ztsnr_ds.data.cache_files import REPORT, CacheError
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.engine import build_ds_config
from ztsnr_ds.holdout import holdout_count, holdout_ids, training_buckets
from ztsnr_ds.keymaps import UNET_PREFIX
from ztsnr_ds.mixing import caption_control, sampler_options
from ztsnr_ds.models import FROZEN_PARTS, UNET_WEIGHTS, is_single_file

ZERO_STAGES = (0, 1, 2)  # validation and export read full weights from every rank: no ZeRO-3


def world_size() -> int:
    """The launcher's WORLD_SIZE (deepspeed, torchrun, slurm export it before start), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_run(config) -> None:
    """All checks below, for a parsed TrainConfig."""
    check_deepspeed_json(config.deepspeed_config, config.trainer.micro_batch, config.trainer.grad_accum)
    check_model(config.model.pretrained, config.model.unet_path)
    if Path(config.trainer.output_dir).exists() and not Path(config.trainer.output_dir).is_dir():
        raise ValueError(f"trainer.output_dir = {config.trainer.output_dir} is a file, not a folder; "
                         "name a new or existing run folder")
    tag = check_resume(Path(config.trainer.output_dir), config.trainer.resume, config.trainer.overwrite)
    check_buckets(config, tag)
    check_text_encoders(config, tag)
    check_ema_resume(config.ema, tag)


def check_model(pretrained: str, unet_path: str | None) -> None:
    """model.pretrained holds every frozen part (and the UNet unless unet_path); model.unet_path is a UNet
    folder or .safetensors whose header names UNet weights. Headers only: nothing is loaded."""
    folder = Path(pretrained)
    if is_single_file(folder) and unet_path is None:
        return  # its parts: config.check_base_file reads the header
    needed = [] if is_single_file(folder) else [*FROZEN_PARTS, *([] if unet_path else ["unet/config.json"])]
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise ValueError(f"model.pretrained = {pretrained} is not a diffusers SDXL folder (missing "
                         f"{', '.join(missing)}) nor a single-file SDXL .safetensors; pass an SDXL model "
                         "folder in diffusers layout or its single file")
    unet = Path(unet_path or folder / "unet")
    weights = unet / UNET_WEIGHTS if unet.is_dir() else unet
    key = "model.unet_path" if unet_path else "model.pretrained"
    if unet.is_dir() and not (unet / "config.json").is_file():
        raise ValueError(f"{key}: {unet} has no config.json; pass a diffusers UNet folder or a .safetensors")
    if not weights.is_file():
        return  # sharded or .bin UNet folders: diffusers checks them when it loads
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{key}: {weights} is not a readable .safetensors file ({err}); pass a UNet "
                         "folder or .safetensors") from None
    if not any(k in ("conv_in.weight", f"{UNET_PREFIX}input_blocks.0.0.weight") for k in keys):
        raise ValueError(f"{key}: {weights} holds no SDXL UNet weights (no conv_in); pass a UNet folder or "
                         ".safetensors (diffusers or single-file SDXL keys)")


def check_ema_resume(cfg: ema.EMAConfig, tag: Path | None) -> None:
    """A tag whose EMA tracks this config would not carry on is refused, unless ema.discard_saved."""
    folder = tag / ema.EMA_DIR if tag is not None else None
    if folder is None or not folder.is_dir() or cfg.discard_saved:
        return
    try:
        saved = set(ema.read_layout(folder)[1].get("tracks", {}))
    except ema.EMAError as err:
        raise ValueError(f"trainer.resume: {err}") from None
    kept = {ema.MAIN_TRACK, *(ema.track_name(s) for s in cfg.sigma_rels if cfg.posthoc)}
    if dropped := sorted(saved - (kept if cfg.enabled else set())):
        key = "ema.sigma_rels" if cfg.posthoc else "ema.posthoc" if cfg.enabled else "ema.enabled"
        raise ValueError(f"{key}: {tag} holds the EMA tracks {', '.join(dropped)}, which this run would "
                         f"drop (and rotation delete); set {key} as the run had it to carry them on, or "
                         "--ema.discard_saved true to drop them on purpose (the last tag holding them stays)")


def check_deepspeed_json(path: str, micro_batch: int, grad_accum: int) -> None:
    try:
        ds_config = build_ds_config(path, micro_batch, grad_accum, world_size())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed_config: {path} is not valid JSON: {err}") from err
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed_config: {path} sets zero_optimization.stage = {stage!r}; ztsnr_ds runs "
                         f"stages {', '.join(map(str, ZERO_STAGES))} (ds_configs/zero2_bf16.json uses 2)")
    zero, bf16 = ds_config.get("zero_optimization", {}), ds_config.get("bf16", {})
    if zero.get("parameter_alignment"):
        raise ValueError(f"deepspeed_config: {path} sets zero_optimization.parameter_alignment = true: "
                         "ZeRO then pads every parameter in the flat partition, and the EMA layout "
                         "(ema.Layout: parameters end to end, as zero_to_fp32 reads them) would name shifted "
                         "elements; remove it")
    for key, value in (("zero_optimization.compute_grad_norm", zero.get("compute_grad_norm", True)),
                       ("bf16.check_grad_overflow", bf16.get("check_grad_overflow", True))):
        if value is False:  # DeepSpeed skips a non-finite step only through this norm / check
            raise ValueError(f"deepspeed_config: {path} sets {key} = false: DeepSpeed would then apply "
                             "inf/NaN gradients to the weights instead of skipping the step; remove it")


def check_resume(output_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """trainer.resume must name a complete tag, and must not leave other runs' tags in output_dir.
    Returns the tag the run will resume, if any."""
    if resume not in ("auto", "none") and not (Path(resume) / checkpoint.STATE_FILE).is_file():
        raise ValueError(f"trainer.resume = {resume}: not a complete checkpoint tag folder (no "
                         f"{checkpoint.STATE_FILE}); use 'auto' or a folder like checkpoints/step00000100")
    for _ in range(3):  # a live run's rotation may delete the newest tag while it is checked: look again
        tag = checkpoint.find_resume_tag(output_dir, resume)
        try:
            safe_load.check_files(sorted(tag.glob("*.pt")) if tag else [])  # reads opcodes, runs nothing
            if tag is not None:
                checkpoint.read_state(tag)  # its bytes against checksums.json
            break
        except (safe_load.UnsafeCheckpoint, checkpoint.CheckpointError) as err:
            if resume == "auto" and tag is not None and not (tag / checkpoint.STATE_FILE).is_file():
                continue  # rotated away meanwhile: resume auto takes the newest complete tag now
            raise ValueError(f"trainer.resume = {resume}: {err}") from err
    foreign = checkpoint.foreign_tags(output_dir, resume) + checkpoint.foreign_snapshots(output_dir, resume)
    if foreign and not overwrite:
        raise ValueError(
            f"trainer.resume = {resume}, but trainer.output_dir {output_dir} already holds checkpoints or "
            f"post-hoc EMA snapshots this run would not continue ({checkpoint.folder_names(foreign)}); a "
            "later resume, export or posthoc_ema.py could pick those up. Use a new trainer.output_dir, "
            "--trainer.resume auto to continue the newest one, or --trainer.overwrite true to move them to "
            "<output_dir>/replaced/")
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
    check_cached_text(config, index)
    val = config.validation
    count = holdout_count(val.holdout, index.rows)
    if tag is not None:
        check_resumed_holdout(tag, count, val.holdout_seed, index.rows)
    held = holdout_ids(index.columns["key_hash"], count, val.holdout_seed)
    options = sampler_options(config, index)  # its ValueError names data.sources
    caption_control(config, index.sources)  # and these the captions keys
    try:
        config.sampler(training_buckets(index.buckets, held, index.rows), config.trainer.micro_batch,
                       world_size(), 0, **options)
    except ValueError as err:
        raise ValueError(f"trainer.micro_batch = {config.trainer.micro_batch} (x {world_size()} ranks): "
                         f"{err}; lower trainer.micro_batch, use fewer ranks or add images") from err


def check_cached_text(config, index: CacheIndex) -> None:
    """Cached text embeddings hold captions of the cache build's captions.max_chunks (report.json; caches
    from before long captions: 1); a run configured otherwise trains on those, so say so and how to fix."""
    if not index.cache_text:
        return
    report = index.root / REPORT
    captions = json.loads(report.read_text()).get("captions") if report.is_file() else None
    built = (captions or {}).get("max_chunks", 1)
    if built != config.captions.max_chunks:
        warnings.warn(f"captions.max_chunks = {config.captions.max_chunks}, but the cached text embeddings "
                      f"of data.cache_dir {index.root} were built with max_chunks {built}: training uses "
                      "them as cached. Rebuild the cache with this YAML (`python launch/cache.py --config "
                      f"<yaml>` re-encodes the captions) or set captions.max_chunks: {built}", stacklevel=2)


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


def check_text_encoders(config, tag: Path | None) -> None:
    """Trained text encoders (docs/text-encoders.md) need live text: a cache built with text embeddings
    would stand in for them (the trainer reads a cache's embeddings if it has them). A resumed run trains
    the encoders its checkpoint trained: the ZeRO files hold exactly those parameters and their state."""
    train = config.text_encoders.train
    if train and CacheIndex(Path(config.data.cache_dir)).cache_text:
        raise ValueError(f"data.cache_dir: {config.data.cache_dir} holds text embeddings (built with "
                         f"data.cache_text: true) that would stand in for text_encoders.train = {train}; "
                         "rebuild it with data.cache_text: false, or train none (text_encoders.train: [])")
    if tag is None:
        return
    saved = checkpoint.read_state(tag)[checkpoint.CONFIG].get("text_encoders", {}).get("train", [])
    if sorted(saved) != sorted(train):
        raise ValueError(f"text_encoders.train = {train}, but {tag} was trained with {saved}; keep the "
                         "checkpoint's text_encoders.train, or start a new run from an export of it")
