"""Text-to-image sampling from a trained model: work out what a model path is and which noise settings
it was trained with, load UNet, VAE and text encoders, sample with the ZTSNR Euler sampler, and write
PNGs that carry their settings, a grid, and optionally the latents (`launch/sample.py` is the CLI).

Model kinds and where their training settings (ztsnr, sigma_max, base_area; captions.dropout_mode, the
unconditional an empty negative prompt stands for) are read from:
- checkpoint (a run folder, its checkpoints/ folder or a tag folder): ztsnr_state.json, config.noise;
  config.model.pretrained is the default base (VAE, text encoders, tokenizers);
- diffusers (a UNet folder, an `export_diffusers` folder, a full SDXL folder, or a UNet .safetensors
  with diffusers keys): the ztsnr_ds.* metadata `export_diffusers` writes into the UNet safetensors.
  A full SDXL folder (with model_index.json) is its own base. Stock UNets record nothing: defaults;
- single_file (an SDXL .safetensors with SGM keys): its ztsnr_ds.* metadata. A full single file is its
  own base (VAE and text encoders from the file, tokenizers built offline: `models.load_frozen_file`);
  a UNet-only one needs --base.

Seeds: image i (0-based) of prompt p (0-based) uses seed + p * n + i, drawn on the CPU, so an image is
reproduced on any device by the same seed with n = 1 (images are sampled one at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL.PngImagePlugin import PngInfo
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ztsnr_ds import checkpoint
from ztsnr_ds.export import ExportError, load_checkpoint, resolve_tag, save_safetensors
from ztsnr_ds.keymaps import CLIP_L_PREFIX, UNET_PREFIX
from ztsnr_ds.metrics import image_grid
from ztsnr_ds.model_metadata import NOISE_SETTINGS, noise_from_metadata
from ztsnr_ds.model_metadata import recorded as recorded_value
from ztsnr_ds.models import (
    UNET_WEIGHTS,
    FrozenParts,
    is_single_file,
    load_frozen,
    load_unet,
    unet_from_state,
)
from ztsnr_ds.sampling import SDXLDenoiser, sample_euler
from ztsnr_ds.schedule import NoiseSchedule
from ztsnr_ds.text import PromptEncoder
from ztsnr_ds.text_training import load_encoders

MODEL_KINDS = ("checkpoint", "diffusers", "single_file")
LATENTS_FILE = "latents.safetensors"
GRID_FILE = "grid.png"


class SampleInputError(ValueError):
    """Bad input for sampling; `arg` is the CLI flag to change and starts the message."""

    def __init__(self, arg: str, message: str) -> None:
        super().__init__(f"{arg}: {message}")
        self.arg = arg


@dataclass
class ModelSource:
    """What a model path is, found without loading weights."""

    kind: str  # one of MODEL_KINDS
    path: Path  # the tag folder of a checkpoint, else the path as given
    noise: dict = field(default_factory=dict)  # the NOISE_SETTINGS the model records (maybe none)
    base: Path | None = None  # diffusers SDXL folder for VAE and text encoders that the model names
    dropout_mode: str | None = None  # captions.dropout_mode it records (None: records none)
    max_chunks: int | None = None  # captions.max_chunks it records (None: records none)


# ---------------------------------------------------------------------------------------- the model
def _file_metadata(metadata: dict[str, str]) -> tuple[dict, str | None, int | None]:
    """(noise settings, dropout_mode, max_chunks) a model file records; a hostile value names itself."""
    try:
        return (noise_from_metadata(metadata), recorded_value(metadata, "dropout_mode"),
                recorded_value(metadata, "max_chunks"))
    except ValueError as e:
        raise SampleInputError("--model", str(e)) from None


def _inspect_checkpoint(path: Path) -> ModelSource:
    try:
        tag_dir = resolve_tag(path)
        config = checkpoint.read_state(tag_dir).get(checkpoint.CONFIG, {})
    except (ExportError, checkpoint.CheckpointError) as e:
        raise SampleInputError("--model", str(e)) from e
    noise = config.get("noise", {})
    recorded = {k: noise[k] for k in NOISE_SETTINGS if k in noise}
    if not noise.get("resolution_scaling", True):
        recorded["base_area"] = None
    pretrained = config.get("model", {}).get("pretrained")
    captions = config.get("captions", {})
    dropout_mode = captions.get("dropout_mode", "empty")  # older runs: the encoded ""
    return ModelSource("checkpoint", tag_dir, recorded, Path(pretrained) if pretrained else None,
                       dropout_mode, captions.get("max_chunks", 1))  # older runs: 77 tokens


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Metadata and tensor names of a .safetensors file (its header only)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, list(f.keys())
    except SafetensorError as e:
        raise SampleInputError("--model", f"{path} is not a readable .safetensors file: {e}") from e


def _inspect_folder(path: Path) -> ModelSource:
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    weights = folder / UNET_WEIGHTS  # sharded or variant files carry no ztsnr_ds metadata
    metadata = _read_header(weights)[0] if weights.is_file() else {}
    base = path if (path / "model_index.json").is_file() else None
    noise, dropout_mode, max_chunks = _file_metadata(metadata)
    return ModelSource("diffusers", path, noise, base, dropout_mode, max_chunks)


def _inspect_file(path: Path) -> ModelSource:
    metadata, keys = _read_header(path)
    sgm = any(k.startswith(UNET_PREFIX) for k in keys)
    whole = sgm and any(k.startswith(CLIP_L_PREFIX) for k in keys)  # a full SDXL is its own base
    noise, dropout_mode, max_chunks = _file_metadata(metadata)
    return ModelSource("single_file" if sgm else "diffusers", path, noise, path if whole else None,
                       dropout_mode, max_chunks)


def inspect_model(path: str | Path) -> ModelSource:
    """Classify a model path (see the module docstring) and read its recorded noise settings."""
    path = Path(path)
    looks_like_run = any((path / name).exists() for name in
                         (checkpoint.STATE_FILE, checkpoint.LATEST_FILE, "checkpoints"))
    if path.is_dir() and looks_like_run:
        return _inspect_checkpoint(path)
    if path.is_dir() and ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file()):
        return _inspect_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _inspect_file(path)
    what = "does not exist" if not path.exists() else "is of no kind that can be sampled"
    raise SampleInputError("--model", f"{path} {what}; pass a checkpoint (run folder, its checkpoints/ "
                           "folder or a tag folder), a diffusers UNet or SDXL folder, or a .safetensors file")


def resolve_base(base: str | Path | None, source: ModelSource) -> Path:
    """The diffusers SDXL folder or single file for VAE, text encoders and tokenizers: --base, else what
    the model names."""
    if base is not None:
        found, origin = Path(base), "--base"
    elif source.base is not None:
        found, origin = source.base, f"the base the {source.kind} names"
    else:
        raise SampleInputError("--base", f"--model {source.path} holds a UNet only; pass --base, the "
                               "diffusers SDXL folder with its VAE, text encoders and tokenizers")
    if not (found.is_dir() or is_single_file(found)):
        raise SampleInputError("--base", f"{found} ({origin}) is not a folder or .safetensors file; pass "
                               "--base, a diffusers SDXL folder or a single-file SDXL")
    return found


def resolve_schedule(recorded: dict, overrides: dict) -> tuple[NoiseSchedule, dict[str, str]]:
    """NoiseSchedule from flag > recorded > NoiseSchedule default, per setting, and where each came from
    ("flag", "model" or "default"). `overrides` holds the NOISE_SETTINGS given as flags (base_area None:
    no resolution scaling).
    """
    default = NoiseSchedule()
    settings = {"ztsnr": default.mode, "sigma_max": default.sigma_max, "base_area": default.base_area}
    origin = dict.fromkeys(settings, "default")
    for key in NOISE_SETTINGS:
        if key in recorded:
            settings[key], origin[key] = recorded[key], "model"
        if key in overrides:
            settings[key], origin[key] = overrides[key], "flag"
    try:
        schedule = NoiseSchedule(settings["ztsnr"], float(settings["sigma_max"]), settings["base_area"])
    except ValueError as e:
        raise SampleInputError("--ztsnr", str(e)) from e
    return schedule, origin


def noise_settings(schedule: NoiseSchedule) -> dict:
    """The NOISE_SETTINGS of a schedule, JSON-able (for the PNG settings)."""
    return {"ztsnr": schedule.mode, "sigma_max": schedule.sigma_max, "base_area": schedule.base_area}


def load_model(source: ModelSource, base: Path, dtype: torch.dtype,
               weights: str = "model") -> tuple[UNet2DConditionModel, FrozenParts]:
    """UNet of the model and VAE / text encoders / tokenizers of the base, in `dtype`, eval, on the CPU.

    weights: "model" or "ema" (a checkpoint's EMA; other kinds of model hold one set of weights)."""
    if weights != "model" and source.kind != "checkpoint":
        raise SampleInputError("--weights", f"--weights {weights} needs a checkpoint; {source.path} is a "
                               f"{source.kind} model with one set of weights (export it with --weights ema)")
    try:
        parts = load_frozen(base, dtype)
    except (OSError, ExportError) as e:
        raise SampleInputError("--base", str(e)) from e
    try:
        if source.kind == "checkpoint":
            trained = load_checkpoint(source.path, dtype, weights)
            unet = unet_from_state(trained.unet_config, trained.state_dict, dtype)
            load_encoders(parts, trained.encoders)  # text encoders the run trained (text_training.py)
        else:
            unet = load_unet(source.path, dtype).eval()
    except (ExportError, OSError) as e:
        raise SampleInputError("--model", str(e)) from e
    text_dim = parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    if text_dim != unet.config.cross_attention_dim:
        raise SampleInputError("--base", f"text encoders of {base} give {text_dim}-dim embeddings, the "
                               f"UNet of {source.path} takes {unet.config.cross_attention_dim}; pass the "
                               "base it was trained from")
    return unet, parts


# ---------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampleSpec:
    """One sampling run: what to draw and how (the CLI flags of launch/sample.py)."""

    prompts: list[str]
    negative: str = ""
    n: int = 1
    """Images per prompt."""
    seed: int = 0
    """Seed of image 0 of prompt 0; image i of prompt p uses seed + p * n + i."""
    steps: int | None = 28
    """Sampler steps (None with an explicit sigma list)."""
    schedule: str | list[float] = "trailing"
    """trailing, karras, or explicit sigmas (see NoiseSchedule.inference_sigmas)."""
    cfg: float = 5.0
    cfg_rescale: float = 0.7
    width: int = 1024
    height: int = 1024
    dropout_mode: str = "empty"
    """captions.dropout_mode of the model: what the empty negative "" stands for (`empty`: the encoded "";
    `zeros`: zero embeddings). A non-empty negative is always encoded."""
    max_chunks: int = 3
    """captions.max_chunks of the model: prompts up to 75 * max_chunks tokens (text.PromptEncoder)."""

    def seed_of(self, prompt_index: int, image_index: int) -> int:
        return self.seed + prompt_index * self.n + image_index


@dataclass
class Samples:
    """Shape: latents (N, C, H/8, W/8) fp32, the denoised latents (VAE latent * scaling_factor);
    images (N, 3, H, W) fp32 in [-1, 1]; N = len(prompts) * n, prompt-major."""

    latents: Tensor
    images: Tensor
    sigmas: Tensor  # (steps + 1,) float32, last 0
    seeds: list[int]
    prompts: list[str]


def decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Pixels in [-1, 1] (unclamped) of denoised latents. Shape: (B, C, h, w) -> (B, 3, 8h, 8w) fp32."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


def _conditioning(encoder: PromptEncoder, prompt: str, time_ids: Tensor,
                  dropout_mode: str = "empty") -> dict:
    """Denoiser kwargs of one prompt; "" is the model's unconditional (`PromptEncoder.unconditional`)."""
    embeds, pooled = encoder.unconditional(1, dropout_mode) if prompt == "" else encoder.encode([prompt])[:2]
    return dict(encoder_hidden_states=embeds, text_embeds=pooled, time_ids=time_ids)


@torch.no_grad()
def generate(unet: UNet2DConditionModel, parts: FrozenParts, schedule: NoiseSchedule, spec: SampleSpec,
             progress: bool = True) -> Samples:
    """Sample every image of `spec` one at a time (Euler, CFG + CFG-rescale) on the UNet's device.

    cfg = 1 skips the unconditional branch (D_u + 1 * (D_c - D_u) = D_c). Size conditioning
    time_ids = (H, W, 0, 0, H, W): uncropped, as the trainer's validation images.
    """
    device = unet.device
    sigmas = schedule.inference_sigmas(spec.schedule, spec.steps, spec.height, spec.width)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)  # 8: VAE downsampling
    shape = (1, unet.config.in_channels, spec.height // factor, spec.width // factor)
    size = [spec.height, spec.width, 0, 0, spec.height, spec.width]
    time_ids = torch.tensor([size], dtype=torch.float32, device=device)  # (1, 6)
    encoder = PromptEncoder.from_parts(parts, spec.max_chunks)
    uncond = None if spec.cfg == 1 else _conditioning(encoder, spec.negative, time_ids, spec.dropout_mode)
    denoiser = SDXLDenoiser(unet, schedule)
    latents, images, seeds = [], [], []
    for p, prompt in enumerate(spec.prompts):
        cond = _conditioning(encoder, prompt, time_ids)
        for i in range(spec.n):
            seeds.append(spec.seed_of(p, i))
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seeds[-1]))  # CPU: any device
            x0 = sample_euler(denoiser, noise.to(device), sigmas.to(device), cond, uncond, spec.cfg,
                              spec.cfg_rescale, progress=progress)
            latents.append(x0.cpu())
            images.append(decode(parts.vae, x0).cpu())
    prompts = [prompt for prompt in spec.prompts for _ in range(spec.n)]
    return Samples(torch.cat(latents), torch.cat(images), sigmas, seeds, prompts)


# ---------------------------------------------------------------------------------------- outputs
def png_info(text: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def sigmas_text(sigmas: Tensor) -> str:
    """Comma-separated levels, exact for float32 and valid as `--schedule list --sigmas`."""
    return ",".join(repr(s) for s in sigmas.tolist())


def image_name(index: int, seed: int) -> str:
    return f"{index:04d}-seed{seed}.png"


def write_samples(samples: Samples, spec: SampleSpec, out: str | Path, settings: dict,
                  save_latents: bool = False) -> list[Path]:
    """One PNG per image (text chunks prompt, negative, seed, sigmas, settings as JSON), GRID_FILE with
    one row per prompt, and with `save_latents` LATENTS_FILE: tensor "latents" (N, C, h, w) fp32, the
    denoised latents before the division by the VAE scaling factor, in PNG order. Returns the paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sigmas, paths = sigmas_text(samples.sigmas), []
    for index, (image, seed, prompt) in enumerate(zip(samples.images, samples.seeds, samples.prompts)):
        text = {"prompt": prompt, "negative": spec.negative, "seed": str(seed), "sigmas": sigmas,
                "settings": json.dumps({**settings, "index": index})}
        paths.append(out / image_name(index, seed))
        image_grid(image[None]).save(paths[-1], pnginfo=png_info(text))  # (1, 3, H, W) -> H x W image
    paths.append(out / GRID_FILE)
    image_grid(samples.images, columns=spec.n if len(spec.prompts) > 1 else None).save(paths[-1])
    if save_latents:
        metadata = {"files": json.dumps([p.name for p in paths[:-1]]), "seeds": json.dumps(samples.seeds),
                    "prompts": json.dumps(samples.prompts), "sigmas": sigmas,
                    "content": "denoised latents x0 = VAE latent * scaling_factor; pixels: decode(x0 / sf)"}
        tensors = {"latents": samples.latents.contiguous()}  # (N, C, h, w) fp32
        paths.append(save_safetensors(tensors, out / LATENTS_FILE, metadata))
    return paths

