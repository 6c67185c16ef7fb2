"""The rank-0 merge of a cache build at 1M-10M rows: wall time and peak memory of the streamed merge
(data/cache_merge.py), against an earlier revision's merge run on the same rows (``--before REV``: that
revision's cache_merge.py, read with ``git show``, which held every row of every part as a dict)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from launch.benches import ROOT, arg, benchmark
from launch.benches.data import captions_pool, nai_bucket_sizes

ROWS_PER_SHARD = 500  # 64 MiB shards of 128x128 latents hold ~500


def rank_rows(rank: int, world: int, rows: int, bucket_of: np.ndarray, bucket_keys: list[str],
              pool: list[str]) -> list[dict]:
    """Rank ``rank``'s manifest rows (keys i = rank mod world), as a build writes them: 25-tag captions,
    NAI buckets, ROWS_PER_SHARD rows per shard, random checksums."""
    from ztsnr_ds.data.tags import parse_tags

    rng = np.random.default_rng(rank)
    out, filled = [], {}
    crcs = rng.integers(0, 2**32, rows, dtype=np.uint64).tolist()
    for i in range(rank, rows, world):
        bucket = bucket_keys[bucket_of[i]]
        h, w = map(int, bucket.split("x"))
        count = filled.get(bucket, 0)
        filled[bucket] = count + 1
        caption = pool[i % len(pool)]
        key = f"{i:09d}.webp"
        out.append({"key": key, "path": f"/data/{key}", "sha256": f"{i:064x}", "bucket": bucket,
                    "orig_hw": [h, w], "crop_tl": [0, 0], "time_ids": [h, w, 0, 0, h, w], "caption": caption,
                    "tags": parse_tags(caption), "shard": f"{bucket}-r{rank}-{count // ROWS_PER_SHARD:06d}",
                    "index": count % ROWS_PER_SHARD, "crc32": crcs[i]})
    return out


def write_parts(root: Path, rows: int, world: int, old_format: bool) -> None:
    """Every rank's part of a ``rows``-row build, one rank at a time (the generator never holds all rows):
    key-sorted JSONL + summary, or with ``old_format`` one JSON per rank holding its rows."""
    from ztsnr_ds.data.cache_files import part_path, write_atomic
    from ztsnr_ds.data.cache_parts import write_part

    (root / "shards").mkdir(parents=True)
    (root / "parts").mkdir()
    bucket_keys, sizes = nai_bucket_sizes(rows)
    bucket_of = np.random.default_rng(0).permutation(np.repeat(np.arange(len(bucket_keys)), sizes))
    pool = [c.decode() for c in captions_pool()]
    for rank in range(world):
        mine = rank_rows(rank, world, rows, bucket_of, bucket_keys, pool)
        shards: dict[str, dict] = {}
        for row in mine:
            info = shards.setdefault(row["shard"], {"sha256": "0" * 64, "bytes": 64 * 2**20,
                                                    "bucket": row["bucket"], "count": 0})
            info["count"] += 1
        summary = {"rank": rank, "world_size": world, "fingerprint": "bench", "scan": "bench",
                   "cache_text": False, "shards": shards, "bad": [], "corrupt_shards": [],
                   "scan_problems": [], "encoded": len(mine), "reused": 0}
        if old_format:
            write_atomic(part_path(root, rank, world), json.dumps({**summary, "rows": mine}).encode())
        else:
            write_part(root, rank, world, summary, mine)


def peak_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB: resident now, and the high-water mark."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_merge(root: str, world: int, before: str | None, queue) -> None:
    """In a fresh process: the merge of ``root``'s parts; its seconds and memory above the start."""
    from ztsnr_ds.data.cache import CacheConfig

    if before is None:
        from ztsnr_ds.data.cache_merge import merge_parts
    else:  # that revision's module, importing today's helpers (same names and behaviour)
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:ztsnr_ds/data/cache_merge.py"],
                                capture_output=True, text=True, check=True).stdout
        path = Path(root).parent / "merge_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("merge_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        merge_parts = module.merge_parts
    baseline, _ = peak_mb()
    start = time.perf_counter()
    merge_parts(CacheConfig(source="/data", cache_dir=root), world)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "baseline_mb": baseline, "peak_mb": peak_mb()[1]})


def measure(root: Path, world: int, before: str | None) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=run_merge, args=(str(root), world, before, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def same_outputs(a: Path, b: Path) -> bool:
    """manifest.jsonl, shards.json, report.json and every index file byte-identical."""
    index = [json.loads((root / "index.json").read_text()) for root in (a, b)]
    if {k: v for k, v in index[0].items() if k != "folder"} != {k: v for k, v in index[1].items()
                                                                 if k != "folder"}:
        return False
    files = [(a / n, b / n) for n in ("manifest.jsonl", "shards.json", "report.json")]
    files += [(p, b / index[1]["folder"] / p.name) for p in sorted((a / index[0]["folder"]).iterdir())]
    return all(x.read_bytes() == y.read_bytes() for x, y in files)


@benchmark(
    arg("--rows", type=int, nargs="+", default=[1_000_000], help="rows of the merged cache"),
    arg("--world", type=int, default=8, help="ranks whose parts are merged"),
    arg("--before", type=str, default=None, help="also run this git revision's merge on the same rows"),
    arg("--before-rows", type=int, nargs="*", default=None, help="rows for --before (default: --rows)"),
    arg("--dir", type=str, default=None, help="working folder (default: a temporary one in /tmp)"),
)
def bench_merge(args: argparse.Namespace) -> None:
    """Rank-0 merge of a build: seconds and peak memory, streamed vs an earlier revision's."""
    results = []
    before_rows = args.rows if args.before_rows is None else args.before_rows
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            variants = [("streamed", None)]
            if args.before and rows in before_rows:
                variants.append((args.before, args.before))
            roots = {}
            for name, before in variants:
                roots[name] = Path(tmp) / name / "cache"
                start = time.perf_counter()
                write_parts(roots[name], rows, args.world, old_format=before is not None)
                parts_mb = sum(p.stat().st_size for p in (roots[name] / "parts").iterdir()) / 2**20
                written = time.perf_counter() - start
                result = measure(roots[name], args.world, before)
                result |= {"merge": name, "rows": rows, "parts_mb": parts_mb, "write_parts_s": written,
                           "manifest_mb": (roots[name] / "manifest.jsonl").stat().st_size / 2**20}
                results.append(result)
                print(f"  {name} {rows:,}: {result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MiB",
                      file=sys.stderr)
            if len(roots) == 2:
                identical = same_outputs(*roots.values())
                for r in results[-2:]:
                    r["identical"] = identical
    print(f"N rows over {args.world} parts (rank r holds keys i = r mod {args.world}), NAI's buckets, "
          f"{ROWS_PER_SHARD} rows per shard, 25-tag captions. Each merge in a freshly spawned process; "
          "peak = VmHWM after the merge, start = VmRSS before it (Python + numpy + the imports). "
          "'identical': manifest, shards.json, report and every index file byte-equal between the two.\n")
    print("| merge | rows | parts MiB | manifest MiB | seconds | peak MiB | peak - start MiB | bytes / row | "
          "identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        grown = r["peak_mb"] - r["baseline_mb"]
        print(f"| {r['merge']} | {r['rows']:,} | {r['parts_mb']:.0f} | {r['manifest_mb']:.0f} | "
              f"{r['seconds']:.1f} | {r['peak_mb']:.0f} | {grown:.0f} | {grown * 2**20 / r['rows']:.0f} | "
              f"{r.get('identical', '-')} |")
