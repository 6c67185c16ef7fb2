"""Distributed bucket sampler: coverage, carry-over, rank agreement, determinism, resume."""

from __future__ import annotations

import json
import logging

import pytest

from ztsnr_ds.data.sampler import BucketBatchSampler

SIZES = {"1024x1024": 37, "832x1216": 20, "1216x832": 5, "512x2048": 64}


def make_buckets() -> dict[str, list[int]]:
    buckets, start = {}, 0
    for key, size in SIZES.items():
        buckets[key] = list(range(start, start + size))[::-1]  # list order must not matter
        start += size
    return buckets


BUCKETS = make_buckets()
ALL_IDS = {i for ids in BUCKETS.values() for i in ids}
BUCKET_OF = {i: key for key, ids in BUCKETS.items() for i in ids}


def ranks(micro_batch: int, world_size: int, **kwargs) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(BUCKETS, micro_batch, world_size, r, **kwargs) for r in range(world_size)]


def global_steps(samplers: list[BucketBatchSampler], steps: int) -> list[tuple[str, list[int]]]:
    """Step all simulated ranks together; check they agree on the bucket; return the global batches."""
    out = []
    for _ in range(steps):
        parts = [next(s) for s in samplers]
        keys = {key for key, _ in parts}
        assert len(keys) == 1, f"ranks disagree on the bucket: {keys}"
        assert all(len(ids) == samplers[0].micro_batch for _, ids in parts)
        out.append((parts[0][0], [i for _, ids in parts for i in ids]))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_each_epoch_covers_every_id_once_and_carries_the_rest(world_size):
    micro = 2
    g = micro * world_size
    samplers = ranks(micro, world_size, seed=5)
    n = samplers[0].batches_per_epoch
    assert n == sum(size // g for size in SIZES.values())
    assert samplers[0].carried_count == sum(size % g for size in SIZES.values())
    never = {i for key, ids in BUCKETS.items() if len(ids) < g for i in ids}
    carried_before: set[int] = set()
    for epoch in range(3):
        batches = global_steps(samplers, n)
        assert all(s.epoch == epoch for s in samplers)
        used = [i for _, ids in batches for i in ids]
        assert len(used) == len(set(used))  # nothing twice within an epoch, across all ranks
        assert all(BUCKET_OF[i] == key for key, ids in batches for i in ids)
        carried = ALL_IDS - set(used)
        assert len(carried) == samplers[0].carried_count
        assert carried_before <= set(used) | never  # last epoch's leftovers come back this epoch
        assert never <= carried
        carried_before = carried
    if never:
        assert set().union(*map(set, samplers[0].samples_never_used.values())) == never
    if world_size > 1:
        assert len({tuple(b) for _, b in batches}) == len(batches)
        runs = 1 + sum(a != b for (a, _), (b, _) in zip(batches, batches[1:]))
        assert runs > len({key for key, _ in batches})  # buckets are interleaved, not in blocks


def test_carried_ids_open_the_next_epoch_pool():
    s = BucketBatchSampler({"a": list(range(10))}, micro_batch=4, world_size=1, rank=0, seed=1)
    used = {i for _ in range(2) for i in next(s)[1]}
    assert s.epoch == 0 and s.state_dict()["carry"] == {}  # carry INTO epoch 0
    second = [next(s)[1] for _ in range(2)]
    carry = s.state_dict()["carry"]["a"]
    assert s.epoch == 1 and set(carry) == set(range(10)) - used
    assert any(batch[:2] == carry for batch in second)  # first in the bucket's pool


def test_resume_mid_epoch_gives_the_same_batches():
    uninterrupted = ranks(2, 4, seed=9)
    reference = global_steps(uninterrupted, 40)  # G = 8: 4 + 2 + 0 + 8 = 14 batches per epoch
    for k in (0, 5, 14, 17, 33):
        first = ranks(2, 4, seed=9)
        global_steps(first, k)
        state = json.loads(json.dumps(first[0].state_dict()))  # through JSON, as in a checkpoint
        assert all(s.state_dict() == first[0].state_dict() for s in first)  # rank-independent state
        # resume on a different split of the same global batch (micro 4 x world 2), other seed given
        resumed = ranks(4, 2, seed=123)
        for s in resumed:
            s.load_state_dict(state)
        assert global_steps(resumed, 40 - k) == reference[k:], f"resume at step {k}"
        assert (resumed[0].epoch, resumed[0].position) == (uninterrupted[0].epoch, uninterrupted[0].position)


def test_seeds_and_shuffle():
    a, b, c = (global_steps([BucketBatchSampler(BUCKETS, 4, 1, 0, seed=s)], 20) for s in (0, 0, 1))
    assert a == b and a != c
    ordered = global_steps([BucketBatchSampler(BUCKETS, 4, 1, 0, shuffle=False)], 5)
    assert ordered[:2] == [("1024x1024", [0, 1, 2, 3]), ("1024x1024", [4, 5, 6, 7])]
    e0, e1 = (
        global_steps([BucketBatchSampler(BUCKETS, 4, 1, 0, seed=0)], 60)[i * 30 : (i + 1) * 30]
        for i in (0, 1)
    )
    assert e0 != e1  # epochs differ


def test_state_dict_is_json_and_resume_refuses_mismatches():
    s = BucketBatchSampler(BUCKETS, 2, 4, 1, seed=3)
    global_steps([s], 3)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert {"seed", "epoch", "position", "carry"} <= state.keys()
    with pytest.raises(ValueError, match=r"global batch .* was 8 \(2 x 4\), now 6 \(2 x 3\)"):
        BucketBatchSampler(BUCKETS, 2, 3, 0).load_state_dict(state)
    other = dict(BUCKETS, extra=[999, 1000])
    with pytest.raises(ValueError, match="bucket contents changed"):
        BucketBatchSampler(other, 2, 4, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle was True, now False"):
        BucketBatchSampler(BUCKETS, 2, 4, 0, shuffle=False).load_state_dict(state)


def test_small_buckets_are_reported_and_bad_arguments_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="ztsnr_ds.data.sampler"):
        s = BucketBatchSampler(BUCKETS, 4, 2, 0)
    assert s.samples_never_used == {"1216x832": sorted(BUCKETS["1216x832"])}
    assert "5 never used" in caplog.text and "1216x832 (5)" in caplog.text
    assert "carried to the next epoch" in s.summary()
    with pytest.raises(ValueError, match="no bucket holds a full global batch of 128"):
        BucketBatchSampler(BUCKETS, 16, 8, 0)
    with pytest.raises(ValueError, match="rank=2 outside"):
        BucketBatchSampler(BUCKETS, 2, 2, 2)
    with pytest.raises(ValueError, match="unique"):
        BucketBatchSampler({"a": [1, 2], "b": [2, 3]}, 1, 1, 0)
