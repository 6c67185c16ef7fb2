"""VAE latent cache: built once (split across ranks, resumable), read memory-mapped while training.

Layout of ``cache_dir``::

    manifest.jsonl   one row per cached image, sorted by key; ``id`` is the 0-based line number
    shards.json      {"format", "fingerprint", "cache_text", "shards": {name: {"sha256", "bytes", "bucket",
                     "count"}}} -- sha256 of every shard file, checked before a shard is read
    report.json      counts, bad images with reasons, scan problems, corrupt shards that were rebuilt
    shards/NAME.safetensors
                     one bucket per shard: "latents" (n, 4, h/8, w/8) bf16, already * vae scaling_factor;
                     with cache_text also "embeds" (n, 77, D) and "pooled" (n, P) bf16
    parts/           per-rank progress and results of a build in flight; removed by the merge

Manifest row: id, key, path, sha256 (of the image file), bucket ("HxW"), orig_hw, crop_tl,
time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w), caption, tags, weight (tag-frequency
weight, mean 1), shard, index (position in the shard).

A build, on every rank:
1. scan the source (same sorted records on every rank) and take ``records[rank::world_size]``;
2. probe each file on threads: sha256 and upright header size -> bucket. An image whose (key, sha256)
   (and caption, with cache_text) sits in a shard of an earlier run with the same settings fingerprint
   is reused once that shard passes its sha256 check; a shard that fails is reported and its images
   re-encoded;
3. encode the rest sorted by (bucket, key): decode on threads, VAE in batches, shards of at most
   ``shard_max_mb``. After a shard is fsynced a line goes to ``parts/progress-rank{r}.jsonl``, so an
   interrupted build resumes from its completed shards;
4. write ``parts/rank{r}-of-{w}.json``. Rank 0 merges (after a barrier when torch.distributed is
   initialised): ids, tag weights over the whole dataset, manifest/shards/report, deletes shards
   nothing refers to. With simulated ranks (no torch.distributed) call :func:`merge_parts` yourself.

Every file is written to a temporary name, fsynced and os.replace'd into place, so a crash leaves the
old or the new file; the progress files are append-only and fsynced after each line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from PIL import ExifTags, Image
from safetensors import safe_open
from tqdm import tqdm

from ztsnr_ds.data.buckets import (
    CROP_MODES,
    BucketConfig,
    assign_bucket,
    bucket_key,
    make_buckets,
    parse_bucket_key,
    resize_and_crop,
)
from ztsnr_ds.data.sources import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    ImageRecord,
    Problem,
    load_image,
    scan_source,
    summarize_problems,
)
from ztsnr_ds.data.tags import TagWeightConfig, parse_tags, tag_weights
from ztsnr_ds.models import FrozenParts
from ztsnr_ds.text import PromptEncoder

logger = logging.getLogger(__name__)

FORMAT = 1
LATENT_MODES = ("mean", "sample")
MANIFEST, SHARDS, REPORT = "manifest.jsonl", "shards.json", "report.json"
SHARD_DIR, PARTS_DIR = "shards", "parts"
HEADER_RESERVE = 4096
"""Bytes of a shard kept for the safetensors header (three tensor entries + metadata: < 1 KiB)."""
REBUILD_HINT = "re-run `python launch/cache.py --config <your yaml>`; it rebuilds corrupt or missing shards"


@dataclass
class CacheConfig:
    """What goes into the latent cache (the ``data`` section of the YAML)."""

    source: str
    """Dataset: a folder tree of images with same-stem .txt captions, or a .jsonl manifest."""
    cache_dir: str
    """Output folder (manifest.jsonl, shards.json, report.json, shards/)."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Aspect-ratio buckets the images are resized and cropped to."""
    crop: str = "center"
    """Crop placement: "center", or "random" (seeded per image by seed and key, so reproducible)."""
    latent: str = "mean"
    """"mean" of the VAE posterior, or one "sample" from it (seeded per image by seed and key)."""
    seed: int = 0
    """Seed of random crops and latent samples."""
    tag_weights: TagWeightConfig = field(default_factory=TagWeightConfig)
    """Tag-frequency loss weights, computed over the whole cached dataset."""
    shard_max_mb: float = 64.0
    """Largest shard file in MiB (a shard holds at least one image even if that is larger)."""
    cache_text: bool = False
    """Also store the caption's text embeddings (bf16); live tag shuffling then has no effect on them."""
    min_image_side: int = 0
    """Images whose smaller side is below this many pixels are skipped as too small (0: keep all)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images above this many pixels are skipped before decoding (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop={self.crop!r} unknown; valid: {', '.join(CROP_MODES)}")
        if self.latent not in LATENT_MODES:
            raise ValueError(f"data.latent={self.latent!r} unknown; valid: {', '.join(LATENT_MODES)}")
        if self.shard_max_mb <= 0:
            raise ValueError(f"data.shard_max_mb={self.shard_max_mb} must be > 0")


class CacheError(RuntimeError):
    """A cache file that cannot be trusted (missing, corrupt, or from an incomplete build)."""


@dataclass
class BuildStats:
    """What one rank's build did; ``report`` is the merged report.json on the rank that merged."""

    rank: int
    encoded: int
    reused: int
    bad: int
    corrupt_shards: list[dict]
    report: dict | None = None


@dataclass
class _Job:
    record: ImageRecord
    sha256: str
    bucket: tuple[int, int]


@dataclass
class _Loaded:
    pixels: torch.Tensor  # (3, H, W) uint8
    time_ids: tuple[int, int, int, int, int, int]


# ----------------------------------------------------------------------------- build


def build_cache(
    cfg: CacheConfig,
    parts: FrozenParts,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    workers: int = 4,
    progress: bool = True,
) -> BuildStats:
    """Cache this rank's share of ``cfg.source``; rank 0 merges when it can see every rank finish.

    ``batch_size`` images per VAE call, ``workers`` threads for hashing and decoding. Merges here when
    world_size == 1 or torch.distributed is initialised (barrier first); otherwise see merge_parts.
    """
    root = Path(cfg.cache_dir)
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    (root / PARTS_DIR).mkdir(exist_ok=True)
    records, problems = scan_source(cfg.source)
    fingerprint = settings_fingerprint(cfg, parts)
    reuse = _ReuseIndex(root, fingerprint, cfg.cache_text)
    writer = _ShardWriter(root, rank, fingerprint, int(cfg.shard_max_mb * 2**20))
    with ThreadPoolExecutor(workers) as pool:
        reused, todo, bad = _plan(records[rank::world_size], cfg, reuse, pool, 4 * workers, progress)
        bad += _encode_jobs(todo, cfg, parts, writer, pool, batch_size, progress)
    part = {
        "rank": rank, "world_size": world_size, "fingerprint": fingerprint, "scan": _scan_digest(records),
        "cache_text": cfg.cache_text, "rows": reused + writer.rows,
        "shards": {**reuse.infos(reused), **writer.infos},
        "bad": [_problem_dict(p) for p in bad], "corrupt_shards": reuse.corrupt,
        "scan_problems": [_problem_dict(p) for p in problems] if rank == 0 else [],
        "encoded": len(writer.rows), "reused": len(reused),
    }
    _write_atomic(_part_path(root, rank, world_size), json.dumps(part).encode())
    logger.info("rank %d: encoded %d, reused %d, bad %d", rank, len(writer.rows), len(reused), len(bad))
    stats = BuildStats(rank, len(writer.rows), len(reused), len(bad), reuse.corrupt)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()
    if rank == 0 and (world_size == 1 or distributed):
        stats.report = merge_parts(cfg, world_size)
    if distributed:
        dist.barrier()  # nobody leaves (or reads the manifest) before the merge is done
    return stats


def _plan(
    records: list[ImageRecord], cfg: CacheConfig, reuse: _ReuseIndex, pool: ThreadPoolExecutor, ahead: int,
    progress: bool,
) -> tuple[list[dict], list[_Job], list[Problem]]:
    """Split ``records`` into reusable manifest rows, images to encode, and bad images."""
    reused, todo, bad = [], [], []
    probe = partial(_probe, cfg=cfg, buckets=make_buckets(cfg.buckets))
    probed = zip(records, _ordered_map(pool, probe, records, ahead), strict=True)
    for record, job in tqdm(probed, total=len(records), disable=not progress, desc="hash + probe"):
        if isinstance(job, BadImage):
            bad.append(Problem(record.key, record.path, job.reason))
        elif (row := reuse.row(job)) is not None:
            reused.append(row)
        else:
            todo.append(job)
    return reused, todo, bad


def settings_fingerprint(cfg: CacheConfig, parts: FrozenParts) -> str:
    """Hash of everything a cached tensor depends on besides its image (and caption, with cache_text).

    Covers the format, buckets, crop, latent mode, seed and the VAE's weights and dtype (the text
    encoders' too with cache_text). A change re-encodes the whole dataset on the next build.
    """
    settings = {"format": FORMAT, "buckets": asdict(cfg.buckets), "crop": cfg.crop, "latent": cfg.latent,
                "seed": cfg.seed, "cache_text": cfg.cache_text, "vae": _module_digest(parts.vae)}
    if cfg.cache_text:
        settings["text"] = [_module_digest(parts.text_encoder), _module_digest(parts.text_encoder_2)]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _scan_digest(records: list[ImageRecord]) -> str:
    """Identifies the scanned record list, so the merge refuses parts of different scans."""
    return hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()[:16]


def _item_seed(seed: int, key: str) -> int:
    """Per-image seed from (seed, key): crops and latent samples do not depend on rank or batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little")


def _probe(record: ImageRecord, cfg: CacheConfig, buckets: list[tuple[int, int]]) -> _Job | BadImage:
    """sha256 of the file and its bucket from the upright header size (EXIF orientation applied,
    as load_image does), without decoding the pixels."""
    try:
        data = record.path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
        return _Job(record, hashlib.sha256(data).hexdigest(), assign_bucket(height, width, buckets))
    except Exception:  # whatever failed, load_image is the one place that names the problem
        try:
            load_image(record.path, cfg.max_pixels, cfg.min_image_side)
        except BadImage as err:
            return err
        return BadImage("unreadable image header")


def _load(job: _Job, cfg: CacheConfig) -> _Loaded | BadImage:
    """Decode, resize to cover the bucket and crop; runs on a worker thread."""
    try:
        img = load_image(job.record.path, cfg.max_pixels, cfg.min_image_side)
    except BadImage as err:
        return err
    rng = random.Random(_item_seed(cfg.seed, job.record.key)) if cfg.crop == "random" else None
    img, time_ids = resize_and_crop(img, job.bucket, cfg.crop, rng)
    return _Loaded(torch.from_numpy(np.array(img)).permute(2, 0, 1), time_ids)  # (H, W, 3) -> (3, H, W)


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for every item on the pool's threads, in order, with at most ``ahead`` in flight."""
    window: deque = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) > ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _encode_jobs(
    jobs: list[_Job], cfg: CacheConfig, parts: FrozenParts, writer: _ShardWriter,
    pool: ThreadPoolExecutor, batch_size: int, progress: bool,
) -> list[Problem]:
    """VAE-encode ``jobs`` in single-bucket batches into the writer's shards; returns the bad images."""
    jobs = sorted(jobs, key=lambda j: (j.bucket, j.record.key))
    text = PromptEncoder.from_parts(parts) if cfg.cache_text else None
    bad, batch = [], []
    loads = _ordered_map(pool, partial(_load, cfg=cfg), jobs, ahead=2 * batch_size)
    for job, loaded in tqdm(zip(jobs, loads, strict=True), total=len(jobs), disable=not progress,
                            desc="VAE encode"):
        if isinstance(loaded, BadImage):
            bad.append(Problem(job.record.key, job.record.path, loaded.reason))
            continue
        if batch and (len(batch) == batch_size or batch[-1][0].bucket != job.bucket):
            _encode_batch(batch, cfg, parts, text, writer)
            batch = []
        batch.append((job, loaded))
    if batch:
        _encode_batch(batch, cfg, parts, text, writer)
    writer.flush()
    return bad


def _encode_batch(
    batch: list[tuple[_Job, _Loaded]], cfg: CacheConfig, parts: FrozenParts,
    text: PromptEncoder | None, writer: _ShardWriter,
) -> None:
    jobs = [job for job, _ in batch]
    pixels = torch.stack([loaded.pixels for _, loaded in batch])  # (B, 3, H, W) uint8
    seeds = [_item_seed(cfg.seed, job.record.key) for job in jobs]
    tensors = {"latents": encode_latents(parts.vae, pixels, cfg.latent, seeds)}
    if text is not None:
        embeds, pooled = text.encode([job.record.caption for job in jobs])
        tensors |= {"embeds": embeds.to("cpu", torch.bfloat16), "pooled": pooled.to("cpu", torch.bfloat16)}
    rows = [_row(job, loaded.time_ids) for job, loaded in batch]
    writer.add(bucket_key(jobs[0].bucket), rows, tensors)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, mode: str, seeds: list[int]) -> torch.Tensor:
    """Scaled VAE latents z * scaling_factor, z = posterior mean or mean + std * eps (eps seeded per image).

    Pixels map to [-1, 1] as diffusers' VaeImageProcessor does (x / 255 * 2 - 1).
    Shape: pixels (B, 3, H, W) uint8 -> (B, 4, H/8, W/8) bf16 on the CPU.
    """
    param = next(vae.parameters())
    x = (pixels.float() / 255 * 2 - 1).to(param.device, param.dtype)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean
    if mode == "sample":
        eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed))
                           for seed in seeds])
        z = z + posterior.std * eps.to(z)
    return (z * vae.config.scaling_factor).to("cpu", torch.bfloat16)


def _row(job: _Job, time_ids: tuple[int, ...] | list[int]) -> dict:
    """Manifest row without id, weight, shard and index; caption and tags always from the current scan."""
    record = job.record
    return {"key": record.key, "path": str(record.path), "sha256": job.sha256,
            "bucket": bucket_key(job.bucket), "orig_hw": list(time_ids[:2]), "crop_tl": list(time_ids[2:4]),
            "time_ids": list(time_ids), "caption": record.caption, "tags": parse_tags(record.caption)}


def _problem_dict(problem: Problem) -> dict:
    return {"key": problem.key, "path": str(problem.path), "reason": problem.reason}


# ----------------------------------------------------------------------------- shards on disk


class _ShardWriter:
    """Collects encoded images of one bucket and writes them as size-bounded, fsynced shards.

    After each shard is on disk a line goes to this rank's progress file: the resume point.
    """

    def __init__(self, root: Path, rank: int, fingerprint: str, max_bytes: int) -> None:
        self.root, self.fingerprint, self.max_bytes = root, fingerprint, max_bytes
        self.progress = root / PARTS_DIR / f"progress-rank{rank}.jsonl"
        self.rows: list[dict] = []  # rows of every shard written by this run
        self.infos: dict[str, dict] = {}
        self._pending: list[tuple[dict, dict[str, torch.Tensor]]] = []

    def add(self, bucket: str, rows: list[dict], tensors: dict[str, torch.Tensor]) -> None:
        """Queue a batch of one bucket (tensors (B, ...)); writes a shard whenever one is full."""
        if self._pending and self._pending[0][0]["bucket"] != bucket:
            self.flush()
        item_bytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        capacity = max(1, (self.max_bytes - HEADER_RESERVE) // item_bytes)
        for i, row in enumerate(rows):
            self._pending.append((row, {name: t[i] for name, t in tensors.items()}))
            if len(self._pending) >= capacity:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        rows = [row for row, _ in self._pending]
        tensors = {name: torch.stack([t[name] for _, t in self._pending]) for name in self._pending[0][1]}
        ident = "\n".join([self.fingerprint] + [f"{r['key']}:{r['sha256']}" for r in rows])
        name = f"{rows[0]['bucket']}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        data = safetensors.torch.save(tensors, metadata={"format": str(FORMAT), "bucket": rows[0]["bucket"],
                                                         "fingerprint": self.fingerprint})
        _write_atomic(_shard_path(self.root, name), data)
        for index, row in enumerate(rows):
            row.update(shard=name, index=index)
        info = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "bucket": rows[0]["bucket"],
                "count": len(rows)}
        # leading newline: a line torn by a crash never swallows the next one
        with open(self.progress, "a", encoding="utf-8") as f:
            entry = {"shard": name, "fingerprint": self.fingerprint, **info, "rows": rows}
            f.write("\n" + json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows
        self.infos[name] = info
        self._pending = []


class _ReuseIndex:
    """Images already cached by an earlier (complete or interrupted) build with the same settings.

    Sources: manifest.jsonl + shards.json, and every parts/progress-rank*.jsonl. A shard is checked
    (sha256) the first time one of its images is reused; a failing shard is recorded in ``corrupt``
    and none of its images is reused.
    """

    def __init__(self, root: Path, fingerprint: str, cache_text: bool) -> None:
        self.root, self.cache_text = root, cache_text
        self.shards: dict[str, dict] = {}
        self._rows: dict[tuple, dict] = {}
        self._checked: dict[str, bool] = {}
        self.corrupt: list[dict] = []
        for name, info, rows in _previous_shards(root, fingerprint):
            self.shards[name] = info
            for row in rows:
                self._rows[self._key(row["key"], row["sha256"], row["caption"])] = row

    def _key(self, key: str, sha256: str, caption: str) -> tuple:
        return (key, sha256, caption) if self.cache_text else (key, sha256)

    def row(self, job: _Job) -> dict | None:
        """The manifest row (caption and tags from the current scan) if ``job``'s image can be reused."""
        old = self._rows.get(self._key(job.record.key, job.sha256, job.record.caption))
        if old is None or not self._shard_ok(old["shard"]):
            return None
        return {**_row(job, old["time_ids"]), **{k: old[k] for k in ("bucket", "shard", "index")}}

    def _shard_ok(self, name: str) -> bool:
        if name not in self._checked:
            problem = shard_problem(_shard_path(self.root, name), self.shards[name]["sha256"])
            self._checked[name] = problem is None
            if problem is not None:
                logger.warning("shard %s: %s; its images are encoded again", name, problem)
                self.corrupt.append({"shard": name, "reason": problem})
        return self._checked[name]

    def infos(self, rows: list[dict]) -> dict[str, dict]:
        """shards.json entries of the shards ``rows`` refer to."""
        return {row["shard"]: self.shards[row["shard"]] for row in rows}


def _previous_shards(root: Path, fingerprint: str) -> Iterator[tuple[str, dict, list[dict]]]:
    """(name, info, rows) of earlier builds' shards with this fingerprint: merged, then progress lines."""
    if (root / MANIFEST).is_file() and (root / SHARDS).is_file():
        meta = json.loads((root / SHARDS).read_text())
        if meta.get("fingerprint") == fingerprint:
            by_shard: dict[str, list[dict]] = {}
            for row in _read_jsonl(root / MANIFEST):
                by_shard.setdefault(row["shard"], []).append(row)
            for name, info in meta["shards"].items():
                yield name, info, by_shard.get(name, [])
    for path in sorted((root / PARTS_DIR).glob("progress-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # blank separator, or a line torn by a crash
                continue
            if entry["fingerprint"] == fingerprint:
                rows = entry.pop("rows")
                yield entry.pop("shard"), {k: entry[k] for k in ("sha256", "bytes", "bucket", "count")}, rows


def shard_problem(path: Path, sha256: str) -> str | None:
    """None if the shard file exists and its sha256 matches, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    actual = h.hexdigest()
    return None if actual == sha256 else f"sha256 mismatch (expected {sha256[:16]}..., got {actual[:16]}...)"


def _shard_path(root: Path, name: str) -> Path:
    return root / SHARD_DIR / f"{name}.safetensors"


def _part_path(root: Path, rank: int, world_size: int) -> Path:
    return root / PARTS_DIR / f"rank{rank}-of-{world_size}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, then os.replace: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the folder is synced
    finally:
        os.close(fd)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- merge


def merge_parts(cfg: CacheConfig, world_size: int) -> dict:
    """Join every rank's part into manifest.jsonl, shards.json and report.json; returns the report.

    Row ids follow the sorted keys and tag weights are computed over all rows, so the manifest does
    not depend on world_size. Afterwards shards no row refers to and the parts/ files are deleted.
    """
    root = Path(cfg.cache_dir)
    parts = _read_parts(root, world_size)
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: r["key"])
    weights = tag_weights([row["tags"] for row in rows], cfg.tag_weights)
    rows = [{"id": i, **row, "weight": w} for i, (row, w) in enumerate(zip(rows, weights, strict=True))]
    shards = {name: info for part in parts for name, info in part["shards"].items()}
    shards = {name: shards[name] for name in sorted({row["shard"] for row in rows})}
    meta = {"format": FORMAT, "fingerprint": parts[0]["fingerprint"], "cache_text": parts[0]["cache_text"],
            "shards": shards}
    report = _report(cfg, parts, rows, shards)
    _write_atomic(root / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows).encode())
    _write_atomic(root / SHARDS, json.dumps(meta, indent=1).encode())
    _write_atomic(root / REPORT, json.dumps(report, indent=1).encode())
    for path in (root / SHARD_DIR).iterdir():
        if path.name.endswith(".tmp") or path.name.removesuffix(".safetensors") not in shards:
            path.unlink()
    for path in (root / PARTS_DIR).iterdir():
        path.unlink()
    _log_report(report)
    return report


def _read_parts(root: Path, world_size: int) -> list[dict]:
    paths = [_part_path(root, rank, world_size) for rank in range(world_size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CacheError(f"cannot merge {root}: no result from {', '.join(missing)} (did every rank finish?)")
    parts = [json.loads(p.read_text()) for p in paths]
    if len({(p["fingerprint"], p["scan"], p["cache_text"]) for p in parts}) != 1:
        raise CacheError(f"cannot merge {root}: the parts come from different settings or scans "
                         f"(stale parts of an earlier build?); {REBUILD_HINT}")
    return parts


def _report(cfg: CacheConfig, parts: list[dict], rows: list[dict], shards: dict[str, dict]) -> dict:
    buckets: dict[str, int] = {}
    for row in rows:
        buckets[row["bucket"]] = buckets.get(row["bucket"], 0) + 1
    return {
        "source": cfg.source, "images": len(rows), "world_size": len(parts),
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


# ----------------------------------------------------------------------------- read


class LatentCache:
    """Read side of the cache: manifest in memory, shards memory-mapped with safetensors.

    With ``verify`` every shard's sha256 is checked once, the first time it is read; a shard that
    fails raises CacheError naming it. Not safe to read while a build writes the same folder.
    """

    def __init__(self, cache_dir: str | Path, verify: bool = True) -> None:
        self.root = Path(cache_dir)
        for name in (MANIFEST, SHARDS):
            if not (self.root / name).is_file():
                raise CacheError(f"{self.root / name} not found: build the cache with "
                                 "`python launch/cache.py --config <your yaml>`")
        self.rows = _read_jsonl(self.root / MANIFEST)
        if [row["id"] for row in self.rows] != list(range(len(self.rows))):
            raise CacheError(f"{self.root / MANIFEST}: ids are not 0..N-1 in order; {REBUILD_HINT}")
        meta = json.loads((self.root / SHARDS).read_text())
        self.shards: dict[str, dict] = meta["shards"]
        self.cache_text: bool = meta["cache_text"]
        self.verify = verify
        self.buckets: dict[str, list[int]] = {}
        for row in self.rows:
            self.buckets.setdefault(row["bucket"], []).append(row["id"])
        self._files: dict[str, safe_open] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        """Pickles without the open shard handles (DataLoader workers with spawn reopen them)."""
        return {**self.__dict__, "_files": {}}

    def height_width(self, bucket: str) -> tuple[int, int]:
        """(height, width) in pixels of a bucket key "HxW"."""
        return parse_bucket_key(bucket)

    def batch(self, ids: list[int]) -> dict:
        """Cached tensors of ``ids`` (all from one bucket).

        Shape: latents (B, 4, h/8, w/8) bf16 (already * scaling_factor), time_ids (B, 6) float32,
        weight (B,) float32, captions list[str]; with cached text also embeds (B, 77, D), pooled (B, P) bf16.
        """
        rows = [self.rows[i] for i in ids]
        if len({row["bucket"] for row in rows}) != 1:
            raise ValueError(f"a batch must come from one bucket, got ids {ids} from several")
        out = {
            "latents": self._stack("latents", rows),
            "time_ids": torch.tensor([row["time_ids"] for row in rows], dtype=torch.float32),
            "weight": torch.tensor([row["weight"] for row in rows], dtype=torch.float32),
            "captions": [row["caption"] for row in rows],
        }
        if self.cache_text:
            out |= {"embeds": self._stack("embeds", rows), "pooled": self._stack("pooled", rows)}
        return out

    def _stack(self, name: str, rows: list[dict]) -> torch.Tensor:
        return torch.stack([self._open(row["shard"]).get_slice(name)[row["index"]] for row in rows])

    def _open(self, shard: str) -> safe_open:
        if shard not in self._files:
            path = _shard_path(self.root, shard)
            if self.verify and (problem := shard_problem(path, self.shards[shard]["sha256"])) is not None:
                raise CacheError(f"latent cache shard {path}: {problem}; {REBUILD_HINT}")
            self._files[shard] = safe_open(path, framework="pt")
        return self._files[shard]
