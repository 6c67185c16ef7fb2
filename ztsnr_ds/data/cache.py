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
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.shards import CHECKSUMS, TEXT_TENSORS, ShardFiles, sample_checksum
from ztsnr_ds.data.sources import DEFAULT_MAX_PIXELS
from ztsnr_ds.data.tags import TagWeightConfig

LATENT_MODES = ("mean", "sample")


@dataclass
class CacheConfig:
    """What goes into the latent cache (the ``data`` section of the YAML)."""

    source: str
    """Dataset: a folder tree of images (jpg, png, webp, gif: first frame, bmp) with same-stem .txt captions,
    or a .jsonl / .parquet manifest of {"image", "caption"} (docs/data-and-captions.md)."""
    cache_dir: str
    """Output folder (manifest.jsonl, shards.json, report.json, shards/)."""
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

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop={self.crop!r} unknown; valid: {', '.join(CROP_MODES)}")
        if self.latent not in LATENT_MODES:
            raise ValueError(f"data.latent={self.latent!r} unknown; valid: {', '.join(LATENT_MODES)}")
        if self.shard_max_mb <= 0:
            raise ValueError(f"data.shard_max_mb={self.shard_max_mb} must be > 0")


class LatentCache:
    """Read side of the cache: the index memory-mapped, samples read one pread each and CRC-checked.

    A sample whose bytes do not match the CRC-32 recorded at build time raises CacheError naming the
    shard, the sample and the image, before anything reaches the model. Not safe to read while a build
    writes the same folder. Holds no per-row Python objects: ``buckets`` are views of one int64 column.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir)
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
        """Cached tensors of ``ids`` (all from one bucket).

        Shape: latents (B, 4, h/8, w/8) bf16 (already * scaling_factor), time_ids (B, 6) float32,
        weight (B,) float32, captions list[str]; with cached text also embeds (B, 77, D), pooled (B, P) bf16.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and not (0 <= ids.min() and ids.max() < len(self)):
            raise CacheError(f"ids {ids.tolist()} outside the cache's 0..{len(self) - 1}; {REBUILD_HINT}")
        col = self.index.columns
        if len(np.unique(col["bucket"][ids])) != 1:
            raise ValueError(f"a batch must come from one bucket, got ids {ids.tolist()} from several")
        out = {
            "latents": torch.stack([self._sample(i, "crc32")[0] for i in ids]),
            "time_ids": torch.from_numpy(col["time_ids"][ids].astype(np.float32)),
            "weight": torch.from_numpy(col["weight"][ids].astype(np.float32)),
            "captions": [self.index.caption(i) for i in ids],
        }
        if self.cache_text:
            text = [self._sample(i, "crc32_text") for i in ids]
            out |= {name: torch.stack([t[j] for t in text]) for j, name in enumerate(TEXT_TENSORS)}
        return out

    def _sample(self, i: int, crc_column: str) -> list[torch.Tensor]:
        """The tensors ``crc_column`` covers (CHECKSUMS) of sample ``i``, their bytes checked against it."""
        names = CHECKSUMS[crc_column]
        name = self.index.shard_names[self.index.columns["shard"][i]]
        shard, position = self._files.get(name), int(self.index.columns["index"][i])
        data = [shard.read(tensor, position) for tensor in names]
        expected = int(self.index.columns[crc_column][i])
        if (actual := sample_checksum(*data)) != expected:
            raise CacheError(f"latent cache shard {shard.path}: sample {position} (id {i}, "
                             f"{self.index.key(i)!r}) fails its checksum (crc32 {actual:08x}, built "
                             f"{expected:08x}): the shard is corrupt; {REBUILD_HINT}")
        return [shard.tensor(tensor, raw) for tensor, raw in zip(names, data, strict=True)]
