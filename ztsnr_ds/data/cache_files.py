"""The latent cache's files on disk: names, the error type, atomic writes.

Layout of ``cache_dir``::

    index.json       the training index: format, row count, shards (name, sha256, bytes, bucket, count),
                     bucket keys, and the folder of the current columns -- see data/index.py
    index-<id>/      memory-mapped columns of the index (.npy, plus UTF-8 blobs for keys and captions)
    manifest.jsonl   one row per cached image, sorted by key: the human-readable record; the build reads
                     it to reuse shards, training never does
    shards.json      {"format", "fingerprint", "cache_text", "shards": {name: {"sha256", "bytes", "bucket",
                     "count"}}}: the build's record of whole-shard sha256s
    report.json      counts, bad images with reasons, scan problems, corrupt shards that were rebuilt,
                     captions per token and chunk count (docs/long-captions.md)
    shards/NAME.safetensors
                     one bucket per shard: "latents" (n, 4, h/8, w/8) bf16, already * vae scaling_factor;
                     with cache_text also "embeds" (n, 77 K, D) (zero-padded to the shard's most chunks K),
                     "pooled" (n, P) bf16 and "text_chunks" (n,) uint8 (docs/long-captions.md)
    parts/           per-rank progress, rows (key-sorted JSONL) and summaries of a build in flight;
                     removed by the merge
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

MANIFEST = "manifest.jsonl"
SHARDS = "shards.json"
REPORT = "report.json"
INDEX = "index.json"
SHARD_DIR = "shards"
PARTS_DIR = "parts"

FORMAT = 1
"""Version of the shard tensors and manifest rows; part of the settings fingerprint (a change re-encodes)."""
INDEX_FORMAT = 2
"""Version of index.json and its columns (format 1 caches had only manifest.jsonl + shards.json)."""
HEADER_RESERVE = 4096
"""Bytes of a shard kept for the safetensors header (three tensor entries + metadata: < 1 KiB)."""
REBUILD_HINT = "re-run `python launch/cache.py --config <your yaml>`; it rebuilds corrupt or missing shards"


class CacheError(RuntimeError):
    """A cache file that cannot be trusted (missing, corrupt, or from an incomplete build)."""


def shard_path(root: Path, name: str) -> Path:
    return root / SHARD_DIR / f"{name}.safetensors"


def part_path(root: Path, rank: int, world_size: int) -> Path:
    """A rank's build summary; written last, so its presence means the rank finished (data/cache_parts.py)."""
    return root / PARTS_DIR / f"rank{rank}-of-{world_size}.json"


def part_rows_path(root: Path, rank: int, world_size: int) -> Path:
    """A rank's manifest rows, one JSON object a line, sorted by key."""
    return root / PARTS_DIR / f"rank{rank}-of-{world_size}.rows.jsonl"


@contextmanager
def synced(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for writing, flushed and fsynced when the block ends."""
    with open(path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary file to stream into; when the block ends it is fsynced and os.replace'd onto ``path``
    (readers see the old or the new file, never half); on an error it is removed and ``path`` kept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with synced(tmp) as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    sync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data)


def sync_dir(folder: Path) -> None:
    """fsync a folder: a rename inside it is durable only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CacheError naming the file and the fix when it is missing or damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path} not found ({what}); {REBUILD_HINT}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path} is damaged ({what}: {err}); {REBUILD_HINT}") from None
    if not isinstance(value, dict):
        raise CacheError(f"{path} is damaged ({what}: not a JSON object); {REBUILD_HINT}")
    return value


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a JSON-lines file, one at a time; CacheError naming the file and line of a damaged one."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CacheError(f"{path}:{lineno} is damaged ({err}); {REBUILD_HINT}") from None


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a JSON-lines file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path))
