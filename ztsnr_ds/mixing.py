"""What the sampler and the caption edits take from the config and the cache besides their own sections:
the sources' repeats (data.sources against the cache's source list), batch by area and the resume mode.
One place, read by the pre-flight checks (before any model loads) and by the trainer alike."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ztsnr_ds.data.caption_control import CaptionControl, CaptionRule
from ztsnr_ds.data.caption_template import CaptionTemplate
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.repeats import source_repeats


def sampler_options(config, index: CacheIndex) -> dict[str, Any]:
    """Keyword arguments of the configured sampler after (buckets, micro_batch, world_size, rank).
    ValueError naming data.sources when the config and the cache list different sources."""
    sources = [(s.name, s.repeats) for s in config.data.source_list()]
    return {"base_area": config.noise.base_area if config.trainer.batch_by_area else None,
            "repeats": source_repeats(index.sources, index.columns["source"], sources),
            "resume_data": config.trainer.resume_data}


PER_SOURCE_CAPTIONS = ("shuffle_tags", "keep_first", "tag_dropout", "keep_tags", "caption_weights")
"""The captions keys a data.sources entry may override."""


def _field_rules(source, key: str) -> tuple:
    """The source's template field rules (validated with data.sources already)."""
    return CaptionTemplate.parse(source.template).rules(source.fields, key) if source.template else ()


def caption_control(config, index_sources: list[str]) -> CaptionControl:
    """Caption edits per cached source: the captions section with each data.sources entry's overrides.
    ValueError naming the key for a bad override, and for edits that vary per use with data.cache_text
    (one embedding per image is cached: it cannot change per use)."""
    rules = {}
    for i, source in enumerate(config.data.source_list()):
        key = f"data.sources[{i}].captions"
        if bad := sorted(set(source.captions) - set(PER_SOURCE_CAPTIONS)):
            raise ValueError(f"{key}.{bad[0]} cannot be set per source; a source may set "
                             f"{', '.join(PER_SOURCE_CAPTIONS)}")
        try:
            rules[source.name] = replace(CaptionRule.of(replace(config.captions, **source.captions)),
                                         fields=_field_rules(source, f"data.sources[{i}].fields"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{key}: {err}") from None
        if config.data.cache_text and rules[source.name].varies:
            where = f"{key} or captions" if source.captions else "captions"
            raise ValueError(f"data.cache_text = true caches one text embedding per image, so {where}"
                             ".tag_dropout, .caption_weights (one of several captions per use) and template "
                             "field dropout / shuffle cannot "
                             "vary per use: set data.cache_text: false (live encoding) or drop those "
                             "settings")
    default = CaptionRule.of(config.captions)
    return CaptionControl([rules.get(name, default) for name in index_sources])
