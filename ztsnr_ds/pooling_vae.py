"""A hand-set diffusers AutoencoderKL for `make demo`: the encoder is 8x8 mean pooling followed by a
fixed colour map, the decoder nearest-neighbour upsampling followed by its inverse.

Why hand-set and not trained: a random tiny VAE maps every colour to nearly the same latent, and a
tiny VAE trained for ~30 s on the demo images (fp32, AdamW) still drew every shape brown (pixel
MSE 0.10); this one needs no training, encodes any image exactly up to its 8x8 block means, and its
latents say what they mean: channels 0-2 are the block means of R, G, B in [-1, 1], channel 3 their
mean (redundant, as SDXL's latent channels partly are). It is still the real AutoencoderKL class,
so the cache, the trainer's validation images and the exports go through the code a real SDXL does.

How it gets through the class's layers:
- every ResnetBlock2D and the mid-block attention add a zero branch to their input (conv2 and to_out
  are zero): identities;
- the encoder's downsamplers are 2x2 means (stride-2 convs), the decoder's upsamplers nearest x2
  followed by a centre-tap identity conv;
- the one layer that cannot be bypassed, GroupNorm before each conv_out, subtracts each group's mean
  and divides by its std, which would erase absolute colour (black vs white). Each group of four
  channels therefore carries (c, -c, K, -K): its mean is 0 exactly and its variance (mean(c^2) + K^2) / 2,
  so with the GroupNorm weight K / sqrt(2) the output is c * K / sqrt(mean(c^2) + K^2), i.e. c to a
  relative 5e-5 for K = 100 and |c| <= 1. conv_out reads silu(c) - silu(-c) = c, exactly.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

K = 100.0  # the constant channel pair that fixes GroupNorm's scale (relative error <= 1 / (2 K^2))
GROUP = 4  # channels per GroupNorm group: (c, -c, K, -K)
FACTOR = 8  # pixels per latent side: 3 stride-2 levels, as SDXL's VAE
# Latent = COLOUR_MAP @ (R, G, B): the three colour channels and their mean.
COLOUR_MAP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
POOLING_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4 * GROUP,) * 4,  # groups 0-2: R, G, B as (c, -c, K, -K); group 3 unused (zeros)
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=128,
    scaling_factor=1.0,  # latents are colours in [-1, 1]: unit scale already (SDXL needs 0.13025 for it)
)


def _centre(conv: torch.nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Set a 3x3 (or 1x1) conv to the per-pixel linear map `weight` (out, in) plus `bias` (out,)."""
    centre = conv.kernel_size[0] // 2
    conv.weight.data[:, :, centre, centre] = weight
    if bias is not None:
        conv.bias.data[:] = bias


def _spread() -> tuple[torch.Tensor, torch.Tensor]:
    """The (16, 3) map of R, G, B into (c, -c, K, -K) groups, and its (16,) bias (the K's)."""
    weight, bias = torch.zeros(4 * GROUP, 3), torch.zeros(4 * GROUP)
    for c in range(3):
        weight[GROUP * c, c], weight[GROUP * c + 1, c] = 1.0, -1.0
        bias[GROUP * c + 2], bias[GROUP * c + 3] = K, -K
    return weight, bias


def _gather() -> torch.Tensor:
    """The (3, 16) map of silu'd (c, -c, ...) groups back to R, G, B: silu(c) - silu(-c) = c."""
    weight = torch.zeros(3, 4 * GROUP)
    for c in range(3):
        weight[c, GROUP * c], weight[c, GROUP * c + 1] = 1.0, -1.0
    return weight


@torch.no_grad()
def pooling_vae() -> AutoencoderKL:
    """The AutoencoderKL described in the module docstring (fp32, eval)."""
    vae = AutoencoderKL(**POOLING_VAE_CONFIG)
    for name, p in vae.named_parameters():  # norms scale 1, everything else 0: branches add nothing
        p.zero_()
        if "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
    spread, k_bias = _spread()
    to_latent, from_latent = COLOUR_MAP, torch.linalg.pinv(COLOUR_MAP)  # (4, 3), (3, 4)
    _centre(vae.encoder.conv_in, spread, k_bias)
    for block in vae.encoder.down_blocks:
        for down in block.downsamplers or []:  # stride-2 conv, padded right/bottom: taps 0-1 are a 2x2 mean
            down.conv.weight.data[:, :, :2, :2] = 0.25 * torch.eye(4 * GROUP)[:, :, None, None]
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        norm.weight.data[:] = K / 2**0.5
    logvar_bias = torch.full((4,), -30.0)  # the posterior's std exp(-15): its mean is the latent
    _centre(vae.encoder.conv_out, torch.cat([to_latent @ _gather(), torch.zeros(4, 4 * GROUP)]),
            torch.cat([torch.zeros(4), logvar_bias]))
    _centre(vae.quant_conv, torch.eye(8))
    _centre(vae.post_quant_conv, torch.eye(4))
    _centre(vae.decoder.conv_in, spread @ from_latent, k_bias)
    for block in vae.decoder.up_blocks:
        for up in block.upsamplers or []:  # nearest x2, then this conv: identity
            _centre(up.conv, torch.eye(4 * GROUP))
    _centre(vae.decoder.conv_out, _gather())
    return vae.eval()
