"""The latent cache at 100k-10M rows: index size, open time, private memory per rank (alone and with 8
ranks at once), epoch plan time, random-read throughput and read amplification, against format 1
(manifest.jsonl parsed into dicts, whole-shard sha256 on first read) where it fits in memory."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from launch.benches import arg, benchmark

BUCKET_SIDE = 1024
TAGS_PER_CAPTION = 25


def write_shards(root: Path, samples: int, side: int, shard_mb: float) -> tuple[list[dict], dict[str, dict]]:
    """``samples`` random latents (4, side/8, side/8) bf16 of the side x side bucket through the build's own
    ShardWriter; returns their manifest rows (with shard, index, crc32) and the shards' infos."""
    from ztsnr_ds.data.cache_files import PARTS_DIR, SHARD_DIR
    from ztsnr_ds.data.shards import ShardWriter

    (root / SHARD_DIR).mkdir(parents=True)
    (root / PARTS_DIR).mkdir()
    writer = ShardWriter(root, 0, "bench", int(shard_mb * 2**20))
    bucket, time_ids = f"{side}x{side}", [side, side, 0, 0, side, side]
    generator = torch.Generator().manual_seed(0)
    for lo in range(0, samples, 16):
        keys = [f"{i:09d}.png" for i in range(lo, min(samples, lo + 16))]
        rows = [{"key": key, "path": str(root / "images" / key), "sha256": f"{lo + j:064x}", "bucket": bucket,
                 "orig_hw": [side, side], "crop_tl": [0, 0], "time_ids": time_ids, "caption": "1girl, solo",
                 "tags": ["1girl", "solo"]} for j, key in enumerate(keys)]
        latents = torch.randn(len(rows), 4, side // 8, side // 8, generator=generator).to(torch.bfloat16)
        writer.add(bucket, rows, {"latents": latents})
    writer.flush()
    return writer.rows, writer.infos


def synthetic_latent_cache(root: Path, n: int, side: int, shard_mb: float) -> None:
    """A trainable cache of n random side x side latents: the build's shard writer and merge, minus the
    images and the VAE (gpu_check's SDXL-size data)."""
    from ztsnr_ds.data.cache import CacheConfig
    from ztsnr_ds.data.cache_merge import merge_parts
    from ztsnr_ds.data.cache_parts import write_part
    from ztsnr_ds.data.cache_settings import CACHE_SETTINGS

    rows, infos = write_shards(root, n, side, shard_mb)
    summary = {"rank": 0, "world_size": 1, "fingerprint": "bench", "scan": "bench", "cache_text": False,
               "shards": infos, "bad": [], "corrupt_shards": [], "scan_problems": [], "encoded": len(rows),
               "reused": 0}
    write_part(root, 0, 1, summary, rows)
    merge_parts(CacheConfig(source=str(root / "images"), cache_dir=str(root), shard_max_mb=shard_mb), 1)
    (root / CACHE_SETTINGS).unlink()  # random latents, from no source or buckets: nothing to compare


def sdxl_folder(root: Path, unet_config: dict, device) -> Path:
    """A diffusers SDXL folder around a randomly initialised UNet of `unet_config` (made on `device`, bf16)
    with frozen parts as wide as it needs: text 2048 = 768 + 1280, pooled 1280 for the real SDXL."""
    import torch
    from diffusers import UNet2DConditionModel

    from ztsnr_ds.models import write_tiny_sdxl

    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    folder = write_tiny_sdxl(root, text_hidden=(unet_config["cross_attention_dim"] - pooled, pooled))
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.to("cpu", torch.bfloat16).save_pretrained(folder / "unet")
    return folder


def captions_pool(count: int = 997, vocabulary: int = 2000) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [", ".join(f"tag_{t}" for t in rng.choice(vocabulary, TAGS_PER_CAPTION, replace=False)).encode()
            for _ in range(count)]


def nai_bucket_sizes(rows: int) -> tuple[list[str], np.ndarray]:
    """NAI's bucket keys and heavy-tailed sizes (bucket k holds ~ k^-1.5 of the rows)."""
    from ztsnr_ds.data.buckets import BucketConfig, bucket_key, make_buckets

    keys = sorted(bucket_key(b) for b in make_buckets(BucketConfig()))
    share = np.arange(1, len(keys) + 1, dtype=np.float64) ** -1.5
    sizes = np.maximum(1, (share / share.sum() * rows).astype(np.int64))
    sizes[0] += rows - sizes.sum()
    return keys, sizes


def write_index(root: Path, rows: int, samples: list[dict], shards: dict[str, dict]) -> None:
    """An index of ``rows`` rows over NAI's buckets, row i pointing at real latent i mod len(samples)."""
    from ztsnr_ds.data.index import key_hashes, write_columns

    names = list(shards)
    pick = np.arange(rows) % len(samples)
    keys, sizes = nai_bucket_sizes(rows)
    key_text = [f"{i:09d}.webp" for i in range(rows)]
    pool = captions_pool()
    caption_ids = np.arange(rows) % len(pool)
    lengths = np.array([len(c) for c in pool], dtype=np.int64)[caption_ids]
    columns = {
        "shard": np.array([names.index(s["shard"]) for s in samples], dtype=np.int32)[pick],
        "index": np.array([s["index"] for s in samples], dtype=np.int32)[pick],
        "bucket": np.repeat(np.arange(len(keys), dtype=np.int32), sizes),
        "time_ids": np.tile(np.array([BUCKET_SIDE, BUCKET_SIDE, 0, 0, BUCKET_SIDE, BUCKET_SIDE], np.int32),
                            (rows, 1)),
        "weight": np.ones(rows, np.float32),
        "crc32": np.array([s["crc32"] for s in samples], dtype=np.uint32)[pick],
        "key_hash": key_hashes(key_text),
    }
    texts = {"keys": (b"".join(k.encode() for k in key_text),
                      np.r_[0, np.cumsum([len(k) for k in key_text])].astype(np.int64)),
             "captions": (b"".join(pool[i] for i in caption_ids),
                          np.r_[0, np.cumsum(lengths)].astype(np.int64))}
    infos = [{"name": name, **shards[name]} for name in names]
    write_columns(root, columns, texts, infos, keys, cache_text=False, fingerprint="bench")


def write_format1_manifest(path: Path, rows: int) -> None:
    """Format 1's manifest.jsonl for ``rows`` images (the fields its reader parsed into dicts)."""
    pool = [c.decode() for c in captions_pool()]
    keys, sizes = nai_bucket_sizes(rows)
    bucket = np.repeat(np.arange(len(keys)), sizes)
    with open(path, "w") as f:
        for i in range(rows):
            caption = pool[i % len(pool)]
            row = {"id": i, "key": f"{i:09d}.webp", "path": f"/data/{i:09d}.webp", "sha256": f"{i:064x}",
                   "bucket": keys[bucket[i]], "orig_hw": [1024, 1024], "crop_tl": [0, 0],
                   "time_ids": [1024, 1024, 0, 0, 1024, 1024], "caption": caption,
                   "tags": caption.split(", "), "weight": 1.0, "shard": "s", "index": i % 500}
            f.write(json.dumps(row) + "\n")


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the OS page cache (POSIX_FADV_DONTNEED), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memory_mb() -> dict[str, float]:
    """This process's Rss, Pss, private (clean + dirty) and anonymous memory, MiB (smaps_rollup)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"],
            "anon": fields["Anonymous"]}


def io_bytes() -> dict[str, int]:
    """rchar (bytes returned by read calls) and read_bytes (bytes fetched from storage) of this process."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def open_as_rank(root: str, fmt: int, world: int, micro_batch: int) -> tuple[object, dict]:
    """What a rank does at start-up: open the cache and build the sampler (plans epoch 0)."""
    from ztsnr_ds.data.cache import LatentCache
    from ztsnr_ds.data.sampler import BucketBatchSampler

    baseline = memory_mb()["private"]  # the interpreter, torch and numpy: there before any cache
    start = time.perf_counter()
    if fmt == 2:

        cache = LatentCache(root)
        buckets = cache.buckets
    else:  # format 1's reader: every manifest row a dict, bucket lists of Python ints
        with open(Path(root) / "manifest.jsonl") as f:
            cache = [json.loads(line) for line in f]
        buckets: dict[str, list[int]] = {}
        for row in cache:
            buckets.setdefault(row["bucket"], []).append(row["id"])
    opened = time.perf_counter()
    sampler = BucketBatchSampler(buckets, micro_batch, world, 0, seed=0)
    return (cache, sampler), {"open_s": opened - start, "sampler_init_s": time.perf_counter() - opened,
                              "baseline_private_mb": baseline}


def rank_probe(root: str, fmt: int, world: int, micro_batch: int, reads: int, queue) -> None:
    """One rank alone: start-up cost, memory, epoch plan, then random reads (cold, then warm)."""
    if fmt == 2:
        evict([p for p in Path(root).rglob("*") if p.is_file()])
    (cache, sampler), result = open_as_rank(root, fmt, world, micro_batch)
    result |= {f"{k}_mb": v for k, v in memory_mb().items()}
    start = time.perf_counter()
    sampler.plan(1).rank_plan(0)
    result["plan_epoch_s"] = time.perf_counter() - start
    if fmt == 2:
        largest = np.asarray(max(cache.buckets.values(), key=len))
        _, first = np.unique(cache.index.columns["crc32"][largest], return_index=True)  # distinct latents
        ids = np.random.default_rng(0).choice(largest[first], min(reads, len(first)), replace=False)
        reads = len(ids)
        item = 4 * (BUCKET_SIDE // 8) ** 2 * 2
        for path in Path(root).glob("index-*/*"):  # steady state: the index sits in the page cache
            path.read_bytes()
        evict(list((Path(root) / "shards").iterdir()))
        for phase in ("cold", "warm"):
            before, start = io_bytes(), time.perf_counter()
            for lo in range(0, reads, 8):
                cache.batch(ids[lo:lo + 8])
            seconds, after = time.perf_counter() - start, io_bytes()
            result[f"{phase}_samples_per_s"] = reads / seconds
            result[f"{phase}_read_amplification"] = (after["rchar"] - before["rchar"]) / (reads * item)
            storage = after["read_bytes"] - before["read_bytes"]
            result[f"{phase}_storage_amplification"] = storage / (reads * item)
    queue.put(result)


def rank_together(root: str, fmt: int, world: int, micro_batch: int, barrier, queue) -> None:
    """One of several ranks on the machine: memory measured while all of them hold the cache open."""
    state, result = open_as_rank(root, fmt, world, micro_batch)
    barrier.wait()
    result |= {f"{k}_mb": v for k, v in memory_mb().items()}
    barrier.wait()
    queue.put(result)
    del state


def measure(root: Path, fmt: int, args: argparse.Namespace) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=rank_probe, args=(str(root), fmt, args.world, args.micro_batch, args.reads,
                                                      queue))
    child.start()
    alone = queue.get()
    child.join()
    keys = ("open_s", "private_mb", "anon_mb", "pss_mb", "baseline_private_mb")
    if fmt == 1:  # all heap, nothing ranks could share: 8 x its 'alone' (8 x 7.5 GB at 1M rows would not fit)
        return alone | {f"ranks{args.ranks}_{k}": alone[k] for k in keys}
    barrier = context.Barrier(args.ranks)
    children = [context.Process(target=rank_together, args=(str(root), fmt, args.world, args.micro_batch,
                                                            barrier, queue)) for _ in range(args.ranks)]
    for c in children:
        c.start()
    together = [queue.get() for _ in children]
    for c in children:
        c.join()
    return alone | {f"ranks{args.ranks}_{k}": max(r[k] for r in together) for k in keys}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


@benchmark(
    arg("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="index rows"),
    arg("--format1-rows", type=int, nargs="*", default=[100_000, 1_000_000],
        help="rows for format 1 (its reader holds ~7.5 KB per row: 10M does not fit in 24 GB)"),
    arg("--samples", type=int, default=512, help="real 1024^2 latents on disk; the rows point at them"),
    arg("--reads", type=int, default=400, help="random samples read per phase (cold, warm)"),
    arg("--ranks", type=int, default=8, help="ranks holding the cache open at once"),
    arg("--world", type=int, default=64, help="world size the sampler plans for"),
    arg("--micro-batch", type=int, default=4),
    arg("--shard-mb", type=float, default=64.0, help="data.shard_max_mb (the default)"),
    arg("--json", type=str, default=None, help="also write the results here"),
    arg("--dir", type=str, default=None, help="working folder (default: a temporary one in /tmp)"),
)
def bench_data(args: argparse.Namespace) -> None:
    """Cache index at scale: open time, private memory per rank, plan time, reads and read amplification."""
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "cache"
        samples, shards = write_shards(root, args.samples, BUCKET_SIDE, args.shard_mb)
        shutil.rmtree(root / "parts")
        for rows in args.rows:
            start = time.perf_counter()
            write_index(root, rows, samples, shards)
            written = time.perf_counter() - start
            index_mb = folder_mb(next(root.glob("index-*")))
            results.append({"format": 2, "rows": rows, "index_mb": index_mb, "write_s": written,
                            **measure(root, 2, args)})
        for rows in args.format1_rows:
            old = Path(tmp) / f"format1-{rows}"
            old.mkdir()
            write_format1_manifest(old / "manifest.jsonl", rows)
            results.append({"format": 1, "rows": rows, "index_mb": folder_mb(old), **measure(old, 1, args)})
            shutil.rmtree(old)
    for r in results:  # the format-1 reader hashed every shard a rank touched: one full pass per rank
        r["read_amplification"] = r.get("warm_read_amplification", args.world + 1.0)
        r["private_rss_mb"] = r[f"ranks{args.ranks}_private_mb"] - r[f"ranks{args.ranks}_baseline_private_mb"]
    buckets = len(nai_bucket_sizes(1)[0])
    print(f"{args.samples} real latents 4x128x128 bf16 ({args.samples * 131072 / 2**20:.0f} MiB, shards of "
          f"{args.shard_mb:g} MiB) under N rows over NAI's {buckets} buckets; captions of {TAGS_PER_CAPTION} "
          f"tags; sampler for world {args.world}, micro-batch {args.micro_batch}. Each figure from fresh "
          "spawned processes; 'alone' = one rank, index evicted from the page cache first; "
          f"'x{args.ranks}' = the largest of {args.ranks} ranks holding the cache open at once. Private = "
          "Private_Clean + Private_Dirty (smaps_rollup) less the same process's before opening (Python, "
          f"torch, numpy: {results[0]['baseline_private_mb']:.0f} MiB); anon = all heap. Format 1's read "
          "amplification is computed, not measured: world + 1 (every rank hashes every shard each epoch); "
          f"its x{args.ranks} columns repeat 'alone' (all heap; 8 copies would not fit).\n")
    print(f"| format | rows | index MiB | open s (alone) | open s (x{args.ranks}) | private MiB (alone) | "
          f"private MiB (x{args.ranks}) | anon MiB | plan epoch s | samples/s cold / warm | "
          "bytes read / sample bytes | storage reads / sample bytes (cold shards) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cold, warm = r.get("cold_samples_per_s"), r.get("warm_samples_per_s")
        rates = f"{cold:.0f} / {warm:.0f}" if r["format"] == 2 else "-"
        storage = f"{r['cold_storage_amplification']:.2f}" if r["format"] == 2 else "-"
        print(f"| {r['format']} | {r['rows']:,} | {r['index_mb']:.0f} | {r['open_s']:.2f} | "
              f"{r[f'ranks{args.ranks}_open_s']:.2f} | {r['private_mb'] - r['baseline_private_mb']:.0f} | "
              f"{r['private_rss_mb']:.0f} | "
              f"{r['anon_mb']:.0f} | {r['plan_epoch_s']:.2f} | {rates} | {r['read_amplification']:.3f} | "
              f"{storage} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
