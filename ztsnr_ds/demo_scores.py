"""Numbers for what a person judges by looking at `make demo`'s images: VAE reconstruction, how far apart
the latents of different colours lie, whether a sample shows the prompted colours, and its brightness.

Images are (N, 3, H, W) float in [-1, 1] (the VAE's range); colours are RGB in 0..255, as the generated
data draws them (data/synthetic.py). Prompts are the data's captions: "red circle, circle, red, white
background" (tags: shape, shape, colour, background) or "plain black, black, plain".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from ztsnr_ds.data.synthetic import BACKGROUNDS, COLOURS, TONES

PALETTE = COLOURS | BACKGROUNDS | TONES  # every colour the data draws, by its tag
# The distinct colours among them (plain white is the white background's colour to 2 levels).
DISTINCT = COLOURS | {"white": BACKGROUNDS["white background"], "dark": BACKGROUNDS["dark background"],
                      "black": TONES["black"]}
UNIFORM = 16 / 127.5  # an 8x8 block is one colour when each channel spans at most 16 levels


def to_unit(rgb: tuple[int, int, int] | Tensor) -> Tensor:
    """0..255 RGB -> [-1, 1] (the VAE's pixel range). Shape: (3,)."""
    return torch.as_tensor(rgb, dtype=torch.float32) / 127.5 - 1


def levels(x: Tensor) -> Tensor:
    """[-1, 1] -> 0..255 levels (unrounded)."""
    return (x + 1) * 127.5


@torch.no_grad()
def reconstruction_rmse(vae: AutoencoderKL, images: list[Tensor]) -> float:
    """RMS error in 0..255 levels of decode(mean of encode(x)) over all pixels of all images.

    images: each (1, 3, H, W) in [-1, 1], sides multiples of the VAE's factor.
    """
    squared, count = 0.0, 0
    for x in images:
        z = vae.encode(x.to(vae.dtype)).latent_dist.mean
        diff = vae.decode(z).sample.float() - x
        squared, count = squared + float(diff.pow(2).sum()), count + diff.numel()
    return (squared / count) ** 0.5 * 127.5


@dataclass
class Separation:
    """Latents of the data's one-colour 8x8 blocks, per colour: mean, and the spread around it."""

    means: dict[str, Tensor]  # colour tag -> (C,) mean latent of its blocks
    counts: dict[str, int]
    spread: float  # largest RMS distance of a block's latent from its colour's mean
    nearest: float  # smallest distance between two colours' means

    def ratio(self) -> float:
        return self.nearest / max(self.spread, 1e-12)


@torch.no_grad()
def latent_separation(vae: AutoencoderKL, images: list[Tensor], factor: int = 8) -> Separation:
    """Class means of the latents of blocks that are one palette colour, and their spread (one latent per
    factor x factor block; a block is one colour when every channel spans <= UNIFORM and its mean is
    within UNIFORM of a DISTINCT entry)."""
    names = list(DISTINCT)
    palette = torch.stack([to_unit(DISTINCT[n]) for n in names])  # (P, 3)
    found: dict[str, list[Tensor]] = {n: [] for n in names}
    for x in images:
        z = vae.encode(x.to(vae.dtype)).latent_dist.mean.float()[0]  # (C, h, w)
        span = F.max_pool2d(x, factor) + F.max_pool2d(-x, factor)  # (1, 3, h, w)
        mean = F.avg_pool2d(x, factor)[0].flatten(1).T  # (h * w, 3)
        uniform = (span[0].flatten(1) <= UNIFORM).all(0)  # (h * w,)
        dist, which = torch.cdist(mean, palette).min(1)  # (h * w,)
        for i in torch.nonzero(uniform & (dist <= UNIFORM)).flatten().tolist():
            found[names[which[i]]].append(z.flatten(1)[:, i])
    blocks = {n: torch.stack(v) for n, v in found.items() if v}  # tag -> (B, C)
    means = {n: b.mean(0) for n, b in blocks.items()}
    spread = max(float((b - means[n]).norm(dim=1).pow(2).mean().sqrt()) for n, b in blocks.items())
    stacked = torch.stack(list(means.values()))
    distances = torch.cdist(stacked, stacked).fill_diagonal_(float("inf"))  # (P, P)
    return Separation(means, {n: len(b) for n, b in blocks.items()}, spread, float(distances.min()))


@dataclass
class ColourScore:
    """One sample of a shape prompt: mean colour inside and outside the drawn shape (0..255)."""

    prompt: str
    shape_share: float  # of the pixels: farther from the background colour than half-way to the shape's
    inside: Tensor  # (3,) mean colour of those pixels
    outside: Tensor  # (3,) mean colour of the others
    colour: str  # prompted shape colour tag
    background: str  # prompted background tag

    def nearest(self, rgb: Tensor, choices: dict) -> str:
        return min(choices, key=lambda n: float((torch.tensor(choices[n], dtype=torch.float32) - rgb).norm()))

    @property
    def ok(self) -> bool:
        """Inside reads as the prompted colour and outside as the prompted background."""
        return (self.shape_share > 0.02 and self.nearest(self.inside, COLOURS) == self.colour
                and self.nearest(self.outside, BACKGROUNDS) == self.background)


def parse_shape_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, background) of a shape caption (its first four tags), None for any other prompt."""
    tags = [t.strip() for t in prompt.split(",")]
    if len(tags) >= 4 and tags[2] in COLOURS and tags[3] in BACKGROUNDS:
        return tags[2], tags[3]
    return None


def colour_score(image: Tensor, prompt: str) -> ColourScore:
    """Split a sample (3, H, W) in [-1, 1] into shape and background by the prompted colours, then average.

    A pixel is "shape" when it is closer to the prompted shape colour than to the prompted background.
    """
    colour, background = parse_shape_prompt(prompt) or (None, None)
    if colour is None:
        raise ValueError(f"prompt {prompt!r} is not a shape caption such as 'red circle, circle, red, white "
                         "background'")
    pixels = levels(image).flatten(1).T  # (H * W, 3) in 0..255
    to_shape = (pixels - torch.tensor(COLOURS[colour], dtype=torch.float32)).norm(dim=1)
    to_background = (pixels - torch.tensor(BACKGROUNDS[background], dtype=torch.float32)).norm(dim=1)
    inside = to_shape < to_background  # (H * W,)
    return ColourScore(prompt, float(inside.float().mean()), _mean_rows(pixels, inside),
                       _mean_rows(pixels, ~inside), colour, background)


def _mean_rows(pixels: Tensor, mask: Tensor) -> Tensor:
    """Mean of the masked rows of (M, 3); NaN where the mask is empty."""
    return pixels[mask].mean(0) if mask.any() else torch.full((3,), float("nan"))


def brightness(image: Tensor) -> float:
    """Mean of all channels of a (3, H, W) image in [-1, 1], in 0..255 levels."""
    return float(levels(image).mean())
