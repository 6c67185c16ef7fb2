"""Source repeats in the sampler (data/repeats.py): exact uses per source and epoch, a fresh fractional
part each epoch, the same global batches on 1 and 2 ranks, bitwise resume, the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_sampler import HEAVY, epoch, ranks, step_ids
from ztsnr_ds.data.repeats import SourceRepeats, source_repeats, uses_per_source
from ztsnr_ds.data.sampler import BucketBatchSampler

ROWS = int(max(max(ids) for ids in HEAVY.values())) + 1
SOURCE = np.random.default_rng(5).integers(0, 3, ROWS).astype(np.int16)  # each row's source, at random
MIX = SourceRepeats(SOURCE, np.array([2.5, 1.0, 0.0]), ["a", "b", "c"])
HELD = {int(i) for i in HEAVY[next(iter(HEAVY))][:7]}  # a held-out few: not in the sampler's buckets
TRAIN = {key: np.setdiff1d(np.asarray(ids), list(HELD)) for key, ids in HEAVY.items()}


def test_uses_per_source_formula():
    assert uses_per_source(np.array([10, 5, 7, 3]), np.array([2.5, 0.5, 1.0, 0.0])).tolist() == [25, 3, 7, 0]


def test_repeats_give_exact_counts_and_a_fresh_fraction_every_epoch():
    samplers = ranks(4, 2, TRAIN, seed=3, repeats=MIX)
    images = np.bincount(SOURCE[np.concatenate(list(TRAIN.values()))], minlength=3)
    extra = int(np.floor(0.5 * images[0] + 0.5))
    thirds = []
    for e in range(3):
        steps = samplers[0].plan(e).steps  # epochs differ by a few steps (other tails)
        uses = np.array([i for _ in range(steps) for i in step_ids([next(s) for s in samplers])])
        assert len(np.unique(uses)) == len(uses)  # every use once (use ids are distinct)
        rows, copy = uses % ROWS, uses // ROWS
        assert not set(rows.tolist()) & HELD
        count = np.bincount(rows, minlength=ROWS)
        per_source = np.bincount(SOURCE[rows], minlength=3)
        assert per_source.tolist() == [2 * images[0] + extra, images[1], 0], f"epoch {e}"
        a = np.flatnonzero(SOURCE == 0)
        a = a[np.isin(a, np.concatenate(list(TRAIN.values())))]
        assert set(count[a].tolist()) == {2, 3} and (count[a] == 3).sum() == extra
        assert (count[np.flatnonzero(SOURCE == 1)][np.isin(np.flatnonzero(SOURCE == 1), rows)] == 1).all()
        assert np.array_equal(np.sort(copy[count[rows] == 3]), np.sort(np.tile([0, 1, 2], extra)))
        thirds.append(set(a[count[a] == 3].tolist()))
    assert thirds[0] != thirds[1] != thirds[2]  # the fractional part is drawn afresh each epoch
    summary = samplers[0].summary_dict["sources"]
    assert summary["a"] == {"images": int(images[0]), "repeats": 2.5,
                            "uses_per_epoch": 2 * int(images[0]) + extra,
                            "distinct_per_epoch": int(images[0])}
    assert summary["c"]["uses_per_epoch"] == 0 and "a" in samplers[0].summary()


def test_repeats_of_one_plan_as_without_repeats():
    ones = SourceRepeats(SOURCE, np.ones(3), ["a", "b", "c"])
    plain = BucketBatchSampler(TRAIN, 4, 2, 0, seed=1)
    mixed = BucketBatchSampler(TRAIN, 4, 2, 0, seed=1, repeats=ones)
    assert np.array_equal(plain.plan(1).ids, mixed.plan(1).ids)
    assert plain.state_dict()["buckets_digest"] == mixed.state_dict()["buckets_digest"]


def test_one_and_two_ranks_train_the_same_global_batches():
    """Micro 4 on 1 rank and micro 2 on 2 ranks: the same use ids in every step but those holding tails
    smaller than 2 (joined across buckets), as without repeats."""
    one = epoch(ranks(1, 4, TRAIN, seed=11, repeats=MIX))
    two = epoch(ranks(2, 2, TRAIN, seed=11, repeats=MIX))
    small = {i for step in one for i in step_ids(step) if len(step_ids(step)) < 2}
    touched = set().union(*[set(step_ids(s)) for s in two if small & set(step_ids(s))])
    kept_one = [sorted(step_ids(s)) for s in one if not touched & set(step_ids(s))]
    kept_two = [sorted(step_ids(s)) for s in two if not touched & set(step_ids(s))]
    assert kept_two == kept_one and len(kept_one) > 0.9 * len(one)


def test_resume_mid_epoch_with_repeats_is_bitwise():
    full_run = ranks(2, 3, TRAIN, seed=9, repeats=MIX)
    n = len(full_run[0])
    full = [[next(s) for s in full_run] for _ in range(n + 4)]
    for k in (7, n + 1):
        first = ranks(2, 3, TRAIN, seed=9, repeats=MIX)
        for _ in range(k):
            [next(s) for s in first]
        state = json.loads(json.dumps(first[0].state_dict()))
        resumed = ranks(2, 3, TRAIN, seed=9, repeats=MIX)
        for s in resumed:
            s.load_state_dict(state)
        assert [[next(s) for s in resumed] for _ in range(len(full) - k)] == full[k:], f"resume at {k}"
    other = ranks(2, 3, TRAIN, seed=9, repeats=SourceRepeats(SOURCE, np.array([2.0, 1.0, 0.0]), MIX.names))
    with pytest.raises(ValueError, match="bucket contents changed"):
        other[0].load_state_dict(state)


def test_config_and_cache_must_list_the_same_sources():
    assert source_repeats(["a", "b"], SOURCE, [("b", 2.0), ("a", 1.0)]).repeats.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"list \['b'\] in data.sources"):
        source_repeats(["a", "b"], SOURCE, [("a", 1.0)])


def test_replan_continues_a_grown_dataset_from_the_next_epoch(caplog):
    """A checkpoint of a run on part of the data: exact resume refuses the grown buckets; replan keeps the
    seed and plans the data as it is now from the next epoch, the plan a fresh sampler has there."""
    part = {key: ids[: len(ids) // 2] for key, ids in TRAIN.items()}
    old = BucketBatchSampler(part, 2, 2, 0, seed=4)
    for _ in range(5):
        next(old)
    state = json.loads(json.dumps(old.state_dict()))
    with pytest.raises(ValueError, match="resume_data: replan"):
        BucketBatchSampler(TRAIN, 2, 2, 0, seed=4, repeats=MIX).load_state_dict(state)
    grown = ranks(2, 2, TRAIN, seed=0, repeats=MIX, resume_data="replan")
    with caplog.at_level("WARNING"):
        for s in grown:
            s.load_state_dict(state)
    assert "replan" in caplog.text and "starts at epoch 1" in caplog.text
    assert all((s.epoch, s.position, s.seed) == (1, 0, 4) for s in grown)
    fresh = ranks(2, 2, TRAIN, seed=4, repeats=MIX)
    for s in fresh:
        s.epoch = 1
    assert [[next(s) for s in grown] for _ in range(20)] == [[next(s) for s in fresh] for _ in range(20)]


def test_samples_seen_per_source_counts_what_all_ranks_trained():
    samplers = ranks(2, 3, TRAIN, seed=2, repeats=MIX)
    n = len(samplers[0])
    taken = []
    for k in (7, n - 7 + 5):  # in epoch 0, then into epoch 1
        taken += [i for _ in range(k) for i in step_ids([next(s) for s in samplers])]
        counts = np.bincount(SOURCE[np.array(taken) % ROWS], minlength=3)
        assert samplers[1].samples_seen() == {f"seen/{name}": int(c) for name, c in zip(MIX.names, counts)}
