"""The last step of a build, on rank 0: join every rank's part into the manifest, the shard record, the
report and the training index; and the one-off conversion of a format-1 cache to the index."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
    part_path,
    read_json,
    read_jsonl,
    write_atomic,
)
from ztsnr_ds.data.index import write_index
from ztsnr_ds.data.shards import fill_checksums
from ztsnr_ds.data.sources import Problem, summarize_problems
from ztsnr_ds.data.tags import TagWeightConfig, tag_weights

logger = logging.getLogger(__name__)


def merge_parts(cfg: CacheConfig, world_size: int) -> dict:
    """Join every rank's part into manifest.jsonl, shards.json, report.json and the index; returns the report.

    Row ids follow the sorted keys and tag weights are computed over all rows,
    so the cache does not depend on world_size. Afterwards shards no row refers to and the parts/ files
    are deleted.
    """
    root = Path(cfg.cache_dir)
    parts = _read_parts(root, world_size)
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: r["key"])
    rows = _with_weights(rows, cfg.tag_weights)
    shards = {name: info for part in parts for name, info in part["shards"].items()}
    shards = {name: shards[name] for name in sorted({row["shard"] for row in rows})}
    fill_checksums(root, rows, shards)  # images reused from a format-1 build
    fingerprint, cache_text = parts[0]["fingerprint"], parts[0]["cache_text"]
    report = _report(cfg.source, parts, rows, shards)
    _write_record(root, rows, shards, fingerprint, cache_text)
    write_atomic(root / REPORT, json.dumps(report, indent=1).encode())
    write_index(root, rows, shards, cache_text, fingerprint)
    for path in (root / SHARD_DIR).iterdir():
        if path.name.endswith(".tmp") or path.name.removesuffix(".safetensors") not in shards:
            path.unlink()
    for path in (root / PARTS_DIR).iterdir():
        path.unlink()
    _log_report(report)
    return report


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


def _with_weights(rows: list[dict], cfg: TagWeightConfig) -> list[dict]:
    weights = tag_weights([row["tags"] for row in rows], cfg)
    return [{"id": i, **row, "weight": w} for i, (row, w) in enumerate(zip(rows, weights, strict=True))]


def _write_record(root: Path, rows: list[dict], shards: dict[str, dict], fingerprint: str,
                  cache_text: bool) -> None:
    """manifest.jsonl and shards.json: the human-readable record, and what the next build reuses."""
    meta = {"format": FORMAT, "fingerprint": fingerprint, "cache_text": cache_text, "shards": shards}
    write_atomic(root / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows).encode())
    write_atomic(root / SHARDS, json.dumps(meta, indent=1).encode())


def _read_parts(root: Path, world_size: int) -> list[dict]:
    paths = [part_path(root, rank, world_size) for rank in range(world_size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CacheError(f"cannot merge {root}: no result from {', '.join(missing)} (did every rank finish?)")
    parts = [read_json(p, "a rank's build result") for p in paths]
    if len({(p["fingerprint"], p["scan"], p["cache_text"]) for p in parts}) != 1:
        raise CacheError(f"cannot merge {root}: the parts come from different settings or scans "
                         f"(stale parts of an earlier build?); {REBUILD_HINT}")
    return parts


def _report(source: str, parts: list[dict], rows: list[dict], shards: dict[str, dict]) -> dict:
    buckets: dict[str, int] = {}
    for row in rows:
        buckets[row["bucket"]] = buckets.get(row["bucket"], 0) + 1
    return {
        "source": source, "images": len(rows), "world_size": len(parts),
        "encoded": sum(p["encoded"] for p in parts), "reused": sum(p["reused"] for p in parts),
        "shards": len(shards), "bytes": sum(info["bytes"] for info in shards.values()),
        "buckets": dict(sorted(buckets.items())),
        "bad": sorted((b for p in parts for b in p["bad"]), key=lambda b: b["key"]),
        "scan_problems": parts[0]["scan_problems"],
        "corrupt_shards": [c for p in parts for c in p["corrupt_shards"]],
    }


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
