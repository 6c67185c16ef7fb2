"""Tag parsing and tag-frequency loss weights (NovelAI Diffusion V3, arXiv 2409.15997).

Rare tags get more weight and common tags less, so the model does not learn only the dataset's
majority concepts. Tags are normalised in exactly one place, :func:`normalize_tag`.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class TagWeightConfig:
    """Tag-frequency weighting: w_t = clip((f_t / f_median)^-alpha, w_min, w_max)."""

    alpha: float = 0.5
    """Strength of the re-weighting; 0 gives every tag weight 1."""
    w_min: float = 0.5
    """Lower clip of a tag's weight (the most common tags); must be > 0."""
    w_max: float = 2.0
    """Upper clip of a tag's weight (the rarest tags); must be >= w_min."""

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"TagWeightConfig.alpha={self.alpha} must be >= 0")
        if self.w_min <= 0:
            raise ValueError(
                f"TagWeightConfig.w_min={self.w_min} must be > 0 (image weights are geometric means)"
            )
        if self.w_max < self.w_min:
            raise ValueError(f"TagWeightConfig.w_max={self.w_max} is below w_min={self.w_min}")


def normalize_tag(tag: str) -> str:
    """Canonical tag: lowercase, underscores as spaces, whitespace collapsed ("Blue_Sky " -> "blue sky")."""
    return " ".join(tag.replace("_", " ").lower().split())


FIELD_SEP = "\u241f"
"""Between the fields of a caption built from a template (data/caption_template.py), read as a comma
here: U+241F (the visible symbol of the unit separator), not whitespace, so strip() keeps empty fields."""


def parse_tags(caption: str) -> list[str]:
    """Normalised tags of a comma-separated caption in their original order; empty tags dropped."""
    return [tag for tag in map(normalize_tag, caption.replace(FIELD_SEP, ",").split(",")) if tag]


def tag_counts(tag_lists: Iterable[list[str]]) -> tuple[Counter, int]:
    """(images carrying each tag, images): what the weights need, summed in one pass over any stream
    of images (a tag repeated within one image counts once)."""
    counts: Counter = Counter()
    images = 0
    for tags in tag_lists:
        counts.update(set(tags))
        images += 1
    return counts, images


def tag_frequencies(tag_lists: list[list[str]]) -> dict[str, float]:
    """f_t: share of images carrying tag t (a tag repeated within one image counts once)."""
    counts, images = tag_counts(tag_lists)
    return {tag: count / images for tag, count in counts.items()}


def raw_tag_weight(freq: float, median_freq: float, alpha: float) -> float:
    """Unclipped tag weight (f_t / f_median)^-alpha (NAI Diffusion V3, arXiv 2409.15997)."""
    return (freq / median_freq) ** -alpha


def tag_weight(freq: float, median_freq: float, cfg: TagWeightConfig) -> float:
    """w_t = clip((f_t / f_median)^-alpha, w_min, w_max)."""
    return min(cfg.w_max, max(cfg.w_min, raw_tag_weight(freq, median_freq, cfg.alpha)))


def weights_from_counts(counts: Mapping[str, int], images: int, cfg: TagWeightConfig) -> dict[str, float]:
    """w_t of every counted tag, f_t = count / images; f_median is the median over the distinct tags."""
    if not counts:
        return {}
    freqs = {tag: count / images for tag, count in counts.items()}
    median = statistics.median(freqs.values())
    return {tag: tag_weight(freq, median, cfg) for tag, freq in freqs.items()}


def per_tag_weights(tag_lists: list[list[str]], cfg: TagWeightConfig) -> dict[str, float]:
    """w_t for every tag of the dataset; f_median is the median over the distinct tags' frequencies."""
    return weights_from_counts(*tag_counts(tag_lists), cfg)


def image_weight(tags: list[str], weights_of: Mapping[str, float]) -> float:
    """Unnormalised image weight: the geometric mean of its distinct tags' w_t (1 without tags)."""
    return _geometric_mean([weights_of[tag] for tag in set(tags)])


def tag_weights(tag_lists: list[list[str]], cfg: TagWeightConfig | None = None) -> list[float]:
    """Per-image loss weights with mean 1 over the dataset.

    An image's weight is the geometric mean of its distinct tags' w_t (1 for an image without tags),
    then all weights are divided by their mean (math.fsum: exactly rounded, so any order gives it).
    """
    cfg = cfg or TagWeightConfig()
    weights_of = per_tag_weights(tag_lists, cfg)
    raw = [image_weight(tags, weights_of) for tags in tag_lists]
    if not raw:
        return []
    mean = math.fsum(raw) / len(raw)
    return [w / mean for w in raw]


def _geometric_mean(values: list[float]) -> float:
    return math.exp(math.fsum(map(math.log, values)) / len(values)) if values else 1.0


def shuffle_caption(caption: str, keep_first: int, rng: random.Random) -> str:
    """Caption with its first ``keep_first`` tags in place and the rest shuffled, joined by ", ".

    Tags come out normalised (see normalize_tag), as the text encoder should see them.
    """
    if keep_first < 0:
        raise ValueError(f"keep_first={keep_first} must be >= 0")
    tags = parse_tags(caption)
    head, tail = tags[:keep_first], tags[keep_first:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
