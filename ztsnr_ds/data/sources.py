"""Training sources: scan a folder tree or a JSONL manifest, load images safely as RGB.

A source is either
- a folder tree of images (jpg, jpeg, png, webp; any letter case) with same-stem ``.txt``
  captions (comma-separated tags), or
- a ``.jsonl`` manifest with one ``{"image": path, "caption": text}`` object per line, image paths
  relative to the manifest's folder, or
- a ``.parquet`` manifest with the same ``image`` and ``caption`` columns and optional ``width`` and
  ``height`` (the upright size in pixels: the build then buckets without opening the image header).

A build's rank scans only its share (:func:`scan_share`): the source streams past every rank and each
keeps the entries whose name hashes to it, so no rank holds or checks the whole list.

Nothing in a scan stops on a bad entry: every problem becomes a :class:`Problem` and the caller
writes the report. Image decoding problems surface later, in :func:`load_image`, as
:class:`BadImage` so the cache writer can skip the file and list it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
"""Image files a source may hold (a GIF gives its first frame)."""
CAPTION_EXTENSION = ".txt"
UNSUPPORTED = f"unsupported format: supported are {', '.join(sorted(IMAGE_EXTENSIONS))} (and .txt captions)"
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
"""Byte-order marks a caption file may start with (Windows editors write them), and their codec."""
DEFAULT_MAX_PIXELS = 8192 * 8192
"""Refuse images above this many pixels before decoding (decompression-bomb guard). It sits below
PIL's own global guard (``Image.MAX_IMAGE_PIXELS`` ~ 89.5 MP), which this module never changes."""

MISSING_CAPTION = "missing caption"
"""Reason of a :class:`Problem` whose record is kept with an empty caption."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# What PIL raises on corrupt data: OSError covers UnidentifiedImageError and "image file is truncated".


@dataclass(frozen=True)
class ImageRecord:
    """One training image.

    path: file to load. caption: raw caption text ("" when missing). key: path relative to the
    dataset root in POSIX form; unique within a source, stable across machines (used as cache id).
    size: (width, height) upright, when the source declares it. source: name of its data.sources entry.
    member: (offset, size) of the image's bytes inside ``path`` (a tar shard, a spilled Parquet cell).
    """

    path: Path
    caption: str
    key: str
    size: tuple[int, int] | None = None
    source: str = ""
    member: tuple[int, int] | None = None


@dataclass(frozen=True, order=True)
class Problem:
    """Something a scan or a load could not use as-is. Sorts by (key, path, reason)."""

    key: str
    path: Path
    reason: str


class BadImage(Exception):
    """An image file that cannot be used for training; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Scan:
    """One rank's share of a source. records and problems: the share's, sorted by key (problems by
    (key, path, reason)); digest: of every entry name of the whole source, so the same on every rank
    of one scan."""

    records: list[ImageRecord]
    problems: list[Problem]
    digest: str


def in_share(name: str, rank: int, world_size: int) -> bool:
    """Whether ``name`` (an image key, or "manifest:line" for an entry without one) is rank's:
    BLAKE2b(name) mod world_size == rank. A function of the name alone, so each rank streams the source
    and keeps its own entries without anyone holding the whole list, and a key's duplicates meet on
    one rank. The same rule splits the reuse of earlier builds (data/cache_reuse.py)."""
    if world_size == 1:
        return True
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % world_size == rank


class _Share:
    """Decides, entry by entry as the source streams past, what this rank keeps; digests every name."""

    def __init__(self, rank: int, world_size: int, prefix: str = "",
                 caption_from: Callable[[dict], str] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.prefix = rank, world_size, prefix
        self.caption_from = caption_from  # builds a manifest entry's caption (data/caption_template.py)
        self._digest = hashlib.sha256()

    def take(self, name: str) -> bool:
        self._digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
        return in_share(self.prefix + name, self.rank, self.world_size)

    def digest(self) -> str:
        return self._digest.hexdigest()[:16]


def scan_source(path: str | Path) -> tuple[list[ImageRecord], list[Problem]]:
    """Records and problems of a whole folder tree or manifest, both sorted by key (see scan_share)."""
    scan = scan_share(path, 0, 1)
    return scan.records, scan.problems


def scan_share(path: str | Path, rank: int, world_size: int, prefix: str = "",
               caption_from: Callable[[dict], str] | None = None) -> Scan:
    """This rank's share (see in_share) of a folder tree or a ``.jsonl`` or ``.parquet`` manifest.

    The source is streamed (folders one at a time, manifest lines, Parquet row batches) and entries of
    other ranks are dropped before their file is checked or their caption read, so a rank holds and
    touches only its share. Records with a missing caption are kept (caption "") and also listed as a
    MISSING_CAPTION problem. ``prefix``: what the cache puts before this source's keys (the share is
    decided on the cached key, as the reuse of earlier builds splits it; data/source_mix.py).
    ``caption_from``: a manifest source's captions from its entries' columns (its ``columns`` read too).
    """
    path, share = Path(path), _Share(rank, world_size, prefix, caption_from)
    if path.is_dir():
        records, problems = scan_folder(path, share)
    elif path.suffix.lower() == ".jsonl" and path.is_file():
        records, problems = read_manifest(path, share)
    elif path.suffix.lower() == ".parquet" and path.is_file():
        records, problems = read_parquet(path, share)
    else:
        raise ValueError(f"source {str(path)!r} is neither a folder nor a .jsonl or .parquet manifest")
    return Scan(sorted(records, key=lambda r: r.key), sorted(problems), share.digest())


def scan_folder(root: Path, share: _Share) -> tuple[list[ImageRecord], list[Problem]]:
    """Images under ``root`` with their same-stem ``.txt`` captions; hidden files and folders skipped."""
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    for folder, names in _walk(root, share, problems):
        captions = {Path(n).stem: n for n in names if Path(n).suffix.lower() == CAPTION_EXTENSION}
        for name in names:
            suffix = Path(name).suffix.lower()
            if suffix == CAPTION_EXTENSION:
                continue
            file = folder / name
            key = file.relative_to(root).as_posix()
            if not share.take(key):
                continue
            if suffix not in IMAGE_EXTENSIONS:
                problems.append(Problem(key, file, f"{UNSUPPORTED}; skipped"))
                continue
            try:
                check_key(key)
            except ValueError as err:
                problems.append(Problem(key, file, str(err)))
                continue
            caption_name = captions.get(Path(name).stem)
            caption = _read_caption(folder / caption_name, key, problems) if caption_name else None
            if caption is None:
                caption = ""
                problems.append(Problem(key, file, MISSING_CAPTION))
            records.append(ImageRecord(file, caption, key))
    return records, problems


def _walk(root: Path, share: _Share, problems: list[Problem]) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted names of its files) for every folder under ``root``, one listing at a time; hidden
    entries skipped, symlinked folders not followed (symlinked files are files)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            name = folder.relative_to(root).as_posix() + "/"
            if share.take(name):
                problems.append(Problem(name, folder, f"unreadable folder: {err.strerror}"))
            continue
        yield folder, [e.name for e in entries if e.is_file()]
        stack.extend(folder / e.name for e in reversed(entries) if e.is_dir(follow_symlinks=False))


def read_manifest(manifest: Path, share: _Share) -> tuple[list[ImageRecord], list[Problem]]:
    """Records of a JSONL manifest; paths must stay inside the manifest's folder.

    Absolute paths and paths that climb out with ``..`` are refused (checked lexically, so a
    dataset made of symlinks still works). Missing files, bad lines and duplicates are problems.
    """
    records: dict[str, ImageRecord] = {}
    problems: list[Problem] = []
    with open(manifest, "rb") as f:  # bytes: one bad byte costs its line, not the scan
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                _add_entry(manifest, f"{manifest.name}:{lineno}", raw, share, records, problems)
    return list(records.values()), problems


def read_parquet(manifest: Path, share: _Share, batch_rows: int = 65536) -> tuple[list[ImageRecord],
                                                                                 list[Problem]]:
    """Records of a Parquet manifest (columns image, caption, optional width and height), read in row
    batches; the same path rules and problems as a JSONL manifest, "where" being the row number."""
    import pyarrow.parquet as pq  # only Parquet sources need it

    records: dict[str, ImageRecord] = {}
    problems: list[Problem] = []
    try:
        table = pq.ParquetFile(manifest)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for a damaged file
        raise ValueError(f"source {manifest}: not a readable Parquet file ({err})") from err
    names = set(table.schema_arrow.names)
    if "image" not in names:
        raise ValueError(f"source {manifest}: no 'image' column (has {sorted(names)})")
    columns = [c for c in ("image", "caption", "width", "height", *getattr(share.caption_from, "columns", ()))
               if c in names]
    row = 0
    for batch in table.iter_batches(batch_size=batch_rows, columns=columns):
        for entry in batch.to_pylist():
            row += 1
            _add_entry(manifest, f"{manifest.name}:row {row}", entry, share, records, problems)
    return list(records.values()), problems


def _add_entry(manifest: Path, where: str, entry: bytes | dict, share: _Share,
               records: dict[str, ImageRecord], problems: list[Problem]) -> None:
    """One manifest line (bytes) or Parquet row (dict): a record or a problem when it is this rank's.
    The key is found first, so another rank's entry costs no file check."""
    try:
        if isinstance(entry, bytes):
            entry = _parse_line(_decode_line(entry))
        elif not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError("bad manifest row: expected a non-empty string 'image'")
        key = _manifest_key(entry["image"])
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
        if share.take(where):
            problems.append(Problem(where, manifest, str(err)))
        return
    if not share.take(key):
        return
    try:
        if share.caption_from is not None:
            entry = {**entry, "caption": share.caption_from(entry)}
        record = _manifest_record(manifest.parent, key, entry, problems)
    except ValueError as err:
        problems.append(Problem(where, manifest, str(err)))
        return
    _add_unique(records, record, where, problems)


def _add_unique(records: dict[str, ImageRecord], record: ImageRecord, where: str,
                problems: list[Problem]) -> None:
    if record.key in records:
        problems.append(Problem(record.key, record.path, f"duplicate entry: again on {where}"))
    else:
        records[record.key] = record


def _decode_line(raw: bytes) -> str:
    """One manifest line as text; a line that is not UTF-8 is refused (its path could be anything). A
    UTF-8 byte-order mark (line 1 of a manifest saved by a Windows editor) is dropped."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: byte {raw[err.start]:#04x} at column {err.start + 1}") from err


def _parse_line(line: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad manifest line: {err}") from err
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
        raise ValueError("bad manifest line: expected an object with a non-empty string 'image'")
    return entry


def _manifest_key(raw: str) -> str:
    """The key of a manifest's image path; ValueError for a path that is absolute or climbs out."""
    if PurePosixPath(raw).is_absolute() or Path(raw).is_absolute():
        raise ValueError(f"refused path: absolute: {raw!r}")
    key = os.path.normpath(raw).replace(os.sep, "/")
    if key == ".." or key.startswith("../"):
        raise ValueError(f"refused path: escapes the manifest folder: {raw!r}")
    return check_key(key)


def check_key(key: str) -> str:
    """The key, if it is valid UTF-8 text (the index stores keys as UTF-8); ValueError naming the fix.

    A file name with bytes that are not UTF-8 reaches Python with surrogate escapes (PEP 383)."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"file name not UTF-8 (byte {ord(key[err.start]) & 0xFF:#04x} at {err.start}): "
                         "rename the file to UTF-8") from None
    return key


def _manifest_record(root: Path, key: str, entry: dict, problems: list[Problem]) -> ImageRecord:
    """One manifest entry -> record; raises ValueError("category: detail") for unusable entries."""
    raw = entry["image"]
    path = root / key
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{UNSUPPORTED}: {raw!r}")
    try:
        exists = path.is_file()
    except OSError as err:  # e.g. ENAMETOOLONG: is_file() only swallows "not found" errors
        raise ValueError(f"unusable path: {err.strerror}: {raw[:80]!r}...") from err
    if not exists:
        raise ValueError(f"missing file: {raw!r}")
    caption = entry.get("caption")
    if caption is None:
        problems.append(Problem(key, path, MISSING_CAPTION))
        caption = ""
    elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):  # several: one a line
        caption = "\n".join(c.strip() for c in caption if c.strip())
    elif not isinstance(caption, str):
        raise ValueError(f"bad manifest line: 'caption' must be a string, got {type(caption).__name__}")
    elif _SURROGATE.search(caption):  # a JSON "\udcXX" escape: not valid Unicode text
        problems.append(Problem(key, path, "caption not UTF-8: lone surrogate escape, kept with U+FFFD "
                                           "in its place"))
        caption = _SURROGATE.sub("\ufffd", caption)
    return ImageRecord(path, caption.strip(), key, _declared_size(entry))


def _declared_size(entry: dict) -> tuple[int, int] | None:
    """(width, height) when the entry gives both as positive integers; None when it gives neither."""
    width, height = entry.get("width"), entry.get("height")
    if width is None and height is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise ValueError(f"bad manifest line: width and height must both be positive integers, got "
                         f"{width!r} x {height!r}")
    return width, height


def _read_caption(path: Path, key: str, problems: list[Problem]) -> str | None:
    """Stripped caption text, or None (plus a problem) when the file cannot be read.

    A byte-order mark picks the codec (UTF-8 or UTF-16, as Windows editors write them) and is dropped;
    anything else is read as UTF-8. Bytes that are not UTF-8 become U+FFFD and the caption is kept,
    with a problem naming the byte: one stray Latin-1 byte in an artist tag should not make the image
    train unconditioned (an empty caption), and every other tag of the caption is still right.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        problems.append(Problem(key, path, f"unreadable caption: {err}"))
        return None
    codec = next((codec for bom, codec in BOMS if data.startswith(bom)), None)
    if codec is not None:
        try:
            return data.decode(codec).strip()
        except UnicodeDecodeError as err:
            problems.append(Problem(key, path, f"caption not {codec}: bytes {err.start}-{err.end} are "
                                               "invalid, kept with U+FFFD in their place"))
            return data.decode(codec, errors="replace").strip()
    if b"\x00" in data:  # UTF-16 without a BOM: ASCII text with a NUL after (or before) every byte
        problems.append(Problem(key, path, "caption holds NUL bytes (UTF-16 without a byte-order mark?): "
                                           "NULs removed; save it as UTF-8"))
        data = data.replace(b"\x00", b"")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        problems.append(Problem(key, path, f"caption not UTF-8: byte {data[err.start]:#04x} at offset "
                                           f"{err.start}, kept with U+FFFD in its place"))
        return data.decode("utf-8", errors="replace").strip()


def summarize_problems(problems: list[Problem]) -> dict[str, int]:
    """Count of problems per reason category (the text before the first ':'), for logs and reports."""
    return dict(sorted(Counter(p.reason.split(":")[0] for p in problems).items()))


def load_image(path: str | Path | io.BytesIO, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 0) -> Image.Image:
    """Decode ``path`` (a file, or the bytes of an image packed in a tar or Parquet file, data/packed.py)
    to an upright RGB image detached from the file.

    EXIF orientation is applied; every colour mode ends as 8-bit RGB (see :func:`to_rgb`).
    Raises BadImage for empty, unreadable or truncated files, images above ``max_pixels`` (checked
    from the header, before decoding), and images whose smaller side is below ``min_side``.
    """
    path = Path(path) if isinstance(path, str) else path
    try:
        if (path.stat().st_size if isinstance(path, Path) else path.getbuffer().nbytes) == 0:
            raise BadImage("empty file")
        with Image.open(path) as img:
            _check_size(img.size, max_pixels, min_side)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb: {err}") from err
    except _DECODE_ERRORS as err:
        raise BadImage(f"unreadable: {type(err).__name__}: {err}") from err


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} exceeds max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}x{height}, smaller side below min_side={min_side}")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB copy of ``img``.

    Transparency (RGBA, LA, PA, palette with a transparent colour) is composited over white, since
    a black background would teach the model dark fringes. 16/32-bit integer greys ("I;16*", "I")
    are taken as 16-bit data and scaled by 255/65535: PIL's own conversion clips them at 255.
    """
    if img.mode.startswith("I"):
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) * (255 / 65535)
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
