"""Build or update the latent cache: ``python launch/cache.py --config cfg.yaml``.

The YAML needs ``model: {pretrained: <diffusers SDXL folder or single-file SDXL>}`` (VAE, and the text
encoders when ``data.cache_text``) and a ``data:`` section holding the fields of
``ztsnr_ds.data.cache.CacheConfig``; an unknown ``data`` key is an error. Other top-level sections and
other ``model`` keys are ignored, so the training YAML can be passed as is.
Relative paths are relative to the working directory.

Several processes split the images and rank 0 merges:
    deepspeed --num_gpus 8 launch/cache.py --config cfg.yaml
    torchrun --nproc_per_node 8 launch/cache.py --config cfg.yaml
(RANK / WORLD_SIZE / LOCAL_RANK from the launcher; torch.distributed with gloo, only for barriers.)
Re-running resumes an interrupted build and re-encodes only new or changed images.

Check or convert a cache (``--cache_dir`` instead of ``--config`` works for both):
    python launch/cache.py --config cfg.yaml --verify   every shard's sha256 and every sample's CRC-32,
                                                        on threads (and ranks); report: verify_report.json
    python launch/cache.py --cache_dir DIR --convert    a format-1 cache (manifest.jsonl) gets its index
"""

from __future__ import annotations

import json
import logging
import sys
from argparse import ArgumentError
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from ztsnr_ds.console import PORT_HINT, port_in_use, quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # before DeepSpeed's first warning

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402

from ztsnr_ds import integrity  # noqa: E402
from ztsnr_ds.config import CaptionConfig, did_you_mean, leaf_keys  # noqa: E402
from ztsnr_ds.data.cache import CacheConfig  # noqa: E402
from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError, write_atomic  # noqa: E402
from ztsnr_ds.text import MAX_CHUNKS  # noqa: E402

if TYPE_CHECKING:
    from ztsnr_ds.data.cache_build import BuildStats
# The build's modules (diffusers, DeepSpeed: seconds to import) are imported once the config is read, so a
# config error shows at once.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPACE_FIX = "free space or move data.cache_dir, then run the same command again (finished shards are kept)"


def cli_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Encode a dataset into the SDXL latent cache (see module docstring).")
    parser.add_argument("--config", type=str, help="YAML with model.pretrained and data sections")
    parser.add_argument("--cache_dir", type=str, help="cache to --verify or --convert (default: config's)")
    parser.add_argument("--verify", action="store_true", help="check every shard and sample; build nothing")
    parser.add_argument("--convert", action="store_true", help="write the index of a format-1 cache")
    parser.add_argument("--batch_size", type=int, default=8, help="images per VAE call")
    parser.add_argument("--workers", type=int, default=4, help="threads hashing and decoding images")
    parser.add_argument("--dtype", type=str, default="float32", choices=list(DTYPES),
                        help="VAE / text encoder dtype; float32 is safe, the SDXL VAE overflows in float16")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; unused")
    return parser


def read_sections(path: str | Path) -> tuple[CacheConfig, str, int]:
    """(CacheConfig from ``data``, ``model.pretrained``, ``captions.max_chunks``) of a YAML file, validated
    by jsonargparse (max_chunks: for cached text and the caption report; default 3 as in training)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    model = raw.get("model") or {}
    parser = ArgumentParser(prog=f"{Path(__file__).name} (sections of {path})", exit_on_error=False)
    parser.add_class_arguments(CacheConfig, "data")
    parser.add_argument("--model.pretrained", type=str, required=True, help="SDXL folder or single file")
    parser.add_argument("--captions.max_chunks", type=int, default=3, help="75-token chunks per caption")
    captions = {k: v for k, v in (raw.get("captions") or {}).items() if k == "max_chunks"}
    sections = {"data": raw.get("data") or {}, "model": {"pretrained": model.get("pretrained")},
                "captions": captions}
    try:
        init = parser.instantiate(parser.parse_object(sections))
        if not 1 <= init.captions.max_chunks <= MAX_CHUNKS:  # before any model loads
            raise ValueError(f"captions.max_chunks = {init.captions.max_chunks} must lie in 1..{MAX_CHUNKS}")
        if init.data.cache_text:  # caption edits a cached embedding cannot follow: refused before any work
            from ztsnr_ds.mixing import caption_control

            caption_control(SimpleNamespace(data=init.data,
                                            captions=CaptionConfig(**(raw.get("captions") or {}))), [])
    except (ArgumentError, ValueError, TypeError) as err:
        print(f"config error: {did_you_mean(str(err), leaf_keys(parser))}", file=sys.stderr)
        raise SystemExit(2) from None
    return init.data, init.model.pretrained, init.captions.max_chunks


def main(argv: list[str] | None = None) -> BuildStats | dict | int:
    parser = cli_parser()
    args = parser.parse_args(argv)
    if args.verify or args.convert:
        if args.cache_dir is None and args.config is None:
            parser.error("--verify and --convert need --cache_dir DIR or --config cfg.yaml")
        root = Path(args.cache_dir or read_sections(args.config)[0].cache_dir)
        try:
            return verify(root, args.workers) if args.verify else convert(root)
        except (CacheError, integrity.NoSpaceError) as err:
            print(f"launch/cache.py: {err}", file=sys.stderr)
            sys.exit(2)
    if args.config is None:
        parser.error("--config is required to build a cache")
    cfg, pretrained, max_chunks = read_sections(args.config)
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.models import load_frozen

    # Only barriers travel (gloo, even on GPUs); a long timeout because ranks may finish hours apart.
    ours = not dist.is_initialized()  # a caller's group (a test, a notebook) is left as it was
    try:
        dist_info = init_distributed(backend="gloo", timeout=timedelta(hours=48))
    except Exception as err:
        if port_in_use(err):
            sys.exit(f"launch/cache.py: {PORT_HINT}\n({type(err).__name__}: {err})")
        raise
    rank, world_size, local_rank = dist_info.rank, dist_info.world_size, dist_info.local_rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(message)s")
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    parts = load_frozen(pretrained, dtype=DTYPES[args.dtype])
    parts.vae.to(device)
    if cfg.cache_text:
        parts.text_encoder.to(device)
        parts.text_encoder_2.to(device)
    try:
        with integrity.no_space_guard(Path(cfg.cache_dir), "the cache build", SPACE_FIX):
            stats = build_cache(cfg, parts, rank, world_size, batch_size=args.batch_size,
                                workers=args.workers, max_chunks=max_chunks, progress=rank == 0)
        if stats.report is not None:
            print(where_things_are(Path(cfg.cache_dir), stats.report, args.config))
        return stats
    except integrity.NoSpaceError as err:  # shards are written whole or not at all: re-run to resume
        print(f"launch/cache.py: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()


def where_things_are(root: Path, report: dict, config: str) -> str:
    """The end of a build: what the cache holds, where the report is, and the next command."""
    skipped = len(report["bad"]) + len(report["scan_problems"])
    lines = [f"cache: {report['images']} images in {len(report['buckets'])} buckets, {report['shards']} "
             f"shards ({report['bytes'] / 2**20:.1f} MiB) in {root}",
             f"  report: {root / 'report.json'} ({skipped} files skipped or kept with a warning, each with "
             f"its reason; {report['upscaled']['images']} images enlarged to their bucket)"]
    if report["images"] == 0:
        lines.append("  no image was cached: see the report's reasons (supported formats, sizes, captions)")
    lines.append(f"next: python launch/train.py --config {config}")
    return "\n".join(lines)


def convert(root: Path) -> int:
    from ztsnr_ds.data.cache_merge import convert_legacy

    with integrity.no_space_guard(root, "the index", SPACE_FIX):
        try:
            rows = convert_legacy(root)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:  # malformed rows
            raise CacheError(f"{root}: manifest.jsonl or shards.json is malformed ({type(err).__name__}: "
                             f"{err}); {REBUILD_HINT}") from None
    print(f"{root}: index written for {rows} rows")
    return rows


def verify(root: Path, workers: int) -> dict:
    """Each rank checks every world_size-th shard; rank 0 joins the reports. Exit 1 on any problem."""
    from ztsnr_ds.data.cache_verify import verify_cache
    from ztsnr_ds.engine import init_distributed

    ours = not dist.is_initialized()
    dist_info = init_distributed(backend="gloo", timeout=timedelta(hours=48))
    report = verify_cache(root, dist_info.rank, dist_info.world_size, workers, progress=dist_info.rank == 0)
    if dist.is_initialized():
        reports = [None] * dist_info.world_size
        dist.all_gather_object(reports, report)
        if ours:
            dist.destroy_process_group()
        report = {"shards": sum(r["shards"] for r in reports), "bytes": sum(r["bytes"] for r in reports),
                  "samples": sum(r["samples"] for r in reports),
                  "problems": [p for r in reports for p in r["problems"]]}
    if dist_info.rank == 0:
        write_atomic(root / "verify_report.json", json.dumps(report, indent=1).encode())
        print(f"{root}: {report['shards']} shards ({report['bytes'] / 2**20:.1f} MiB), {report['samples']} "
              f"samples checked, {len(report['problems'])} problems (verify_report.json)")
        for problem in report["problems"][:20]:
            print("  " + ", ".join(f"{k}={v}" for k, v in problem.items()))
    if report["problems"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
