"""Aspect-ratio buckets (NovelAI recipe), bucket assignment, resize-to-cover + crop with SDXL time_ids.

Bucket construction follows NovelAI's aspect-ratio bucketing (NAI, "NovelAI Improvements on Stable
Diffusion", 2022; kept in NAI Diffusion V3, arXiv 2409.15997): sides are multiples of 64, the area
is at most max_area, widths run from min_side to max_side with the largest height that fits.
Size conditioning follows SDXL (Podell et al. 2023, sec. 2.2): the UNet sees the original size and
the crop offset of each sample.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

CROP_MODES = ("center", "random")


@dataclass
class BucketConfig:
    """Limits of the bucket set; the defaults are SDXL's (1 MP, sides 512..2048, aspect 1:4..4:1)."""

    max_area: int = 1024 * 1024
    """Largest bucket area in pixels."""
    step: int = 64
    """Every side is a multiple of this (64 px = 8 latent px, divisible by the UNet's down-sampling)."""
    min_side: int = 512
    """Smallest bucket side in pixels; a multiple of step."""
    max_side: int = 2048
    """Largest bucket side in pixels; a multiple of step."""
    max_aspect: float = 4.0
    """Largest long-side / short-side ratio of a bucket."""

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError(f"BucketConfig.step={self.step} must be positive")
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if value <= 0 or value % self.step:
                raise ValueError(
                    f"BucketConfig.{name}={value} must be a positive multiple of step={self.step}"
                )
        if self.max_side < self.min_side:
            raise ValueError(f"BucketConfig.max_side={self.max_side} is below min_side={self.min_side}")
        if self.max_area < self.min_side**2:
            raise ValueError(f"BucketConfig.max_area={self.max_area} is below min_side**2={self.min_side**2}")
        if self.max_aspect < 1:
            raise ValueError(f"BucketConfig.max_aspect={self.max_aspect} must be >= 1")


@dataclass(frozen=True)
class CropPlan:
    """Resize-to-cover size and crop offset (in the resized image's pixels) for one image."""

    resized_h: int
    resized_w: int
    top: int
    left: int


def make_buckets(cfg: BucketConfig | None = None) -> list[tuple[int, int]]:
    """Sorted, de-duplicated (height, width) buckets in pixels.

    For w = min_side, min_side + step, ..., max_side: h = min(max_side, floor(max_area / w / step) * step);
    both (h, w) and its transpose, plus the largest square; then keep those within the side and aspect
    limits.
    """
    cfg = cfg or BucketConfig()
    candidates: set[tuple[int, int]] = set()
    for width in range(cfg.min_side, cfg.max_side + 1, cfg.step):
        height = min(cfg.max_side, cfg.max_area // width // cfg.step * cfg.step)
        candidates |= {(height, width), (width, height)}
    side = min(cfg.max_side, math.isqrt(cfg.max_area) // cfg.step * cfg.step)
    candidates.add((side, side))
    return sorted(b for b in candidates if _within_limits(b, cfg))


def _within_limits(bucket: tuple[int, int], cfg: BucketConfig) -> bool:
    short, long = sorted(bucket)
    return cfg.min_side <= short and long <= cfg.max_side and long <= cfg.max_aspect * short


def assign_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Bucket with the nearest log aspect ratio: argmin |log(h / w) - log(bh / bw)|.

    Log distance treats 1:2 and 2:1 alike. Ties go to the larger bucket (less upscaling).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    log_ar = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


def plan_crop(
    height: int, width: int, bucket: tuple[int, int], mode: str = "center", rng: random.Random | None = None
) -> CropPlan:
    """Scale so the image covers ``bucket`` (aspect kept), then place the crop.

    scale = max(bh / h, bw / w); resized = round(side * scale) (at least the bucket side);
    centre: offset = (resized - bucket) // 2; random: uniform integer offset drawn from ``rng``.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r} unknown; valid: {', '.join(CROP_MODES)}")
    if mode == "random" and rng is None:
        raise ValueError("crop mode 'random' needs an rng (random.Random)")
    target_h, target_w = bucket
    scale = max(target_h / height, target_w / width)
    resized_h = max(target_h, round(height * scale))
    resized_w = max(target_w, round(width * scale))
    if mode == "center":
        return CropPlan(resized_h, resized_w, (resized_h - target_h) // 2, (resized_w - target_w) // 2)
    return CropPlan(
        resized_h, resized_w, rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
    )


def resize_and_crop(
    img: Image.Image, bucket: tuple[int, int], mode: str = "center", rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int, int, int, int, int]]:
    """Image resized to cover ``bucket`` (LANCZOS) and cropped to it, plus its SDXL time_ids.

    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), the crop offset in the
    resized image's pixels (SDXL convention, Podell et al. 2023, sec. 2.2).
    """
    plan = plan_crop(img.height, img.width, bucket, mode, rng)
    target_h, target_w = bucket
    resized = img.resize((plan.resized_w, plan.resized_h), Image.Resampling.LANCZOS)
    cropped = resized.crop((plan.left, plan.top, plan.left + target_w, plan.top + target_h))
    return cropped, (img.height, img.width, plan.top, plan.left, target_h, target_w)


def bucket_key(bucket: tuple[int, int]) -> str:
    """Key "HxW" of a (height, width) bucket, as used in cache manifests and sampler state."""
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket_key(key: str) -> tuple[int, int]:
    """(height, width) of an "HxW" bucket key."""
    height, _, width = key.partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise ValueError(f"bucket key {key!r} is not of the form 'HxW'")
    return int(height), int(width)
