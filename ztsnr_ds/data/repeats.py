"""Source repeats per epoch: which cached images an epoch trains on, and how often (kohya ``num_repeats``,
OneTrainer's fractional ``repeats``).

A source s of n_s training images with repeats r_s = f_s + p_s (f_s = floor(r_s), 0 <= p_s < 1) gives
every image f_s uses per epoch and k_s = floor(p_s * n_s + 1/2) of them one more, a subset drawn afresh
each epoch from a generator seeded by (seed, epoch): uses_s = f_s * n_s + k_s exactly, every epoch.

The c-th use (c = 0, 1, ...) of row i in an epoch has the use id u = i + c * R (R = rows of the cache), so
u mod R is the row and u itself seeds the use's random streams (trainer.sample_streams): every use of a
repeated image draws its own noise, sigma and caption edits, and with all repeats 1 every u = i, the plan
of a run without repeats. Vectorised numpy: a few passes over the epoch's ids, a loop over the sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceRepeats:
    """The cache's source of every row and each source's repeats.

    Shape: source (R,) int (the index's source column), repeats (S,) float64, names S strings.
    """

    source: np.ndarray
    repeats: np.ndarray
    names: list[str]

    @property
    def rows(self) -> int:
        return len(self.source)

    def digest(self) -> str:
        """Of the names and repeats: a resume under other repeats would plan other epochs."""
        text = ";".join(f"{name}={float(r)!r}" for name, r in zip(self.names, self.repeats, strict=True))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def source_repeats(index_sources: Sequence[str], source_column: np.ndarray,
                   configured: Sequence[tuple[str, float]]) -> SourceRepeats:
    """Repeats of the cache's sources from ``data.sources`` (name, repeats) pairs. ValueError naming
    data.sources when the config and the cache list different sources."""
    wanted = dict(configured)
    missing = [name for name in wanted if name not in index_sources]
    unlisted = [name for name in index_sources if name not in wanted]
    if missing or unlisted:
        fix = [f"build {missing} into the cache (launch/cache.py)"] if missing else []
        fix += [f"list {unlisted} in data.sources (repeats: 0 to leave it out)"] if unlisted else []
        raise ValueError(f"data.sources lists {sorted(wanted)}, the cache holds {list(index_sources)}: "
                         + "; ".join(fix))
    repeats = np.array([wanted[name] for name in index_sources], dtype=np.float64)
    return SourceRepeats(np.asarray(source_column), repeats, list(index_sources))


def uses_per_source(images: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """uses_s = floor(r_s) * n_s + floor(frac(r_s) * n_s + 1/2). Shape: (S,), (S,) -> (S,) int64."""
    whole = np.floor(repeats)
    return (whole * images + np.floor((repeats - whole) * images + 0.5)).astype(np.int64)


def images_per_source(buckets: Sequence[np.ndarray], mix: SourceRepeats) -> np.ndarray:
    """Training images of each source over ``buckets`` (row ids). Shape: (S,) int64."""
    if len(mix.names) == 1:
        return np.array([sum(len(ids) for ids in buckets)], dtype=np.int64)
    rows = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    return np.bincount(mix.source[rows], minlength=len(mix.names)).astype(np.int64)


class EpochUses:
    """Each bucket's use ids per epoch (module docstring): row i of source s appears floor(r_s) times,
    plus once more if drawn into the source's k_s extras (drawn over the whole source, so the counts per
    source are exact whatever the buckets). What does not change between epochs is kept from the start:
    each training row's whole copies (1 byte a row) and the rows of each source with a fractional part;
    an epoch then costs its k_s draws and a few vectorised passes per bucket."""

    def __init__(self, buckets: Sequence[np.ndarray], mix: SourceRepeats, images: np.ndarray) -> None:
        self.buckets, self.rows = [np.asarray(ids, dtype=np.int64) for ids in buckets], mix.rows
        whole = np.floor(mix.repeats).astype(np.int64)
        if whole.max(initial=0) > 127:
            raise ValueError(f"data.sources repeats {mix.repeats.max():g}: at most 127 per epoch")
        self.copies = [whole[mix.source[ids]].astype(np.int8) for ids in self.buckets]  # B x (n_b,)
        self.extras = uses_per_source(images, mix.repeats) - whole * images  # k_s (images: per source)
        self.members = {}
        if self.extras.any():
            rows = np.concatenate(self.buckets)  # (N,)
            source = mix.source[rows]
            self.members = {int(s): rows[source == s] for s in np.flatnonzero(self.extras)}
        self.most = int(whole.max(initial=0))

    def __call__(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The use ids of one epoch, bucket by bucket, the extras drawn from ``rng``. Shape: B x (uses_b,)."""
        extra = np.zeros(self.rows, dtype=bool)  # (R,) rows with a use more this epoch
        for s, members in self.members.items():  # a loop over the sources, not the rows
            k = int(self.extras[s])  # the k smallest of n uniform draws: k of n without replacement
            extra[members[np.argpartition(rng.random(len(members), dtype=np.float32), k - 1)[:k]]] = True
        out = []
        for ids, copies in zip(self.buckets, self.copies, strict=True):
            parts = [ids[copies > c] + c * self.rows for c in range(self.most)]
            more = extra[ids]
            parts.append(ids[more] + copies[more].astype(np.int64) * self.rows)
            out.append(np.concatenate(parts))
        return out


def source_summary(images: np.ndarray, mix: SourceRepeats, world_size: int) -> dict[str, dict]:
    """JSON-able facts per source (the same every epoch) from its training images (images_per_source):
    images, repeats, uses and distinct images per epoch. ValueError when an epoch has fewer uses than
    ranks."""
    uses = uses_per_source(images, mix.repeats)
    if uses.sum() < world_size:
        raise ValueError(f"data.sources repeats give {int(uses.sum())} samples per epoch, fewer than the "
                         f"{world_size} ranks: raise repeats or use fewer ranks")
    distinct = np.where(mix.repeats >= 1, images, uses)
    facts = zip(mix.names, images, mix.repeats, uses, distinct, strict=True)
    return {name: {"images": int(n), "repeats": float(r), "uses_per_epoch": int(u),
                   "distinct_per_epoch": int(d)} for name, n, r, u, d in facts}


def source_table(sources: dict[str, dict]) -> list[str]:
    """Lines of the start-up table: one per source, then the epoch's total."""
    lines = [f"{'source':>16} {'images':>9} {'repeats':>8} {'per epoch':>10}  share"]
    total = sum(s["uses_per_epoch"] for s in sources.values()) or 1
    for name, s in sources.items():
        lines.append(f"{name or '(unnamed)':>16} {s['images']:>9} {s['repeats']:>8g} "
                     f"{s['uses_per_epoch']:>10}  {s['uses_per_epoch'] / total:6.1%}")
    return lines


def seen_by_step(uses: np.ndarray, step_starts: np.ndarray, mix: SourceRepeats) -> np.ndarray:
    """Samples of each source in an epoch plan before each step: row k counts the use ids
    uses[:step_starts[k]] by source (one source: the steps' starts). Shape: (N,), (K + 1,) -> (K + 1, S)."""
    if len(mix.names) == 1:
        return np.asarray(step_starts, dtype=np.int64)[:, None]
    source = np.take(mix.source, uses, mode="wrap")  # (N,) the source of row u mod R
    starts = np.asarray(step_starts[:-1], dtype=np.int64)  # every step holds >= 1 id: no empty segment
    per_step = np.column_stack([np.add.reduceat(source == s, starts, dtype=np.int64)
                                for s in range(len(mix.names))])  # (K, S)
    return np.vstack([np.zeros((1, len(mix.names)), np.int64), per_step.cumsum(0)])
