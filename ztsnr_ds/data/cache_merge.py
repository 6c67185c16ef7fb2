"""The last step of a build, on rank 0: join every rank's part into the manifest, the shard record, the
report and the training index; and the one-off conversion of a format-1 cache to the index."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ztsnr_ds.data.buckets import parse_bucket_key
from ztsnr_ds.data.cache import CacheConfig
from ztsnr_ds.data.cache_files import (
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    REBUILD_HINT,
    REPORT,
    SHARD_DIR,
    SHARDS,
    CacheError,
    atomic_file,
    read_json,
    read_jsonl,
    write_atomic,
)
from ztsnr_ds.data.cache_parts import merged_rows, part_rows, read_summaries
from ztsnr_ds.data.cache_settings import write_cache_settings
from ztsnr_ds.data.index import IndexWriter, key_hash, write_index
from ztsnr_ds.data.shards import CHECKSUMS, fill_checksums, shard_checksums
from ztsnr_ds.data.sources import Problem, summarize_problems
from ztsnr_ds.data.tags import TagWeightConfig, image_weight, weights_from_counts

logger = logging.getLogger(__name__)
CAPTION_THRESHOLDS = (75, 150, 225)
"""Token counts (1, 2, 3 CLIP chunks) the report counts captions above."""


@dataclass
class _Counts:
    """Pass 1 over the parts: what the ids, the tag weights, the shard list and the report need."""

    rows: int = 0
    tags: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)
    shards: set[str] = field(default_factory=set)
    unchecked: set[str] = field(default_factory=set)  # shards of rows reused from a format-1 build
    captions: Counter = field(default_factory=Counter)  # caption chunking (_caption_report)
    upscaled: int = 0  # images smaller than their bucket on a side: resized up to cover it
    max_upscale: float = 1.0  # the largest such factor


def merge_parts(cfg: CacheConfig, world_size: int) -> dict:
    """Join every rank's part into manifest.jsonl, shards.json, report.json and the index; returns the report.

    Row ids follow the sorted keys and tag weights are computed over all rows, so the cache does not
    depend on world_size. Streams the parts (data/cache_parts.py): pass 1 counts tags, buckets and shards;
    pass 2 merges the key-sorted parts into the index's numpy columns and the manifest lines (without
    weights: their mean is known only at the end); pass 3 appends the weights to the lines. So memory
    grows by ~100 bytes per row (columns, offsets, weights), not by a Python dict per row. Afterwards
    shards no row refers to and the parts/ files are deleted.
    """
    root = Path(cfg.cache_dir)
    parts = read_summaries(root, world_size)
    counts = _count(part_rows(root, world_size))
    known = {name: info for part in parts for name, info in part["shards"].items()}
    if missing := sorted(counts.shards - set(known)):
        raise CacheError(f"cannot merge {root}: rows refer to shard {missing[0]}, which no part lists; "
                         f"{REBUILD_HINT}")
    shards = {name: known[name] for name in sorted(counts.shards)}
    fingerprint, cache_text = parts[0]["fingerprint"], parts[0]["cache_text"]
    index = IndexWriter(root, counts.rows, cache_text)
    unweighted = root / PARTS_DIR / "manifest-unweighted.jsonl"
    sources = [s.name for s in cfg.source_list()]
    weights = _merge_rows(root, world_size, shards, counts, cfg.tag_weights, index, unweighted, sources)
    _write_manifest(root, unweighted, weights)
    write_atomic(root / SHARDS, json.dumps(_shard_record(shards, fingerprint, cache_text), indent=1).encode())
    report = _report(cfg.source if cfg.source is not None else [s.path for s in cfg.source_list()], parts,
                     counts, shards)
    write_atomic(root / REPORT, json.dumps(report, indent=1).encode())
    index.columns["weight"][:] = weights
    index.finish([{"name": name, **info} for name, info in shards.items()],
                 sorted({info["bucket"] for info in shards.values()}), fingerprint, sources)
    for path in (root / SHARD_DIR).iterdir():
        if path.name.endswith(".tmp") or path.name.removesuffix(".safetensors") not in shards:
            path.unlink()
    for path in (root / PARTS_DIR).iterdir():
        path.unlink()
    write_cache_settings(cfg)  # last: what training compares its data.* with (drift.py)
    _log_report(report)
    return report


def _count(rows: Iterable[dict]) -> _Counts:
    counts = _Counts()
    for row in rows:
        counts.rows += 1
        counts.tags.update(set(row["tags"]))
        counts.buckets[row["bucket"]] += 1
        counts.shards.add(row["shard"])
        if "crc32" not in row:
            counts.unchecked.add(row["shard"])
        if "tokens" in row:
            counts.captions.update({f"chunks {row['chunks']}": 1, "tags_cut": row["tags_cut"],
                                    "truncated": row["tags_cut"] > 0,
                                    **{f"over {n}": row["tokens"] > n for n in CAPTION_THRESHOLDS}})
        if (factor := upscale_factor(row["orig_hw"], row["bucket"])) > 1:
            counts.upscaled += 1
            counts.max_upscale = max(counts.max_upscale, factor)
    return counts


def upscale_factor(orig_hw: list[int], bucket: str) -> float:
    """How much an image was enlarged to cover its bucket: max(H_b / h, W_b / w) (1 or less: not enlarged)."""
    height, width = parse_bucket_key(bucket)
    return max(height / orig_hw[0], width / orig_hw[1])


def _merge_rows(root: Path, world_size: int, shards: dict[str, dict], counts: _Counts, cfg: TagWeightConfig,
                index: IndexWriter, unweighted: Path, sources: list[str]) -> np.ndarray:
    """Pass 2: the rows in key order into the index columns (all but weight) and ``unweighted`` (manifest
    lines without their weight); returns the weights (mean 1), float64 in id order. ``sources``: the
    names the source column counts."""
    source_pos = {name: i for i, name in enumerate(sources)}
    weights_of = weights_from_counts(counts.tags, counts.rows, cfg)
    legacy = shard_checksums(root, counts.unchecked, shards)
    shard_pos = {name: i for i, name in enumerate(shards)}
    bucket_pos = {key: i for i, key in enumerate(sorted({info["bucket"] for info in shards.values()}))}
    crc_columns = [name for name in CHECKSUMS if name in index.columns]
    col, raw = index.columns, np.empty(counts.rows, np.float64)
    with open(unweighted, "wb") as out:
        for i, row in enumerate(merged_rows(root, world_size)):
            if "crc32" not in row:
                row.update({name: int(v[row["index"]]) for name, v in legacy[row["shard"]].items()})
            col["shard"][i], col["index"][i] = shard_pos[row["shard"]], row["index"]
            col["bucket"][i], col["time_ids"][i] = bucket_pos[row["bucket"]], row["time_ids"]
            for name in crc_columns:
                col[name][i] = row[name]
            col["key_hash"][i], col["source"][i] = key_hash(row["key"]), source_pos[row.get("source", "")]
            index.add_texts(row["key"], row["caption"])
            raw[i] = image_weight(row["tags"], weights_of)
            out.write(json.dumps({"id": i, **row}).encode() + b"\n")
    return raw / (math.fsum(raw) / len(raw)) if len(raw) else raw


def _write_manifest(root: Path, unweighted: Path, weights: np.ndarray) -> None:
    """Pass 3: manifest.jsonl = the unweighted lines with ``"weight": w`` appended (text, no parsing)."""
    with open(unweighted, "rb") as lines, atomic_file(root / MANIFEST) as out:
        for line, weight in zip(lines, weights, strict=True):  # not .tolist(): 32 bytes a row
            out.write(line[:-2] + b', "weight": ' + json.dumps(float(weight)).encode() + b"}\n")


def convert_legacy(root: Path, progress: bool = True) -> int:
    """Write the index of a format-1 cache (manifest.jsonl + shards.json), in place; returns its rows.

    Reads every shard once (sha256 checked) for the per-sample checksums format 1 did not record.
    The manifest and shards stay as they are; the index appears atomically, so an interrupted
    conversion leaves the cache as it was and can simply be run again.
    """
    rows = read_jsonl(root / MANIFEST)
    meta = read_json(root / SHARDS, "the build's shard record")
    if [row.get("id") for row in rows] != list(range(len(rows))):
        raise CacheError(f"{root / MANIFEST}: ids are not 0..N-1 in order; {REBUILD_HINT}")
    shards = meta.get("shards", {})
    if missing := sorted({row.get("shard") for row in rows} - set(shards), key=str):
        raise CacheError(f"{root / SHARDS} lists no entry for shard {missing[0]} (and {len(missing) - 1} "
                         f"more); {REBUILD_HINT}")
    fill_checksums(root, rows, shards, progress)
    _write_record(root, rows, shards, meta["fingerprint"], meta["cache_text"])
    write_index(root, rows, shards, meta["cache_text"], meta["fingerprint"])
    return len(rows)


def _shard_record(shards: dict[str, dict], fingerprint: str, cache_text: bool) -> dict:
    """shards.json: the build's record of whole-shard sha256s, and what the next build reuses."""
    return {"format": FORMAT, "fingerprint": fingerprint, "cache_text": cache_text, "shards": shards}


def _write_record(root: Path, rows: list[dict], shards: dict[str, dict], fingerprint: str,
                  cache_text: bool) -> None:
    """manifest.jsonl and shards.json of rows held in memory (the format-1 conversion)."""
    write_atomic(root / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows).encode())
    write_atomic(root / SHARDS, json.dumps(_shard_record(shards, fingerprint, cache_text), indent=1).encode())


def _report(source: str | list[str], parts: list[dict], counts: _Counts, shards: dict[str, dict]) -> dict:
    """report.json: counts, buckets, bad images and scan problems (every rank's, in key order)."""
    def in_order(problem: dict) -> tuple:
        return problem["key"], problem["path"], problem["reason"]

    return {
        "source": source, "images": counts.rows, "world_size": len(parts),
        "encoded": sum(p["encoded"] for p in parts), "reused": sum(p["reused"] for p in parts),
        "shards": len(shards), "bytes": sum(info["bytes"] for info in shards.values()),
        "buckets": dict(sorted(counts.buckets.items())),
        "upscaled": {"images": counts.upscaled, "max_factor": round(counts.max_upscale, 3)},
        "bad": sorted((b for p in parts for b in p["bad"]), key=in_order),
        "scan_problems": sorted((s for p in parts for s in p["scan_problems"]), key=in_order),
        "corrupt_shards": [c for p in parts for c in p["corrupt_shards"]],
        "captions": _caption_report(counts.captions, parts[0]["max_chunks"]) if counts.captions else None,
    }


def _caption_report(counts: Counter, max_chunks: int) -> dict:
    """report.json "captions": captions over 75/150/225 tokens, captions per chunk count, and those cut at
    captions.max_chunks (at a tag boundary) with the tag occurrences cut. None when no row was counted
    (parts written without caption counts)."""
    return {"max_chunks": max_chunks,
            "tokens_over": {str(n): counts[f"over {n}"] for n in CAPTION_THRESHOLDS},
            "chunks": {str(k): counts[f"chunks {k}"] for k in range(1, max_chunks + 1)},
            "truncated": counts["truncated"], "tags_cut": counts["tags_cut"]}


def _log_report(report: dict) -> None:
    logger.info("latent cache: %d images in %d buckets, %d shards (%.1f MiB); encoded %d, reused %d",
                report["images"], len(report["buckets"]), report["shards"], report["bytes"] / 2**20,
                report["encoded"], report["reused"])
    for name, what in (("bad", "bad images skipped"), ("scan_problems", "scan problems")):
        if report[name]:
            counts = summarize_problems([Problem(p["key"], Path(p["path"]), p["reason"])
                                         for p in report[name]])
            logger.warning("%d %s (listed in report.json): %s", len(report[name]), what,
                           ", ".join(f"{reason}: {n}" for reason, n in counts.items()))
    if report["corrupt_shards"]:
        logger.warning("%d corrupt shards were rebuilt", len(report["corrupt_shards"]))
    if upscaled := report["upscaled"]["images"]:
        logger.warning("%d images smaller than their bucket were enlarged to cover it (up to %.2fx; "
                       "report.json \"upscaled\"); data.min_image_side skips images below a side length",
                       upscaled, report["upscaled"]["max_factor"])
    if (cap := report["captions"]) is None:
        return
    logger.info("captions: over %s tokens: %s; chunks (75 tokens each) per caption: %s",
                "/".join(cap["tokens_over"]), "/".join(map(str, cap["tokens_over"].values())),
                ", ".join(f"{k}: {n}" for k, n in cap["chunks"].items()))
    if cap["truncated"]:
        logger.warning("%d captions longer than captions.max_chunks = %d chunks were cut at a tag boundary "
                       "(%d tag occurrences cut, counted in report.json); raise captions.max_chunks "
                       "(up to 8) to keep them", cap["truncated"], cap["max_chunks"], cap["tags_cut"])
