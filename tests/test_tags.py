"""Tag normalisation, tag-frequency weights (NAI V3) and caption shuffling."""

from __future__ import annotations

import math
import random

import pytest

from ztsnr_ds.data.tags import (
    TagWeightConfig,
    normalize_tag,
    parse_tags,
    per_tag_weights,
    raw_tag_weight,
    shuffle_caption,
    tag_frequencies,
    tag_weight,
    tag_weights,
)


def test_normalisation_happens_once_and_everywhere():
    assert normalize_tag("Blue_Sky ") == normalize_tag("blue sky") == "blue sky"
    assert normalize_tag("  Long \t  HAIR__x ") == "long hair x"
    assert parse_tags("a, , Blue_Sky,,  long   hair  ,") == ["a", "blue sky", "long hair"]
    assert parse_tags("") == [] and parse_tags(" , ,") == []
    # the two spellings are one tag for the frequency count
    assert tag_frequencies([parse_tags("Blue_Sky"), parse_tags("blue sky, cloud")]) == {
        "blue sky": 1.0,
        "cloud": 0.5,
    }


def test_per_tag_weight_formula():
    # 16x more frequent than the median at alpha 0.5: 16^-0.5 = 0.25 before clipping
    assert raw_tag_weight(0.16, 0.01, 0.5) == pytest.approx(0.25)
    assert raw_tag_weight(0.01 / 16, 0.01, 0.5) == pytest.approx(4.0)
    cfg = TagWeightConfig(alpha=0.5, w_min=0.5, w_max=2.0)
    assert tag_weight(0.16, 0.01, cfg) == 0.5  # clipped up to w_min
    assert tag_weight(0.01 / 16, 0.01, cfg) == 2.0  # clipped down to w_max
    assert tag_weight(0.04, 0.01, TagWeightConfig(w_min=0.1)) == pytest.approx(0.5)
    assert tag_weight(0.04, 0.01, TagWeightConfig(alpha=0.0)) == 1.0


def test_image_weights_by_hand():
    lists = [["a", "b"], ["a"], ["a", "c", "c"], []]
    # f: a 3/4, b 1/4, c 1/4 -> median 1/4; w_a = 3^-0.5, w_b = w_c = 1 (no clipping at [0.3, 2])
    cfg = TagWeightConfig(alpha=0.5, w_min=0.3, w_max=2.0)
    assert per_tag_weights(lists, cfg) == pytest.approx({"a": 3**-0.5, "b": 1.0, "c": 1.0})
    raw = [3**-0.25, 3**-0.5, 3**-0.25, 1.0]  # geometric means; the untagged image is neutral (1)
    mean = sum(raw) / 4
    got = tag_weights(lists, cfg)
    assert got == pytest.approx([r / mean for r in raw], rel=1e-12)
    assert got[3] / got[0] == pytest.approx(3**0.25)


def test_weights_respect_limits_and_mean_one():
    rng = random.Random(0)
    vocab = [f"tag{i}" for i in range(60)]
    # Zipf-like tag popularity: some tags are on most images, many are rare
    lists = [[t for k, t in enumerate(vocab) if rng.random() < 0.9 / (k + 1) ** 0.8] for _ in range(500)]
    lists += [[f"rare{i}"] for i in range(5)]  # on one image each: far below the median
    lists.append([])  # untagged: raw weight 1, so it reveals the normalisation constant
    cfg = TagWeightConfig()
    per_tag = per_tag_weights(lists, cfg)
    assert min(per_tag.values()) == cfg.w_min and max(per_tag.values()) == cfg.w_max  # both clips active
    weights = tag_weights(lists, cfg)
    assert math.fsum(weights) / len(weights) == pytest.approx(1.0, abs=1e-12)
    # before normalisation every image weight is a geometric mean of clipped values
    raw = [w / weights[-1] for w in weights]
    assert all(cfg.w_min - 1e-12 <= w <= cfg.w_max + 1e-12 for w in raw)
    assert min(raw) < 0.7 and max(raw) == pytest.approx(cfg.w_max)  # the rare-only images
    assert len(set(round(w, 9) for w in weights)) > 10
    assert tag_weights([]) == [] and tag_weights([[], []]) == [1.0, 1.0]


@pytest.mark.parametrize(
    "field, kwargs", [("alpha", dict(alpha=-1)), ("w_min", dict(w_min=0)), ("w_max", dict(w_max=0.4))]
)
def test_invalid_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"TagWeightConfig\.{field}="):
        TagWeightConfig(**kwargs)


def test_shuffle_caption_keeps_head_and_permutes_tail():
    tags = [f"t{i}" for i in range(12)]
    caption = ",".join(tags)
    orders = set()
    for seed in range(10):
        out = shuffle_caption(caption, 3, random.Random(seed)).split(", ")
        assert out[:3] == tags[:3] and sorted(out[3:]) == sorted(tags[3:])
        orders.add(tuple(out))
    assert len(orders) == 10
    assert shuffle_caption(caption, 3, random.Random(4)) == shuffle_caption(caption, 3, random.Random(4))
    assert shuffle_caption("A_b, c", 5, random.Random(0)) == "a b, c"
    with pytest.raises(ValueError, match="keep_first"):
        shuffle_caption(caption, -1, random.Random(0))
