"""Sources whose images are packed in files: WebDataset tar shards and Parquet files with an image-bytes
column (the HF datasets layout: ``image`` binary, or a struct with ``bytes``).

Tar shards are read with the standard library's ``tarfile``, not the ``webdataset`` package: the build
reads every image twice (hash and bucket, then decode in bucket order), so it needs random access to a
member, which a tar gives by offset (one pread of the member's bytes, the shard never loaded); webdataset
streams samples in order for training loops and adds a dependency. Each rank lists the shards' headers,
keeps the members whose key hashes to it (data/sources.py in_share) and reads only their bytes. Members
are grouped WebDataset-style by their name up to the first dot of the basename: ``0001.jpg`` with
``0001.txt`` (the caption). The cache key is ``<shard file>/<member>``.

Parquet cells are not addressable by offset (pages are compressed), so a rank streams the file a row
batch at a time, and copies the image bytes of its own rows to a spill file in the build's parts/ folder
(deleted by the merge); a record then points at its bytes there. Memory holds one batch; the disk
holds the rank's share of the bytes until the build ends. The key is ``<parquet file>/<row>``.

Damaged members (bytes no image decoder reads) are skipped and reported like damaged files, by the build;
a tar that cannot be read on (a damaged header) keeps the members before it and reports the rest.
"""

from __future__ import annotations

import glob
import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from PIL import Image

from ztsnr_ds.data.sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    MISSING_CAPTION,
    ImageRecord,
    Problem,
    Scan,
    in_share,
    load_image,
)

CAPTION_EXTENSIONS = (".txt", ".caption")


def packed_kind(path: str) -> str | None:
    """"tar" for a .tar shard or a glob of them, "parquet" for a Parquet file whose image column holds
    bytes, None for other sources (files on disk)."""
    if path.lower().endswith(".tar"):
        return "tar"
    if path.lower().endswith(".parquet") and Path(path).is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.ParquetFile(path).schema_arrow
        kind = schema.field("image").type if "image" in schema.names else None
        if kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                                 or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            return "parquet"
    return None


def read_bytes(record: ImageRecord) -> bytes:
    """The image's bytes: its file, or its member's range of the file it is packed in."""
    if record.member is None:
        return record.path.read_bytes()
    offset, size = record.member
    with open(record.path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def load_record(record: ImageRecord, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> Image.Image:
    """data/sources.py load_image of the record's file or packed bytes (BadImage alike)."""
    if record.member is None:
        return load_image(record.path, max_pixels, min_side)
    return load_image(io.BytesIO(read_bytes(record)), max_pixels, min_side)


class _Names:
    """This rank's share and the digest of every name streamed past (as data/sources.py's scan)."""

    def __init__(self, rank: int, world_size: int, prefix: str) -> None:
        self.rank, self.world_size, self.prefix, self.digest = rank, world_size, prefix, hashlib.sha256()

    def take(self, name: str) -> bool:
        self.digest.update(name.encode() + b"\0")
        return in_share(self.prefix + name, self.rank, self.world_size)


def scan_packed(path: str, rank: int, world_size: int, prefix: str, spill: Path,
                caption_from: Callable[[dict], str] | None = None) -> Scan:
    """This rank's share of a tar (glob) or image-bytes Parquet source, keys without ``prefix`` (the
    caller adds it), sorted by key; ``spill``: the file a Parquet source's bytes are copied to."""
    names = _Names(rank, world_size, prefix)
    if packed_kind(path) == "tar":
        shards = sorted(Path(p) for p in glob.glob(path)) if glob.has_magic(path) else [Path(path)]
        records, problems = [], []
        for shard in shards:
            _scan_tar(shard, names, records, problems)
    else:
        records, problems = _scan_parquet(Path(path), names, spill, caption_from)
    return Scan(sorted(records, key=lambda r: r.key), sorted(problems), names.digest.hexdigest()[:16])


def _scan_tar(shard: Path, names: _Names, records: list[ImageRecord], problems: list[Problem]) -> None:
    """Records of one shard's members (headers read in order; only this rank's captions read)."""
    images, captions = {}, {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                stem = str(name.parent / name.name.split(".", 1)[0])
                if member.isfile() and name.suffix.lower() in IMAGE_EXTENSIONS:
                    images[stem] = member
                elif member.isfile() and name.suffix.lower() in CAPTION_EXTENSIONS:
                    captions[stem] = member
            _tar_records(shard, tar, images, captions, names, records, problems)
    except (tarfile.TarError, OSError) as err:  # a damaged header: the members before it are kept
        if names.take(f"{shard.name}/"):
            problems.append(Problem(f"{shard.name}/", shard, f"unreadable tar shard: {err}; members after "
                                    f"the damage are skipped (listed {len(images)} images before it)"))
        if images:
            with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                _tar_records(shard, tar, images, captions, names, records, problems)


def _tar_records(shard: Path, tar: tarfile.TarFile, images: dict, captions: dict, names: _Names,
                 records: list[ImageRecord], problems: list[Problem]) -> None:
    for stem, member in images.items():
        key = f"{shard.name}/{member.name}"
        if not names.take(key):
            continue
        caption = ""
        if stem in captions:
            caption = tar.extractfile(captions[stem]).read().decode("utf-8", errors="replace").strip()
        else:
            problems.append(Problem(key, shard, MISSING_CAPTION))
        records.append(ImageRecord(shard, caption, key, member=(member.offset_data, member.size)))
    images.clear()


def _scan_parquet(path: Path, names: _Names, spill: Path,
                  caption_from: Callable[[dict], str] | None) -> tuple[list[ImageRecord], list[Problem]]:
    """Stream row batches; copy this rank's image bytes to ``spill``."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = [c for c in table.schema_arrow.names if c == "image" or c in ("caption", "width", "height")
               or c in getattr(caption_from, "columns", ())]
    records, problems, row = [], [], 0
    spill.parent.mkdir(parents=True, exist_ok=True)
    with open(spill, "wb") as out:
        for batch in table.iter_batches(batch_size=1024, columns=columns):
            image = batch.column("image")
            data = image.field("bytes") if hasattr(image, "field") else image
            others = [c for c in columns if c != "image"]
            for i in range(len(batch)):  # Python per row of the build's scan only, as every manifest scan
                key, row = f"{path.name}/{row:09d}", row + 1
                if not names.take(key):
                    continue
                blob = data[i].as_py()
                if not blob:
                    problems.append(Problem(key, path, "missing image bytes"))
                    continue
                entry = {c: batch.column(c)[i].as_py() for c in others}
                caption = caption_from(entry) if caption_from else entry.get("caption") or ""
                caption = "\n".join(caption) if isinstance(caption, list) else caption
                width, height = entry.get("width"), entry.get("height")
                size = (width, height) if width and height else None
                records.append(ImageRecord(spill, caption.strip(), key, size, member=(out.tell(), len(blob))))
                out.write(blob)
    return records, problems
