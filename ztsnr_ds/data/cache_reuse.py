"""What earlier builds of a cache left that the next build can reuse instead of encoding again.

Sources: manifest.jsonl + shards.json of the last merged build, and every parts/progress-rank*.jsonl of
an interrupted one. A shard is checked (sha256) the first time one of its images is reused; a failing
shard is recorded in ``corrupt`` and none of its images is reused. A damaged record (a torn line, a
shard missing from shards.json) costs only the images it describes: they are encoded again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from ztsnr_ds.data.cache_files import (
    MANIFEST,
    PARTS_DIR,
    SHARDS,
    CacheError,
    iter_jsonl,
    read_json,
    shard_path,
)
from ztsnr_ds.data.shards import shard_problem
from ztsnr_ds.data.sources import in_share

logger = logging.getLogger(__name__)

REUSED_FIELDS = ("bucket", "time_ids", "shard", "index", "crc32", "crc32_text")
"""What a reused image takes from its old row; caption and tags always come from the current scan."""
INFO_FIELDS = ("sha256", "bytes", "bucket", "count")


class ReuseIndex:
    """Rows of images in a shard with this build's settings fingerprint, by (key, sha256[, caption])."""

    def __init__(self, root: Path, fingerprint: str, cache_text: bool, rank: int = 0,
                 world_size: int = 1) -> None:
        """Holds the rows of this rank's share only (data/sources.py in_share): the records stream past."""
        self.root, self.cache_text = root, cache_text
        self.shards: dict[str, dict] = {}
        self._rows: dict[tuple, dict] = {}
        self._checked: dict[str, bool] = {}
        self.corrupt: list[dict] = []
        for name, info, rows in _previous_shards(root, fingerprint, lambda k: in_share(k, rank, world_size)):
            self.shards[name] = info
            for row in rows:
                self._rows[self._key(row["key"], row["sha256"], row["caption"])] = row

    def _key(self, key: str, sha256: str, caption: str) -> tuple:
        return (key, sha256, caption) if self.cache_text else (key, sha256)

    def lookup(self, key: str, sha256: str, caption: str) -> dict | None:
        """The REUSED_FIELDS of the image's old row, if its shard is intact."""
        old = self._rows.get(self._key(key, sha256, caption))
        if old is None or old.get("shard") not in self.shards or not self._shard_ok(old["shard"]):
            return None
        return {k: old[k] for k in REUSED_FIELDS if k in old}

    def _shard_ok(self, name: str) -> bool:
        if name not in self._checked:
            problem = shard_problem(shard_path(self.root, name), self.shards[name]["sha256"])
            self._checked[name] = problem is None
            if problem is not None:
                logger.warning("shard %s: %s; its images are encoded again", name, problem)
                self.corrupt.append({"shard": name, "reason": problem})
        return self._checked[name]

    def infos(self, rows: list[dict]) -> dict[str, dict]:
        """shards.json entries of the shards ``rows`` refer to."""
        return {row["shard"]: self.shards[row["shard"]] for row in rows}


def _previous_shards(root: Path, fingerprint: str,
                     mine: Callable[[str], bool]) -> Iterator[tuple[str, dict, list[dict]]]:
    """(name, info, rows whose key is ``mine``) of earlier builds' shards with this fingerprint: merged,
    then progress lines."""
    yield from _merged_shards(root, fingerprint, mine)
    for path in sorted((root / PARTS_DIR).glob("progress-rank*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    same = entry["fingerprint"] == fingerprint
                    shard = (entry["shard"], {k: entry[k] for k in INFO_FIELDS},
                             [row for row in entry["rows"] if mine(row["key"])])
                except (ValueError, KeyError, TypeError):  # blank separator, or a line torn by a crash
                    continue
                if same:
                    yield shard


def _merged_shards(root: Path, fingerprint: str,
                   mine: Callable[[str], bool]) -> Iterator[tuple[str, dict, list[dict]]]:
    if not ((root / MANIFEST).is_file() and (root / SHARDS).is_file()):
        return
    by_shard: dict[str, list[dict]] = {}
    try:
        meta = read_json(root / SHARDS, "the build's shard record")
        if meta.get("fingerprint") != fingerprint:
            return
        for row in iter_jsonl(root / MANIFEST):  # all read before any is used: a torn line voids the lot
            if mine(row["key"]):
                by_shard.setdefault(row.get("shard"), []).append(row)
    except CacheError as err:
        logger.warning("%s: nothing of the last build is reused", err)
        return
    for name, info in meta.get("shards", {}).items():
        yield name, info, by_shard.get(name, [])
