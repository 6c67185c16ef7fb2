"""What the sampler and the caption edits take from the config and the cache besides their own sections:
the sources' repeats (data.sources against the cache's source list), batch by area and the resume mode.
One place, read by the pre-flight checks (before any model loads) and by the trainer alike."""

from __future__ import annotations

from typing import Any

from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.repeats import source_repeats


def sampler_options(config, index: CacheIndex) -> dict[str, Any]:
    """Keyword arguments of the configured sampler after (buckets, micro_batch, world_size, rank).
    ValueError naming data.sources when the config and the cache list different sources."""
    sources = [(s.name, s.repeats) for s in config.data.source_list()]
    return {"base_area": config.noise.base_area if config.trainer.batch_by_area else None,
            "repeats": source_repeats(index.sources, index.columns["source"], sources),
            "resume_data": config.trainer.resume_data}
