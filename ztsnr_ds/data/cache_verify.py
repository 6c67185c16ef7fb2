"""``launch/cache.py --verify``: every index column file's sha256 (data/index_sums.py), every shard's
sha256 and every sample's CRC-32, read once, on threads (and split over ranks when launched on several),
with a progress bar and a report."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import safetensors.torch
from tqdm import tqdm

from ztsnr_ds.data.cache_files import shard_path
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.shards import CHECKSUMS, read_shard, sample_checksums


def verify_cache(root: Path, rank: int = 0, world_size: int = 1, workers: int = 4,
                 progress: bool = True) -> dict:
    """Check this rank's shards (every world_size-th); returns {"shards", "bytes", "samples", "problems"}
    where each problem names the shard and, for a sample, its id, key and position."""
    index = CacheIndex(root)
    order = np.argsort(index.columns["shard"], kind="stable")
    starts = np.searchsorted(index.columns["shard"][order], np.arange(len(index.shards) + 1))
    mine = list(range(rank, len(index.shards), world_size))

    def check(s: int) -> tuple[int, list[dict]]:
        ids = order[starts[s]:starts[s + 1]]
        return _check_shard(root, index, s, ids)

    problems: list[dict] = [{"column": p} for p in index.column_problems(rank, world_size)]
    if index.column_sums is None and rank == 0:
        problems.append({"column": f"{index.folder}: no column checksums (indexed by an older version); "
                                   f"write them with `python launch/cache.py --cache_dir {root} --convert`"})
    samples = 0
    with ThreadPoolExecutor(workers) as pool:
        for checked, found in tqdm(pool.map(check, mine), total=len(mine), disable=not progress,
                                   desc="verify shards", unit="shard"):
            samples += checked
            problems += found
    return {"shards": len(mine), "bytes": sum(index.shards[s]["bytes"] for s in mine), "samples": samples,
            "problems": problems}


def _check_shard(root: Path, index: CacheIndex, s: int, ids: np.ndarray) -> tuple[int, list[dict]]:
    info = index.shards[s]
    data, problem = read_shard(shard_path(root, info["name"]), info["sha256"])
    found = [] if problem is None else [{"shard": info["name"], "reason": problem}]
    if data is None:
        return 0, found
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # a damaged header: nothing in the shard can be checked
        return 0, found + [{"shard": info["name"], "reason": f"unreadable: {err}"}]
    columns = [c for c in CHECKSUMS if c in index.columns]
    count = len(tensors.get("latents", ()))
    for i in ids:
        position = int(index.columns["index"][i])
        if not 0 <= position < count:  # a shard swapped for another of fewer samples
            found.append({"shard": info["name"], "reason": f"sample {position} beyond the shard's {count}",
                          "id": int(i), "key": index.key(i), "index": position})
            continue
        actual = sample_checksums(tensors, position)
        found += [{"shard": info["name"], "reason": f"{column} mismatch", "id": int(i), "key": index.key(i),
                   "index": position}
                  for column in columns if actual.get(column) != int(index.columns[column][i])]
    return len(ids), found
