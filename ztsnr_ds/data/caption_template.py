"""Captions built from metadata columns of a JSONL / Parquet source (Kohaku-XL / NoobAI order: rating,
character, copyright, artist, general, quality, year), e.g. the template
``"{rating}, {character}, {copyright}, by {artist}, {general}, {quality}, {year}"``.

The template is cut at its commas into segments of at most one ``{field}`` each. At build time each
segment is filled from its column (a list column joined by ", ", None as empty) and the segments are
cached joined by FIELD_SEP, empty ones included, so segment i is field i at every use; tag weights read
FIELD_SEP as a comma (data/tags.py). At each use (data/caption_control.py) a field is dropped with its
``dropout`` and its tags shuffled when ``shuffle``; empty segments vanish with their commas.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ztsnr_ds.data.tags import FIELD_SEP, parse_tags

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FIELD_KEYS = ("dropout", "shuffle")
"""What data.sources[i].fields.<field> may set."""


@dataclass(frozen=True)
class FieldRule:
    """Per-use edits of one template field: dropped whole with probability ``dropout``; tags shuffled."""

    dropout: float = 0.0
    shuffle: bool = False


@dataclass(frozen=True)
class CaptionTemplate:
    """A parsed template: its segments (text with at most one {field}) and their field names."""

    segments: tuple[str, ...]
    names: tuple[str | None, ...]

    @classmethod
    def parse(cls, template: str) -> CaptionTemplate:
        """ValueError for a segment with two fields or a template without any."""
        segments = tuple(s.strip() for s in template.split(",") if s.strip())
        found = [_FIELD.findall(s) for s in segments]
        if any(len(f) > 1 for f in found) or not any(found):
            raise ValueError(f"template {template!r}: give one {{column}} per comma-separated part")
        return cls(segments, tuple(f[0] if f else None for f in found))

    @property
    def columns(self) -> list[str]:
        return [name for name in self.names if name is not None]

    def __call__(self, entry: Mapping) -> str:
        """The cached caption of a manifest entry: the filled segments joined by FIELD_SEP."""
        filled = (_fill(s, name, entry) for s, name in zip(self.segments, self.names, strict=True))
        return FIELD_SEP.join(filled)

    def rules(self, fields: Mapping[str, Mapping], key: str) -> tuple[FieldRule, ...]:
        """Each segment's FieldRule from a source's ``fields`` setting; ValueError naming ``key``."""
        if unknown := sorted(set(fields) - set(self.columns)):
            raise ValueError(f"{key}.{unknown[0]}: not a field of the template (fields: {self.columns})")
        out = []
        for name in self.names:
            setting = dict(fields.get(name, {})) if name else {}
            if bad := sorted(set(setting) - set(FIELD_KEYS)):
                raise ValueError(f"{key}.{name}.{bad[0]}: unknown; a field sets {', '.join(FIELD_KEYS)}")
            rule = FieldRule(float(setting.get("dropout", 0.0)), bool(setting.get("shuffle", False)))
            if not 0 <= rule.dropout <= 1:
                raise ValueError(f"{key}.{name}.dropout = {rule.dropout} must lie in [0, 1]")
            out.append(rule)
        return tuple(out)


def _fill(segment: str, name: str | None, entry: Mapping) -> str:
    if name is None:
        return segment
    value = entry.get(name)
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value if v is not None and str(v).strip())
    value = "" if value is None else " ".join(str(value).split())  # no newlines: one caption
    return segment.replace("{" + name + "}", value) if value else ""


def render_fields(caption: str, rules: Sequence[FieldRule], rng: random.Random) -> list[str]:
    """The tags of one use of a cached templated caption: field by field (rules[i] for segment i; the
    last rule for segments past the list), dropped or shuffled as its rule says, empty ones gone."""
    tags: list[str] = []
    for i, segment in enumerate(caption.split(FIELD_SEP)):
        rule = rules[min(i, len(rules) - 1)] if rules else FieldRule()
        if not segment or (rule.dropout and rng.random() < rule.dropout):
            continue
        field = parse_tags(segment)
        if rule.shuffle:
            rng.shuffle(field)
        tags += field
    return tags
