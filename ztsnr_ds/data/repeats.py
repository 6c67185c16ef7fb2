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
        """Of the names, the repeats and the way uses are drawn ("uses 2": EpochUses' layout and draw, so a
        checkpoint of the first version is refused, not silently continued on other epochs): a resume
        under other repeats would plan other epochs."""
        text = "uses 2;" + ";".join(f"{name}={float(r)!r}"
                                    for name, r in zip(self.names, self.repeats, strict=True))
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


ROW_BITS = 48
"""A packed use id (EpochUses) holds the use id in its low 48 bits and the use's source above them."""


class EpochUses:
    """Each epoch's use ids (module docstring), laid out bucket after bucket for `sampler.plan_pool`, which
    permutes each bucket's run in place: row i of source s appears floor(r_s) times, plus once more if drawn
    into the source's k_s extras (drawn over the whole source, so the counts per source are exact whatever
    the buckets). Each use id is packed with its source (ROW_BITS) at no cost, so the plan's sources are
    read back without a lookup per use (`unpack_sources`).

    Kept from the start: each bucket's rows grouped by source (one slice per source and bucket); an epoch
    then costs its k_s draws (over the rows of the sources with a fractional part only) and one write of
    every use, a slice at a time (a loop over buckets x sources x copies, not the rows)."""

    def __init__(self, buckets: Sequence[np.ndarray], mix: SourceRepeats) -> None:
        self.rows, count = mix.rows, len(mix.names)
        self.whole = np.floor(mix.repeats).astype(np.int64)
        if self.whole.max(initial=0) > 127:
            raise ValueError(f"data.sources repeats {mix.repeats.max():g}: at most 127 per epoch")
        if (self.whole.max(initial=0) + 1) * self.rows >= 1 << ROW_BITS:
            raise ValueError(f"data.sources repeats: {self.rows} cached rows are too many to repeat (use ids "
                             f"need < 2^{ROW_BITS})")
        self.grouped, counts = [], []  # B x (n_b,) rows by source; (B, S) rows per source
        for ids in buckets:
            source = mix.source[ids]
            self.grouped.append(np.concatenate([ids[source == s] for s in range(count)]))
            counts.append(np.bincount(source, minlength=count))
        self.counts = np.array(counts, dtype=np.int64).reshape(len(buckets), count)
        self.images = self.counts.sum(0)  # (S,) training images per source
        self.extras = uses_per_source(self.images, mix.repeats) - self.whole * self.images  # k_s
        self.runs = np.c_[np.zeros(len(buckets), np.int64), np.cumsum(self.counts, axis=1)]  # (B, S + 1)

    def _draw(self, rng: np.random.Generator) -> dict[int, np.ndarray]:
        """Each fractional source's extras: a mask over its rows, bucket after bucket, with k_s set, every
        k-subset of the n rows equally likely. Each row draws an 8-bit uniform key; the rows whose key is
        below v, the k-th smallest key, are in, and a uniform choice of the rest among the rows at v (about
        n / 256 of them): a few passes over 1-byte keys instead of a partition of n floats."""
        masks = {}
        for s in np.flatnonzero(self.extras).tolist():  # a loop over the sources, not the rows
            n, k = int(self.images[s]), int(self.extras[s])
            key = rng.integers(0, 256, n, dtype=np.uint8)
            at_most = np.cumsum(np.bincount(key, minlength=256))  # (256,) rows with key <= v
            v = int(np.searchsorted(at_most, k))  # the smallest v with at_most[v] >= k
            masks[s] = key < v
            rest = k - (int(at_most[v - 1]) if v else 0)
            masks[s][rng.choice(np.flatnonzero(key == v), rest, replace=False)] = True
        return masks

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The packed use ids of one epoch, bucket after bucket, the extras drawn from ``rng``, and the
        uses of each bucket. Shape: (U,), (B,)."""
        masks = self._draw(rng)
        bounds = {s: np.r_[0, np.cumsum(self.counts[:, s])] for s in masks}  # each bucket's part of a mask
        extra = [[(s, masks[s][bounds[s][b]:bounds[s][b + 1]]) for s in masks] for b in range(len(self.runs))]
        drawn = np.array([[np.count_nonzero(m) for _, m in more] for more in extra], np.int64)
        sizes = self.counts @ self.whole + drawn.reshape(len(self.runs), -1).sum(1)
        pool, at = np.empty(int(sizes.sum()), dtype=np.int64), 0
        for ids, run, more in zip(self.grouped, self.runs.tolist(), extra):
            for c in range(int(self.whole.max(initial=0))):  # copy c: every source with more than c copies
                for s in np.flatnonzero(self.whole > c).tolist():  # a source at a time: its ids carry it
                    n = run[s + 1] - run[s]
                    np.add(ids[run[s]:run[s + 1]], c * self.rows + (s << ROW_BITS), out=pool[at:at + n])
                    at += n
            for s, mask in more:  # one use more of the drawn rows
                n = int(np.count_nonzero(mask))
                np.compress(mask, ids[run[s]:run[s + 1]], out=pool[at:at + n])
                pool[at:at + n] += int(self.whole[s]) * self.rows + (s << ROW_BITS)
                at += n
        return pool, sizes


def unpack_sources(uses: np.ndarray) -> np.ndarray:
    """The source of every packed use id (EpochUses): its top 16 bits, read as a strided view (no shift of
    the whole array); unpacks ``uses`` in place. Shape: (N,) int64 -> (N,) int16."""
    source = uses.view(np.int16)[3 if np.little_endian else 0::4].copy()
    np.bitwise_and(uses, (1 << ROW_BITS) - 1, out=uses)
    return source


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


def seen_by_step(source: np.ndarray | None, step_starts: np.ndarray, count: int) -> np.ndarray:
    """Samples of each of ``count`` sources before each step: row k counts source[:step_starts[k]] (the
    source of every use in plan order; None for one source: the steps' starts). Each source but the last
    (the rest) is counted per step, then summed over the steps: no array of N counts.
    Shape: (N,), (K + 1,) -> (K + 1, S)."""
    starts = np.asarray(step_starts, dtype=np.int64)
    if count == 1:
        return starts[:, None]
    seen = np.zeros((len(starts), count), dtype=np.int64)  # every step holds >= 1 id: starts[1:] >= 1
    for s in range(count - 1):
        per_step = np.add.reduceat((source == s).view(np.uint8), starts[:-1], dtype=np.int32)  # bytes: fast
        seen[1:, s] = per_step.cumsum(dtype=np.int64)
    seen[:, -1] = starts - seen[:, :-1].sum(1)
    return seen
