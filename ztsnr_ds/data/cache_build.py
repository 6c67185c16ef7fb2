"""Building the latent cache: scan, split across ranks, probe, VAE-encode into shards, merge on rank 0.

A build, on every rank:
1. scan this rank's share of the source, streamed (data/sources.py scan_share: by a hash of the key, so no
   rank holds the whole list and the split needs no communication);
2. probe each file on threads: sha256 and upright header size -> bucket (a Parquet source's width and
   height skip the header). An image whose (key, sha256) (and caption, with cache_text) sits in a shard
   of an earlier run with the same settings fingerprint is reused once that shard passes its sha256
   check; a shard that fails is reported and its images re-encoded (data/cache_reuse.py);
3. encode the rest sorted by (bucket, key): decode on threads, VAE in batches, shards of at most
   ``shard_max_mb``. After a shard is fsynced a line goes to ``parts/progress-rank{r}.jsonl``, so an
   interrupted build resumes from its completed shards;
4. write this rank's part: its rows sorted by key, then its summary (data/cache_parts.py). Rank 0 merges
   (after a barrier when torch.distributed is initialised; data/cache_merge.py). With simulated ranks
   (no torch.distributed) call merge_parts yourself.

Every file is written to a temporary name, fsynced and os.replace'd into place, so a crash leaves the
old or the new file; the progress files are append-only and fsynced after each line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import ExifTags, Image
from tqdm import tqdm

from ztsnr_ds.data.buckets import assign_bucket, bucket_key, make_buckets, resize_and_crop
from ztsnr_ds.data.cache import CacheConfig
from ztsnr_ds.data.cache_files import FORMAT, PARTS_DIR, SHARD_DIR
from ztsnr_ds.data.cache_merge import merge_parts
from ztsnr_ds.data.cache_parts import write_part
from ztsnr_ds.data.cache_reuse import ReuseIndex
from ztsnr_ds.data.caption_cap import bound_captions
from ztsnr_ds.data.caption_control import canonical_caption
from ztsnr_ds.data.packed import load_record, read_bytes
from ztsnr_ds.data.shards import ShardWriter
from ztsnr_ds.data.source_mix import scan_sources
from ztsnr_ds.data.sources import BadImage, ImageRecord, Problem
from ztsnr_ds.data.tags import parse_tags
from ztsnr_ds.models import FrozenParts
from ztsnr_ds.text import CaptionCounts, PromptEncoder

logger = logging.getLogger(__name__)


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
class Job:
    """An image to cache: its record, the sha256 of its file and its bucket."""

    record: ImageRecord
    sha256: str
    bucket: tuple[int, int]


@dataclass
class _Loaded:
    pixels: torch.Tensor  # (3, H, W) uint8
    time_ids: tuple[int, int, int, int, int, int]


def build_cache(
    cfg: CacheConfig,
    parts: FrozenParts,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    workers: int = 4,
    progress: bool = True,
    max_chunks: int = 3,
) -> BuildStats:
    """Cache this rank's share of the sources (``cfg.source_list()``); rank 0 merges when it can see
    every rank finish.

    ``batch_size`` images per VAE call, ``workers`` threads for hashing and decoding. Merges here when
    world_size == 1 or torch.distributed is initialised (barrier first); otherwise see merge_parts.
    ``max_chunks`` (captions.max_chunks): 75-token chunks per caption, for cached text and the report.
    """
    root = Path(cfg.cache_dir)
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    (root / PARTS_DIR).mkdir(exist_ok=True)
    scan = scan_sources(cfg.source_list(), rank, world_size, root / PARTS_DIR)
    scan = bound_captions(scan, cfg.max_caption_bytes)  # no per-use cost grows with a runaway caption
    fingerprint = settings_fingerprint(cfg, parts, max_chunks)
    text = PromptEncoder.from_parts(parts, max_chunks)
    reuse = ReuseIndex(root, fingerprint, cfg.cache_text, rank, world_size)
    writer = ShardWriter(root, rank, fingerprint, int(cfg.shard_max_mb * 2**20))
    with ThreadPoolExecutor(workers) as pool:
        reused, todo, bad = _plan(scan.records, cfg, reuse, pool, 4 * workers, progress)
        bad += _encode_jobs(todo, cfg, parts, text if cfg.cache_text else None, writer, pool, batch_size,
                            progress)
    for row in reused + writer.rows:  # this rank's share of the caption report (data/cache_merge.py)
        row |= caption_fields(caption_counts(text, row["caption"]))
    summary = {
        "rank": rank, "world_size": world_size, "fingerprint": fingerprint, "scan": scan.digest,
        "cache_text": cfg.cache_text, "shards": {**reuse.infos(reused), **writer.infos},
        "bad": [_problem_dict(p) for p in bad], "corrupt_shards": reuse.corrupt,
        "scan_problems": [_problem_dict(p) for p in scan.problems],
        "encoded": len(writer.rows), "reused": len(reused), "max_chunks": max_chunks,
    }
    write_part(root, rank, world_size, summary, reused + writer.rows)
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
    records: list[ImageRecord], cfg: CacheConfig, reuse: ReuseIndex, pool: ThreadPoolExecutor, ahead: int,
    progress: bool,
) -> tuple[list[dict], list[Job], list[Problem]]:
    """Split ``records`` into reusable manifest rows, images to encode, and bad images."""
    reused, todo, bad = [], [], []
    probe = partial(_probe, cfg=cfg, buckets=make_buckets(cfg.buckets))
    probed = zip(records, _ordered_map(pool, probe, records, ahead), strict=True)
    for record, job in tqdm(probed, total=len(records), disable=not progress, desc="hash + probe"):
        if isinstance(job, BadImage):
            bad.append(Problem(record.key, record.path, job.reason))
        elif (old := reuse.lookup(record.key, job.sha256, record.caption)) is not None:
            reused.append({**manifest_row(job, old["time_ids"]), **old})
        else:
            todo.append(job)
    return reused, todo, bad


def settings_fingerprint(cfg: CacheConfig, parts: FrozenParts, max_chunks: int = 3) -> str:
    """Hash of everything a cached tensor depends on besides its image (and caption, with cache_text).

    Covers the format, buckets, crop, latent mode, seed and the VAE's weights and dtype (the text
    encoders' too, and max_chunks, with cache_text). A change re-encodes the whole dataset on the next build.
    """
    settings = {"format": FORMAT, "buckets": asdict(cfg.buckets), "crop": cfg.crop, "latent": cfg.latent,
                "seed": cfg.seed, "cache_text": cfg.cache_text, "vae": _module_digest(parts.vae)}
    if cfg.cache_text:
        settings["text"] = [_module_digest(parts.text_encoder), _module_digest(parts.text_encoder_2)]
        settings["max_chunks"] = max_chunks
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _item_seed(seed: int, key: str) -> int:
    """Per-image seed from (seed, key): crops and latent samples do not depend on rank or batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little")


def _probe(record: ImageRecord, cfg: CacheConfig, buckets: list[tuple[int, int]]) -> Job | BadImage:
    """sha256 of the file and its bucket from the upright header size (EXIF orientation applied,
    as load_image does), without decoding the pixels."""
    try:
        data = read_bytes(record)
        if record.size is not None:  # declared by the source (upright), no header to open
            width, height = record.size
        else:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                    width, height = height, width
        return Job(record, hashlib.sha256(data).hexdigest(), assign_bucket(height, width, buckets))
    except Exception:  # whatever failed, load_image is the one place that names the problem
        try:
            load_record(record, cfg.max_pixels, cfg.min_image_side)
        except BadImage as err:
            return err
        return BadImage("unreadable image header")


def _load(job: Job, cfg: CacheConfig) -> _Loaded | BadImage:
    """Decode, resize to cover the bucket and crop; runs on a worker thread."""
    try:
        img = load_record(job.record, cfg.max_pixels, cfg.min_image_side)
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
    jobs: list[Job], cfg: CacheConfig, parts: FrozenParts, text: PromptEncoder | None, writer: ShardWriter,
    pool: ThreadPoolExecutor, batch_size: int, progress: bool,
) -> list[Problem]:
    """VAE-encode ``jobs`` in single-bucket batches into the writer's shards (and their captions with
    ``text``); returns the bad images."""
    jobs = sorted(jobs, key=lambda j: (j.bucket, j.record.key))
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
    batch: list[tuple[Job, _Loaded]], cfg: CacheConfig, parts: FrozenParts,
    text: PromptEncoder | None, writer: ShardWriter,
) -> None:
    jobs = [job for job, _ in batch]
    pixels = torch.stack([loaded.pixels for _, loaded in batch])  # (B, 3, H, W) uint8
    seeds = [_item_seed(cfg.seed, job.record.key) for job in jobs]
    tensors = {"latents": encode_latents(parts.vae, pixels, cfg.latent, seeds)}
    if text is not None:
        cond = text.encode([job.record.caption for job in jobs])
        tensors |= {"embeds": cond.embeds.to("cpu", torch.bfloat16),  # (B, 77 K, D), zero-padded
                    "pooled": cond.pooled.to("cpu", torch.bfloat16),
                    "text_chunks": cond.chunks.to(torch.uint8)}
    rows = [manifest_row(job, loaded.time_ids) for job, loaded in batch]
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


def manifest_row(job: Job, time_ids: tuple[int, ...] | list[int]) -> dict:
    """Manifest row without id, weight, shard and index; caption and tags always from the current scan."""
    record = job.record
    return {"key": record.key, "path": str(record.path), "sha256": job.sha256,
            "bucket": bucket_key(job.bucket), "orig_hw": list(time_ids[:2]), "crop_tl": list(time_ids[2:4]),
            "time_ids": list(time_ids), "caption": record.caption, "tags": parse_tags(record.caption),
            "source": record.source}


def caption_counts(text: PromptEncoder, caption: str) -> CaptionCounts:
    """Counts of the longest variant of a cached caption as it reaches the encoder: each of several lines
    (one is picked per use), a template's filled fields joined by ", " (data/caption_control.py)."""
    variants = [canonical_caption(line) for line in caption.splitlines() if line.strip()] or [""]
    return max((text.counts(v) for v in variants), key=lambda c: c.tokens)


def caption_fields(counts: CaptionCounts) -> dict:
    """Manifest fields of a caption's chunking (PromptEncoder.counts), summed into report.json's captions."""
    return {"tokens": counts.tokens, "chunks": counts.chunks, "tags_cut": counts.tags_cut}


def _problem_dict(problem: Problem) -> dict:
    return {"key": problem.key, "path": str(problem.path), "reason": problem.reason}
