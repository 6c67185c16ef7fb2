"""Checksums of a cache index's column files, and the seal of index.json (docs/integrity.md).

Every file of an ``index-<id>/`` folder -- every column, whatever its name (captions.bin, weight.npy,
time_ids.npy, key_hash.npy, the offsets, a column a later version adds) -- gets its sha256 in
``index-<id>/checksums.json``, written before index.json. index.json, the completeness marker, then
carries the sha256 of that file and is sealed itself (integrity.seal: sha256 of its canonical JSON).
Opening an index checks the seal (cheap); the column bytes are hashed by training's start-up check
(each rank a share of the files) and by ``launch/cache.py --verify``.

An index written before this carries neither: it opens with a one-line warning, and
``python launch/cache.py --cache_dir DIR --convert`` writes it again with its checksums.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from ztsnr_ds import integrity
from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError, synced

SUMS_FILE = integrity.CHECKSUM_FILE
SUMS_KEY = "checksums_sha256"
"""index.json's field holding the sha256 of index-<id>/checksums.json."""
RESEAL_HINT = "write it again with `python launch/cache.py --cache_dir {root} --convert`"


def write_sums(folder: Path) -> str:
    """sha256 of every file in ``folder`` into folder/checksums.json (fsynced); returns that file's sha256."""
    names = integrity.tag_files(folder, skip=(SUMS_FILE,))
    data = json.dumps({name: integrity.sha256(folder / name) for name in names}, indent=1).encode()
    with synced(folder / SUMS_FILE) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def unseal(root: Path, folder: Path, meta: dict) -> tuple[dict, dict[str, str] | None]:
    """(index.json's fields without its seal, the column checksums) after checking both; for an index
    written before column checksums, (meta, None) and a one-line warning."""
    path = root / "index.json"
    sums_path = folder / SUMS_FILE
    if not sums_path.is_file() and integrity.SEAL_KEY not in meta and SUMS_KEY not in meta:
        warnings.warn(f"{path}: its columns carry no checksums (indexed by an older version); "
                      + RESEAL_HINT.format(root=root), stacklevel=3)
        return meta, None
    try:
        meta = integrity.check_seal(meta, path, REBUILD_HINT)
        data = sums_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get(SUMS_KEY):
            raise CacheError(f"{sums_path} does not match its sha256 in {path} (damaged or edited); "
                             f"{REBUILD_HINT}")
        sums = integrity.read_checksums(folder, REBUILD_HINT)
    except (integrity.IntegrityError, OSError) as err:
        raise CacheError(f"{err}" if isinstance(err, integrity.IntegrityError)
                         else f"{sums_path} is unreadable ({err}); {REBUILD_HINT}") from None
    return meta, sums


def problems(folder: Path, sums: dict[str, str], rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's share of the column files (every world_size-th) checked against their sha256s."""
    found = integrity.mismatches(folder, sums, rank, world_size)
    return [f"{p}; {REBUILD_HINT}" for p in found]
