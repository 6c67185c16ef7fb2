"""Typed configuration of a VAE decoder fine-tune (launch/train_vae.py), read by jsonargparse like the
UNet run's. The loop, optimizer, EMA and logging sections are the UNet run's own classes (config.py), so
a key means the same in both YAMLs; the VAE adds its data, loss, perceptual and validation sections.
"""

from __future__ import annotations

from argparse import ArgumentError
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from ztsnr_ds.config import ConfigError, LoggingConfig, OptimizerConfig, TrainerConfig, _check_positive
from ztsnr_ds.data.sources import DEFAULT_MAX_PIXELS
from ztsnr_ds.ema import EMAConfig
from ztsnr_ds.patch_gan import GANConfig
from ztsnr_ds.perceptual import RANDOM, VGG16_WIDTHS, check_files

LATENT_FACTOR = 8  # pixels per latent side (SDXL's VAE): crops are multiples of it


@dataclass
class VAEModelConfig:
    pretrained: str
    """Diffusers SDXL folder (its vae/ is fine-tuned) or an AutoencoderKL folder (config.json)."""
    gradient_checkpointing: bool = True
    """Recompute the decoder's activations in backward (far less memory, ~1/3 more compute)."""


@dataclass
class VAEDataConfig:
    source: str
    """Images: the UNet run's data.source (folder tree, .jsonl or .parquet manifest); captions unused."""
    crop_min: int = 256
    """Smallest square crop side in pixels (a multiple of 8); each micro-batch draws one side."""
    crop_max: int = 512
    """Largest crop side; images whose smaller side is below it are skipped and reported."""
    crop_step: int = 64
    """Crop sides are crop_min, crop_min + crop_step, ... <= crop_max (few shapes: few kernel variants)."""
    seed: int = 0
    """Seeds which image, which crop side and which position each sample gets (with step and rank)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images above this many pixels are skipped before decoding (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        for key in ("crop_min", "crop_max", "crop_step"):
            value = getattr(self, key)
            _check_positive(f"data.{key}", value)
            if value % LATENT_FACTOR:
                raise ValueError(f"data.{key} = {value} must be a multiple of {LATENT_FACTOR} (the VAE)")
        if self.crop_max < self.crop_min:
            raise ValueError(f"data.crop_max = {self.crop_max} is below data.crop_min = {self.crop_min}")

    @property
    def sides(self) -> list[int]:
        return list(range(self.crop_min, self.crop_max + 1, self.crop_step))


@dataclass
class VAELossConfig:
    l1: float = 1.0
    """Weight of the mean absolute pixel error (images in [-1, 1])."""
    lpips: float = 1.0
    """Weight of the LPIPS perceptual distance (SD's autoencoder: L1 + 1.0 x LPIPS)."""
    mse: float = 0.0
    """Weight of the mean squared pixel error (Stability's sd-vae-ft-mse: MSE + 0.1 x LPIPS, smoother)."""

    def __post_init__(self) -> None:
        for key in ("l1", "lpips", "mse"):
            _check_positive(f"loss.{key}", getattr(self, key), allow_zero=True)
        if not (self.l1 or self.lpips or self.mse):
            raise ValueError("loss.l1, loss.lpips and loss.mse are all 0: nothing to train on; set one > 0")


@dataclass
class PerceptualConfig:
    backbone: str | None = None
    """torchvision's VGG16 weights file (vgg16-397923af.pth or .safetensors; `features.*` keys), read
    locally, never downloaded; "random": a seeded random VGG (tests, smoke runs only)."""
    linear: str | None = None
    """lpips' weights/v0.1/vgg.pth (the learned channel weights); null: unit weights (LPIPS baseline)."""
    widths: list[int] = field(default_factory=lambda: list(VGG16_WIDTHS))
    """Channels of the five VGG stages: VGG16's for real weights; smaller only with backbone random."""

    def __post_init__(self) -> None:
        if self.backbone not in (None, RANDOM) and tuple(self.widths) != VGG16_WIDTHS:
            raise ValueError(f"perceptual.widths = {self.widths}: a weights file is VGG16 "
                             f"{list(VGG16_WIDTHS)}; other widths only with perceptual.backbone random")
        if len(self.widths) != len(VGG16_WIDTHS):
            raise ValueError(f"perceptual.widths = {self.widths}: give 5 stage widths")


@dataclass
class VAEValidationConfig:
    every: int = 500
    """Steps between validations (and one at step 0 and at the end); 0: none."""
    holdout: int = 8
    """Images kept out of training (the lowest seeded hashes of their keys); their centre crops are the
    fixed validation set: PSNR, SSIM, LPIPS, L1 and a PNG grid (inputs beside reconstructions)."""
    crop: int = 256
    """Side of the held-out centre crops (a multiple of 8, at most data.crop_max)."""
    seed: int = 0
    """Seed of which images are held out (not data.seed: runs that differ in it still compare)."""
    use_ema: bool = True
    """With ema.enabled, also validate the EMA of the decoder."""

    def __post_init__(self) -> None:
        _check_positive("validation.every", self.every, allow_zero=True)
        _check_positive("validation.holdout", self.holdout, allow_zero=True)
        _check_positive("validation.crop", self.crop)
        if self.crop % LATENT_FACTOR:
            raise ValueError(f"validation.crop = {self.crop} must be a multiple of {LATENT_FACTOR}")
        if self.every and not self.holdout:
            raise ValueError(f"validation.every = {self.every} has no images: set validation.holdout >= 1, "
                             "or validation.every 0")


@dataclass
class VAETrainConfig:
    model: VAEModelConfig
    """Which VAE to start from."""
    data: VAEDataConfig
    """Images and crops."""
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    """Loss terms and their weights."""
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    """LPIPS network weights."""
    gan: GANConfig = field(default_factory=GANConfig)
    """Optional patch-GAN term (off by default; ztsnr_ds/patch_gan.py)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamWSR settings (as the UNet run)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, schedule, checkpoints (as the UNet run; batch_by_area does not apply)."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the decoder (sharded like ZeRO-2)."""
    validation: VAEValidationConfig = field(default_factory=VAEValidationConfig)
    """Held-out reconstructions."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    """DeepSpeed JSON (ZeRO-2 + pure bf16 by default, zero2_fp32.json: fp32); batch sizes from trainer.*."""

    def __post_init__(self) -> None:
        if self.trainer.batch_by_area:
            raise ValueError("trainer.batch_by_area: a VAE micro-batch is crops of one side; set false")
        if self.validation.crop > self.data.crop_max:
            raise ValueError(f"validation.crop = {self.validation.crop} exceeds data.crop_max = "
                             f"{self.data.crop_max}: held-out images must be as large as training ones")
        if self.loss.lpips and self.perceptual.backbone is None:
            raise ValueError("perceptual.backbone is not set but loss.lpips > 0: name torchvision's VGG16 "
                             "weights file, 'random' for a smoke run, or set loss.lpips 0")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Fine-tune the SDXL VAE decoder (encoder frozen) under DeepSpeed.",
                            exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="VAE YAML (configs/*vae*.yaml).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignored.")
    parser.add_class_arguments(VAETrainConfig, fail_untyped=True)
    return parser


def check_inputs(config: VAETrainConfig) -> None:
    """Fail before any model loads: paths, perceptual files, the DeepSpeed JSON, trainer.resume."""
    from ztsnr_ds import preflight

    pretrained = Path(config.model.pretrained)
    if not ((pretrained / "vae" / "config.json").is_file() or (pretrained / "config.json").is_file()):
        raise ConfigError(f"model.pretrained: {pretrained} is neither a diffusers SDXL folder "
                          "(vae/config.json) nor an AutoencoderKL folder (config.json)")
    if not Path(config.data.source).exists():
        raise ConfigError(f"data.source: {config.data.source} does not exist; expected the image folder or "
                          "manifest of the UNet run")
    try:
        if config.loss.lpips:
            check_files(config.perceptual.backbone, config.perceptual.linear)
        preflight.check_deepspeed_json(config.deepspeed_config, config.trainer.micro_batch,
                                       config.trainer.grad_accum)
        trainer = config.trainer
        preflight.check_resume(Path(trainer.output_dir), trainer.resume, trainer.overwrite)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err


def parse(argv: Sequence[str] | None = None) -> tuple[VAETrainConfig, dict]:
    """Parse, instantiate and check; returns the config and its JSON-able form (stored in checkpoints)."""
    parser = build_parser()
    try:
        init = parser.instantiate(parser.parse_args(argv))
        config = VAETrainConfig(**{k: getattr(init, k) for k in VAETrainConfig.__dataclass_fields__})
    except (ArgumentError, ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err
    check_inputs(config)
    return config, asdict(config)
