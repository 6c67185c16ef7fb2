"""Bucket set properties, nearest-aspect assignment, crops and their SDXL time_ids."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image

from ztsnr_ds.data.buckets import (
    BucketConfig,
    assign_bucket,
    bucket_key,
    make_buckets,
    parse_bucket_key,
    plan_crop,
    resize_and_crop,
)

SDXL = BucketConfig()
TINY = BucketConfig(max_area=256 * 256, min_side=128, max_side=512)
CONFIGS = [SDXL, TINY, BucketConfig(max_area=768 * 768, min_side=256, max_side=1024, max_aspect=2.0)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bucket_set_properties(cfg):
    buckets = make_buckets(cfg)
    assert buckets == sorted(set(buckets))
    assert set(buckets) == {(w, h) for h, w in buckets}  # symmetric under transpose
    for h, w in buckets:
        assert h % cfg.step == 0 and w % cfg.step == 0
        assert h * w <= cfg.max_area
        assert cfg.min_side <= min(h, w) and max(h, w) <= cfg.max_side
        assert max(h, w) / min(h, w) <= cfg.max_aspect
    side = math.isqrt(cfg.max_area) // 64 * 64
    assert (side, side) in buckets


def test_sdxl_buckets_match_the_nai_formula():
    buckets = make_buckets(SDXL)
    # h = min(2048, floor(2^20 / w / 64) * 64): the usual SDXL sizes 832x1216, 768x1344, 512x2048
    for bucket in [(1024, 1024), (1216, 832), (1344, 768), (2048, 512), (1600, 640), (832, 1216)]:
        assert bucket in buckets
    assert (1536, 640) in buckets  # the transpose of w = 1536 -> h = floor(682.7 / 64) * 64 = 640
    assert len(buckets) == 33
    tiny = [(128, 384), (128, 448), (128, 512), (192, 320), (256, 256)]
    assert make_buckets(TINY) == tiny + sorted((w, h) for h, w in tiny[:-1])


def test_assignment_minimises_log_aspect_distance():
    rng = random.Random(0)
    for cfg in (SDXL, TINY):
        buckets = make_buckets(cfg)
        for _ in range(2000):
            h, w = rng.randint(16, 8000), rng.randint(16, 8000)
            got = assign_bucket(h, w, buckets)
            distance = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in buckets]
            assert abs(math.log(h / w) - math.log(got[0] / got[1])) == pytest.approx(min(distance), abs=1e-12)
    assert assign_bucket(100, 400, make_buckets(TINY)) == (128, 512)
    assert assign_bucket(1000, 1000, make_buckets(SDXL)) == (1024, 1024)


@pytest.mark.parametrize("mode", ["center", "random"])
def test_crop_matches_time_ids(mode):
    buckets = make_buckets(TINY)
    rng, sizes = random.Random(1), random.Random(2)
    for _ in range(12):
        h, w = sizes.randint(40, 700), sizes.randint(40, 700)
        img = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8))
        bucket = assign_bucket(h, w, buckets)
        out, time_ids = resize_and_crop(img, bucket, mode, rng)
        orig_h, orig_w, top, left, th, tw = time_ids
        assert (orig_h, orig_w, th, tw) == (h, w, *bucket) and out.size == (tw, th)
        # resize to cover independently: the scale makes one side exact, the other at least as large
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        assert abs(rh - h * scale) <= 0.5 and abs(rw - w * scale) <= 0.5  # aspect kept
        assert rh == th or rw == tw
        assert 0 <= top <= rh - th and 0 <= left <= rw - tw  # crop inside the resized image
        if mode == "center":
            assert (top, left) == ((rh - th) // 2, (rw - tw) // 2)
        resized = np.asarray(img.resize((rw, rh), Image.Resampling.LANCZOS))
        assert np.array_equal(np.asarray(out), resized[top : top + th, left : left + tw])
        if rh > th:  # a crop one row off would give other pixels: the check has power
            assert not np.array_equal(np.asarray(out), resized[top + 1 : top + 1 + th, left : left + tw])


def test_random_crop_is_driven_by_the_rng():
    draws = [plan_crop(300, 1000, (256, 256), "random", random.Random(s)) for s in range(20)]
    assert len({d.left for d in draws}) > 5
    assert plan_crop(300, 1000, (256, 256), "random", random.Random(3)) == draws[3]
    with pytest.raises(ValueError, match="needs an rng"):
        plan_crop(300, 1000, (256, 256), "random")
    with pytest.raises(ValueError, match="valid: center, random"):
        plan_crop(300, 1000, (256, 256), "middle")


def mean_crop_loss(cfg: BucketConfig, num: int = 2001, long_side: int = 4096) -> float:
    """Share of the resized image's pixels cut away by the crop, averaged over aspect ratios
    h/w log-uniform from 1:4 to 4:1 (centre crop, images larger than every bucket)."""
    buckets = make_buckets(cfg)
    losses = []
    for log_ar in np.linspace(math.log(1 / 4), math.log(4), num):
        ar = math.exp(log_ar)
        h, w = (long_side, round(long_side / ar)) if ar >= 1 else (round(long_side * ar), long_side)
        bucket = assign_bucket(h, w, buckets)
        plan = plan_crop(h, w, bucket)
        losses.append(1 - bucket[0] * bucket[1] / (plan.resized_h * plan.resized_w))
    return float(np.mean(losses))


def test_mean_crop_loss_of_sdxl_buckets_is_small():
    loss = mean_crop_loss(SDXL)
    print(f"mean crop loss, SDXL buckets, aspect 1:4..4:1: {loss:.4%}")
    assert 0 < loss < 0.10
    # a single square bucket would lose far more, so the helper measures what it should
    assert mean_crop_loss(BucketConfig(max_aspect=1.0)) > 0.3


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("step", dict(step=0)),
        ("min_side", dict(min_side=500)),
        ("max_side", dict(max_side=1000)),
        ("max_side", dict(min_side=1024, max_side=512)),
        ("max_area", dict(max_area=500 * 500)),
        ("max_aspect", dict(max_aspect=0.5)),
    ],
)
def test_invalid_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"BucketConfig\.{field}="):
        BucketConfig(**kwargs)


def test_bucket_key_round_trip():
    assert bucket_key((1216, 832)) == "1216x832"
    assert all(parse_bucket_key(bucket_key(b)) == b for b in make_buckets(SDXL))
    with pytest.raises(ValueError, match="HxW"):
        parse_bucket_key("1216-832")
