"""Distributed bucket batch sampler: every cached id once per epoch, one bucket per micro-batch, resumable.

Epoch plan, a pure function of (seed, epoch, bucket contents, micro_batch, world size W, base_area),
computed in numpy on every rank alike:
  1. each bucket's ids are permuted and cut into global batches of G_b = m_b * W ids; the last one
     (the tail, 1 <= size <= G_b) may be smaller. m_b = micro_batch, or with batch by area
     m_b = max(1, floor(micro_batch * base_area / (h * w))) (`bucket_micro_batches`).
  2. the global batches of all buckets are shuffled together (one permutation).
  3. a step (one micro-step of every rank) is one global batch split into W near-equal micro-batches,
     rank r taking the r-th (a tail of 3 on 2 ranks: 2 + 1). Global batches smaller than W cannot give
     every rank a sample: they are cut together, in order, into steps of exactly W ids, one per rank, so
     ranks train on different buckets in the same step (ZeRO-2 needs one shape only inside a
     micro-batch). The L < W ids left over join the step whose micro-batches have the most room for them
     (`_host`); where none has room they take W - L ids from the end of the largest one-bucket step that
     keeps >= W (`_donor`) and make one more step of W, one id per rank, placed after it (`_join_small`).
Every rank has a non-empty micro-batch in every step, all ranks make the same number of steps, and no
micro-batch ever holds more than its bucket's m_b ids (trainer.micro_batch is sized to the memory, and a
deterministic plan would repeat an out-of-memory step on resume). Every id is in exactly one micro-batch
per epoch, except when no step can host or donate (every one-bucket step has < 2W - L ids; e.g.
micro_batch 1 and N not a multiple of W): then those L < W ids sit this epoch out (other ids each epoch,
as the plan is reshuffled), and the start-up summary counts them as unused. Steps 1 and 2 do not depend on how
G_b is split into micro_batch x W, so 1 rank x micro 4 and 2 ranks x micro 2 train on the same ids in
every step except those holding tails smaller than W and the host or donor of their leftover.

With source repeats (``repeats``, data/repeats.py) each epoch's bucket contents are its use ids, row ids
with a repeated image's further uses as row + copy * rows, drawn before step 1; without, the row ids.

Steps hold different numbers of samples (tails); the trainer weights each sample by 1 / (samples in the
optimizer step), a count every rank reads from the plan (`upcoming_samples`). The checkpoint state is a
few numbers (seed, epoch, position, samples done); a resume replans the epoch.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ztsnr_ds.data.buckets import parse_bucket_key
from ztsnr_ds.data.repeats import (
    EpochUses,
    SourceRepeats,
    images_per_source,
    seen_by_step,
    source_summary,
    source_table,
    unpack_sources,
)

logger = logging.getLogger(__name__)

Batch = tuple[str, list[int]]
RESUME_DATA = ("exact", "replan")


def bucket_micro_batches(keys: Sequence[str], micro_batch: int, base_area: int | None) -> np.ndarray:
    """Micro-batch of each bucket: m_b = max(1, floor(micro_batch * base_area / (h * w))), so pixels per
    micro-batch stay about micro_batch * base_area; base_area None gives micro_batch everywhere.
    Shape: (len(keys),) int64."""
    if base_area is None:
        return np.full(len(keys), micro_batch, dtype=np.int64)
    areas = np.array([h * w for h, w in map(parse_bucket_key, keys)], dtype=np.int64)
    return np.maximum(1, micro_batch * base_area // areas)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch for all W ranks: in step k rank r trains on ids[offsets[k*W + r] : offsets[k*W + r + 1]],
    all from bucket index bucket[k*W + r].

    Shape: ids (N,) int64, offsets (S*W + 1,) int64, bucket (S*W,) int64.
    """

    ids: np.ndarray
    offsets: np.ndarray
    bucket: np.ndarray
    world_size: int

    @property
    def steps(self) -> int:
        return len(self.bucket) // self.world_size

    def rank_plan(self, rank: int) -> RankPlan:
        """What one rank keeps: its own ids (about N / W) and the global sample count of every step."""
        w = self.world_size
        starts, lengths = self.offsets[rank:-1:w], np.diff(self.offsets)[rank::w]
        done = self.offsets[::w]  # (S + 1,) samples of all ranks before step k
        return RankPlan(_gather(self.ids, starts, lengths), np.r_[0, np.cumsum(lengths)],
                        self.bucket[rank::w], done)


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: step k is ids[offsets[k] : offsets[k + 1]] from bucket index bucket[k]; done[k] is
    the number of samples all ranks trained on before step k. Shape: (n,), (S + 1,), (S,), (S + 1,)."""

    ids: np.ndarray
    offsets: np.ndarray
    bucket: np.ndarray
    done: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.bucket)


def plan_epoch(buckets: Sequence[np.ndarray], micro_batches: np.ndarray, world_size: int,
               rng: np.random.Generator | None) -> EpochPlan:
    """The plan of the module docstring for buckets (index order) and per-bucket micro-batches;
    rng None keeps ids and batches in order. Needs sum of sizes >= world_size."""
    sizes = np.array([len(ids) for ids in buckets], dtype=np.int64)
    return plan_pool(np.concatenate(buckets), sizes, micro_batches, world_size, rng)


def plan_pool(pool: np.ndarray, sizes: np.ndarray, micro_batches: np.ndarray, world_size: int,
              rng: np.random.Generator | None) -> EpochPlan:
    """`plan_epoch` of the buckets laid out one after another in `pool` (sizes[b] ids each), which it
    permutes in place, bucket by bucket (the draws of ``rng.permutation`` of each bucket: one whole copy
    of the ids fewer). Shape: pool (N,), sizes (B,)."""
    if rng is not None:
        for first, end in zip((np.cumsum(sizes) - sizes).tolist(), np.cumsum(sizes).tolist()):
            rng.shuffle(pool[first:end])
    bucket, start, size = _global_batches(sizes, micro_batches * world_size)
    if rng is not None:
        order = rng.permutation(len(size))
        bucket, start, size = bucket[order], start[order], size[order]
    bucket, start, size, step = _join_small(bucket, start, size, micro_batches, world_size)
    parts, part_bucket = _split_steps(size, bucket, step, micro_batches, world_size)
    return EpochPlan(_gather(pool, start, size), np.r_[0, np.cumsum(parts)], part_bucket, world_size)


def _gather(pool: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """pool[starts[0] : starts[0] + lengths[0]] ++ pool[starts[1] : ...] ++ ..., without a Python loop."""
    before = np.cumsum(lengths) - lengths
    return pool[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]


def _global_batches(sizes: np.ndarray, global_batches: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bucket index, start in the concatenated pool, and size of every global batch, bucket by bucket:
    bucket b of n_b ids gives ceil(n_b / G_b) batches, the last one holding the rest. Shape: 3 x (T,)."""
    count = -(-sizes // global_batches)
    bucket = np.repeat(np.arange(len(sizes)), count)
    within = np.arange(len(bucket)) - np.repeat(np.cumsum(count) - count, count)  # batch index in bucket
    g = global_batches[bucket]
    start = np.repeat(np.cumsum(sizes) - sizes, count) + within * g
    return bucket, start, np.minimum(g, sizes[bucket] - within * g)


Piece = tuple[int, int, int]  # (bucket, start in the pool, size): a run of ids of one bucket in a step


def _join_small(bucket: np.ndarray, start: np.ndarray, size: np.ndarray, caps: np.ndarray,
                world_size: int) -> tuple[np.ndarray, ...]:
    """Steps of >= W ids from the global batches (in order): every batch of >= W ids is a step; the
    batches smaller than W (tails, at most one per bucket) are cut, in order, into steps of exactly W
    ids (one id per rank, so no micro-batch grows), each placed where its first tail was; the L < W ids
    left over join a step with room for them (`_host`), else get W - L ids of a `_donor` step and follow
    it as one more step of W, else wait for another epoch. Returns the pieces in step order and their step
    index. Python runs over the tails only; the one-batch steps stay arrays (key 2i: batch i's place).
    Shape: 4 x (P,)."""
    small = np.flatnonzero(size < world_size)
    if not len(small):
        return bucket, start, size, np.arange(len(size))
    big = np.flatnonzero(size >= world_size)  # the one-batch steps
    big_size = size[big]
    groups: dict[int, list[Piece]] = {}
    group: list[Piece] = []
    need, at = world_size, 0
    for i in small:  # Python over the tails only
        b, first, left = int(bucket[i]), int(start[i]), int(size[i])
        while left:
            at = at if group else int(i)
            take = min(left, need)
            group.append((b, first, take))
            first, left, need = first + take, left - take, need - take
            if not need:
                groups[2 * at], group, need = group, [], world_size
    host = _host(bucket[big], big_size, big, groups, group, caps, world_size) if group else None
    donor = _donor(big_size, big, need, world_size) if group and host is None else None
    if host is not None:
        groups[host] = groups.get(host, []) + group  # after the host's own pieces (stable sort below)
    elif donor is not None:  # the donor keeps size - need >= W ids: its micro-batches only shrink
        j = int(np.searchsorted(big, donor))
        big_size = big_size.copy()
        big_size[j] -= need
        groups[2 * donor + 1] = [(int(bucket[donor]), int(start[donor] + big_size[j]), need), *group]
    extra = np.array([(key, *piece) for key, pieces in groups.items() for piece in pieces],
                     dtype=np.int64).reshape(-1, 4).T
    key = np.r_[2 * big, extra[0]]
    order = np.argsort(key, kind="stable")
    key = key[order]
    step = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    return (np.r_[bucket[big], extra[1]][order], np.r_[start[big], extra[2]][order],
            np.r_[big_size, extra[3]][order], step)


def _donor(big_size: np.ndarray, big: np.ndarray, need: int, world_size: int) -> int | None:
    """The one-batch step that can give `need` ids and keep >= W: the largest, then the last; None if
    there is none (every step holds < W + need ids)."""
    if not len(big):
        return None
    best = int(big[big_size == big_size.max()].max())
    return best if int(big_size.max()) >= world_size + need else None


def _host(big_bucket: np.ndarray, big_size: np.ndarray, big: np.ndarray, groups: dict[int, list[Piece]],
          leftover: list[Piece], caps: np.ndarray, world_size: int) -> int | None:
    """A step whose W micro-batches can hold the leftover pieces too with none over its bucket's micro-batch
    (sum of ceil(size / m_b) over all pieces <= W): the one with the most spare micro-batches, then the
    fewest ids, then the last; None if no step has the room. Returns its key (`_join_small`)."""
    def slots(pieces: list[Piece]) -> int:
        return sum(-(-s // int(caps[b])) for b, _, s in pieces)

    room = world_size - slots(leftover)
    spare = room - (-(-big_size // caps[big_bucket]))  # the one-batch steps, vectorised
    fits = np.flatnonzero(spare >= 0)
    best = []
    if len(fits):
        j = fits[np.lexsort((big[fits], -big_size[fits], spare[fits]))[-1]]
        best.append((int(spare[j]), -int(big_size[j]), 2 * int(big[j])))
    best += [(room - slots(pieces), -sum(s for _, _, s in pieces), key) for key, pieces in groups.items()
             if room - slots(pieces) >= 0]
    return max(best, default=(0, 0, None))[2]


def _split_steps(size: np.ndarray, bucket: np.ndarray, step: np.ndarray, caps: np.ndarray,
                 world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Micro-batch sizes and buckets, W per step in rank order. A one-piece step of n ids gives rank r
    floor(n / W) + (r < n mod W) ids; steps of several pieces are split by `_split_pieces`.
    Shape: 2 x (S*W,)."""
    first = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
    members = np.diff(np.r_[first, len(size)])
    total = np.add.reduceat(size, first)[:, None]
    parts = total // world_size + (np.arange(world_size) < total % world_size)  # (S, W)
    part_bucket = np.repeat(bucket[first][:, None], world_size, axis=1)  # (S, W)
    for k in np.flatnonzero(members > 1):
        piece = slice(first[k], first[k] + members[k])
        parts[k], part_bucket[k] = _split_pieces(size[piece], bucket[piece], caps, world_size)
    return parts.ravel(), part_bucket.ravel()


def _split_pieces(size: np.ndarray, bucket: np.ndarray, caps: np.ndarray,
                  world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W micro-batches of a step of k <= W pieces (sum of sizes >= W): piece i gets n_i >= 1 of them, each
    further one going to the piece most over its bucket's micro-batch (then: the most ids per micro-batch),
    split near-equally. Where sum ceil(size / m_b) <= W (`_join_small` makes no other step) none ends over;
    a step of exactly W ids gets one id per micro-batch. Shape: (k,) -> 2 x (W,)."""
    n, cap = np.ones(len(size), dtype=np.int64), caps[bucket]
    for _ in range(world_size - len(size)):
        over = np.where(n < size, -(-size // n) - cap, np.iinfo(np.int64).min)
        best = np.flatnonzero(over == over.max())
        n[best[np.argmax(size[best] / n[best])]] += 1
    parts = np.concatenate([s // c + (np.arange(c) < s % c) for s, c in zip(size, n)])
    return parts, np.repeat(bucket, n)


class BucketBatchSampler:
    """Infinite iterator of (bucket key, ids of this rank's micro-batch); see the module docstring.

    buckets: bucket key "HxW" -> ids (a list or an int array; unique across buckets, order ignored).
    micro_batch: ids per rank per micro-step, at base_area when base_area is given (batch by area).
    seed: with the epoch, fixes the order. shuffle=False keeps ids and batches in sorted order.
    repeats: the cache's sources and their repeats per epoch; the iterator then yields use ids
    (data/repeats.py: the row is the id mod the cache's rows).
    resume_data: "exact" (continue the checkpoint's plan; refused when the buckets or repeats changed) or
    "replan" (a fresh plan of the data now, from the epoch after the checkpoint's; see load_state_dict).
    """

    def __init__(self, buckets: Mapping[str, Sequence[int] | np.ndarray], micro_batch: int, world_size: int,
                 rank: int, *, seed: int = 0, shuffle: bool = True, base_area: int | None = None,
                 repeats: SourceRepeats | None = None, resume_data: str = "exact") -> None:
        if resume_data not in RESUME_DATA:
            raise ValueError(f"trainer.resume_data = {resume_data!r} is not one of {', '.join(RESUME_DATA)}")
        if micro_batch < 1 or world_size < 1:
            raise ValueError(f"micro_batch={micro_batch} and world_size={world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        self.keys = sorted(str(key) for key in buckets)
        self._buckets = [_sorted_ids(buckets[key]) for key in self.keys]
        self.total = sum(len(ids) for ids in self._buckets)
        if self.total < world_size:
            raise ValueError(f"{self.total} cached samples cannot feed {world_size} ranks: use fewer ranks")
        _check_unique(self.keys, self._buckets)
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank
        self.global_batch = micro_batch * world_size
        self.seed, self.shuffle, self.base_area = seed, shuffle, base_area
        self.micro_batches = bucket_micro_batches(self.keys, micro_batch, base_area)
        self.repeats, self.resume_data, self._seen = repeats, resume_data, {}
        self._uses = EpochUses(self._buckets, repeats) if self._repeating else None
        images = self._uses.images if self._uses is not None else (
            images_per_source(self._buckets, repeats) if repeats is not None else None)
        self.sources = source_summary(images, repeats, world_size) if repeats is not None else None
        self._digest = _fingerprint(self.keys, self._buckets) + (repeats.digest() if self._repeating else "")
        first, self._seen[0] = self._planned(0)
        self.summary_dict = self._summarise(first)
        self._plans = {0: first.rank_plan(rank)}
        self.epoch, self.position = 0, 0

    # ---- the plan -------------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        """All ranks' plan of `epoch` (pure: the same on every rank)."""
        return self._planned(epoch)[0]

    def _planned(self, epoch: int) -> tuple[EpochPlan, np.ndarray | None]:
        """The plan of `epoch` and, with sources, its (steps + 1, sources) samples of each source before
        step k (all ranks; `seen_by_step`), read from the packed use ids with repeats."""
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch)) if self.shuffle else None
        if self._uses is None:
            plan = plan_epoch(self._buckets, self.micro_batches, self.world_size, rng)
            several = self.repeats is not None and len(self.repeats.names) > 1
            source = self.repeats.source[plan.ids] if several else None
        else:  # its own generator: the plan's draws stay those of a run without repeats
            pool, sizes = self._uses(np.random.default_rng([_epoch_seed(self.seed, epoch), 1]))
            plan = plan_pool(pool, sizes, self.micro_batches, self.world_size, rng)
            source = unpack_sources(plan.ids)
        if self.repeats is None:
            return plan, None
        return plan, seen_by_step(source, plan.offsets[::self.world_size], len(self.repeats.names))

    @property
    def _repeating(self) -> bool:
        return self.repeats is not None and bool((self.repeats.repeats != 1).any())

    def _rank_plan(self, epoch: int) -> RankPlan:
        """This rank's plan of `epoch`, kept for the current and the next epoch only."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= self.epoch}
            plan, seen = self._planned(epoch)
            self._plans[epoch] = plan.rank_plan(self.rank)
            self._seen = {e: v for e, v in self._seen.items() if e in self._plans} | {epoch: seen}
        return self._plans[epoch]

    def samples_seen(self) -> dict[str, int]:
        """{"seen/<source>": samples of that source all ranks trained on so far} (epochs before this one
        counted at today's uses per epoch); {} without sources. Read from the plan: no collective."""
        if self.sources is None:
            return {}
        now = self._seen[self.epoch][self.position] if self.epoch in self._seen else 0
        before = np.array([s["uses_per_epoch"] for s in self.sources.values()]) * self.epoch
        seen = zip(self.sources, before + now, strict=True)
        return {f"seen/{name or 'default'}": int(n) for name, n in seen}

    def __len__(self) -> int:
        """Steps (micro-steps of every rank) in the current epoch; tail joins make it vary by a few."""
        return self._rank_plan(self.epoch).steps

    def upcoming_samples(self, steps: int) -> int:
        """Samples all ranks train on in the next `steps` steps, read from the plan (no collective)."""
        total, epoch, position = 0, self.epoch, self.position
        while steps > 0:
            plan = self._rank_plan(epoch)
            take = min(steps, plan.steps - position)
            total += int(plan.done[position + take] - plan.done[position])
            steps, epoch, position = steps - take, epoch + 1, 0
        return total

    # ---- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        plan = self._rank_plan(self.epoch)
        if self.position >= plan.steps:
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._rank_plan(self.epoch)
            if self.sources is not None:
                logger.info("epoch %d: %s", self.epoch, "; ".join(
                    f"{name}: {s['uses_per_epoch']} samples, {s['uses_per_epoch'] * self.epoch} seen so far"
                    for name, s in self.sources.items()))
        k = self.position
        self.position += 1
        ids = plan.ids[plan.offsets[k] : plan.offsets[k + 1]].tolist()  # host list of one micro-batch only
        return self.keys[plan.bucket[k]], ids

    # ---- reporting ------------------------------------------------------------------------------

    def _summarise(self, plan: EpochPlan) -> dict[str, Any]:
        """JSON-able facts per bucket: images, micro-batch, global batches, how the tail trains."""
        micro_batches = np.bincount(plan.bucket, minlength=len(self.keys))
        buckets = {}
        for b, key in enumerate(self.keys):
            n, g = len(self._buckets[b]), int(self.micro_batches[b]) * self.world_size
            tail = n % g
            buckets[key] = {"images": n, "micro_batch": int(self.micro_batches[b]), "global_batch": g,
                            "full_global_batches": n // g, "tail": tail,
                            "tail_joined_with_other_buckets": 0 < tail < self.world_size,
                            "micro_batches_epoch0": int(micro_batches[b])}
        unused = self.total - len(plan.ids) if self.sources is None else sum(
            s["images"] - s["distinct_per_epoch"] for s in self.sources.values())
        return {"images": self.total, "used_per_epoch": len(plan.ids), "unused": unused,
                **({"sources": self.sources} if self.sources is not None else {}),
                "world_size": self.world_size, "micro_batch": self.micro_batch,
                "batch_by_area_base": self.base_area, "steps_epoch0": plan.steps, "buckets": buckets}

    def summary(self) -> str:
        """Start-up report: one line per bucket, then the totals."""
        s = self.summary_dict
        lines = [f"{'bucket':>11} {'images':>8} {'micro':>6} {'global':>7} {'full':>6} {'tail':>5}  tail is"]
        for key, b in s["buckets"].items():
            joined = b["tail_joined_with_other_buckets"]
            how = "-" if not b["tail"] else "joined with other buckets" if joined else "a smaller step"
            lines.append(f"{key:>11} {b['images']:>8} {b['micro_batch']:>6} {b['global_batch']:>7} "
                         f"{b['full_global_batches']:>6} {b['tail']:>5}  {how}")
        area = f", batch by area at {s['batch_by_area_base']} px" if s["batch_by_area_base"] else ""
        lines.append(f"{s['images']} images in {len(s['buckets'])} buckets, {s['used_per_epoch']} used per "
                     f"epoch, {s['unused']} unused; {s['steps_epoch0']} steps in epoch 0 (micro_batch "
                     f"{self.micro_batch} x {self.world_size} ranks{area})")
        return "\n".join(lines + (source_table(self.sources) if self.sources is not None else []))

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: a few numbers (the plan is recomputed from them on resume)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "samples_done": int(self._rank_plan(self.epoch).done[self.position]),
                "global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "world_size": self.world_size, "base_area": self.base_area, "shuffle": self.shuffle,
                "buckets_digest": self._digest}

    def same_global_batches(self, state: dict[str, Any]) -> bool:
        """True if `state`'s run cut the same global batches (same micro_batch x world size per bucket)."""
        return (state.get("global_batch"), state.get("base_area")) == (self.global_batch, self.base_area)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. With the same micro_batch, world size and base_area this is
        exact. Otherwise the epoch is kept and the position is the last step boundary of this sampler's
        plan at or before the samples `state` had done: exact where the boundaries agree (the same global
        batch on another world size, outside joined tails); else some samples of this epoch repeat or
        are skipped. Raises ValueError for other bucket contents, another shuffle flag or an old state.
        The saved seed wins over the constructor's. With resume_data "replan" see `_replan`."""
        if self.resume_data == "replan":
            self._replan(state)
            return
        self._check_resumable(state)
        if state["seed"] != self.seed:
            logger.warning("sampler seed %s replaced by the checkpoint's seed %s", self.seed, state["seed"])
            self.seed, self._plans = int(state["seed"]), {}
        self.epoch = int(state["epoch"])
        plan = self._rank_plan(self.epoch)
        same = all(state[k] == getattr(self, k) for k in ("micro_batch", "world_size", "base_area"))
        position = int(state["position"]) if same else int(
            np.searchsorted(plan.done, state["samples_done"], side="right") - 1)
        if not 0 <= position <= plan.steps:
            raise ValueError(f"cannot resume: position {position} outside [0, {plan.steps}]")
        self.position = position
        if not same:
            self._warn_inexact(state)

    def _warn_inexact(self, state: dict[str, Any]) -> None:
        """Warn with counts when the saved run's plan (its micro_batch, world size, base_area) had trained
        other ids of this epoch than this plan puts before the resumed position (tails cut otherwise)."""
        rng = np.random.default_rng(_epoch_seed(self.seed, self.epoch)) if self.shuffle else None
        caps = bucket_micro_batches(self.keys, int(state["micro_batch"]), state["base_area"])
        old = plan_epoch(self._buckets, caps, int(state["world_size"]), rng)
        new = self.plan(self.epoch)
        before_old = old.ids[:old.offsets[int(state["position"]) * old.world_size]]
        cut = new.offsets[self.position * self.world_size]
        repeated = len(np.intersect1d(before_old, new.ids[cut:]))
        skipped = len(np.setdiff1d(new.ids[:cut], before_old))
        if repeated or skipped:
            warnings.warn(
                f"resumed on {self.world_size} ranks x micro_batch {self.micro_batch} from a run of "
                f"{state['world_size']} x {state['micro_batch']}: the plans cut this epoch's tails "
                f"differently, so {repeated} samples trained before the checkpoint come again and {skipped} "
                "are skipped until the next epoch (keep world size and micro_batch: an exact continuation)",
                stacklevel=3)

    def _replan(self, state: dict[str, Any]) -> None:
        """Continue on the data as it is now (a grown or changed cache, other repeats): the saved seed, a
        fresh plan from the epoch after the checkpoint's (its own epoch when it had not started it); the
        rest of the checkpoint's epoch is not trained. Logged, with what changed."""
        saved_epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
        self.seed, self._plans = int(state.get("seed", self.seed)), {}
        self.epoch, self.position = saved_epoch + (position > 0), 0
        changed = "unchanged" if state.get("buckets_digest") == self._digest else "changed"
        if self.rank == 0:
            logger.warning("trainer.resume_data = replan: the checkpoint stopped at step %d of epoch %d; a "
                           "fresh plan of the current data (%s since the checkpoint, %d steps an epoch) "
                           "starts at epoch %d", position, saved_epoch, changed,
                           self._rank_plan(self.epoch).steps, self.epoch)

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if "samples_done" not in state:
            raise ValueError("cannot resume: the sampler state comes from the earlier carry-over sampler, "
                             "whose plan no longer exists; start a new run (trainer.resume: none)")
        if state["shuffle"] != self.shuffle:
            raise ValueError(f"cannot resume: shuffle was {state['shuffle']}, now {self.shuffle}")
        if state["buckets_digest"] != self._digest:
            raise ValueError(
                f"cannot resume: bucket contents changed (digest {state['buckets_digest'][:12]} saved, "
                f"{self._digest[:12]} now); rebuild the cache as it was, start a new run, or continue this "
                "one on the data as it is now with trainer.resume_data: replan")


def _epoch_seed(seed: int, epoch: int) -> int:
    """RNG seed of one epoch; hashed so that nearby (seed, epoch) pairs give unrelated orders."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


def _sorted_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Ids as a sorted int64 array (no copy for the cache's sorted int64 arrays)."""
    array = np.asarray(ids, dtype=np.int64).reshape(-1)
    return np.sort(array) if (array[1:] < array[:-1]).any() else array


def _fingerprint(keys: Sequence[str], buckets: Sequence[np.ndarray]) -> str:
    """Digest of the bucket contents: BLAKE2b over keys, sizes and the ids' little-endian int64 bytes."""
    digest = hashlib.blake2b(digest_size=32)
    for key, ids in zip(keys, buckets):
        digest.update(f"{key}:{len(ids)};".encode())
        digest.update(ids.astype("<i8", copy=False))  # the buffer itself: no bytes copy
    return digest.hexdigest()


def _check_unique(keys: Sequence[str], buckets: Sequence[np.ndarray]) -> None:
    """ValueError naming a repeated id and its buckets (one sort of all ids)."""
    every = np.sort(np.concatenate(buckets))
    repeated = every[1:][every[1:] == every[:-1]]
    if len(repeated):
        where = [key for key, ids in zip(keys, buckets) if (ids == repeated[0]).any()]
        raise ValueError(f"id {int(repeated[0])} is listed more than once (buckets {where}); "
                         "ids must be unique across buckets")
