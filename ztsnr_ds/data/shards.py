"""Cache shards: safetensors files of one bucket, written size-bounded and read one sample at a time.

Every sample carries a CRC-32 of its bytes (latents; embeds + pooled with cached text), written at build
time into its manifest row and the index, and checked on the bytes a read returns. A read costs one
``pread`` of exactly the sample (plus the header, once per opened shard), so what storage serves per
trained sample does not grow with the world size. The whole-file sha256 is for the build (reuse) and
for ``launch/cache.py --verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from ztsnr_ds.data.cache_files import (
    FORMAT,
    HEADER_RESERVE,
    PARTS_DIR,
    REBUILD_HINT,
    CacheError,
    shard_path,
    write_atomic,
)

TEXT_TENSORS = ("embeds", "pooled", "text_chunks")
"""Cached text: embeds (n, 77 K, D) zero-padded to the shard's most chunks K, pooled (n, P) and the chunks
of each sample (n,) uint8 (absent in caches written before long captions: one chunk each)."""
CHECKSUMS = {"crc32": ("latents",), "crc32_text": TEXT_TENSORS}
"""The per-sample checksums (manifest row fields and index columns) and the tensors each one covers (those
of them a shard holds)."""
MAX_HEADER = 16 * HEADER_RESERVE
"""A header larger than this is not one of ours (ours are < 1 KiB): refuse before reading it."""
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}


def sample_checksum(*samples: torch.Tensor | bytes) -> int:
    """CRC-32 of the samples' raw bytes, chained in order: crc(a ++ b) (zlib, ~1 GB/s on one core)."""
    crc = 0
    for sample in samples:
        data = sample if isinstance(sample, bytes) else _tensor_bytes(sample)
        crc = zlib.crc32(data, crc)
    return crc


def sample_checksums(tensors: Mapping[str, torch.Tensor], index: int) -> dict[str, int]:
    """The CHECKSUMS of sample ``index`` of a shard's stacked ``tensors`` (crc32_text only with text)."""
    return {column: sample_checksum(*(tensors[n][index] for n in names if n in tensors))
            for column, names in CHECKSUMS.items() if names[0] in tensors}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def shard_problem(path: Path, sha256: str) -> str | None:
    """None if the shard file exists and its sha256 matches, else what is wrong with it (streamed)."""
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return _digest_problem(h.hexdigest(), sha256)


def read_shard(path: Path, sha256: str) -> tuple[bytes | None, str | None]:
    """(the shard's bytes or None if missing, what is wrong with it or None): one read for both the
    sha256 check and the tensors."""
    if not path.is_file():
        return None, "missing"
    data = path.read_bytes()
    return data, _digest_problem(hashlib.sha256(data).hexdigest(), sha256)


def _digest_problem(actual: str, expected: str) -> str | None:
    if actual == expected:
        return None
    return f"sha256 mismatch (expected {expected[:16]}..., got {actual[:16]}...)"


class ShardWriter:
    """Collects encoded images of one bucket and writes them as size-bounded, fsynced shards.

    After each shard is on disk a line goes to this rank's progress file: the resume point.
    """

    def __init__(self, root: Path, rank: int, fingerprint: str, max_bytes: int) -> None:
        self.root, self.fingerprint, self.max_bytes = root, fingerprint, max_bytes
        self.progress = root / PARTS_DIR / f"progress-rank{rank}.jsonl"
        self.rows: list[dict] = []  # rows of every shard written by this run
        self.infos: dict[str, dict] = {}
        self._pending: list[tuple[dict, dict[str, torch.Tensor]]] = []

    def add(self, bucket: str, rows: list[dict], tensors: dict[str, torch.Tensor]) -> None:
        """Queue a batch of one bucket (tensors (B, ...)); writes a shard whenever one is full."""
        if self._pending and self._pending[0][0]["bucket"] != bucket:
            self.flush()
        item_bytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        capacity = max(1, (self.max_bytes - HEADER_RESERVE) // item_bytes)
        for i, row in enumerate(rows):
            self._pending.append((row, {name: t[i] for name, t in tensors.items()}))
            if len(self._pending) >= capacity:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        rows = [row for row, _ in self._pending]
        tensors = {name: _stack([t[name] for _, t in self._pending]) for name in self._pending[0][1]}
        ident = "\n".join([self.fingerprint] + [f"{r['key']}:{r['sha256']}" for r in rows])
        name = f"{rows[0]['bucket']}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        data = safetensors.torch.save(tensors, metadata={"format": str(FORMAT), "bucket": rows[0]["bucket"],
                                                         "fingerprint": self.fingerprint})
        write_atomic(shard_path(self.root, name), data)
        for index, row in enumerate(rows):
            row.update(shard=name, index=index, **sample_checksums(tensors, index))
        info = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "bucket": rows[0]["bucket"],
                "count": len(rows)}
        # leading newline: a line torn by a crash never swallows the next one
        with open(self.progress, "a", encoding="utf-8") as f:
            entry = {"shard": name, "fingerprint": self.fingerprint, **info, "rows": rows}
            f.write("\n" + json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows
        self.infos[name] = info
        self._pending = []


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    """Stack samples; samples of different lengths (embeds of 77 k positions) zero-padded on dim 0."""
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)


class ShardFile:
    """One shard open for random reads: the safetensors header parsed once, then a pread per sample."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # random access: no read-ahead of neighbours nobody asked for
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            head = os.pread(self.fd, 8, 0)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < size <= MAX_HEADER:
                raise CacheError(f"latent cache shard {path}: not a safetensors shard (header size {size})")
            header = json.loads(os.pread(self.fd, size, 8))
            header.pop("__metadata__", None)
            self.tensors = {name: (_DTYPES[t["dtype"]], t["shape"], 8 + size + t["data_offsets"][0],
                                   t["data_offsets"][1] - t["data_offsets"][0]) for name, t in header.items()}
        except (ValueError, KeyError, TypeError) as err:
            os.close(self.fd)
            raise CacheError(f"latent cache shard {path}: damaged header ({err})") from None
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, name: str, index: int) -> bytes:
        """The raw bytes of sample ``index`` of tensor ``name``; CacheError if it is not in the file."""
        if name not in self.tensors:
            raise CacheError(f"latent cache shard {self.path}: no tensor {name!r}")
        _, shape, start, length = self.tensors[name]
        if not 0 <= index < shape[0]:
            raise CacheError(f"latent cache shard {self.path}: sample {index} out of range "
                             f"(it holds {shape[0]})")
        item = length // shape[0]
        data = os.pread(self.fd, item, start + index * item)
        if len(data) != item:
            raise CacheError(f"latent cache shard {self.path}: truncated at sample {index}")
        return data

    def tensor(self, name: str, data: bytes) -> torch.Tensor:
        """``data`` (from read) as one sample of tensor ``name``."""
        dtype, shape, _, _ = self.tensors[name]
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape[1:])

    def close(self) -> None:
        os.close(self.fd)


class ShardFiles:
    """At most ``limit`` shards open at once (least recently used closed first): a 10M-image cache has
    tens of thousands of shards, more than a process may hold open."""

    def __init__(self, root: Path, limit: int = 256) -> None:
        self.root, self.limit = root, limit
        self._open: OrderedDict[str, ShardFile] = OrderedDict()

    def get(self, name: str) -> ShardFile:
        shard = self._open.pop(name, None)
        if shard is None:
            try:
                shard = ShardFile(shard_path(self.root, name))
            except FileNotFoundError:
                raise CacheError(f"latent cache shard {shard_path(self.root, name)} is missing") from None
            if len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()
        self._open[name] = shard
        return shard


def shard_checksums(root: Path, names: Iterable[str], shards: Mapping[str, dict],
                    progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The CHECKSUMS of every sample of the named shards ({name: {column: (count,) uint32}}), reading each
    shard once and checking its sha256 on the way (for caches written before per-sample checksums)."""
    out = {}
    for name in tqdm(sorted(names), disable=not progress, desc="checksum samples"):
        path = shard_path(root, name)
        data, problem = (read_shard(path, shards[name]["sha256"]) if name in shards
                         else (None, "not in shards.json"))
        if problem is not None:
            raise CacheError(f"latent cache shard {path}: {problem}; {REBUILD_HINT}")
        tensors = safetensors.torch.load(data)
        per_sample = [sample_checksums(tensors, i) for i in range(len(tensors["latents"]))]
        out[name] = {column: np.array([c[column] for c in per_sample], np.uint32) for column in per_sample[0]}
    return out


def fill_checksums(root: Path, rows: list[dict], shards: dict[str, dict], progress: bool = False) -> int:
    """Add the per-sample CRC-32s to rows that lack them (see :func:`shard_checksums`); returns how many."""
    todo = [row for row in rows if "crc32" not in row]
    table = shard_checksums(root, {row["shard"] for row in todo}, shards, progress)
    for row in todo:
        row.update({column: int(values[row["index"]]) for column, values in table[row["shard"]].items()})
    return len(todo)
