"""Several training sources in one cache: the ``data.sources`` entries, their keys and their scan.

Each source is scanned on its own (data/sources.py) and its keys get the prefix ``<name>/``, so two
sources may hold the same file names and every cached key still names its source. A source named ""
keeps its bare keys: that is what a single ``data.source`` is, so a cache built from ``data.source``
keeps its keys (and its reuse) when ``data.sources`` lists that folder with ``name: ""`` next to new
sources. The build reuses an image by (key, sha256), so adding a source encodes only the new images.

The cache index stores each row's position in the source list (data/index.py ``source`` column); the
sampler applies each source's ``repeats`` per epoch (data/repeats.py) and the trainer its caption
settings (data/caption_control.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ztsnr_ds.data.caption_template import CaptionTemplate
from ztsnr_ds.data.packed import packed_kind, scan_packed
from ztsnr_ds.data.sources import Scan, scan_share


@dataclass
class SourceConfig:
    """One entry of ``data.sources``."""

    path: str
    """Folder tree of images with same-stem .txt captions, a .jsonl / .parquet manifest, a Parquet file
    with the image bytes in its image column, or WebDataset .tar shards (a glob: /data/{shards}/*.tar)."""
    repeats: float = 1.0
    """Uses of each image per epoch, >= 0: 2.5 trains every image twice and a fresh half of them (chosen
    per epoch, deterministically) a third time; 0 keeps the source cached but unused."""
    name: str | None = None
    """Prefix of this source's cache keys and its name in the sampler table; default the path's stem.
    "" keeps bare keys (what a single data.source builds, so its cache is reused)."""
    captions: dict[str, Any] = field(default_factory=dict)
    """Caption settings of this source overriding the global ``captions`` section (e.g. tag_dropout)."""
    template: str = ""
    """JSONL / Parquet sources: build the caption from columns, e.g. "{rating}, {character}, {general}"
    (one {column} per comma-separated part; empty parts vanish with their commas); "" reads "caption"."""
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per template field: {"dropout": p, "shuffle": bool}, drawn at every use (e.g. general: {dropout:
    0.1, shuffle: true})."""


def source_list(source: str | None, sources: list[SourceConfig]) -> list[SourceConfig]:
    """The sources a cache holds, names resolved: ``data.sources``, or ``data.source`` as one entry named
    "" with repeats 1. ValueError naming the key when both, neither, or bad entries are given."""
    if source is not None and sources:
        raise ValueError("data.source and data.sources are both set: list every source under data.sources "
                         "(the former data.source as an entry with name: \"\" keeps its cached keys)")
    if source is not None:
        return [SourceConfig(path=source, name="")]
    if not sources:
        raise ValueError("data.sources is empty: give at least one source (or data.source)")
    resolved = [replace(s, name=Path(s.path).stem if s.name is None else s.name) for s in sources]
    for i, s in enumerate(resolved):
        if not (math.isfinite(s.repeats) and s.repeats >= 0):
            raise ValueError(f"data.sources[{i}].repeats = {s.repeats} must be a finite number >= 0")
        if "/" in s.name:
            raise ValueError(f"data.sources[{i}].name = {s.name!r} must not contain '/' (it prefixes keys)")
        check_template(s, f"data.sources[{i}]")
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names {names} repeat; give each entry its own name")
    if sum(s.repeats for s in resolved) == 0:
        raise ValueError("data.sources: every repeats is 0, nothing would train; raise one above 0")
    return resolved


def check_template(source: SourceConfig, key: str) -> None:
    """ValueError naming ``key``.template / .fields for a bad template, fields or a folder source."""
    if not source.template:
        if source.fields:
            raise ValueError(f"{key}.fields is set without a {key}.template")
        return
    if Path(source.path).suffix.lower() not in (".jsonl", ".parquet"):  # columns: not a folder or tar
        raise ValueError(f"{key}.template needs a .jsonl or .parquet source (columns), not {source.path}")
    try:
        CaptionTemplate.parse(source.template).rules(source.fields, f"{key}.fields")
    except ValueError as err:
        raise ValueError(f"{key}.template: {err}") from None


def key_prefix(name: str) -> str:
    """What a source's keys start with: "<name>/", or nothing for the source named ""."""
    return f"{name}/" if name else ""


def scan_sources(sources: list[SourceConfig], rank: int, world_size: int, spill_dir: Path) -> Scan:
    """This rank's share of every source, keys prefixed, records tagged with their source name, all in
    key order; the digest covers every source's digest and name (the same on every rank). Sources of
    packed images (data/packed.py) copy a Parquet source's bytes to a file in ``spill_dir``."""
    records, problems, digest = [], [], hashlib.sha256()
    for i, s in enumerate(sources):
        prefix = key_prefix(s.name)
        template = CaptionTemplate.parse(s.template) if s.template else None
        if packed_kind(s.path):
            spill = spill_dir / f"spill-rank{rank}-source{i}.bin"
            scan = scan_packed(s.path, rank, world_size, prefix, spill, caption_from=template)
        else:
            scan = scan_share(s.path, rank, world_size, prefix=prefix, caption_from=template)
        records += [replace(r, key=prefix + r.key, source=s.name) for r in scan.records]
        problems += [replace(p, key=prefix + p.key) for p in scan.problems]
        digest.update(f"{s.name}\0{scan.digest}\0".encode())
    return Scan(sorted(records, key=lambda r: r.key), sorted(problems), digest.hexdigest()[:16])
