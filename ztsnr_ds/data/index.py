"""The cache index: what training reads per sample, as memory-mapped numpy columns.

Every rank ``np.load(..., mmap_mode="r")``s the same files, so the OS page cache holds one copy per
machine and a rank's private memory does not grow with the dataset (numpy ``.npy`` rather than Arrow:
fixed-width columns need nothing more, and captions and keys are one UTF-8 blob each plus int64
offsets -- the layout of an Arrow string column -- so no extra dependency is needed to read them).

``index.json`` names the current column folder ``index-<id>/``; a rewrite fills a new folder and then
swaps the pointer atomically, so a crash leaves the old index or the new one. Every file of the folder
has its sha256 in ``index-<id>/checksums.json`` and index.json is sealed (data/index_sums.py).

Columns (N rows, id = row number, rows sorted by key):
    shard (N,) int32       position in index.json "shards"      index (N,) int32   sample in its shard
    bucket (N,) int32      position in index.json "buckets"     time_ids (N, 6) int32
    weight (N,) float32    tag-frequency weight, mean 1         crc32 (N,) uint32  of the latent bytes
    crc32_text (N,) uint32 of embeds + pooled (cached text only)
    source (N,) int16      position in index.json "sources" (data/source_mix.py); an index without it
                           (built before data.sources) reads as one source named ""
    key_hash (N,) uint64   first 8 bytes (little-endian) of BLAKE2b(key): a stable per-image number
    by_bucket (N,) int64   ids grouped by bucket, ascending inside each; bucket b is
                           by_bucket[bucket_starts[b]:bucket_starts[b + 1]] (bucket_starts in index.json)
    keys.bin, captions.bin (UTF-8) with key_offsets, caption_offsets (N + 1,) int64
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ztsnr_ds import integrity
from ztsnr_ds.data import index_sums
from ztsnr_ds.data.cache_files import (
    INDEX,
    INDEX_FORMAT,
    MANIFEST,
    REBUILD_HINT,
    SHARDS,
    CacheError,
    read_json,
    sync_dir,
    synced,
    write_atomic,
)

CONVERT_HINT = "convert it once with `python launch/cache.py --convert --cache_dir {root}`"
COLUMN_TYPES: dict[str, tuple[type, tuple[int, ...]]] = {
    "shard": (np.int32, ()), "index": (np.int32, ()), "bucket": (np.int32, ()), "time_ids": (np.int32, (6,)),
    "weight": (np.float32, ()), "crc32": (np.uint32, ()), "key_hash": (np.uint64, ()),
    "crc32_text": (np.uint32, ()), "source": (np.int16, ()),
}
"""dtype and per-row shape of every fixed-width column but by_bucket (crc32_text only with cached text,
source only in indexes that list their sources)."""
_ROW_COLUMNS = tuple(name for name in COLUMN_TYPES if name not in ("crc32_text", "source"))
"""Columns every index has, one entry per row."""


def key_hash(key: str) -> int:
    """h(key) = first 8 bytes of BLAKE2b(utf-8 key) as a little-endian unsigned 64-bit integer."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """:func:`key_hash` of every key. Shape (len(keys),) uint64."""
    return np.fromiter(map(key_hash, keys), dtype=np.uint64, count=len(keys))


def write_index(root: Path, rows: Sequence[dict], shards: dict[str, dict], cache_text: bool,
                fingerprint: str) -> None:
    """The index of ``rows`` (dicts in id order: shard, index, bucket, time_ids, weight, crc32[, crc32_text],
    key, caption): their columns, then :func:`write_columns`."""
    names = list(shards)
    shard_pos = {name: i for i, name in enumerate(names)}
    bucket_keys = sorted({info["bucket"] for info in shards.values()})
    bucket_pos = {key: i for i, key in enumerate(bucket_keys)}
    n = len(rows)
    columns = {
        "shard": np.fromiter((shard_pos[r["shard"]] for r in rows), np.int32, n),
        "index": np.fromiter((r["index"] for r in rows), np.int32, n),
        "bucket": np.fromiter((bucket_pos[r["bucket"]] for r in rows), np.int32, n),
        "time_ids": np.array([r["time_ids"] for r in rows], dtype=np.int32).reshape(n, 6),
        "weight": np.fromiter((r["weight"] for r in rows), np.float32, n),
        "crc32": np.fromiter((r["crc32"] for r in rows), np.uint32, n),
        "key_hash": key_hashes([r["key"] for r in rows]),
    }
    if cache_text:
        columns["crc32_text"] = np.fromiter((r["crc32_text"] for r in rows), np.uint32, n)
    texts = {"keys": utf8_column([r["key"] for r in rows]),
             "captions": utf8_column([r["caption"] for r in rows])}
    write_columns(root, columns, texts, [{"name": name, **shards[name]} for name in names], bucket_keys,
                  cache_text, fingerprint)


def write_columns(root: Path, columns: dict[str, np.ndarray], texts: dict[str, tuple[bytes, np.ndarray]],
                  shards: list[dict], bucket_keys: list[str], cache_text: bool, fingerprint: str) -> None:
    """Write ``columns`` (the fixed-width ones of the module docstring but by_bucket) and ``texts``
    ({"keys", "captions"}: (UTF-8 blob, offsets)) into a new ``index-<id>/`` folder, then swap index.json
    to it and remove older folders. ``shards`` in the order the shard column counts them."""
    folder = _new_folder(root)
    for name, (blob, offsets) in texts.items():
        with synced(folder / f"{name[:-1]}_offsets.npy") as f:
            np.save(f, offsets)
        with synced(folder / f"{name}.bin") as f:
            f.write(blob)
    _finish(root, folder, columns, shards, bucket_keys, cache_text, fingerprint)


def _new_folder(root: Path) -> Path:
    folder = root / f"index-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def _finish(root: Path, folder: Path, columns: dict[str, np.ndarray], shards: list[dict],
            bucket_keys: list[str], cache_text: bool, fingerprint: str,
            sources: list[str] | None = None) -> None:
    """Save the fixed-width columns and by_bucket into ``folder`` (its text blobs already there), point
    index.json at it and remove older folders. ``sources``: the names the source column counts."""
    bucket = columns["bucket"]
    columns = {**columns, "by_bucket": np.argsort(bucket, kind="stable").astype(np.int64)}
    starts = np.searchsorted(bucket[columns["by_bucket"]], np.arange(len(bucket_keys) + 1))
    for name, values in columns.items():
        with synced(folder / f"{name}.npy") as f:
            np.save(f, values)
    sums = index_sums.write_sums(folder)  # every file of the folder, before the marker index.json
    sync_dir(folder)
    meta = {"format": INDEX_FORMAT, "folder": folder.name, "rows": len(bucket), "fingerprint": fingerprint,
            "cache_text": cache_text, "shards": shards, "buckets": bucket_keys,
            "bucket_starts": starts.tolist(), index_sums.SUMS_KEY: sums,
            **({"sources": sources} if sources is not None else {})}
    write_atomic(root / INDEX, json.dumps(integrity.seal(meta), indent=1).encode())
    for old in root.glob("index-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


class IndexWriter:
    """A new index filled row by row, for a build too large for per-row Python objects: the fixed-width
    columns preallocated for ``rows`` (the caller fills ``columns[name][i]``), keys and captions streamed
    to their blobs with int64 offsets. :meth:`finish` swaps index.json to it; until then the old index
    stays current, and a crash leaves only an unreferenced folder that the next finish removes."""

    def __init__(self, root: Path, rows: int, cache_text: bool) -> None:
        self.root, self.rows, self.cache_text = root, rows, cache_text
        self.folder = _new_folder(root)
        names = [*_ROW_COLUMNS, "source", *(["crc32_text"] if cache_text else [])]
        self.columns = {name: np.zeros((rows, *shape), dtype)
                        for name in names for dtype, shape in [COLUMN_TYPES[name]]}
        self._offsets = {name: np.zeros(rows + 1, np.int64) for name in ("keys", "captions")}
        self._blobs = {name: open(self.folder / f"{name}.bin", "wb") for name in self._offsets}  # noqa: SIM115
        self._added = 0

    def add_texts(self, key: str, caption: str) -> None:
        """Key and caption of the next row (rows in id order)."""
        i = self._added
        for name, text in (("keys", key), ("captions", caption)):
            data = text.encode("utf-8")
            self._blobs[name].write(data)
            self._offsets[name][i + 1] = self._offsets[name][i] + len(data)
        self._added += 1

    def finish(self, shards: list[dict], bucket_keys: list[str], fingerprint: str,
               sources: list[str]) -> None:
        """Write everything and make this index the current one (``shards`` as for write_columns,
        ``sources`` the names the source column counts)."""
        if self._added != self.rows:
            raise ValueError(f"IndexWriter: {self._added} rows' texts added, {self.rows} announced")
        for name, blob in self._blobs.items():
            blob.flush()
            os.fsync(blob.fileno())
            blob.close()
            with synced(self.folder / f"{name[:-1]}_offsets.npy") as f:
                np.save(f, self._offsets[name])
        _finish(self.root, self.folder, self.columns, shards, bucket_keys, self.cache_text, fingerprint,
                sources)


def utf8_column(values: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """(blob, offsets): value i is blob[offsets[i]:offsets[i + 1]] in UTF-8 (an Arrow string column)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return b"".join(encoded), offsets


class CacheIndex:
    """The index of ``root``, memory-mapped and checked for consistency (not for content: the per-sample
    CRC-32 does that on every read). Opening costs a few sequential passes over the small columns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / INDEX).is_file() and (root / MANIFEST).is_file() and (root / SHARDS).is_file():
            raise CacheError(f"{root} is a latent cache of format 1 (manifest.jsonl, no {INDEX}); "
                             + CONVERT_HINT.format(root=root))
        if not (root / INDEX).is_file():
            raise CacheError(f"{root / INDEX} not found: build the cache with "
                             "`python launch/cache.py --config <your yaml>`")
        meta = read_json(root / INDEX, "latent cache index")
        try:
            meta, self.column_sums = index_sums.unseal(root, root / meta["folder"], meta)
            if meta["format"] != INDEX_FORMAT:
                raise CacheError(f"{root / INDEX}: index format {meta['format']}, this version reads "
                                 f"{INDEX_FORMAT}; {REBUILD_HINT}")
            self.rows: int = int(meta["rows"])
            self.cache_text: bool = bool(meta["cache_text"])
            self.fingerprint: str = meta["fingerprint"]
            self.shards: list[dict] = meta["shards"]
            self.shard_names = [s["name"] for s in self.shards]
            self.bucket_keys: list[str] = meta["buckets"]
            starts = np.asarray(meta["bucket_starts"], dtype=np.int64)
            self.folder = folder = root / meta["folder"]
            self.sources: list[str] = list(meta.get("sources", [""]))
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"{root / INDEX} is damaged (bad field: {err}); {REBUILD_HINT}") from None
        names = [*_ROW_COLUMNS, "by_bucket", "key_offsets", "caption_offsets"]
        names += ["crc32_text"] if self.cache_text else []
        names += ["source"] if "sources" in meta else []
        try:
            self.columns = {name: self._column(folder, name) for name in names}
            self.columns.setdefault("source", np.broadcast_to(np.int16(0), (self.rows,)))  # no memory per row
            self.keys_blob = self._blob(folder / "keys.bin", self.columns["key_offsets"])
            self.captions_blob = self._blob(folder / "captions.bin", self.columns["caption_offsets"])
            self._check(starts)
        except CacheError as err:  # a damaged column names itself rather than its symptom
            if damaged := self.column_problems():
                raise CacheError(f"{root / INDEX}: {'; '.join(damaged)}") from err
            raise
        by_bucket = self.columns["by_bucket"]
        self.buckets = {key: by_bucket[starts[i]:starts[i + 1]] for i, key in enumerate(self.bucket_keys)}

    def _column(self, folder: Path, name: str) -> np.ndarray:
        path = folder / f"{name}.npy"
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CacheError(f"{path} is missing; {REBUILD_HINT}") from None
        except (ValueError, EOFError) as err:  # EOFError: an empty file
            raise CacheError(f"{path} is damaged ({type(err).__name__}: {err}); {REBUILD_HINT}") from None
        expected = self.rows + 1 if name.endswith("_offsets") else self.rows
        if len(values) != expected:
            raise CacheError(f"{path}: {len(values)} rows, index.json says {expected}; {REBUILD_HINT}")
        return values

    def _blob(self, path: Path, offsets: np.ndarray) -> np.ndarray:
        size = path.stat().st_size if path.is_file() else -1
        if size != int(offsets[-1]):
            raise CacheError(f"{path}: {size} bytes, its offsets say {int(offsets[-1])}; {REBUILD_HINT}")
        if not size:
            return np.zeros(0, np.uint8)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mapped, "madvise"):  # one caption per sample, at random: no read-ahead around it
            mapped.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(mapped, dtype=np.uint8)

    def _check(self, starts: np.ndarray) -> None:
        """Every reference in range: shard and bucket positions, sample positions inside their shard,
        offsets ascending, the bucket grouping consistent with the bucket column."""
        if problems := self._problems(starts):
            raise CacheError(f"{self.root / INDEX} is damaged: {'; '.join(problems)}; {REBUILD_HINT}")

    def _problems(self, starts: np.ndarray) -> list[str]:
        col, n_buckets = self.columns, len(self.bucket_keys)
        problems = [f"{name} not ascending from 0" for name in ("key_offsets", "caption_offsets")
                    if col[name][0] != 0 or (np.diff(col[name]) < 0).any()]
        if len(starts) != n_buckets + 1 or starts[0] != 0 or starts[-1] != self.rows:
            return problems + ["bucket_starts do not cover the rows"]
        if not self.rows:
            return problems
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        if not 0 <= col["shard"].min() <= col["shard"].max() < len(counts):
            problems.append("a shard position out of range")
        elif ((col["index"] < 0) | (col["index"] >= counts[col["shard"]])).any():
            problems.append("a sample position beyond its shard's count")
        if not 0 <= col["source"].min() <= col["source"].max() < len(self.sources):
            problems.append("a source position out of range")
        if not 0 <= col["bucket"].min() <= col["bucket"].max() < n_buckets:
            return problems + ["a bucket position out of range"]
        if (np.bincount(col["bucket"], minlength=n_buckets) != np.diff(starts)).any():
            return problems + ["bucket_starts disagree with the bucket column"]
        by_bucket = col["by_bucket"]
        if not 0 <= by_bucket.min() <= by_bucket.max() < self.rows or (
                col["bucket"][by_bucket] != np.repeat(np.arange(n_buckets), np.diff(starts))).any():
            problems.append("by_bucket does not group the ids by their bucket")
        return problems

    def column_problems(self, rank: int = 0, world_size: int = 1) -> list[str]:
        """This rank's share of the column files checked against their sha256s (none recorded: none)."""
        return index_sums.problems(self.folder, self.column_sums or {}, rank, world_size)

    def key(self, i: int) -> str:
        offsets = self.columns["key_offsets"]
        return self.keys_blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8")

    def caption(self, i: int) -> str:
        offsets = self.columns["caption_offsets"]
        return self.captions_blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8")
