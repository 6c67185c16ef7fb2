"""A rank's part of a build: its manifest rows and its summary, written by the rank, read by the merge.

The rows go to ``parts/rank{r}-of-{w}.rows.jsonl``, one JSON object a line, sorted by key, so rank 0
merges every rank's rows in key order with a k-way merge holding one row per rank, never a whole
dataset of dicts. The summary (``rank{r}-of-{w}.json``: settings fingerprint, scan digest, counts,
shards, bad images, scan problems) is written after the rows: its presence means the rank finished.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path

from ztsnr_ds.data.cache_files import (
    REBUILD_HINT,
    CacheError,
    atomic_file,
    iter_jsonl,
    part_path,
    part_rows_path,
    read_json,
    write_atomic,
)


def write_part(root: Path, rank: int, world_size: int, summary: dict, rows: list[dict]) -> None:
    """This rank's rows (sorted here by key) and then its summary, with ``"rows"`` set to their count."""
    rows = sorted(rows, key=lambda row: row["key"])
    with atomic_file(part_rows_path(root, rank, world_size)) as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
    write_atomic(part_path(root, rank, world_size), json.dumps({**summary, "rows": len(rows)}).encode())


def read_summaries(root: Path, world_size: int) -> list[dict]:
    """Every rank's summary; CacheError when a rank has not finished or the parts disagree."""
    paths = [part_path(root, rank, world_size) for rank in range(world_size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CacheError(f"cannot merge {root}: no result from {', '.join(missing)} (did every rank finish?)")
    parts = [read_json(p, "a rank's build result") for p in paths]
    if len({(p["fingerprint"], p["scan"], p["cache_text"]) for p in parts}) != 1:
        raise CacheError(f"cannot merge {root}: the parts come from different settings or scans "
                         f"(stale parts of an earlier build?); {REBUILD_HINT}")
    return parts


def part_rows(root: Path, world_size: int) -> Iterator[dict]:
    """Every rank's rows, rank by rank (for passes where the order does not matter)."""
    for rank in range(world_size):
        yield from iter_jsonl(part_rows_path(root, rank, world_size))


def merged_rows(root: Path, world_size: int) -> Iterator[dict]:
    """Every rank's rows in key order (heapq k-way merge of the key-sorted parts); CacheError when a key
    repeats or a part is out of order (parts of different builds)."""
    streams = [iter_jsonl(part_rows_path(root, rank, world_size)) for rank in range(world_size)]
    previous = None
    for row in heapq.merge(*streams, key=lambda r: r["key"]):
        if previous is not None and row["key"] <= previous:
            raise CacheError(f"cannot merge {root}: key {row['key']!r} after {previous!r} (repeated or out "
                             f"of order: parts of different builds?); {REBUILD_HINT}")
        previous = row["key"]
        yield row
