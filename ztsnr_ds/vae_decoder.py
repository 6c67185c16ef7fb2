"""The trained part of a decoder-only VAE fine-tune (NAI V3), and how it goes back into an AutoencoderKL.

NAI V3 fine-tunes the SDXL VAE decoder with the encoder frozen: every latent ever made (the latent cache,
the UNet's training data, the clients' img2img) stays valid, only decoding improves. The trainable module
holds `post_quant_conv` and `decoder` under the names AutoencoderKL gives them, so its state dict (and
DeepSpeed's zero_to_fp32 of it, and the EMA's) is a subset of the VAE's keys; `quant_conv` and `encoder`
stay outside it, frozen, and never reach the optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

TRAINED_PREFIXES = ("decoder.", "post_quant_conv.")  # the AutoencoderKL keys a decoder run owns
KIND = "vae_decoder"  # ztsnr_state.json "kind" of a decoder run's checkpoint tags


class DecoderError(ValueError):
    """Decoder weights that do not fit a VAE; the message names the keys and the fix."""


class Decoder(torch.nn.Module):
    """AutoencoderKL.decode without the VAE around it: z (unscaled latent) -> image in about [-1, 1].

    Shape: (B, 4, h, w) -> (B, 3, 8h, 8w).
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        if vae.post_quant_conv is None:
            raise DecoderError("this AutoencoderKL has no post_quant_conv (use_post_quant_conv false): "
                               "not an SD/SDXL-layout VAE")
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


@torch.no_grad()
def encode_mean(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior mean of the frozen encoder (no scaling factor). Shape: (B, 3, H, W) -> (B, 4, H/8, W/8)."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mean


def decoder_keys(vae: AutoencoderKL) -> set[str]:
    return {k for k in vae.state_dict() if k.startswith(TRAINED_PREFIXES)}


@torch.no_grad()
def apply_decoder(vae: AutoencoderKL, state: dict[str, torch.Tensor]) -> AutoencoderKL:
    """Copy trained decoder + post_quant_conv weights into `vae` (in its dtype); encoder untouched.

    `state` must hold exactly the VAE's decoder.* and post_quant_conv.* keys with their shapes.
    """
    expected = decoder_keys(vae)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    params = vae.state_dict()
    wrong = [k for k in expected & set(state) if state[k].shape != params[k].shape]
    if missing or unexpected or wrong:
        raise DecoderError(f"decoder weights do not fit this VAE: {len(missing)} missing (e.g. "
                           f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                           f"{len(wrong)} of other shape (e.g. {wrong[:2]}); pass the VAE the decoder run "
                           "trained from")
    for key in expected:
        params[key].copy_(state[key].to(params[key].dtype))
    return vae


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """AutoencoderKL from a diffusers SDXL folder (its vae/) or a VAE folder; local files only."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
