"""Distributed bucket batch sampler: one bucket per global batch, deterministic, resumable mid-epoch.

Epoch plan (a pure function of seed, epoch, the bucket contents and the carry from the previous
epoch), with G = micro_batch * world_size:
  for each bucket, in sorted key order:
      pool = carried ids of this bucket (first) + shuffled remaining ids
      cut the pool into full global batches of G; the < G leftovers are carried to the next epoch
  shuffle the list of global batches, which interleaves buckets randomly.
Rank r takes ids [r * micro_batch, (r + 1) * micro_batch) of every global batch, so all ranks are in
the same bucket at every step and every id is used at most once per epoch across ranks; the only
ids an epoch skips are the ones it carries, which open the next epoch's pool of their bucket.

The position counts global batches, so a checkpoint resumes on another world size as long as
G = micro_batch * world_size stays the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

Batch = tuple[str, list[int]]
Carry = dict[str, list[int]]


class BucketBatchSampler:
    """Infinite iterator of (bucket_key, ids of this rank) with len(ids) == micro_batch.

    buckets: bucket key -> sample ids (ids unique across buckets; the order inside a list is ignored).
    seed: with the epoch number, fixes the order. shuffle=False keeps ids and buckets in sorted order.
    A bucket with fewer than G ids never fills a global batch: its ids are carried forever and listed
    in ``samples_never_used`` (a warning is logged once).
    """

    def __init__(
        self,
        buckets: dict[str, list[int]],
        micro_batch: int,
        world_size: int,
        rank: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if micro_batch < 1 or world_size < 1:
            raise ValueError(f"micro_batch={micro_batch} and world_size={world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        self.buckets = {str(key): sorted(int(i) for i in ids) for key, ids in sorted(buckets.items())}
        _check_unique(self.buckets)
        self._buckets_digest = hashlib.sha256(json.dumps(self.buckets).encode()).hexdigest()
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank
        self.global_batch = micro_batch * world_size
        self.seed, self.shuffle = seed, shuffle
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds a full global batch of {self.global_batch}: {self.summary()}")
        if self.samples_never_used:
            logger.warning("%s", self.summary())
        self._start_epoch(0, {})

    # ---- static facts of the bucket set ---------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (= optimizer micro-steps of every rank) per epoch."""
        return sum(len(ids) // self.global_batch for ids in self.buckets.values())

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def carried_count(self) -> int:
        """Ids each epoch leaves for the next one (sum over buckets of size mod G; the same every epoch)."""
        return sum(len(ids) % self.global_batch for ids in self.buckets.values())

    @property
    def samples_never_used(self) -> dict[str, list[int]]:
        """Ids of buckets smaller than one global batch: carried forever, never trained on."""
        return {key: ids for key, ids in self.buckets.items() if 0 < len(ids) < self.global_batch}

    def summary(self) -> str:
        """One log line: sizes, batches per epoch, carried and never-used ids."""
        never = self.samples_never_used
        line = (
            f"{len(self.buckets)} buckets, {sum(map(len, self.buckets.values()))} samples, global batch "
            f"{self.global_batch} (micro {self.micro_batch} x world {self.world_size}), "
            f"{self.batches_per_epoch} batches/epoch, {self.carried_count} carried to the next epoch"
        )
        if never:
            listed = ", ".join(f"{key} ({len(ids)})" for key, ids in never.items())
            line += f", {sum(map(len, never.values()))} never used (buckets smaller than G: {listed})"
        return line

    # ---- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= len(self._plan):
            self._start_epoch(self.epoch + 1, self._carry_out)
        key, ids = self._plan[self.position]
        self.position += 1
        start = self.rank * self.micro_batch
        return key, ids[start : start + self.micro_batch]

    def _start_epoch(self, epoch: int, carry_in: Carry) -> None:
        self.epoch, self.position, self._carry_in = epoch, 0, carry_in
        self._plan, self._carry_out = self._plan_epoch(epoch, carry_in)

    def _plan_epoch(self, epoch: int, carry_in: Carry) -> tuple[list[Batch], Carry]:
        """Global batches of ``epoch`` and the ids it carries to the next (see the module docstring)."""
        rng = random.Random(_epoch_seed(self.seed, epoch))
        batches: list[Batch] = []
        carry_out: Carry = {}
        g = self.global_batch
        for key, ids in self.buckets.items():
            carried = carry_in.get(key, [])
            skip = set(carried)
            fresh = [i for i in ids if i not in skip]
            if self.shuffle:
                rng.shuffle(fresh)
            pool = carried + fresh
            full = len(pool) // g * g
            batches += [(key, pool[i : i + g]) for i in range(0, full, g)]
            if full < len(pool):
                carry_out[key] = pool[full:]
        if self.shuffle:
            rng.shuffle(batches)
        return batches, carry_out

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: seed, epoch, position (global batches done this epoch), carry into this epoch."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "carry": {key: list(ids) for key, ids in self._carry_in.items()},
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "buckets_digest": self._buckets_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` stopped: the same future global batches, sliced for this rank.

        Needs the same global batch (micro_batch * world_size may be split differently), the same
        shuffle flag and the same bucket contents; otherwise raises ValueError naming both values.
        The saved seed wins over the constructor's.
        """
        self._check_resumable(state)
        if state["seed"] != self.seed:
            logger.warning("sampler seed %s replaced by the checkpoint's seed %s", self.seed, state["seed"])
        self.seed = int(state["seed"])
        carry = {str(key): [int(i) for i in ids] for key, ids in state["carry"].items()}
        self._start_epoch(int(state["epoch"]), carry)
        if not 0 <= state["position"] <= len(self._plan):
            raise ValueError(f"cannot resume: position {state['position']} outside [0, {len(self._plan)}]")
        self.position = int(state["position"])

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"cannot resume: global batch (micro_batch x world_size) was {state['global_batch']} "
                f"({state['micro_batch']} x {state['world_size']}), now {self.global_batch} "
                f"({self.micro_batch} x {self.world_size}); positions count global batches, keep the product"
            )
        if state["shuffle"] != self.shuffle:
            raise ValueError(f"cannot resume: shuffle was {state['shuffle']}, now {self.shuffle}")
        if state["buckets_digest"] != self._buckets_digest:
            raise ValueError(
                f"cannot resume: bucket contents changed (digest {state['buckets_digest'][:12]} saved, "
                f"{self._buckets_digest[:12]} now); rebuild the cache as it was or start a new run"
            )


def _epoch_seed(seed: int, epoch: int) -> int:
    """RNG seed of one epoch; hashed so that nearby (seed, epoch) pairs give unrelated orders."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


def _check_unique(buckets: dict[str, list[int]]) -> None:
    seen: set[int] = set()
    for key, ids in buckets.items():
        repeated = seen.intersection(ids) or (len(set(ids)) < len(ids))
        if repeated:
            raise ValueError(f"bucket {key!r} repeats ids already listed (ids must be unique across buckets)")
        seen.update(ids)
