"""Typed training configuration, read by jsonargparse from YAML and the command line.

One dataclass per component, a docstring under every field (jsonargparse turns them
into `--help`), checks in `__post_init__` that name the key to change. Everything is
validated by `parse()` before a model is loaded or a process group is joined.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from ztsnr_ds.data.cache import CacheConfig
from ztsnr_ds.data.sampler import RESUME_DATA, BucketBatchSampler
from ztsnr_ds.ema import EMAConfig
from ztsnr_ds.kernels import ATTENTION_BACKENDS, COMPILE_MODES
from ztsnr_ds.schedule import INFERENCE_SCHEDULES
from ztsnr_ds.text import MAX_CHUNKS
from ztsnr_ds.text_training import TextEncodersConfig

ZTSNR_MODES = ("terminal", "rescale", "off")
WEIGHTINGS = ("min_snr", "soft_min_snr", "none")
LR_SCHEDULES = ("constant", "cosine")
DROPOUT_MODES = ("empty", "zeros")  # the unconditional: encoded "" or zero embeddings (PromptEncoder)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key} = {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} = {value} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    pretrained: str
    """The SDXL to start from: a diffusers folder, or a single-file SDXL .safetensors (SGM keys, as model
    sites ship them; tokenizers built offline from open-clip-torch's CLIP vocabulary). VAE, text encoders,
    tokenizers and, unless unet_path, the UNet come from it."""
    unet_path: str | None = None
    """UNet to train instead of <pretrained>/unet: a diffusers UNet folder, a UNet .safetensors
    (diffusers keys) or a full single-file SDXL .safetensors (SGM keys)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: about a third more compute for far less memory."""
    attention: str = "sdpa"
    """Attention kernel (torch SDPA backend): sdpa (PyTorch picks per call), flash, cudnn, efficient
    (memory-efficient) or math. One the device cannot run fails at the first step."""
    compile: str = "none"
    """torch.compile the UNet: none, full (the whole UNet) or regional (each transformer block: far
    quicker to compile, most of the gain). Compiles at the first step; checkpoints are unchanged."""

    def __post_init__(self) -> None:
        _check_choice("model.attention", self.attention, tuple(ATTENTION_BACKENDS))
        _check_choice("model.compile", self.compile, COMPILE_MODES)


@dataclass
class NoiseConfig:
    ztsnr: str = "terminal"
    """Zero terminal SNR: terminal (NAI: sigma_999 := sigma_max), rescale (Lin et al.), off."""
    sigma_max: float = 20000.0
    """Stand-in for infinite sigma at the terminal timestep (NAI uses 20000)."""
    resolution_scaling: bool = True
    """Scale finite sigmas by sqrt(H*W / base_area), so bigger images get more noise."""
    base_area: int = 1024 * 1024
    """Pixel area at which sigmas are the plain table (1024x1024 for SDXL)."""

    def __post_init__(self) -> None:
        _check_choice("noise.ztsnr", self.ztsnr, ZTSNR_MODES)
        _check_positive("noise.sigma_max", self.sigma_max)
        _check_positive("noise.base_area", self.base_area)


@dataclass
class LossConfig:
    weighting: str = "min_snr"
    """Per-sigma loss weight: min_snr, soft_min_snr or none."""
    gamma: float = 5.0
    """Min-SNR gamma (Hang et al. 2023)."""
    terminal_weight: float = 1.0
    """Weight of samples at sigma_max, where min_snr would give ~2.5e-9."""

    def __post_init__(self) -> None:
        _check_choice("loss.weighting", self.weighting, WEIGHTINGS)
        _check_positive("loss.gamma", self.gamma)
        _check_positive("loss.terminal_weight", self.terminal_weight, allow_zero=True)


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    kahan: bool = False
    """Keep a bf16 Kahan buffer of what stochastic rounding lost (2 more bytes per parameter)."""
    fused: bool | None = None
    """The step as one torch.compile'd kernel (Triton on CUDA, C++ on CPU: ~20 s to compile the first
    time) instead of eager chunks, with bitwise the same results. null: fused, or eager with a warning
    where the kernel cannot be built; true: such a failure is an error."""

    def __post_init__(self) -> None:
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optimizer.eps", self.eps)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas = {self.betas} must lie in [0, 1)")


@dataclass
class CaptionConfig:
    shuffle_tags: bool = True
    """Shuffle comma-separated tags each time a caption is encoded (live text encoding only)."""
    keep_first: int = 1
    """Tags kept in place at the front when shuffling (e.g. the rating or subject tag)."""
    dropout: float = 0.05
    """Probability of training on the unconditional (makes classifier-free guidance work)."""
    tag_dropout: float = 0.0
    """Probability of dropping each tag of a caption per use (live text encoding only), except the first
    keep_first tags and keep_tags (data/caption_control.py)."""
    keep_tags: list[str] = field(default_factory=list)
    """Tags tag_dropout never drops (e.g. 1girl, quality tags); compared normalised (Blue_Sky = blue sky)."""
    caption_weights: list[float] = field(default_factory=list)
    """Captions with several lines (a multi-line .txt, a list column) train on one line per use: line i
    with weight caption_weights[i] (lines past the list take its last weight; empty: all equal)."""
    dropout_mode: str = "empty"
    """The unconditional, for dropout and for an empty negative prompt: empty (the encoded "", which
    ComfyUI and A1111 send for an empty negative) or zeros (zero embeddings and pooled vector, SDXL base's
    own dropout, which diffusers sends when no negative is given). Exports record it."""
    max_chunks: int = 3
    """Longest caption in 75-token CLIP chunks (1..8; 3 = 225 tokens, NAI's "CLIP context concatenation"):
    each chunk is encoded alone and the states concatenated (docs/long-captions.md). 1 is plain SDXL
    (77 tokens). Longer captions are cut at a tag boundary; the cache build reports how many. The cache
    build reads it too (cached text embeddings)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks <= MAX_CHUNKS:
            raise ValueError(f"captions.max_chunks = {self.max_chunks} must lie in 1..{MAX_CHUNKS} "
                             f"(chunks of 75 tokens; 3 = 225 tokens)")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"captions.dropout = {self.dropout} must lie in [0, 1]")
        _check_choice("captions.dropout_mode", self.dropout_mode, DROPOUT_MODES)
        _check_positive("captions.keep_first", self.keep_first, allow_zero=True)
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise ValueError(f"captions.tag_dropout = {self.tag_dropout} must lie in [0, 1]")
        weights = self.caption_weights
        if any(w < 0 for w in weights) or (weights and not sum(weights)):
            raise ValueError(f"captions.caption_weights = {self.caption_weights}: weights must be >= 0, "
                             "not all 0")


@dataclass
class TrainerConfig:
    output_dir: str = "runs/sdxl"
    """Run folder: checkpoints/, samples/, tensorboard/, config.yaml."""
    micro_batch: int = 1
    """Samples per rank per forward pass (at most; a bucket's tail gives smaller ones). With batch_by_area,
    the count at noise.base_area: an h x w bucket takes max(1, floor(micro_batch * base_area / (h * w)))."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch * grad_accum * world size (at most)."""
    batch_by_area: bool = False
    """Micro-batch per bucket by pixel area (pixels per micro-batch about constant): smaller buckets take
    more samples. A step is still one optimizer update; metrics log samples_per_step."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    lr_schedule: str = "constant"
    """constant (after warmup) or cosine (to min_lr_ratio * lr at max_steps)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule as a fraction of lr."""
    seed: int = 0
    """Seeds noise, sigma draws, caption shuffles and stochastic rounding (offset per rank)."""
    save_every: int = 500
    """Steps between checkpoints (and one at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str = "auto"
    """auto (latest complete checkpoint in output_dir if any), none, or a checkpoint tag folder."""
    init_from: str | None = None
    """Start this NEW run (its own output_dir) from another run's checkpoint: a run folder (its latest
    tag), its checkpoints/ folder or a tag folder. Weights, optimizer moments and EMA are carried, the
    step count, LR schedule and epoch start at 0, any number of ranks; the chain is recorded (lineage in
    checkpoints and exports). Applied only while output_dir has no checkpoint of its own to resume."""
    init_weights_only: bool = False
    """With init_from: carry the weights only (fresh optimizer moments, EMA from those weights)."""
    resume_data: str = "exact"
    """What a resume trains next: exact (the checkpoint's sampler plan, mid-epoch; refused when the cache's
    buckets or data.sources repeats changed) or replan (weights, optimizer, EMA and step from the
    checkpoint, a fresh sampler plan of the data as it is now from the next epoch: a grown cache)."""
    overwrite: bool = False
    """Allow a run that does not continue output_dir's newest checkpoint (resume none, or an older
    tag): the tags it would not resume from are moved to output_dir/replaced/<time>/, not deleted."""
    log_every: int = 10
    """Steps between metric logs (each log is one host sync)."""
    max_nonfinite: int = 10
    """Consecutive skipped non-finite micro-batches after which the run stops."""
    max_bad_samples: int = 16
    """Corrupt cache samples a rank skips mid-run (weight 0, each reported) before the run saves a checkpoint
    and stops with the rebuild command (exit 2); 0 stops at the first. See docs/integrity.md."""
    allow_recipe_change: bool = False
    """Let a resumed run change recipe keys (noise.*, loss.*, data.buckets.*) of its checkpoint; without
    it such a change exits 2 naming the keys. Every change is kept in the checkpoint's config history."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace): on GPUs, runs
    and resumes then repeat bit for bit, at some speed; the CPU is deterministic without it."""

    def __post_init__(self) -> None:
        for key in ("micro_batch", "grad_accum", "max_steps", "save_every", "log_every", "max_nonfinite"):
            _check_positive(f"trainer.{key}", getattr(self, key))
        _check_positive("trainer.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("trainer.max_bad_samples", self.max_bad_samples, allow_zero=True)
        _check_choice("trainer.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("trainer.resume_data", self.resume_data, RESUME_DATA)
        if self.keep_last < 1:
            raise ValueError(f"trainer.keep_last = {self.keep_last} must be >= 1")


@dataclass
class ValidationConfig:
    every: int = 500
    """Steps between validation grids (and one at the end); 0 turns validation off."""
    prompts: list[str] = field(default_factory=lambda: ["1girl, solo, looking at viewer",
                                                        "scenery, mountain"])
    """Prompts sampled with fixed seeds each time."""
    negative: str = ""
    """Negative prompt (the unconditional branch of classifier-free guidance)."""
    steps: int = 28
    """Euler steps."""
    schedule: str = "trailing"
    """Inference sigma schedule: trailing or karras."""
    cfg_scale: float = 5.0
    """Classifier-free guidance scale."""
    cfg_rescale: float = 0.7
    """CFG-rescale phi (0 disables)."""
    height: int = 1024
    """Image height in pixels (multiple of 8)."""
    width: int = 1024
    """Image width in pixels (multiple of 8)."""
    seed: int = 0
    """Seed of the first prompt's noise; prompt i uses seed + i."""
    holdout: float = 0
    """Cached images kept out of training for the held-out loss (ztsnr_ds/holdout.py): a count (>= 1) or
    a fraction of the cache (0 < x < 1), picked by a seeded hash of the image key; 0: none."""
    holdout_seed: int = 0
    """Seed of which images are held out and of their fixed noise (not trainer.seed: runs that differ in
    it still compare)."""
    loss_every: int = 0
    """Steps between held-out loss evaluations (also at step 0 of a new run and at the end); 0: at
    validation.every."""
    use_ema: bool = True
    """With ema.enabled, also sample the validation images and the held-out loss with the EMA weights."""

    def __post_init__(self) -> None:
        _check_positive("validation.every", self.every, allow_zero=True)
        _check_positive("validation.holdout", self.holdout, allow_zero=True)
        _check_positive("validation.loss_every", self.loss_every, allow_zero=True)
        if self.holdout >= 1 and self.holdout != int(self.holdout):
            raise ValueError(f"validation.holdout = {self.holdout:g}: a count (>= 1) must be a whole number, "
                             "a fraction must lie in (0, 1)")
        if self.holdout and not (self.loss_every or self.every):
            raise ValueError(f"validation.holdout = {self.holdout:g} needs validation.loss_every > 0 (or "
                             "validation.every > 0) to evaluate the held-out images")
        if self.loss_every and not self.holdout:
            raise ValueError(f"validation.loss_every = {self.loss_every} has no images to evaluate: set "
                             "validation.holdout (a count or a fraction of the cache)")
        _check_choice("validation.schedule", self.schedule, INFERENCE_SCHEDULES)
        for key in ("height", "width"):
            if getattr(self, key) % 8:
                raise ValueError(f"validation.{key} = {getattr(self, key)} must be a multiple of 8")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events to <output_dir>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str = "ztsnr_ds"
    """W&B project."""
    wandb_mode: str = "offline"
    """online or offline (offline needs no network; `wandb sync` uploads later)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""


@dataclass
class TrainConfig:
    model: ModelConfig
    """Which SDXL to start from."""
    data: CacheConfig
    """Latent cache (built by launch/cache.py from the same section)."""
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    """Live caption augmentation."""
    sampler: Callable[[dict, int, int, int], BucketBatchSampler] = BucketBatchSampler
    """Batch sampler: class_path + init_args; called with (buckets, micro_batch, world_size, rank)."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Noise schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective weighting."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamWSR settings."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, schedule, checkpoints."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the weights (sharded like ZeRO-2) and post-hoc EMA snapshots."""
    text_encoders: TextEncodersConfig = field(default_factory=TextEncodersConfig)
    """Train CLIP-L / bigG with the UNet (docs/text-encoders.md); none by default."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Validation images."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    """DeepSpeed JSON (ZeRO-2 + pure bf16 by default); batch sizes are filled in from trainer.*."""


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help prints each field's docstring
    parser = ArgumentParser(description="Train an SDXL UNet with the NAI V3 ZTSNR recipe under DeepSpeed.",
                            exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Training YAML (configs/*.yaml).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignored.")
    parser.add_class_arguments(TrainConfig, fail_untyped=True)
    return parser


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


def check_sections(config: TrainConfig) -> None:
    """Settings that are valid alone but not together; the message names both keys."""
    if config.model.attention == "flash" and config.captions.max_chunks > 1:
        raise ConfigError("model.attention = flash cannot apply the cross-attention mask that batches of "
                          "captions of different chunk counts need (captions.max_chunks = "
                          f"{config.captions.max_chunks}); use sdpa, efficient or cudnn, or "
                          "captions.max_chunks: 1")
    if config.data.cache_text and config.text_encoders.train:
        raise ConfigError(f"text_encoders.train = {config.text_encoders.train} needs live text encoding, but "
                          "data.cache_text: true feeds the UNet cached embeddings that no encoder gradient "
                          "reaches; set data.cache_text: false (the cache's latents stay usable) or "
                          "text_encoders.train: []")


UNKNOWN_KEY = (re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
               re.compile(r"unrecognized arguments: --(?P<key>[\w.]+)"),
               re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"))
"""jsonargparse's messages for a key it does not know (in a YAML section, on the command line, at the top)."""


def leaf_keys(parser: ArgumentParser) -> list[str]:
    """The dotted keys a parser takes values for (not its sections, not --help)."""
    dests = [action.dest for action in parser._actions]
    return [d for d in dests if not d.endswith("help") and not any(o.startswith(f"{d}.") for o in dests)]


def did_you_mean(message: str, keys: Sequence[str]) -> str:
    """`message` plus "did you mean ..." with the known keys nearest to the unknown key it names."""
    for pattern in UNKNOWN_KEY:
        if match := pattern.search(message):
            key = ".".join(filter(None, (match.groupdict().get("group"), match["key"])))
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            if close:
                return f"{message}; did you mean {' or '.join(close)}?"
    return message


def check_inputs(config: TrainConfig) -> None:
    """Fail before any work if an input the run needs is missing; name the key."""
    checks = [
        ("model.pretrained", Path(config.model.pretrained), "a diffusers SDXL folder or single-file SDXL"),
        ("data.cache_dir", Path(config.data.cache_dir) / "manifest.jsonl",
         "a latent cache: run `python launch/cache.py --config <this yaml>` first"),
        ("deepspeed_config", Path(config.deepspeed_config), "a DeepSpeed JSON (see ds_configs/)"),
    ]
    if config.model.unet_path:
        checks.append(("model.unet_path", Path(config.model.unet_path), "a UNet folder or .safetensors"))
    for key, path, what in checks:
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist; expected {what}")
    check_base_file(config)
    from ztsnr_ds import preflight  # imports the cache and checkpoint modules

    try:
        preflight.check_run(config)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    from ztsnr_ds import init_from

    try:
        note = init_from.check(config.trainer.init_from, config.trainer.output_dir, config.trainer.resume)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if note and os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr)


def run_lineage(config: TrainConfig) -> dict:
    """{"lineage": [...]} of a run started with trainer.init_from (ztsnr_ds/init_from.py), else {}."""
    from ztsnr_ds import init_from

    t = config.trainer
    lineage = init_from.run_lineage(t.output_dir, t.resume, t.init_from, t.init_weights_only)
    return {init_from.LINEAGE: lineage} if lineage else {}


def check_base_file(config: TrainConfig) -> None:
    """A single-file model.pretrained must hold all SDXL parts; print (rank 0) what it records of its
    training that this run changes."""
    from ztsnr_ds.keymaps import ExportError
    from ztsnr_ds.models import base_noise_notes, check_single_file, is_single_file  # torch: when needed

    if not is_single_file(config.model.pretrained):
        return
    try:
        check_single_file(config.model.pretrained)
    except ExportError as err:
        raise ConfigError(f"model.pretrained: {err}") from err
    if os.environ.get("RANK", "0") == "0":
        for note in base_noise_notes(config.model.pretrained, asdict(config.noise)):
            print(f"model.pretrained: {note}", file=sys.stderr)


def parse(argv: Sequence[str] | None = None) -> tuple[TrainConfig, dict]:
    """Parse, instantiate and check; returns the config and its JSON-able resolved form."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(argv)
        init = parser.instantiate(namespace)
        config = TrainConfig(**{k: getattr(init, k) for k in TrainConfig.__dataclass_fields__})
    except (ArgumentError, ValueError, TypeError) as err:
        raise ConfigError(did_you_mean(str(err), leaf_keys(parser))) from err
    check_sections(config)
    check_inputs(config)
    return config, check_drift(config, to_dict(config, namespace) | run_lineage(config), namespace)


def check_drift(config: TrainConfig, config_dict: dict, namespace: Namespace) -> dict:
    """data.* against the cache's build, and a resume's config against its checkpoint's (drift.py);
    returns ``config_dict`` with the history of changes the next checkpoint records."""
    from ztsnr_ds import checkpoint, drift  # the checkpoint module imports torch
    from ztsnr_ds.data.cache_settings import check_cache

    yaml_path = namespace.get("config") or "<your yaml>"
    yaml_path = str(yaml_path[-1]) if isinstance(yaml_path, list) and yaml_path else str(yaml_path)
    try:
        check_cache(config.data, yaml_path)
        tag = checkpoint.find_resume_tag(Path(config.trainer.output_dir), config.trainer.resume)
        if tag is None:
            return config_dict
        drift.check_precision(tag, config.deepspeed_config)
        state = checkpoint.read_state(tag)
        return drift.check_resume(state[checkpoint.CONFIG], config_dict, state[checkpoint.STEP],
                                  config.trainer.allow_recipe_change)
    except (ValueError, checkpoint.CheckpointError) as err:
        raise ConfigError(str(err)) from err


def parse_or_exit(argv: Sequence[str] | None = None) -> tuple[TrainConfig, dict]:
    """`parse` for entry points: a bad config prints one clear message and exits with status 2."""
    try:
        return parse(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(config: TrainConfig, namespace: Namespace) -> dict:
    """JSON-able resolved config (stored in checkpoints and read back by export and sample)."""
    out = {k: asdict(getattr(config, k)) for k in TrainConfig.__dataclass_fields__
           if k not in ("sampler", "deepspeed_config")}
    out["sampler"] = namespace.sampler.as_dict() if hasattr(namespace.sampler, "as_dict") else None
    out["deepspeed_config"] = config.deepspeed_config
    return out
