"""Captions bounded at cache build: a caption longer than data.max_caption_bytes is cut at a tag boundary.

A caption is stored in the index, split into tags for the tag weights, shuffled and tokenised on every
use: a runaway caption file (a 50 MB dump of 4.8M tags) would make each of those cost grow with it. Cut
once at build time, every later use is bounded by the cap; each cut is reported (report.json
"scan_problems") with the image's key and the sizes. The default cap lies far above real captions
(a 55-tag Danbooru caption with artist and quality tags is ~0.6 KB; 225 CLIP tokens ~1 KB).
"""

from __future__ import annotations

from dataclasses import replace

from ztsnr_ds.data.sources import Problem, Scan

DEFAULT_MAX_CAPTION_BYTES = 16384


def cut_caption(caption: str, limit: int) -> str:
    """The longest run of whole tags (cut at a comma) within `limit` UTF-8 bytes; a caption without a comma
    in range is cut at the last whole character."""
    head = caption.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    comma = head.rfind(",")
    return (head[:comma] if comma > 0 else head).rstrip(" ,")


def bound_captions(scan: Scan, limit: int) -> Scan:
    """`scan` with every caption over `limit` bytes cut (`cut_caption`), and a problem per cut caption."""
    records, problems = [], list(scan.problems)
    for record in scan.records:
        if len(record.caption) * 4 > limit and (size := len(record.caption.encode("utf-8"))) > limit:
            cut = cut_caption(record.caption, limit)
            reason = (f"caption cut from {size} to {len(cut.encode('utf-8'))} bytes at a tag boundary "
                      f"(data.max_caption_bytes = {limit}); shorten the caption or raise the cap")
            problems.append(Problem(record.key, record.path, reason))
            record = replace(record, caption=cut)
        records.append(record)
    return replace(scan, records=records, problems=sorted(problems))
