"""Is what a run or tool reads back intact, and is there room for what it writes: checksums, seals, space.

One rule for every folder a run or tool reads back (docs/integrity.md): its files' sha256s are written
before its completeness marker, and the marker's own bytes are covered too, so a flipped bit anywhere
names itself instead of loading as other numbers.

- A checkpoint tag: checksums.json maps every file (path relative to the tag, POSIX) to its sha256,
  the marker ztsnr_state.json included (its bytes are known before it is written). It is written after
  every rank's files and before the marker, and checked on resume and export. A tag's universal/ (made
  later) has its own checksums.json, written before the folder is renamed into place.
- JSON that is its own marker (a snapshot's ema.json, a cache's index.json) carries a seal: the sha256
  of its canonical JSON without the seal (`seal`, `check_seal`).
The ranks split the hashing (file i goes to rank i mod world size): the work of one save or load
spreads over the job, not onto rank 0.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKSUM_FILE = "checksums.json"
SEAL_KEY = "seal_sha256"
BYTES_PER_PARAM = 14
"""First-save size estimate per parameter: bf16 module weights (2) + fp32 master, exp_avg and
exp_avg_sq (3 x 4). An upper bound for pure bf16 (8); later saves use the previous tag's size."""


class IntegrityError(RuntimeError):
    """A tag whose files do not match their checksums, or a disk without room for a save."""


class NoSpaceError(IntegrityError):
    """A write that found the disk full; the partial output is removed, the message names the fix."""


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


def read_checksums(tag_dir: Path, fix: str = "pass an older complete tag") -> dict[str, str] | None:
    """The folder's recorded checksums; None for a folder saved before checksums were recorded."""
    path = tag_dir / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
            raise ValueError("not a map of file names to sha256s")
        return sums
    except (OSError, ValueError, TypeError, AttributeError) as err:  # torn, not UTF-8, not a dict
        raise IntegrityError(f"{path} is not a checksum file ({err}); the folder is damaged: {fix}") from None


def canonical(record: dict) -> bytes:
    """The bytes a seal hashes: sorted keys, no spaces (floats round-trip exactly through JSON)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def seal(record: dict) -> dict:
    """`record` plus SEAL_KEY = sha256(canonical(record without SEAL_KEY))."""
    body = {k: v for k, v in record.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: hashlib.sha256(canonical(body)).hexdigest()}


def check_seal(record: dict, path: Path, fix: str) -> dict:
    """`record` (read from `path`) without its seal; IntegrityError if the seal is missing or wrong."""
    body = {k: v for k, v in record.items() if k != SEAL_KEY}
    if record.get(SEAL_KEY) != hashlib.sha256(canonical(body)).hexdigest():
        what = "has no seal" if SEAL_KEY not in record else "does not match its seal"
        raise IntegrityError(f"{path} {what} ({SEAL_KEY}): damaged or edited; {fix}")
    return body


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


CHECKPOINT_FIX = "free space, lower trainer.keep_last or move trainer.output_dir"


def no_space_message(folder: Path, need: int | None, what: str = "a checkpoint",
                     fix: str = CHECKPOINT_FIX) -> str:
    needs = f", {what} needs ~{need / 2**20:.1f} MiB" if need is not None else f" for {what}"
    return f"no space left on {folder}: {free_bytes(folder) / 2**20:.1f} MiB free{needs}; {fix}"


def is_no_space(err: BaseException, folder: Path) -> bool:
    """True for ENOSPC, also when safetensors reports it in its own type ("os error 28") or torch as a
    bare RuntimeError from its zip writer ("[enforce fail at inline_container.cc:672] . unexpected pos"):
    then the disk is full (< 1 MiB)."""
    return (getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)
            or free_bytes(folder) < 2**20)


@contextmanager
def no_space_guard(folder: Path, what: str, fix: str) -> Iterator[None]:
    """Turn any write error that is a full disk (`is_no_space`) into NoSpaceError naming `what` and `fix`;
    the caller's own clean-up (temporary files, atomic renames) runs as the error passes."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as err:  # safetensors, torch and numpy each report a full disk in their own type
        if not is_no_space(err, Path(folder)):
            raise
        raise NoSpaceError(no_space_message(Path(folder), None, what, fix)) from err
