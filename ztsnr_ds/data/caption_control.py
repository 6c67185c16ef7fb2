"""Caption edits of one use of a cached caption, drawn from that use's Python stream (trainer.sample_streams,
seeded by (seed, epoch, use id)), so a resume and any world size repeat them.

For each use, in this order (draws only where a setting asks for one, so the defaults draw exactly what
the plain tag shuffle did):
1. several captions: a caption with several lines (a multi-line .txt, a list column) trains on one line
   per use, line i with probability w_i / sum(w) (``caption_weights``; lines past the list take its last
   weight; no list: all equal). Kohya/OneTrainer/SimpleTuner pick one caption per step the same way.
2. tag dropout: every tag but the first ``keep_first`` and those in ``keep_tags`` is dropped with
   probability ``tag_dropout`` (kohya ``caption_tag_dropout_rate``, OneTrainer ``tag_dropout``).
3. tag shuffle: the tags after the first ``keep_first`` are shuffled (data/tags.py shuffle_caption).
A caption built from a template (data/caption_template.py) is first rendered field by field (each
field's dropout and shuffle); tag dropout then applies, the global shuffle does not (the template fixes
the order of the fields).
Whole-caption dropout (``captions.dropout``) is drawn before all of these, by the trainer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ztsnr_ds.data.caption_template import FieldRule, render_fields
from ztsnr_ds.data.tags import FIELD_SEP, normalize_tag, parse_tags, shuffle_caption


@dataclass(frozen=True)
class CaptionRule:
    """The caption settings of one source (the ``captions`` section with the source's overrides)."""

    shuffle_tags: bool = True
    keep_first: int = 1
    tag_dropout: float = 0.0
    keep_tags: frozenset[str] = frozenset()
    caption_weights: tuple[float, ...] = ()
    fields: tuple[FieldRule, ...] = ()

    @classmethod
    def of(cls, section: object) -> CaptionRule:
        """From a CaptionConfig-like object (keep_tags normalised as the tags are)."""
        return cls(section.shuffle_tags, section.keep_first, section.tag_dropout,
                   frozenset(map(normalize_tag, section.keep_tags)), tuple(section.caption_weights))

    @property
    def varies(self) -> bool:
        """Whether a use's caption can differ from the cached one beyond the tag order."""
        return self.tag_dropout > 0 or bool(self.caption_weights) or any(
            f.dropout or f.shuffle for f in self.fields)


def pick_line(caption: str, weights: Sequence[float], rng: random.Random) -> str:
    """One line of a multi-line caption (empty lines ignored); line i weighs weights[min(i, len - 1)], or 1
    without weights. A one-line caption draws nothing."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    w = [weights[min(i, len(weights) - 1)] for i in range(len(lines))] if weights else None
    return rng.choices(lines, weights=w)[0]


def edit_caption(caption: str, rule: CaptionRule, rng: random.Random) -> str:
    """The caption of one use (module docstring). With one line, no tag dropout and no shuffle it is the
    caption as cached; otherwise its tags come out normalised, joined by ", "."""
    if "\n" in caption:
        caption = pick_line(caption, rule.caption_weights, rng)
    templated = FIELD_SEP in caption  # the template fixes the order: fields shuffle inside only
    if templated or rule.tag_dropout:
        tags = render_fields(caption, rule.fields, rng) if templated else parse_tags(caption)
        head, tail = tags[:rule.keep_first], tags[rule.keep_first:]
        if rule.tag_dropout:
            tail = [t for t in tail if t in rule.keep_tags or rng.random() >= rule.tag_dropout]
        caption = ", ".join(head + tail)
    if rule.shuffle_tags and not templated:
        return shuffle_caption(caption, rule.keep_first, rng)
    return caption


def canonical_caption(caption: str) -> str:
    """The caption without per-use edits, for fixed probes (the held-out loss): the first of several
    lines, a template's non-empty fields joined by ", "; any other caption as it is."""
    if "\n" in caption:
        caption = next((line.strip() for line in caption.splitlines() if line.strip()), "")
    if FIELD_SEP in caption:
        caption = ", ".join(field for field in caption.split(FIELD_SEP) if field.strip())
    return caption


class CaptionControl:
    """Per-source caption edits of a micro-batch: rules[s] for the cache's source s."""

    def __init__(self, rules: Sequence[CaptionRule]) -> None:
        self.rules = list(rules)

    def edit(self, captions: Sequence[str], sources: Sequence[int], dropped: Sequence[bool],
             rngs: Sequence[random.Random]) -> list[str]:
        """"" for a dropped caption, else edit_caption with its source's rule and its use's stream."""
        return ["" if d else edit_caption(c, self.rules[s], rng)
                for c, s, d, rng in zip(captions, sources, dropped, rngs, strict=True)]
