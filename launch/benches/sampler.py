"""Epoch planning of the bucket sampler at 10M ids."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from launch.benches import arg, benchmark


@benchmark(
    arg("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="cached ids"),
    arg("--world", type=int, default=64, help="ranks simulated (one plans; the plan is the same on all)"),
    arg("--micro-batch", type=int, default=4),
    arg("--repeats", type=int, default=3),
)
def bench_sampler(args: argparse.Namespace) -> None:
    """Epoch plan time of the bucket sampler at 10M ids (NAI's 33 buckets, heavy-tailed sizes).

    Baseline in the same process: one numpy permutation of all N ids, the floor of any shuffled plan.
    """

    from ztsnr_ds.data.buckets import BucketConfig, bucket_key, make_buckets
    from ztsnr_ds.data.sampler import BucketBatchSampler

    keys = [bucket_key(b) for b in make_buckets(BucketConfig())]
    share = np.arange(1, len(keys) + 1, dtype=np.float64) ** -1.5  # bucket k holds ~ k^-1.5 of the ids
    print(f"{len(keys)} buckets, sizes ~ k^-1.5, world {args.world}, micro-batch {args.micro_batch}; "
          f"median of {args.repeats}; sampler init includes the uniqueness check, digest and epoch 0.\n")
    print("| ids | sampler init s | plan one epoch s | one permutation of N s | plan / permutation "
          "| steps | rank plan MiB | state bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        sizes = np.maximum(1, (share / share.sum() * rows).astype(np.int64))
        sizes[0] += rows - sizes.sum()
        bounds = np.r_[0, np.cumsum(sizes)]
        buckets = {key: np.arange(bounds[i], bounds[i + 1]) for i, key in enumerate(keys)}
        start = time.perf_counter()
        sampler = BucketBatchSampler(buckets, args.micro_batch, args.world, 0, seed=0)
        init = time.perf_counter() - start
        plan_s, perm_s = [], []
        for epoch in range(1, args.repeats + 1):
            start = time.perf_counter()
            plan = sampler.plan(epoch).rank_plan(0)
            plan_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.random.default_rng(epoch).permutation(rows)
            perm_s.append(time.perf_counter() - start)
        mib = sum(a.nbytes for a in (plan.ids, plan.offsets, plan.bucket, plan.done)) / 2**20
        plan_t, perm_t = statistics.median(plan_s), statistics.median(perm_s)
        print(f"| {rows:,} | {init:.2f} | {plan_t:.2f} | {perm_t:.2f} | {plan_t / perm_t:.1f} | {plan.steps} "
              f"| {mib:.1f} | {len(json.dumps(sampler.state_dict()))} |")
