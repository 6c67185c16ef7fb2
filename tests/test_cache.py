"""Latent cache on the tiny SDXL: latents vs an independent VAE encode, manifest, bad files, reuse,
corruption, resume, rank split, shard bound, cached text and the launch script."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from ztsnr_ds import integrity
from ztsnr_ds.data import index_sums
from ztsnr_ds.data.buckets import BucketConfig, assign_bucket, make_buckets
from ztsnr_ds.data.cache import CacheConfig, LatentCache
from ztsnr_ds.data.cache_build import build_cache
from ztsnr_ds.data.cache_files import HEADER_RESERVE, CacheError
from ztsnr_ds.data.cache_merge import merge_parts
from ztsnr_ds.data.source_mix import SourceConfig
from ztsnr_ds.data.tags import FIELD_SEP, parse_tags, tag_weights
from ztsnr_ds.models import TINY_TEXT_HIDDEN, load_frozen
from ztsnr_ds.text import PromptEncoder

BUCKETS = BucketConfig(max_area=128 * 128, step=64, min_side=64, max_side=256, max_aspect=4.0)
SHARD_BYTES = HEADER_RESERVE + 2 * 2048  # two 128x128 latents (4 * 16 * 16 bf16) per shard
# (width, height) of the good images: square-ish, wide and tall ones for every bucket
SIZES = [
    (128, 128),
    (96, 96),
    (200, 100),
    (100, 200),
    (256, 64),
    (64, 256),
    (150, 60),
    (90, 250),
    (300, 120),
    (130, 140),
    (70, 70),
    (160, 90),
]
TAGS = ["1girl", "solo", "smile", "outdoors", "sky", "cat", "red_eyes", "hat"]
BAD = {"empty.png", "corrupt.jpg", "truncated.png"}
ROW_FIELDS = {
    "id",
    "key",
    "path",
    "sha256",
    "bucket",
    "orig_hw",
    "crop_tl",
    "time_ids",
    "caption",
    "tags",
    "weight",
    "shard",
    "index",
    "crc32",
    "source",
    "tokens",  # caption chunking (text.PromptEncoder.counts), summed into report.json's captions
    "chunks",
    "tags_cut",
}


def _noise_image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write_dataset(root: Path) -> Path:
    """Good images with tag captions (one without a caption), an EXIF-rotated JPEG and three bad files."""
    root.mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        _noise_image(i, w, h).save(root / f"img{i:02d}.png")
        if i != 5:
            tags = [tag for j, tag in enumerate(TAGS) if (i + 1) % (j + 2)]  # tags of varied frequency
            (root / f"img{i:02d}.txt").write_text(", ".join(tags))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 180x70, shown rotated by 90 degrees: upright 70 wide, 180 tall
    (root / "sub").mkdir()
    _noise_image(99, 180, 70).save(root / "sub" / "rotated.jpg", exif=exif.tobytes(), quality=95)
    (root / "sub" / "rotated.txt").write_text("cat, hat")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(7).bytes(500))
    png = (root / "img00.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    return root


def _cfg(source: Path, cache_dir: Path, **kw) -> CacheConfig:
    kw = {"buckets": BUCKETS, "crop": "random", "shard_max_mb": SHARD_BYTES / 2**20} | kw
    return CacheConfig(source=str(source), cache_dir=str(cache_dir), **kw)


class SimulatedCrash(Exception):
    pass


@contextmanager
def count_vae_images(vae, fail_after_calls: int | None = None):
    """Counts images through the VAE encoder; optionally raises on a later call (a simulated crash)."""
    seen = {"images": 0, "calls": 0}

    def hook(module, args):
        if fail_after_calls is not None and seen["calls"] >= fail_after_calls:
            raise SimulatedCrash
        seen["calls"] += 1
        seen["images"] += args[0].shape[0]

    handle = vae.encoder.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _read_rows(cache_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (cache_dir / "manifest.jsonl").read_text().splitlines()]


def _content(rows: list[dict]) -> list[dict]:
    """Rows without their storage location and checksum (VAE batches of other sizes differ in the
    last bits, see assert_same_latents)."""
    return [{k: v for k, v in row.items() if k not in ("shard", "index", "crc32")} for row in rows]


def _latents_by_key(cache_dir: Path) -> dict[str, torch.Tensor]:
    cache = LatentCache(cache_dir)
    return {row["key"]: cache.batch([row["id"]])["latents"][0] for row in _read_rows(cache_dir)}


def assert_same_latents(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to one bf16 rounding step (VAE batches of other sizes differ in the last fp32 bits)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=2**-7, atol=1e-3 * a[key].abs().max().item())


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return load_frozen(tiny_sdxl, dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def built(tmp_path_factory, parts, dataset):
    """One finished cache (random crops, posterior means); tests that change it work on a copy."""
    cfg = _cfg(dataset, tmp_path_factory.mktemp("built") / "cache")
    with count_vae_images(parts.vae) as seen:
        stats = build_cache(cfg, parts, batch_size=3, workers=2, progress=False)
    return cfg, stats, seen["images"]


@pytest.fixture
def copied(tmp_path, built):
    cfg, _, _ = built
    data = shutil.copytree(cfg.source, tmp_path / "images")
    cache = shutil.copytree(cfg.cache_dir, tmp_path / "cache")
    return _cfg(data, cache)


def test_latents_equal_independent_vae_encoding(built, parts):
    """latents == VAE(image resized to cover the bucket, cropped at time_ids' offset).mean * scale."""
    cfg, _, _ = built
    cache = LatentCache(cfg.cache_dir)
    processor = VaeImageProcessor(vae_scale_factor=8)
    for row in _read_rows(Path(cfg.cache_dir)):
        oh, ow, top, left, th, tw = row["time_ids"]
        img = ImageOps.exif_transpose(Image.open(row["path"])).convert("RGB")
        assert img.size == (ow, oh)
        scale = max(th / oh, tw / ow)  # cover the bucket, keep the aspect ratio
        img = img.resize((max(tw, round(ow * scale)), max(th, round(oh * scale))), Image.Resampling.LANCZOS)
        img = img.crop((left, top, left + tw, top + th))
        with torch.no_grad():
            ref = parts.vae.encode(processor.preprocess(img)).latent_dist.mean[0]
        ref = ref * parts.vae.config.scaling_factor
        got = cache.batch([row["id"]])["latents"][0]
        assert got.dtype == torch.bfloat16 and got.shape == (4, th // 8, tw // 8)
        torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())
    assert any(row["crop_tl"] != [0, 0] for row in _read_rows(Path(cfg.cache_dir)))  # random crops exercised


def test_manifest_rows_report_and_reader(built):
    cfg, stats, encoded = built
    rows = _read_rows(Path(cfg.cache_dir))
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert [r["id"] for r in rows] == list(range(len(SIZES) + 1)) and encoded == stats.encoded == len(rows)
    buckets = make_buckets(BUCKETS)
    for row in rows:
        assert set(row) == ROW_FIELDS
        path = Path(row["path"])
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        txt = path.with_suffix(".txt")
        assert row["caption"] == (txt.read_text() if txt.exists() else "")
        assert row["tags"] == parse_tags(row["caption"])
        oh, ow, top, left, th, tw = row["time_ids"]
        assert row["orig_hw"] == [oh, ow] and row["crop_tl"] == [top, left]
        assert row["bucket"] == f"{th}x{tw}" and (th, tw) == assign_bucket(oh, ow, buckets)
    rotated = next(r for r in rows if r["key"] == "sub/rotated.jpg")
    assert rotated["orig_hw"] == [180, 70] and rotated["bucket"] == "192x64"  # upright, from the EXIF tag
    weights = [r["weight"] for r in rows]
    assert weights == pytest.approx(tag_weights([r["tags"] for r in rows], cfg.tag_weights))
    assert np.mean(weights) == pytest.approx(1.0) and np.ptp(weights) > 0.1

    report = json.loads((Path(cfg.cache_dir) / "report.json").read_text())
    assert report["images"] == len(rows) and sum(report["buckets"].values()) == len(rows)
    reasons = {b["key"]: b["reason"] for b in report["bad"]}
    assert set(reasons) == BAD and reasons["empty.png"] == "empty file"
    assert "truncated" in reasons["truncated.png"]
    assert {p["key"] for p in report["scan_problems"]} == {"img05.png"} | BAD  # no caption; img05 is cached
    assert not (Path(cfg.cache_dir) / "parts").exists() or not any((Path(cfg.cache_dir) / "parts").iterdir())

    cache = LatentCache(cfg.cache_dir)
    assert len(cache) == len(rows)
    assert sorted(i for ids in cache.buckets.values() for i in ids) == list(range(len(rows)))
    key, ids = max(cache.buckets.items(), key=lambda kv: len(kv[1]))
    h, w = cache.height_width(key)
    batch = cache.batch(ids)
    assert (
        batch["latents"].shape == (len(ids), 4, h // 8, w // 8) and batch["latents"].dtype == torch.bfloat16
    )
    assert batch["time_ids"].shape == (len(ids), 6)
    assert batch["time_ids"].dtype == batch["weight"].dtype == torch.float32
    assert batch["time_ids"].tolist() == [rows[i]["time_ids"] for i in ids]
    assert batch["captions"] == [rows[i]["caption"] for i in ids] and "embeds" not in batch
    with pytest.raises(ValueError, match="one bucket"):
        cache.batch([ids[0], next(i for i in range(len(rows)) if i not in ids)])


def test_shards_bounded_and_checksummed(built):
    cfg, _, _ = built
    root = Path(cfg.cache_dir)
    meta = json.loads((root / "shards.json").read_text())
    files = sorted(p.stem for p in (root / "shards").iterdir())
    assert files == sorted(meta["shards"])
    for name, info in meta["shards"].items():
        data = (root / "shards" / f"{name}.safetensors").read_bytes()
        assert len(data) == info["bytes"] <= SHARD_BYTES
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
    per_bucket = [info["bucket"] for info in meta["shards"].values()]
    assert max(per_bucket.count(b) for b in per_bucket) >= 2  # a bucket spilled into a second shard
    for info in meta["shards"].values():  # packed: as many latents as fit beside the header reserve
        h, w = map(int, info["bucket"].split("x"))
        assert 1 <= info["count"] <= (SHARD_BYTES - HEADER_RESERVE) // (4 * (h // 8) * (w // 8) * 2) == 2


def test_rerun_reuses_and_reencodes_only_changes(copied, parts):
    before = _latents_by_key(Path(copied.cache_dir))
    with count_vae_images(parts.vae) as seen:
        stats = build_cache(copied, parts, batch_size=3, workers=2, progress=False)
    assert seen["images"] == stats.encoded == 0 and stats.reused == len(before)

    data = Path(copied.source)
    _noise_image(1234, 128, 128).save(data / "img00.png")  # same size, new pixels
    (data / "img01.png").unlink()
    (data / "img01.txt").unlink()
    (data / "img02.txt").write_text("brand new tag")  # caption only: latents reused, row updated
    with count_vae_images(parts.vae) as seen:
        stats = build_cache(copied, parts, batch_size=3, workers=2, progress=False)
    assert seen["images"] == stats.encoded == 1
    after = _latents_by_key(Path(copied.cache_dir))
    assert set(after) == set(before) - {"img01.png"}
    assert not torch.equal(after["img00.png"], before["img00.png"])
    assert_same_latents(
        {k: v for k, v in after.items() if k != "img00.png"},
        {k: v for k, v in before.items() if k in after and k != "img00.png"},
    )
    rows = {r["key"]: r for r in _read_rows(Path(copied.cache_dir))}
    assert rows["img02.png"]["tags"] == ["brand new tag"]
    meta = json.loads((Path(copied.cache_dir) / "shards.json").read_text())
    assert sorted(p.stem for p in (Path(copied.cache_dir) / "shards").iterdir()) == sorted(meta["shards"])


def test_added_source_encodes_only_its_images(copied, parts):
    """data.source's folder listed with name "" keeps its keys (all reused); a second source's keys get
    its name as prefix, only its images are encoded, and the index's source column names each row's."""
    before = _latents_by_key(Path(copied.cache_dir))
    extra = Path(copied.source).parent / "extra"
    extra.mkdir()
    for name in ("img00", "img03"):  # the same file names as in the first source
        shutil.copy(Path(copied.source) / f"{name}.png", extra / f"{name}.png")
        (extra / f"{name}.txt").write_text("extra, tag")
    mixed = CacheConfig(cache_dir=copied.cache_dir, buckets=BUCKETS, crop="random",
                        shard_max_mb=SHARD_BYTES / 2**20,
                        sources=[SourceConfig(copied.source, name=""), SourceConfig(str(extra), repeats=2.5)])
    with count_vae_images(parts.vae) as seen:
        stats = build_cache(mixed, parts, batch_size=3, workers=2, progress=False)
    assert seen["images"] == stats.encoded == 2 and stats.reused == len(before)
    cache = LatentCache(copied.cache_dir)
    keys = [cache.index.key(i) for i in range(len(cache))]
    assert {k for k in keys if k.startswith("extra/")} == {"extra/img00.png", "extra/img03.png"}
    assert cache.index.sources == ["", "extra"]
    assert cache.index.columns["source"].tolist() == [int(k.startswith("extra/")) for k in keys]
    assert_same_latents({k: v for k, v in _latents_by_key(Path(copied.cache_dir)).items() if k in before},
                        before)


def _sample_offset(path: Path, index: int) -> tuple[int, int]:
    """(first byte, length) of latent sample ``index`` in a safetensors shard, from its header."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + size])["latents"]
    begin, end = entry["data_offsets"]
    item = (end - begin) // entry["shape"][0]
    return 8 + size + begin + index * item, item


def test_corrupt_sample_detected_on_read_verified_and_rebuilt(copied, parts, capsys):
    root = Path(copied.cache_dir)
    before = _latents_by_key(root)
    rows = _read_rows(root)
    victim = next(r for r in rows if sum(o["shard"] == r["shard"] for o in rows) == 2)
    neighbour = next(r for r in rows if r["shard"] == victim["shard"] and r is not victim)
    path = root / "shards" / f"{victim['shard']}.safetensors"
    start, length = _sample_offset(path, victim["index"])
    data = bytearray(path.read_bytes())
    data[start + length // 2] ^= 0x01  # one flipped bit inside the victim's latents, header intact
    path.write_bytes(bytes(data))
    cache = LatentCache(root)
    with pytest.raises(CacheError, match=rf"{victim['shard']}.*sample {victim['index']} \(id {victim['id']}, "
                                         rf"'{victim['key']}'\) fails its checksum.*launch/cache\.py"):
        cache.batch([victim["id"]])
    torch.testing.assert_close(cache.batch([neighbour["id"]])["latents"][0], before[neighbour["key"]],
                               rtol=0, atol=0)  # the rest of the shard still reads: per-sample checks

    launch = _launch_module()
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--cache_dir", str(root), "--verify", "--workers", "2"])
    assert exit_info.value.code == 1
    report = json.loads((root / "verify_report.json").read_text())
    assert report["shards"] == len({r["shard"] for r in rows}) and report["samples"] == len(rows)
    assert sorted(p["reason"] for p in report["problems"]) == ["crc32 mismatch", _sha_reason(report)]
    bad = next(p for p in report["problems"] if p["reason"] == "crc32 mismatch")
    assert (bad["id"], bad["key"], bad["shard"], bad["index"]) == (victim["id"], victim["key"],
                                                                 victim["shard"], victim["index"])
    assert f"{len(rows)} samples checked, 2 problems" in capsys.readouterr().out

    with count_vae_images(parts.vae) as seen:
        stats = build_cache(copied, parts, batch_size=3, workers=2, progress=False)
    assert [c["shard"] for c in stats.corrupt_shards] == [victim["shard"]]
    assert seen["images"] == stats.encoded == 2
    assert stats.report["corrupt_shards"][0]["shard"] == victim["shard"]
    assert_same_latents(_latents_by_key(root), before)
    assert launch.main(["--cache_dir", str(root), "--verify"])["problems"] == []


def _sha_reason(report: dict) -> str:
    return next(p["reason"] for p in report["problems"] if p["reason"].startswith("sha256 mismatch"))


def test_interrupted_build_resumes_from_completed_shards(tmp_path, parts, dataset, built):
    cfg = _cfg(dataset, tmp_path / "cache")
    with pytest.raises(SimulatedCrash), count_vae_images(parts.vae, fail_after_calls=3):
        build_cache(cfg, parts, batch_size=2, workers=2, progress=False)
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "shards").glob("*.safetensors")}
    assert done and not (tmp_path / "cache" / "manifest.jsonl").exists()
    kept = sum(
        json.loads(line)["count"]
        for line in (tmp_path / "cache" / "parts" / "progress-rank0.jsonl").read_text().splitlines()
        if line
    )

    with count_vae_images(parts.vae) as seen:
        stats = build_cache(cfg, parts, batch_size=2, workers=2, progress=False)
    assert stats.reused == kept > 0 and seen["images"] == stats.encoded == len(SIZES) + 1 - kept
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done.items())  # completed shards untouched
    ref_cfg = built[0]
    assert _content(_read_rows(tmp_path / "cache")) == _content(_read_rows(Path(ref_cfg.cache_dir)))
    assert_same_latents(_latents_by_key(tmp_path / "cache"), _latents_by_key(Path(ref_cfg.cache_dir)))


def test_two_ranks_match_one_rank(tmp_path, parts, dataset, built):
    """Posterior samples and random crops are seeded per image, so the split cannot change them."""
    one, two = (_cfg(dataset, tmp_path / name, latent="sample") for name in ("one", "two"))
    build_cache(one, parts, batch_size=4, workers=2, progress=False)
    stats = [
        build_cache(two, parts, rank=r, world_size=2, batch_size=3, workers=2, progress=False) for r in (0, 1)
    ]
    assert not (tmp_path / "two" / "manifest.jsonl").exists()  # no torch.distributed: merge is explicit
    assert all(s.encoded > 0 for s in stats)
    report = merge_parts(two, world_size=2)
    assert report["images"] == len(SIZES) + 1 and {b["key"] for b in report["bad"]} == BAD
    one_report = json.loads((tmp_path / "one" / "report.json").read_text())
    for field in ("images", "buckets", "bad", "scan_problems"):  # shards: each rank packs its own
        assert report[field] == one_report[field], field  # every rank's problems, in key order
    assert _content(_read_rows(tmp_path / "two")) == _content(_read_rows(tmp_path / "one"))
    a, b, mean = (_latents_by_key(p) for p in (tmp_path / "one", tmp_path / "two", Path(built[0].cache_dir)))
    assert_same_latents(a, b)
    assert all(not torch.allclose(a[k].float(), mean[k].float(), atol=1e-4) for k in a)  # samples, not means

    # the one-rank cache rebuilt by three ranks: each reuses its share of the manifest, nothing encoded
    with count_vae_images(parts.vae) as seen:
        stats = [build_cache(one, parts, rank=r, world_size=3, batch_size=3, workers=2, progress=False)
                 for r in range(3)]
    assert seen["images"] == 0 and sum(s.reused for s in stats) == len(SIZES) + 1
    assert all(s.reused > 0 for s in stats)
    merge_parts(one, world_size=3)
    assert_same_latents(_latents_by_key(tmp_path / "one"), a)


def test_cached_text_embeddings(tmp_path, parts, dataset):
    """Cached text equals live encoding, long captions (3 chunks, padded in a mixed batch) included, and the
    report counts tokens per caption (against the tokenizer's own count)."""
    cfg = _cfg(dataset, tmp_path / "cache", crop="center", cache_text=True, shard_max_mb=1.0)
    long_caption = ", ".join(f"long tag {i}" for i in range(20))  # 219 tokens of the tiny tokenizer: 3 chunks
    (Path(cfg.source) / "sub" / "rotated.txt").write_text(long_caption)
    try:
        stats = build_cache(cfg, parts, batch_size=4, workers=2, progress=False)
    finally:
        (Path(cfg.source) / "sub" / "rotated.txt").write_text("cat, hat")
    cache = LatentCache(cfg.cache_dir)
    encoder = PromptEncoder.from_parts(parts)
    all_chunks = []
    for ids in cache.buckets.values():
        batch = cache.batch(ids)
        embeds, pooled, chunks = encoder.encode(batch["captions"])
        assert batch["embeds"].dtype == batch["pooled"].dtype == torch.bfloat16
        assert torch.equal(batch["chunks"], chunks)
        assert batch["embeds"].shape == (len(ids), 77 * int(chunks.max()), 2 * TINY_TEXT_HIDDEN)
        torch.testing.assert_close(batch["embeds"].float(), embeds, rtol=2**-7, atol=1e-2)
        torch.testing.assert_close(batch["pooled"].float(), pooled, rtol=2**-7, atol=1e-2)
        all_chunks += chunks.tolist()
    assert sorted(all_chunks)[-1] == 3 and len(set(all_chunks)) > 1
    tokens = [len(parts.tokenizer(cache.index.caption(i), add_special_tokens=False).input_ids)
              for i in range(len(cache))]
    report = stats.report["captions"]
    assert report["tokens_over"] == {str(n): sum(t > n for t in tokens) for n in (75, 150, 225)}
    assert sum(report["chunks"].values()) == len(cache) and report["chunks"]["3"] == 1
    assert report["truncated"] == report["tags_cut"] == 0 and report["max_chunks"] == 3

    (Path(cfg.source) / "sub" / "rotated.txt").write_text("dog")  # cached text must follow the caption
    try:
        stats = build_cache(cfg, parts, batch_size=4, workers=2, progress=False)
    finally:
        (Path(cfg.source) / "sub" / "rotated.txt").write_text("cat, hat")
    assert stats.encoded == 1



def test_text_chunks_are_checksummed_and_an_old_cache_reads_as_one_chunk(tmp_path, parts, dataset):
    """The chunk count sits in the shard under the text CRC; shards written before it (no text_chunks
    tensor, CRC of embeds + pooled) still read, as one chunk per sample."""
    import safetensors.torch

    from ztsnr_ds.data.shards import sample_checksum

    cfg = _cfg(dataset, tmp_path / "cache", crop="center", cache_text=True)
    build_cache(cfg, parts, batch_size=4, workers=2, progress=False)
    cache = LatentCache(cfg.cache_dir)
    ids = list(range(len(cache)))
    new = [cache.batch([i]) for i in ids]
    index, root = cache.index, Path(cfg.cache_dir)
    shard_of = {i: index.shard_names[index.columns["shard"][i]] for i in ids}
    crc_path = root / json.loads((root / "index.json").read_text())["folder"] / "crc32_text.npy"
    crcs = np.load(crc_path)
    for name in set(shard_of.values()):  # rewrite every shard as an older build wrote it
        path = root / "shards" / f"{name}.safetensors"
        tensors = safetensors.torch.load_file(path)
        assert tensors.pop("text_chunks").tolist() == [1] * len(tensors["pooled"])
        safetensors.torch.save_file(tensors, path)
        for i in ids:
            if shard_of[i] == name:
                position = int(index.columns["index"][i])
                crcs[i] = sample_checksum(tensors["embeds"][position], tensors["pooled"][position])
    np.save(crc_path, crcs)
    old = LatentCache(cfg.cache_dir)
    for i, batch in zip(ids, new, strict=True):
        got = old.batch([i])
        assert got["chunks"].tolist() == batch["chunks"].tolist() == [1]
        assert torch.equal(got["embeds"], batch["embeds"]) and torch.equal(got["pooled"], batch["pooled"])
    # a new shard whose chunk count is damaged fails its text checksum on read
    build_cache(_cfg(dataset, tmp_path / "fresh", crop="center", cache_text=True), parts, batch_size=4,
                workers=2, progress=False)
    fresh = LatentCache(tmp_path / "fresh")
    name = fresh.index.shard_names[fresh.index.columns["shard"][0]]
    path = tmp_path / "fresh" / "shards" / f"{name}.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["text_chunks"][int(fresh.index.columns["index"][0])] = 2
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(CacheError, match="fails its checksum"):
        LatentCache(tmp_path / "fresh").batch([0])

def _launch_module():
    path = Path(__file__).resolve().parents[1] / "launch" / "cache.py"
    spec = importlib.util.spec_from_file_location("launch_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_script_reads_training_yaml(tmp_path, tiny_sdxl, dataset):
    launch = _launch_module()
    data = {
        "source": str(dataset),
        "cache_dir": str(tmp_path / "cache"),
        "crop": "center",
        "buckets": {"max_area": 128 * 128, "min_side": 64, "max_side": 256},
    }
    config = {"model": {"pretrained": str(tiny_sdxl), "unet_path": None}, "data": data, "optim": {"lr": 1e-4}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    stats = launch.main(["--config", str(tmp_path / "train.yaml"), "--batch_size", "4", "--workers", "2"])
    assert stats.encoded == len(SIZES) + 1 and stats.report["images"] == len(SIZES) + 1
    assert len(LatentCache(tmp_path / "cache")) == len(SIZES) + 1

    config["data"]["shard_size_mb"] = 8  # a typo must not pass silently
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        launch.main(["--config", str(tmp_path / "typo.yaml")])


def _as_format_1(root: Path) -> None:
    """What a cache written before the index looked like: no index, rows without checksums."""
    (root / "index.json").unlink()
    for folder in root.glob("index-*"):
        shutil.rmtree(folder)
    rows = [{k: v for k, v in row.items() if k != "crc32"} for row in _read_rows(root)]
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_format_1_cache_names_its_command_and_converts(copied):
    root = Path(copied.cache_dir)
    before = _latents_by_key(root)
    rows = _read_rows(root)
    _as_format_1(root)
    command = rf"`python launch/cache\.py --convert --cache_dir {root}`"
    with pytest.raises(CacheError, match=rf"format 1.*{command}"):
        LatentCache(root)
    assert _launch_module().main(["--cache_dir", str(root), "--convert"]) == len(rows)
    after = _latents_by_key(root)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert _read_rows(root) == rows  # the checksums it computed are the ones the build recorded


def _rewrite_index(root: Path, edit) -> None:
    """Edit index.json and seal it again: the structural checks behind the seal (docs/integrity.md)."""
    meta = json.loads((root / "index.json").read_text())
    edit(meta)
    (root / "index.json").write_text(json.dumps(integrity.seal(meta)))


def _edit_column(root: Path, name: str, edit) -> None:
    """Edit a column and record its new sha256: the structural checks behind the column checksums."""
    meta = json.loads((root / "index.json").read_text())
    path = root / meta["folder"] / f"{name}.npy"
    values = np.load(path)
    edit(values)
    np.save(path, values)
    sums = index_sums.write_sums(path.parent)
    _rewrite_index(root, lambda m: m.update({index_sums.SUMS_KEY: sums}))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "index.json").write_text('{"format": 2, "rows": 1'), r"index\.json is damaged"),
    (lambda root: _rewrite_index(root, lambda m: m["shards"].pop()), r"shard position out of range"),
    (lambda root: _rewrite_index(root, lambda m: m.pop("folder")), r"bad field: 'folder'"),
    (lambda root: _edit_column(root, "index", lambda v: v.__setitem__(0, 7)), r"sample position beyond"),
    (lambda root: _edit_column(root, "by_bucket", lambda v: v.__setitem__(0, 10**6)), r"by_bucket"),
    (lambda root: (root / json.loads((root / "index.json").read_text())["folder"] / "weight.npy").unlink(),
     r"weight\.npy is missing"),
], ids=["truncated_json", "shard_entry_removed", "field_missing", "index_out_of_range", "bad_grouping",
        "column_missing"])
def test_damaged_index_is_named_and_rebuilt_by_the_build(copied, parts, damage, message):
    root = Path(copied.cache_dir)
    before = _latents_by_key(root)
    damage(root)
    with pytest.raises(CacheError, match=rf"{message}.*launch/cache\.py --config"):
        LatentCache(root)
    with count_vae_images(parts.vae) as seen:
        build_cache(copied, parts, batch_size=3, workers=2, progress=False)  # the command the message names
    assert seen["images"] == 0  # shards and manifest were intact: everything reused
    assert_same_latents(_latents_by_key(root), before)


def test_swapped_index_rows_fail_their_checksums(copied):
    root = Path(copied.cache_dir)
    rows = _read_rows(root)
    a, b = (r for r in rows if r["shard"] == rows[0]["shard"])  # two samples of one shard (same bucket)
    _edit_column(root, "index", lambda v: v.__setitem__([a["id"], b["id"]], [b["index"], a["index"]]))
    with pytest.raises(CacheError, match=rf"sample {b['index']} \(id {a['id']}.*fails its checksum"):
        LatentCache(root).batch([a["id"]])


def test_damaged_build_record_is_rebuilt_by_the_launch_script(copied, tiny_sdxl):
    root = Path(copied.cache_dir)
    lines = (root / "manifest.jsonl").read_text().splitlines(keepends=True)
    (root / "manifest.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    meta = json.loads((root / "shards.json").read_text())
    meta["shards"].pop(sorted(meta["shards"])[0])
    (root / "shards.json").write_text(json.dumps(meta))
    config = _yaml_for(copied, tiny_sdxl, root.parent)
    stats = _launch_module().main(["--config", str(config), "--workers", "2"])
    assert stats.encoded == len(lines)  # a torn manifest: nothing of it is trusted, all encoded again
    assert len(LatentCache(root)) == len(lines)


def _yaml_for(cfg: CacheConfig, model: Path, folder: Path) -> Path:
    data = {"source": cfg.source, "cache_dir": cfg.cache_dir, "crop": cfg.crop,
            "shard_max_mb": cfg.shard_max_mb,
            "buckets": {k: getattr(cfg.buckets, k) for k in ("max_area", "step", "min_side", "max_side",
                                                             "max_aspect")}}
    path = folder / "cache.yaml"
    path.write_text(yaml.safe_dump({"model": {"pretrained": str(model)}, "data": data}))
    return path


def test_parquet_source_builds_the_same_cache_as_jsonl(tmp_path, parts, dataset):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    keys = sorted(p.name for p in dataset.glob("img*.png"))
    captions = [(dataset / k).with_suffix(".txt").read_text() if (dataset / k).with_suffix(".txt").exists()
                else "" for k in keys]
    sizes = [Image.open(dataset / k).size for k in keys]
    (dataset / "list.jsonl").write_text("".join(json.dumps({"image": k, "caption": c}) + "\n"
                                                for k, c in zip(keys, captions)))
    pq.write_table(pa.table({"image": keys, "caption": captions, "width": [w for w, _ in sizes],
                             "height": [h for _, h in sizes]}), dataset / "list.parquet")
    try:
        for name in ("jsonl", "parquet"):
            build_cache(_cfg(dataset / f"list.{name}", tmp_path / name), parts, batch_size=3, workers=2,
                        progress=False)
    finally:
        (dataset / "list.jsonl").unlink()
        (dataset / "list.parquet").unlink()
    assert _read_rows(tmp_path / "parquet") == _read_rows(tmp_path / "jsonl")
    parquet, jsonl = _latents_by_key(tmp_path / "parquet"), _latents_by_key(tmp_path / "jsonl")
    assert parquet.keys() == jsonl.keys() and all(torch.equal(parquet[k], jsonl[k]) for k in jsonl)


def test_template_and_list_caption_sources(tmp_path, parts, dataset):
    """A Parquet source with a caption template caches its fields (empty ones kept as empty fields); a
    JSONL source with a list of captions caches them one a line; tags read both as comma lists."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    meta = tmp_path / "meta.parquet"
    keys = ["img00.png", "img01.png"]
    pq.write_table(pa.table({"image": keys, "rating": ["safe", "general"],
                             "artist": ["foo", None], "general": [["1girl", "hat"], []]}), meta)
    shutil.copy(meta, dataset / "meta.parquet")
    (dataset / "multi.jsonl").write_text(json.dumps({"image": "img02.png", "caption": ["a, b", "a photo"]}))
    sources = [SourceConfig(str(dataset / "meta.parquet"), template="{rating}, by {artist}, {general}",
                            fields={"general": {"shuffle": True}}),
               SourceConfig(str(dataset / "multi.jsonl"))]
    cfg = CacheConfig(cache_dir=str(tmp_path / "cache"), buckets=BUCKETS, sources=sources)
    try:
        build_cache(cfg, parts, batch_size=3, workers=2, progress=False)
    finally:
        (dataset / "meta.parquet").unlink()
        (dataset / "multi.jsonl").unlink()
    rows = {r["key"]: r for r in _read_rows(tmp_path / "cache")}
    sep = FIELD_SEP
    assert rows["meta/img00.png"]["caption"] == f"safe{sep}by foo{sep}1girl, hat"
    assert rows["meta/img01.png"]["caption"] == f"general{sep}{sep}"
    assert rows["meta/img00.png"]["tags"] == ["safe", "by foo", "1girl", "hat"]
    assert rows["multi/img02.png"]["caption"] == "a, b\na photo"


def test_tar_and_parquet_bytes_sources_cache_as_the_files(tmp_path, parts, dataset):
    """The same images as loose files, as members of two WebDataset tar shards (one holding a damaged
    member) and as a Parquet image-bytes column give the same latents and captions; the damaged member
    is reported with its shard and member, the rest cached."""
    pa = pytest.importorskip("pyarrow")
    import tarfile

    import pyarrow.parquet as pq

    names = sorted(p.name for p in dataset.glob("img*.png"))[3:9]  # one without a caption (img05)
    captions = {n: (dataset / n).with_suffix(".txt").read_text() if (dataset / n).with_suffix(".txt").exists()
                else "" for n in names}
    wds = tmp_path / "wds"
    wds.mkdir()
    for shard, part in (("a.tar", names[:3]), ("b.tar", names[3:])):
        with tarfile.open(wds / shard, "w") as tar:
            for n in part:
                tar.add(dataset / n, arcname=n)
                if captions[n]:
                    tar.add((dataset / n).with_suffix(".txt"), arcname=n.replace(".png", ".txt"))
            if shard == "b.tar":
                tar.add(dataset / "corrupt.jpg", arcname="zz_corrupt.jpg")
    pq.write_table(pa.table({"image": [{"bytes": (dataset / n).read_bytes(), "path": n} for n in names],
                             "caption": [captions[n] for n in names]}), tmp_path / "bytes.parquet")
    files = tmp_path / "files"
    files.mkdir()
    for n in names:
        shutil.copy(dataset / n, files / n)
        (files / n).with_suffix(".txt").write_text(captions[n])
    caches = {}
    for name, path in (("files", files), ("tar", f"{wds}/*.tar"), ("parquet", tmp_path / "bytes.parquet")):
        cfg = CacheConfig(cache_dir=str(tmp_path / f"cache_{name}"), buckets=BUCKETS, crop="center",
                          source=str(path))
        stats = build_cache(cfg, parts, batch_size=3, workers=2, progress=False)
        caches[name] = (_latents_by_key(Path(cfg.cache_dir)), _read_rows(Path(cfg.cache_dir)), stats)
    member = {"files": lambda k: k, "tar": lambda k: k.split("/", 1)[1],
              "parquet": lambda k: names[int(k.split("/", 1)[1])]}
    latents = {name: {member[name](k): v for k, v in lat.items()} for name, (lat, _, _) in caches.items()}
    assert set(latents["files"]) == set(names)
    for name in ("tar", "parquet"):
        assert_same_latents(latents[name], latents["files"])
        assert {member[name](r["key"]): r["caption"] for r in caches[name][1]} == captions
    assert [r["key"] for r in caches["tar"][1]][:2] == ["a.tar/img03.png", "a.tar/img04.png"]
    report = caches["tar"][2].report
    assert [(b["key"], Path(b["path"]).name) for b in report["bad"]] == [("b.tar/zz_corrupt.jpg", "b.tar")]
    assert not list((tmp_path / "cache_parquet" / "parts").iterdir())  # the spilled bytes are gone


def test_launch_script_refuses_cached_text_with_tag_dropout(tmp_path, tiny_sdxl, dataset, capsys):
    """The build reads the training YAML's captions too: cached text cannot follow per-use tag dropout,
    so it stops before any work, exit 2, naming both keys."""
    config = {"model": {"pretrained": str(tiny_sdxl)},
              "data": {"source": str(dataset), "cache_dir": str(tmp_path / "cache"), "cache_text": True},
              "captions": {"tag_dropout": 0.1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        _launch_module().main(["--config", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not (tmp_path / "cache").exists()
    assert "data.cache_text = true" in err and "captions.tag_dropout" in err
