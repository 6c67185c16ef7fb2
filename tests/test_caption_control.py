"""Per-use caption edits (data/caption_control.py): tag dropout with protected tags, one of several
captions by weight, and the defaults drawing exactly what the plain tag shuffle drew."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ztsnr_ds.data.caption_control import CaptionControl, CaptionRule, canonical_caption, edit_caption
from ztsnr_ds.data.caption_template import CaptionTemplate
from ztsnr_ds.data.tags import FIELD_SEP, parse_tags

CAPTION = "masterpiece, 1girl, Blue_Sky, solo, smile, hat, cat, outdoors, red eyes, tree"


def tag_shuffle_before(caption: str, keep_first: int, rng: random.Random) -> str:
    """The trainer's caption edit before this change, written out: the first tags kept, the rest shuffled."""
    tags = [" ".join(t.replace("_", " ").lower().split()) for t in caption.split(",")]
    tags = [t for t in tags if t]
    tail = tags[keep_first:]
    rng.shuffle(tail)
    return ", ".join(tags[:keep_first] + tail)


def test_defaults_draw_what_the_tag_shuffle_drew():
    for seed in range(20):
        assert edit_caption(CAPTION, CaptionRule(), random.Random(seed)) == tag_shuffle_before(
            CAPTION, 1, random.Random(seed))
    assert edit_caption(CAPTION, CaptionRule(shuffle_tags=False), random.Random(0)) == CAPTION


def test_tag_dropout_never_drops_keep_first_or_keep_tags():
    rule = CaptionRule(keep_first=2, tag_dropout=0.5, keep_tags=frozenset({"blue sky", "tree"}))
    kept = Counter()
    for seed in range(400):
        tags = parse_tags(edit_caption(CAPTION, rule, random.Random(seed)))
        assert tags[:2] == ["masterpiece", "1girl"] and {"blue sky", "tree"} <= set(tags)
        kept.update(tags[2:])
    droppable = [t for t in parse_tags(CAPTION)[2:] if t not in ("blue sky", "tree")]
    assert all(150 < kept[t] < 250 for t in droppable)  # each kept with probability 1/2 (binomial, 5 sigma)
    everything = CaptionRule(keep_first=1, tag_dropout=1.0, keep_tags=frozenset({"hat"}), shuffle_tags=False)
    assert edit_caption(CAPTION, everything, random.Random(1)) == "masterpiece, hat"


def test_one_of_several_captions_by_weight():
    caption = "1girl, solo, hat\na girl wearing a hat\n\nthird"
    always_first = CaptionRule(shuffle_tags=False, caption_weights=(1.0, 0.0))
    assert {edit_caption(caption, always_first, random.Random(s)) for s in range(50)} == {"1girl, solo, hat"}
    weighted = CaptionRule(shuffle_tags=False, caption_weights=(2.0, 1.0))  # lines 2 and 3 weigh 1 each
    picks = Counter(edit_caption(caption, weighted, random.Random(s)) for s in range(2000))
    assert set(picks) == {"1girl, solo, hat", "a girl wearing a hat", "third"}
    assert abs(picks["1girl, solo, hat"] / 2000 - 0.5) < 0.05  # 2 / (2 + 1 + 1), 4.5 sigma


def test_control_applies_each_source_rule_and_dropout():
    plain = CaptionRule(shuffle_tags=False)
    emptied = CaptionRule(shuffle_tags=False, tag_dropout=1.0, keep_first=0)
    control = CaptionControl([plain, emptied])
    rngs = [random.Random(i) for i in range(3)]
    edited = control.edit([CAPTION, CAPTION, CAPTION], [0, 1, 0], [False, False, True], rngs)
    assert edited == [CAPTION, "", ""]


TEMPLATE = "{rating}, {character}, by {artist}, {general}, {year}"
ENTRY = {"rating": "safe", "character": [], "artist": "Foo_Bar", "general": ["1girl", "solo", "hat"],
         "year": 2023}


def test_template_builds_the_expected_strings_and_empty_fields_vanish():
    template = CaptionTemplate.parse(TEMPLATE)
    assert template.columns == ["rating", "character", "artist", "general", "year"]
    cached = template(ENTRY)
    assert cached == FIELD_SEP.join(["safe", "", "by Foo_Bar", "1girl, solo, hat", "2023"])
    assert parse_tags(cached) == ["safe", "by foo bar", "1girl", "solo", "hat", "2023"]  # tag weights' view
    rules = template.rules({}, "data.sources[0].fields")
    for seed in range(5):  # the global shuffle leaves a template's order alone
        assert edit_caption(cached, CaptionRule(fields=rules), random.Random(seed)) == (
            "safe, by foo bar, 1girl, solo, hat, 2023")
    rules = template.rules({"artist": {"dropout": 1.0}, "general": {"shuffle": True}}, "f")
    outs = {edit_caption(cached, CaptionRule(fields=rules), random.Random(s)) for s in range(30)}
    assert all(o.startswith("safe, ") and o.endswith(", 2023") and "foo" not in o for o in outs)
    assert {tuple(sorted(o.split(", ")[1:4])) for o in outs} == {("1girl", "hat", "solo")} and len(outs) > 1
    assert template({"rating": "safe"}) == FIELD_SEP.join(["safe", "", "", "", ""])
    assert edit_caption(template({"rating": "safe"}), CaptionRule(fields=rules), random.Random(0)) == "safe"


def test_template_errors_name_the_key():
    with pytest.raises(ValueError, match="one {column} per"):
        CaptionTemplate.parse("{a} {b}, {c}")
    with pytest.raises(ValueError, match=r"f\.nope: not a field"):
        CaptionTemplate.parse(TEMPLATE).rules({"nope": {}}, "f")
    with pytest.raises(ValueError, match=r"f\.artist\.dropout = 2"):
        CaptionTemplate.parse(TEMPLATE).rules({"artist": {"dropout": 2}}, "f")


def test_canonical_caption_for_fixed_probes():
    assert canonical_caption("Blue_Sky, a") == "Blue_Sky, a"  # a plain caption as cached
    assert canonical_caption("\nfirst, line\nsecond") == "first, line"
    cached = CaptionTemplate.parse(TEMPLATE)(ENTRY)
    assert canonical_caption(cached) == "safe, by Foo_Bar, 1girl, solo, hat, 2023"
