"""The training run's start-up check of its latent cache, split over the ranks.

Before any model loads on the trainer side: every index column file against its sha256
(data/index_sums.py) and every shard file present with the size the index records. Each rank checks
every world_size-th file, the problems are gathered, and every rank raises the same CacheError naming
the files and the rebuild command: a deleted shard is found at start-up, not at step 3. Mid-run faults
are SampleFaults' (data/sample_faults.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ztsnr_ds.data.cache import LatentCache
from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError, shard_path
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.sample_faults import SampleFaults
from ztsnr_ds.engine import DistInfo

SHOWN = 10  # problems quoted in the error; the rest are counted


def shard_problems(root: Path, index: CacheIndex, rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's share of the shards (every world_size-th): missing, or another size than recorded."""
    problems = []
    for info in index.shards[rank::world_size]:
        path = shard_path(root, info["name"])
        size = path.stat().st_size if path.is_file() else None
        if size != info["bytes"]:
            problems.append(f"{path} is missing" if size is None
                            else f"{path} has {size} bytes, the index records {info['bytes']}")
    return problems


def open_cache(cache_dir: str | Path, max_bad_samples: int, dist: DistInfo) -> LatentCache:
    """Collective: the run's cache (corrupt samples met later skipped up to max_bad_samples), checked."""
    cache = LatentCache(cache_dir, SampleFaults(max_bad_samples))
    mine = (cache.index.column_problems(dist.rank, dist.world_size)
            + shard_problems(cache.root, cache.index, dist.rank, dist.world_size))
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, mine)  # short strings, once at start-up
    if problems := [p for part in gathered for p in part]:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise CacheError(f"data.cache_dir {cache.root} fails its start-up check: "
                         f"{'; '.join(problems[:SHOWN])}{more}; {REBUILD_HINT}")
    return cache
