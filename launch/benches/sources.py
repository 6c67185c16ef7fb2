"""Several sources with repeats against one source: sampler start-up and epoch plans at 10M rows."""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from launch.benches import arg, benchmark, interleaved_times


@benchmark(
    arg("--rows", type=int, default=10_000_000, help="cached ids"),
    arg("--world", type=int, default=64, help="ranks simulated (one plans; the plan is the same on all)"),
    arg("--micro-batch", type=int, default=4),
    arg("--repeats", type=int, default=3, help="timed runs of each case (after one warm-up)"),
)
def bench_sources(args: argparse.Namespace) -> None:
    """Sampler start-up and one epoch's rank plan: 3 sources with repeats 2.5 / 1 / 0.5 (shares 0.2 / 0.3 /
    0.5 of the rows, so an epoch has 1.05 N uses) and one source against no sources (the sampler's path
    without data.sources), in one process.

    Timed: the sampler's construction (uniqueness check, digest, per-source counts, epoch 0) and a later
    epoch's rank plan with this rank's samples-seen counts (what the trainer computes once an epoch); also
    the index's new check of the source column (min and max of an int16 column).
    """
    from launch.benches.data import nai_bucket_sizes
    from ztsnr_ds.data.repeats import SourceRepeats
    from ztsnr_ds.data.sampler import BucketBatchSampler

    keys, sizes = nai_bucket_sizes(args.rows)
    ids = np.random.default_rng(0).permutation(args.rows)  # buckets hold ids of every source
    bounds = np.r_[0, np.cumsum(sizes)]
    buckets = {key: np.sort(ids[bounds[i]:bounds[i + 1]]) for i, key in enumerate(keys)}
    first = (np.array([0.2, 0.5]) * args.rows).astype(np.int64)  # shares 0.2 / 0.3 / 0.5
    source = np.searchsorted(first, np.arange(args.rows), "right").astype(np.int16)
    mix = SourceRepeats(source, np.array([2.5, 1.0, 0.5]), ["danbooru", "e621", "aesthetic"])
    one = SourceRepeats(np.zeros(args.rows, np.int16), np.ones(1), [""])
    epoch = iter(range(1, 10**6))

    def start(repeats: SourceRepeats | None) -> BucketBatchSampler:
        return BucketBatchSampler(buckets, args.micro_batch, args.world, 0, seed=0, repeats=repeats)

    samplers = {"none": start(None), "single": start(one), "3 sources": start(mix)}

    def plan(name: str) -> None:
        s = samplers[name]
        s.epoch = next(epoch)
        s._rank_plan(s.epoch)  # the plan and, with sources, the samples-seen table

    cases = {"init none": lambda: start(None), "init single": lambda: start(one),
             "init 3 sources": lambda: start(mix), "plan none": lambda: plan("none"),
             "plan single": lambda: plan("single"), "plan 3 sources": lambda: plan("3 sources"),
             "source column check": lambda: (source.min(), source.max())}
    times = interleaved_times(cases, warmup=1, repeats=args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    uses = {name: len(s.plan(1).ids) for name, s in samplers.items()}
    print(f"{args.rows:,} rows in {len(keys)} NAI buckets, world {args.world}, micro-batch "
          f"{args.micro_batch}, median of {args.repeats} (interleaved). Uses per epoch: single "
          f"{uses['single']:,}, 3 sources {uses['3 sources']:,}.\n")
    print("| case | no sources s | 1 source s | 3 sources s | 1 / none | 3 / none | 3 / none per use |")
    print("|---|---|---|---|---|---|---|")
    for what in ("init", "plan"):
        a, b, c = (med[f"{what} {name}"] for name in ("none", "single", "3 sources"))
        per_use = c / a * uses["single"] / uses["3 sources"]
        print(f"| {what} | {a:.2f} | {b:.2f} | {c:.2f} | {b / a:.2f} | {c / a:.2f} | {per_use:.2f} |")
    check = med["source column check"] * 1e3
    print(f"\nsource column check (min + max of {args.rows:,} int16): {check:.1f} ms")
    print("\n" + samplers["3 sources"].summary().split("\n", 34)[-1])
