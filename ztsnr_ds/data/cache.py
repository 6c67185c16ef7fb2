"""The latent cache: its settings, and the reader training uses.

A cache is built once (``launch/cache.py``, split across ranks, resumable: data/cache_build.py) and
read by every rank through :class:`LatentCache`: the index memory-mapped (data/index.py), each sample
read with one pread and checked against its CRC-32 (data/shards.py). The files: data/cache_files.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ztsnr_ds.data.buckets import CROP_MODES, BucketConfig, parse_bucket_key
from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError
from ztsnr_ds.data.caption_cap import DEFAULT_MAX_CAPTION_BYTES
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.sample_faults import SampleFaults
from ztsnr_ds.data.shards import CHECKSUMS, ShardFiles, sample_checksum
from ztsnr_ds.data.source_mix import SourceConfig, source_list
from ztsnr_ds.data.sources import DEFAULT_MAX_PIXELS
from ztsnr_ds.data.tags import TagWeightConfig
from ztsnr_ds.text import WINDOW

LATENT_MODES = ("mean", "sample")


@dataclass
class CacheConfig:
    """What goes into the latent cache (the ``data`` section of the YAML)."""

    cache_dir: str
    """Output folder (manifest.jsonl, shards.json, report.json, shards/)."""
    source: str | None = None
    """One dataset: a folder tree of images (jpg, png, webp, gif: first frame, bmp) with same-stem .txt
    captions, or a .jsonl / .parquet manifest of {"image", "caption"} (docs/data-and-captions.md). The same
    as one data.sources entry with name "" and repeats 1."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several datasets in one cache, each with its repeats per epoch and caption overrides
    (docs/sources.md); instead of data.source."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Aspect-ratio buckets the images are resized and cropped to."""
    crop: str = "center"
    """Crop placement: "center", or "random" (seeded per image by seed and key, so reproducible)."""
    latent: str = "mean"
    """"mean" of the VAE posterior, or one "sample" from it (seeded per image by seed and key)."""
    seed: int = 0
    """Seed of random crops and latent samples."""
    tag_weights: TagWeightConfig = field(default_factory=TagWeightConfig)
    """Tag-frequency loss weights, computed over the whole cached dataset."""
    shard_max_mb: float = 64.0
    """Largest shard file in MiB (a shard holds at least one image even if that is larger)."""
    cache_text: bool = False
    """Also store the caption's text embeddings (bf16); live tag shuffling then has no effect on them."""
    min_image_side: int = 0
    """Images whose smaller side is below this many pixels are skipped as too small (0: keep all). Kept
    images smaller than their bucket are enlarged to cover it; report.json counts them ("upscaled")."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images above this many pixels are skipped before decoding (decompression-bomb guard)."""
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    """Captions longer than this (UTF-8 bytes) are cut at a tag boundary and reported in report.json: every
    use of a caption (tag weights, shuffle, tokenising) then stays bounded (data/caption_cap.py)."""

    def __post_init__(self) -> None:
        self.source_list()
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop={self.crop!r} unknown; valid: {', '.join(CROP_MODES)}")
        if self.latent not in LATENT_MODES:
            raise ValueError(f"data.latent={self.latent!r} unknown; valid: {', '.join(LATENT_MODES)}")
        if self.max_caption_bytes < 1:
            raise ValueError(f"data.max_caption_bytes={self.max_caption_bytes} must be >= 1 (default "
                             f"{DEFAULT_MAX_CAPTION_BYTES})")
        if self.shard_max_mb <= 0:
            raise ValueError(f"data.shard_max_mb={self.shard_max_mb} must be > 0")

    def source_list(self) -> list[SourceConfig]:
        """The sources, names resolved (data/source_mix.py source_list)."""
        return source_list(self.source, self.sources)


class LatentCache:
    """Read side of the cache: the index memory-mapped, samples read one pread each and CRC-checked.

    A sample whose bytes do not match the CRC-32 recorded at build time raises CacheError naming the
    shard, the sample and the image, before anything reaches the model; with ``faults`` (training) it is
    reported there and replaced by a readable sample of its bucket with weight 0 (data/sample_faults.py).
    Not safe to read while a build writes the same folder. Holds no per-row Python objects: ``buckets``
    are views of one int64 column.
    """

    def __init__(self, cache_dir: str | Path, faults: SampleFaults | None = None) -> None:
        self.root = Path(cache_dir)
        self.faults = faults
        self.index = CacheIndex(self.root)
        self.cache_text = self.index.cache_text
        self.buckets: dict[str, np.ndarray] = self.index.buckets
        self.key_hash: np.ndarray = self.index.columns["key_hash"]
        self._files = ShardFiles(self.root)

    def __len__(self) -> int:
        return self.index.rows

    def __getstate__(self) -> dict:
        """Pickles without open shard files (DataLoader workers with spawn reopen them)."""
        return {**self.__dict__, "_files": ShardFiles(self.root)}

    def height_width(self, bucket: str) -> tuple[int, int]:
        """(height, width) in pixels of a bucket key "HxW"."""
        return parse_bucket_key(bucket)

    def batch(self, ids: list[int] | np.ndarray) -> dict:
        """Cached tensors of ``ids`` (all from one bucket): row ids, or the sampler's use ids (row + copy *
        rows for a repeated image, data/repeats.py), read as their row.

        Shape: latents (B, 4, h/8, w/8) bf16 (already * scaling_factor), time_ids (B, 6) float32,
        weight (B,) float32, captions list[str], source (B,) int64 (position in index.sources); with cached
        text also embeds (B, 77 K, D) bf16 (each sample's k chunks, zero-padded to the batch's most K),
        pooled (B, P) bf16 and chunks (B,) int64 (1 for a cache written before long captions). A corrupt
        sample skipped by ``faults`` reads as a readable one of its bucket with weight 0 and caption "".
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and ids.min() < 0:
            raise CacheError(f"ids {ids.tolist()} outside the cache's 0..{len(self) - 1}; {REBUILD_HINT}")
        ids = ids % max(len(self), 1)
        col = self.index.columns
        if len(np.unique(col["bucket"][ids])) != 1:
            raise ValueError(f"a batch must come from one bucket, got ids {ids.tolist()} from several")
        read = [self._read(i) for i in ids]
        bad = np.array([r is None for r in read])
        if bad.any():  # skipped samples (self.faults): a readable one of the bucket in place, weight 0
            stand_in = next((r for r in read if r is not None), None) or self._stand_in(int(ids[0]))
            read = [stand_in if r is None else r for r in read]
        out = {
            "latents": torch.stack([r[0] for r in read]),
            "time_ids": torch.from_numpy(col["time_ids"][ids].astype(np.float32)),
            "weight": torch.from_numpy(np.where(bad, 0, col["weight"][ids]).astype(np.float32)),
            "captions": ["" if b else self.index.caption(i) for i, b in zip(ids, bad)],
            "source": torch.from_numpy(col["source"][ids].astype(np.int64)),
        }
        if self.cache_text:  # r = [latents, embeds (77 max_chunks, D), pooled, text_chunks (older: none)]
            chunks = torch.tensor([int(r[3]) if len(r) > 3 else 1 for r in read], dtype=torch.int64)
            embeds = [r[1][:WINDOW * k] for r, k in zip(read, chunks.tolist(), strict=True)]  # (77 k, D) each
            out |= {"embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True),
                    "pooled": torch.stack([r[2] for r in read]), "chunks": chunks}
        return out

    def _read(self, i: int) -> list[torch.Tensor] | None:
        """Latents (and the TEXT_TENSORS with cached text) of sample ``i``; None if it is corrupt and
        self.faults skips it (reported there), else CacheError."""
        try:
            return [*self._sample(i, "crc32"), *(self._sample(i, "crc32_text") if self.cache_text else [])]
        except CacheError as err:
            if self.faults is None:
                raise
            self.faults.record(err, i)
            return None

    def _stand_in(self, i: int) -> list[torch.Tensor]:
        """The first readable sample of id i's bucket (every corrupt one met on the way is reported)."""
        bucket = self.index.bucket_keys[self.index.columns["bucket"][i]]
        for j in self.buckets[bucket]:
            if (found := self._read(int(j))) is not None:
                return found
        raise CacheError(f"no sample of bucket {bucket} in {self.root} is readable; {REBUILD_HINT}")

    def _sample(self, i: int, crc_column: str) -> list[torch.Tensor]:
        """The tensors ``crc_column`` covers (CHECKSUMS) of sample ``i``, their bytes checked against it."""
        name = self.index.shard_names[self.index.columns["shard"][i]]
        shard, position = self._files.get(name), int(self.index.columns["index"][i])
        names = [n for n in CHECKSUMS[crc_column] if n in shard.tensors or n != "text_chunks"]  # older: none
        data = [shard.read(tensor, position) for tensor in names]
        expected = int(self.index.columns[crc_column][i])
        if (actual := sample_checksum(*data)) != expected:
            raise CacheError(f"latent cache shard {shard.path}: sample {position} (id {i}, "
                             f"{self.index.key(i)!r}) fails its checksum (crc32 {actual:08x}, built "
                             f"{expected:08x}): the shard is corrupt; {REBUILD_HINT}")
        return [shard.tensor(tensor, raw) for tensor, raw in zip(names, data, strict=True)]
