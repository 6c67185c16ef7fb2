"""A decoder run's weights back into a whole AutoencoderKL, for export (diffusers vae/, single-file
first_stage_model.*) and for sampling.

The trained tensors (decoder.*, post_quant_conv.*: the run's model or its EMA) are read as the UNet's
are (export.resolve_tag, checksums verified, zero_to_fp32 or the EMA slices) and copied into the VAE the
run started from; encoder and quant_conv are that VAE's own tensors, untouched. The UNet and every latent
cache were made with an encoder, and only that encoder's latents decode right: `check_same_encoder` refuses
a decoder trained on another one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ztsnr_ds import checkpoint
from ztsnr_ds.export import WEIGHTS, _ema_weights, _model_weights, resolve_tag
from ztsnr_ds.keymaps import ExportError
from ztsnr_ds.vae_decoder import KIND, TRAINED_PREFIXES, DecoderError, apply_decoder, load_vae


@dataclass
class TrainedDecoder:
    """The decoder of one tag of a decoder run, and the VAE it was trained from."""

    state_dict: dict[str, torch.Tensor]  # decoder.* and post_quant_conv.* (AutoencoderKL names)
    base: Path  # model.pretrained of the run: SDXL folder or VAE folder
    step: int
    tag_dir: Path
    weights: str = "model"

    @property
    def title(self) -> str:
        return f"{self.tag_dir.parent.parent.name} step {self.step} ({self.weights})"


def load_decoder_run(path: str | Path, dtype: torch.dtype = torch.float32,
                     weights: str = "model") -> TrainedDecoder:
    """The decoder of a run folder, its checkpoints/ folder or a tag folder (verified like a UNet tag)."""
    if weights not in WEIGHTS:
        raise ExportError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    tag_dir = resolve_tag(path)
    try:
        state = checkpoint.read_state(tag_dir)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from e
    if state.get("kind") != KIND:
        raise ExportError(f"{tag_dir} is not a VAE decoder run's checkpoint ; pass --vae a run of "
                          "launch/train_vae.py")
    problems = checkpoint.verify(tag_dir)
    if problems:
        raise ExportError(f"{tag_dir} refused: {'; '.join(problems)}")
    tensors = _ema_weights(tag_dir, dtype) if weights == "ema" else _model_weights(tag_dir, dtype)
    base = Path(state[checkpoint.CONFIG]["model"]["pretrained"])
    return TrainedDecoder(tensors, base, state[checkpoint.STEP], tag_dir, weights)


def check_same_encoder(vae: AutoencoderKL, other: AutoencoderKL, where: str) -> None:
    """Raise unless both VAEs hold bitwise the same encoder and quant_conv (compared in fp32)."""
    mine, theirs = vae.state_dict(), other.state_dict()
    keys = [k for k in mine if not k.startswith(TRAINED_PREFIXES)]
    differ = [k for k in keys if k not in theirs or not torch.equal(mine[k].float(), theirs[k].float())]
    if differ:
        raise ExportError(f"{where}: the decoder run was trained on another encoder ({len(differ)} tensors "
                          f"differ, e.g. {differ[:2]}); its latents would not decode right. Pass the SDXL "
                          "folder both runs started from")


def trained_vae(decoder: TrainedDecoder, dtype: torch.dtype = torch.float32,
                base: str | Path | None = None) -> AutoencoderKL:
    """The run's base VAE with the trained decoder in it. With `base` (the UNet's SDXL folder), that
    folder's VAE, after checking that it has the encoder the decoder was trained on."""
    try:
        vae = load_vae(decoder.base, dtype)
        if base is not None and Path(base).resolve() != decoder.base.resolve():
            own = load_vae(base, dtype)
            check_same_encoder(own, vae, f"--base {base}")
            vae = own
        return apply_decoder(vae, decoder.state_dict).eval()
    except (OSError, DecoderError) as e:
        raise ExportError(f"VAE of {decoder.tag_dir}: {e}") from e


def write_vae_folder(vae: AutoencoderKL, out: str | Path) -> Path:
    """A diffusers AutoencoderKL folder (config.json + safetensors), replacing `out` only once whole."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_sampling_vae(path: str | Path, dtype: torch.dtype, weights: str = "model",
                      base: str | Path | None = None) -> AutoencoderKL:
    """`--vae` of sample.py: an AutoencoderKL folder (an export's vae/, or an SDXL folder's), or a
    decoder run (its model or EMA weights, put into `base`'s VAE after the encoder check)."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
        return load_vae(path, dtype).eval()
    return trained_vae(load_decoder_run(path, dtype, weights), dtype, base)
