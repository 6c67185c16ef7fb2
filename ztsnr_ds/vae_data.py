"""Training crops for the VAE decoder: random squares of the full-resolution source images.

The source is scanned as for the latent cache (data/sources.py), each rank its share, so no rank holds
the whole list. A micro-batch is drawn from a stream seeded by (seed, step, rank, micro-batch) alone: one
crop side for the micro-batch (ZeRO needs one shape inside it), then per sample an image of the rank's
share and a position. No state to save: a resumed run draws the same crops. An image that cannot be used
(unreadable, truncated, a decompression bomb, smaller than data.crop_max) is skipped, its draw repeated,
and listed (`problems`); since the same file fails the same way again, resume stays exact.

Held-out images: the `count` keys of the whole source with the lowest BLAKE2b(seed:key) (`held_out`); the
caller gathers each rank's candidates (`holdout_candidates`), a few strings per rank.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ztsnr_ds.data.sources import BadImage, ImageRecord, Problem, load_image


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB -> float in [-1, 1]. Shape: (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def key_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def holdout_candidates(records: list[ImageRecord], count: int, seed: int) -> list[tuple[int, str, str]]:
    """This share's `count` lowest (hash, key, path): the global lowest `count` are among all ranks' lists."""
    return sorted((key_hash(r.key, seed), r.key, str(r.path)) for r in records)[:count]


def held_out(candidates: list[list[tuple[int, str, str]]], count: int) -> list[tuple[str, str]]:
    """The `count` lowest-hash (key, path) over every rank's candidates, in hash order."""
    merged = sorted(tuple(c) for part in candidates for c in part)[:count]
    return [(key, path) for _, key, path in merged]


def centre_crop(img: Image.Image, side: int) -> Image.Image:
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


class CropStream:
    """Random square crops of this rank's images. Shape of a micro-batch: (B, 3, S, S) in [-1, 1]."""

    def __init__(self, records: list[ImageRecord], sides: list[int], seed: int, rank: int,
                 max_pixels: int) -> None:
        if not records:
            raise ValueError("no training images on this rank after the held-out ones; add images or lower "
                             "validation.holdout")
        self.records, self.sides, self.seed, self.rank = records, sides, seed, rank
        self.max_pixels, self.min_side = max_pixels, max(sides)
        self.bad: dict[int, Problem] = {}

    def rng(self, step: int, micro: int) -> random.Random:
        digest = hashlib.sha256(f"vae:{self.seed}:{step}:{self.rank}:{micro}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def load(self, i: int) -> Image.Image | None:
        """Image i, or None (remembered and listed) when it cannot be used."""
        if i in self.bad:
            return None
        record = self.records[i]
        try:
            return load_image(record.path, self.max_pixels, self.min_side)
        except BadImage as err:
            reason = (f"{err.reason} (data.crop_max)" if err.reason.startswith("too small") else err.reason)
            self.bad[i] = Problem(record.key, Path(record.path), reason)
            if len(self.bad) == len(self.records):
                raise ValueError(f"every image of this rank's share is unusable, e.g. {reason}; see the data "
                                 "report, fix the source or lower data.crop_max") from err
            return None

    def batch(self, step: int, micro: int, size: int) -> torch.Tensor:
        """Micro-batch `micro` of optimizer step `step`: `size` crops of one side drawn from the stream."""
        rng = self.rng(step, micro)
        side = rng.choice(self.sides)
        crops = []
        while len(crops) < size:
            img = self.load(rng.randrange(len(self.records)))
            if img is None:
                continue  # the next draw replaces it
            left, top = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
            crops.append(to_tensor(img.crop((left, top, left + side, top + side))))
        return torch.stack(crops)

    @property
    def problems(self) -> list[Problem]:
        return sorted(self.bad.values())
