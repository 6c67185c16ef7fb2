"""One rank's scan of a large source: seconds and peak memory of ``scan_share`` (data/sources.py) for a
folder tree and a JSONL manifest, alone (world 1) and as rank 0 of a world, against an earlier revision's
scan (``--before REV``: its sources.py, read with ``git show``, which built every record on every rank)."""

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

from launch.benches import ROOT, arg, benchmark
from launch.benches.merge import peak_mb

PER_FOLDER = 1000


def write_source(root: Path, images: int) -> None:
    """``images`` empty .png files with 25-tag .txt captions, PER_FOLDER a folder, and a JSONL of them."""
    with open(root / "m.jsonl", "w") as manifest:
        for i in range(images):
            name = f"d{i // PER_FOLDER:05d}/img{i:09d}.png"
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).touch()
            caption = ", ".join(f"tag_{(i * 7 + k * 131) % 2000}" for k in range(25))
            (root / name).with_suffix(".txt").write_text(caption)
            manifest.write(json.dumps({"image": name, "caption": caption}) + "\n")


def run_scan(source: str, rank: int, world: int, before: str | None, queue) -> None:
    """In a fresh process: one rank's scan; its seconds, records and memory above the start."""
    if before is None:
        from ztsnr_ds.data.sources import scan_share

        def scan() -> int:
            return len(scan_share(source, rank, world).records)
    else:  # that revision's scan: the whole record list on every rank, then its slice
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:ztsnr_ds/data/sources.py"],
                              capture_output=True, text=True, check=True).stdout
        path = Path(tempfile.mkdtemp()) / "sources_before.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("sources_before", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)

        def scan() -> int:
            records, _ = module.scan_source(source)
            return len(records[rank::world])
    baseline, _ = peak_mb()
    start = time.perf_counter()
    records = scan()
    queue.put({"seconds": time.perf_counter() - start, "records": records,
               "grown_mb": peak_mb()[1] - baseline})


def measure(source: Path, world: int, before: str | None) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=run_scan, args=(str(source), 0, world, before, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


@benchmark(
    arg("--images", type=int, default=200_000, help="images in the source"),
    arg("--world", type=int, nargs="+", default=[1, 8], help="world sizes; rank 0 is measured"),
    arg("--before", type=str, default=None, help="also run this git revision's scan"),
    arg("--dir", type=str, default=None, help="working folder (default: a temporary one in /tmp)"),
)
def bench_scan(args: argparse.Namespace) -> None:
    """One rank's scan of a folder tree and a JSONL manifest: seconds and peak memory."""
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_source(Path(tmp), args.images)
        for kind, source in (("folder", Path(tmp)), ("jsonl", Path(tmp) / "m.jsonl")):
            for world in args.world:
                for name, before in [("share", None)] + ([(args.before, args.before)] if args.before else []):
                    result = measure(source, world, before) | {"source": kind, "world": world, "scan": name}
                    results.append(result)
                    print(f"  {kind} {name} world {world}: {result['seconds']:.1f} s", file=sys.stderr)
    print(f"{args.images:,} images (empty files, 25-tag captions, {PER_FOLDER} a folder); rank 0's scan in a "
          "freshly spawned process, the page cache warm; memory = VmHWM after the scan less VmRSS before.\n")
    print("| source | scan | world | records kept | seconds | peak - start MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['source']} | {r['scan']} | {r['world']} | {r['records']:,} | {r['seconds']:.1f} | "
              f"{r['grown_mb']:.0f} |")
