"""Is a checkpoint tag intact, and is there room for the next one: checksums and free space.

checksums.json maps every file of a tag (path relative to the tag, POSIX) to its sha256. It is
written after every rank's files and before the completeness marker, and checked on resume and
export, so a flipped bit or a file cut short names itself instead of loading as other weights.
The ranks split the hashing (file i goes to rank i mod world size): the work of one save or load
spreads over the job, not onto rank 0.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

CHECKSUM_FILE = "checksums.json"
BYTES_PER_PARAM = 14
"""First-save size estimate per parameter: bf16 module weights (2) + fp32 master, exp_avg and
exp_avg_sq (3 x 4). An upper bound for pure bf16 (8); later saves use the previous tag's size."""


class IntegrityError(RuntimeError):
    """A tag whose files do not match their checksums, or a disk without room for a save."""


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tag_files(tag_dir: Path, skip: tuple[str, ...]) -> list[str]:
    """Files of a tag relative to it, sorted; `skip`: top-level entries left out (markers, universal/)."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.relative_to(tag_dir).parts[0] not in skip)


def hash_share(tag_dir: Path, names: list[str], rank: int, world_size: int) -> dict[str, str]:
    """sha256 of this rank's share of `names` (every world_size-th, starting at rank)."""
    return {name: sha256(tag_dir / name) for name in names[rank::world_size]}


def mismatches(tag_dir: Path, expected: dict[str, str], rank: int, world_size: int) -> list[str]:
    """Problems found in this rank's share of `expected`: missing files or another sha256."""
    problems = []
    for name in sorted(expected)[rank::world_size]:
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != expected[name]:
            problems.append(f"{path} does not match its sha256 in {CHECKSUM_FILE} (damaged or changed)")
    return problems


def read_checksums(tag_dir: Path) -> dict[str, str] | None:
    """The tag's recorded checksums; None for a tag saved before checksums were recorded."""
    path = tag_dir / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise IntegrityError(f"{path} is not a checksum file ({err}); the tag is damaged: "
                             "pass an older complete tag") from err


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def no_space_message(folder: Path, need: int) -> str:
    return (f"no space left on {folder}: {free_bytes(folder) / 2**20:.1f} MiB free, a checkpoint needs "
            f"~{need / 2**20:.1f} MiB; free space, lower trainer.keep_last or move trainer.output_dir")


def is_no_space(err: BaseException, folder: Path) -> bool:
    """True for ENOSPC, also when torch reports it as a bare RuntimeError from its zip writer
    ("[enforce fail at inline_container.cc:672] . unexpected pos"): then the disk is full (< 1 MiB)."""
    return getattr(err, "errno", None) == errno.ENOSPC or free_bytes(folder) < 2**20
