"""Corrupt samples met while training: skipped and reported, up to a cap; past it the run saves and stops.

A sample whose bytes fail their CRC-32 (or whose shard vanished or was cut short) mid-run is not worth a
lost run: the reader (`LatentCache.batch`) puts a readable sample of the same bucket in its place with
tag weight 0, so it adds nothing to the loss or the gradient and every shape and collective stays as
planned, and reports it here. Past `limit` skipped samples `stop` turns true; the trainer's per-step
stop agreement then saves a checkpoint on every rank and ends the run, and the launcher exits with
status 2 and the command that rebuilds the shards (`message`). No step since the last save is lost.
"""

from __future__ import annotations

import sys

from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError


class SampleFaults:
    """This rank's count of corrupt samples skipped; `stop` once more than `limit` were met."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.shards = limit, 0, set()

    @property
    def stop(self) -> bool:
        return self.count > self.limit

    def record(self, err: CacheError, sample_id: int) -> None:
        """Report one corrupt sample (stderr: one line with the shard, id and key from `err`)."""
        self.count += 1
        print(f"warning: skipped sample id {sample_id} ({self.count} so far, at most trainer.max_bad_samples "
              f"= {self.limit} before the run saves and stops): {err}", file=sys.stderr, flush=True)

    def message(self) -> str:
        return (f"{self.count} corrupt cache samples met (trainer.max_bad_samples = {self.limit}): the run "
                f"saved a checkpoint and stopped; {REBUILD_HINT}, then resume (the next start also lists "
                "missing shards)")
