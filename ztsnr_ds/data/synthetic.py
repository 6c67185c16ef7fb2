"""A generated, captioned image set for `make demo` and the tests (nothing to download).

Coloured shapes on plain backgrounds at aspect ratios from 1:4 to 4:1, and every fourth image a
near-black or near-white plain one (NAI V3's Fig. 2 case: without ZTSNR a model cannot draw those),
captioned with comma-separated tags that describe them, so a model can learn something in minutes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white background": (245, 245, 245), "dark background": (25, 25, 30)}
TONES = {"black": (8, 8, 10), "white": (247, 247, 247)}  # plain images, +-PLAIN_NOISE per pixel
PLAIN_NOISE = 6
PLAIN_EVERY = 4  # image i is plain when i % PLAIN_EVERY == PLAIN_EVERY - 1, black and white in turn
SIZES = ((128, 128), (192, 96), (96, 192), (256, 64), (64, 256), (160, 128), (128, 160))  # (width, height)
DETAIL_TAGS = ("simple background", "no humans", "geometric shape", "flat color", "solid fill", "sharp edges",
               "centered", "minimalism", "still life", "vector art", "clean lines", "single object")
"""Tags true of every shape image, appended to some captions so that they run past one 75-token CLIP
chunk (docs/long-captions.md): with the tiny demo tokenizer (one token per character) 5 of them make a
caption 2 chunks, 12 of them 3."""
DETAIL_COUNTS = (0, 5, 12)
"""Detail tags of shape image i: DETAIL_COUNTS[i % 3] (a function of i: the drawing's random stream is
untouched)."""


def draw_sample(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """One image and its caption: a shape of one colour on one background."""
    colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    shape = rng.choice(["circle", "square"])
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    side = int(min(width, height) * rng.uniform(0.5, 0.8))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (left, top, left + side, top + side)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img, f"{colour} {shape}, {shape}, {colour}, {background}"


def draw_plain(rng: random.Random, width: int, height: int, tone: str) -> tuple[Image.Image, str]:
    """A near-plain image of one tone (uniform noise of +-PLAIN_NOISE levels) and its caption."""
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    noise = noise_rng.integers(-PLAIN_NOISE, PLAIN_NOISE + 1, (height, width, 1))  # grey noise
    pixels = np.clip(np.array(TONES[tone]) + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels), f"plain {tone}, {tone}, plain"


def write_dataset(folder: str | Path, n: int = 48, seed: int = 0) -> Path:
    """Write n PNG images with same-stem .txt captions into folder; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        if i % PLAIN_EVERY == PLAIN_EVERY - 1:
            tone = list(TONES)[(i // PLAIN_EVERY) % len(TONES)]
            img, caption = draw_plain(rng, width, height, tone)
        else:
            img, caption = draw_sample(rng, width, height)
            caption += "".join(f", {tag}" for tag in DETAIL_TAGS[:DETAIL_COUNTS[i % len(DETAIL_COUNTS)]])
        img.save(folder / f"img{i:04d}.png")
        (folder / f"img{i:04d}.txt").write_text(caption)
    return folder
