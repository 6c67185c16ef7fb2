"""The streamed rank-0 merge against a reference computed from all rows held in memory, for one and for
several simulated ranks: manifest bytes, every index column, shards.json and report.json."""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ztsnr_ds.data.cache import CacheConfig
from ztsnr_ds.data.cache_files import CacheError
from ztsnr_ds.data.cache_merge import merge_parts
from ztsnr_ds.data.cache_parts import write_part
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.tags import parse_tags, tag_weights

BUCKETS = ["64x256", "128x128", "256x64"]
# keys whose byte order differs from a per-folder walk order ('.' < '/' < '0'), and non-ASCII ones
NAMES = ["a.png", "a/b.png", "a-b.png", "a0.png", "b/\u00e9t\u00e9.webp", "z/\u6f22\u5b57.jpg", "A.PNG"]
VOCAB = [f"Tag_{i}" for i in range(40)]


def _rows(n: int, cache_text: bool, rng: random.Random) -> tuple[list[dict], dict[str, dict]]:
    """n manifest rows as ranks write them (shard, index, checksums) and their shards' infos."""
    keys = NAMES + [f"d{rng.randrange(50)}/img{i:04d}.png" for i in range(n - len(NAMES))]
    rng.shuffle(keys)
    rows, shards = [], {}
    for bucket in BUCKETS:
        mine = [k for j, k in enumerate(keys) if j % len(BUCKETS) == BUCKETS.index(bucket)]
        for lo in range(0, len(mine), 7):
            name = f"{bucket}-{lo:04d}"
            shards[name] = {"sha256": f"{lo:064x}", "bytes": 1000 + lo, "bucket": bucket,
                            "count": len(mine[lo:lo + 7])}
            for index, key in enumerate(mine[lo:lo + 7]):
                h, w = map(int, bucket.split("x"))
                tags = [t for k, t in enumerate(VOCAB) if rng.random() < 0.8 / (k + 1) ** 0.7]
                caption = ", ".join(tags) if rng.random() > 0.05 else ""
                rows.append({"key": key, "path": f"/data/{key}", "sha256": f"{rng.getrandbits(256):064x}",
                             "bucket": bucket, "orig_hw": [h + 3, w + 5], "crop_tl": [1, 2],
                             "time_ids": [h + 3, w + 5, 1, 2, h, w], "caption": caption,
                             "tags": parse_tags(caption), "shard": name, "index": index,
                             "crc32": rng.getrandbits(32)} | ({"crc32_text": rng.getrandbits(32)}
                                                              if cache_text else {}))
    return rows, shards


def _legacy_shard(root: Path, rows: list[dict], shards: dict[str, dict]) -> list[int]:
    """A real shard of 3 samples whose rows lack crc32 (reused from a format-1 build); their CRC-32s."""
    latents = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    data = safetensors.torch.save({"latents": latents})
    (root / "shards" / "128x128-legacy.safetensors").write_bytes(data)
    shards["128x128-legacy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                "bucket": "128x128", "count": 3}
    for index, key in enumerate(["legacy/0.png", "legacy/1.png", "legacy/2.png"]):
        rows.append({"key": key, "path": f"/data/{key}", "sha256": f"{index:064x}", "bucket": "128x128",
                     "orig_hw": [128, 128], "crop_tl": [0, 0], "time_ids": [128, 128, 0, 0, 128, 128],
                     "caption": "solo", "tags": ["solo"], "shard": "128x128-legacy", "index": index})
    return [zlib.crc32(latents[i].view(torch.uint8).numpy().tobytes()) for i in range(3)]


def _write_parts(root: Path, rows: list[dict], shards: dict[str, dict], world_size: int, cache_text: bool,
                 rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Rows spread over ``world_size`` parts at random (any split must give the same cache); each part
    lists its rows' shards plus one stale shard no row refers to. Returns (bad, scan problems)."""
    owner = [rng.randrange(world_size) for _ in rows]
    bad = [{"key": f"bad{i}.png", "path": f"/data/bad{i}.png", "reason": "empty file"} for i in range(5)]
    problems = [{"key": f"m.jsonl:{i}", "path": "/m.jsonl", "reason": "refused path: x"} for i in range(4)]
    problems += [{"key": rows[0]["key"], "path": rows[0]["path"], "reason": "missing caption"}]
    for rank in range(world_size):
        mine = [row for row, r in zip(rows, owner) if r == rank]
        infos = {row["shard"]: shards[row["shard"]] for row in mine}
        summary = {"rank": rank, "world_size": world_size, "fingerprint": "f", "scan": "s",
                   "cache_text": cache_text, "shards": {**infos, "stale": shards["stale"]},
                   "bad": bad[rank::world_size], "scan_problems": problems[rank::world_size],
                   "corrupt_shards": [], "encoded": len(mine) - rank, "reused": rank}
        write_part(root, rank, world_size, summary, [dict(row) for row in mine])
    return bad, problems


def _expected_columns(rows: list[dict], shards: list[str], cfg: CacheConfig, cache_text: bool) -> dict:
    """The index of the key-sorted rows, computed with plain Python from the rows in memory."""
    buckets = sorted({row["bucket"] for row in rows})
    weights = tag_weights([row["tags"] for row in rows], cfg.tag_weights)
    columns = {
        "shard": np.array([shards.index(r["shard"]) for r in rows], np.int32),
        "index": np.array([r["index"] for r in rows], np.int32),
        "bucket": np.array([buckets.index(r["bucket"]) for r in rows], np.int32),
        "time_ids": np.array([r["time_ids"] for r in rows], np.int32),
        "weight": np.array(weights, np.float32),
        "crc32": np.array([r["crc32"] for r in rows], np.uint32),
        "key_hash": np.array([int.from_bytes(hashlib.blake2b(r["key"].encode(), digest_size=8).digest(),
                                             "little") for r in rows], np.uint64),
    }
    if cache_text:
        columns["crc32_text"] = np.array([r["crc32_text"] for r in rows], np.uint32)
    by_bucket = sorted(range(len(rows)), key=lambda i: (buckets.index(rows[i]["bucket"]), i))
    return columns | {"by_bucket": np.array(by_bucket, np.int64)}


def _merged(tmp_path: Path, world_size: int, cache_text: bool) -> tuple[CacheConfig, dict, list, list, list]:
    rng = random.Random(0)  # the same rows for every world size
    root = tmp_path / f"cache{world_size}"
    (root / "shards").mkdir(parents=True)
    (root / "parts").mkdir()
    rows, shards = _rows(240, cache_text, rng)
    crcs = [] if cache_text else _legacy_shard(root, rows, shards)
    shards["stale"] = {"sha256": "0" * 64, "bytes": 1, "bucket": "128x128", "count": 1}
    for name in ("stale", "64x256-0000"):
        (root / "shards" / f"{name}.safetensors").write_bytes(b"")
    cfg = CacheConfig(source="/data", cache_dir=str(root))
    bad, problems = _write_parts(root, rows, shards, world_size, cache_text, random.Random(world_size))
    report = merge_parts(cfg, world_size)
    return cfg, report, rows, shards, [bad, problems, crcs]


def _upscaled(rows: list[dict]) -> dict:
    """Images with a side shorter than their bucket's (enlarged to cover it) and the largest such factor."""
    factors = [max(int(b) / o for o, b in zip(row["orig_hw"], row["bucket"].split("x"), strict=True))
               for row in rows]
    small = [f for f, row in zip(factors, rows, strict=True)
             if any(o < int(b) for o, b in zip(row["orig_hw"], row["bucket"].split("x"), strict=True))]
    return {"images": len(small), "max_factor": round(max(small, default=1.0), 3)}


@pytest.mark.parametrize("cache_text", [False, True], ids=["latents", "cached_text"])
def test_streamed_merge_equals_in_memory_reference(tmp_path, cache_text):
    outputs = {}
    for world_size in (1, 3):
        cfg, report, rows, shards, (bad, problems, crcs) = _merged(tmp_path, world_size, cache_text)
        root = Path(cfg.cache_dir)
        rows = sorted(rows, key=lambda r: r["key"])
        for row in rows:  # the format-1 rows get the CRC-32s of their samples' bytes
            if "crc32" not in row:
                row["crc32"] = crcs[row["index"]]
        weights = tag_weights([row["tags"] for row in rows], cfg.tag_weights)
        manifest = "".join(json.dumps({"id": i, **row, "weight": w}) + "\n"
                           for i, (row, w) in enumerate(zip(rows, weights)))
        assert (root / "manifest.jsonl").read_text() == manifest
        names = sorted({row["shard"] for row in rows})
        meta = json.loads((root / "shards.json").read_text())
        assert meta == {"format": 1, "fingerprint": "f", "cache_text": cache_text,
                        "shards": {name: shards[name] for name in names}}

        index = CacheIndex(root)
        assert index.shards == [{"name": name, **shards[name]} for name in names]
        assert index.bucket_keys == sorted({row["bucket"] for row in rows})
        for name, values in _expected_columns(rows, names, cfg, cache_text).items():
            np.testing.assert_array_equal(index.columns[name], values, err_msg=name)
            assert index.columns[name].dtype == values.dtype, name
        assert [index.key(i) for i in range(len(rows))] == [row["key"] for row in rows]
        assert [index.caption(i) for i in range(len(rows))] == [row["caption"] for row in rows]

        assert report == json.loads((root / "report.json").read_text())
        assert report == {
            "source": "/data", "images": len(rows), "world_size": world_size,
            "encoded": len(rows) - sum(range(world_size)), "reused": sum(range(world_size)),
            "shards": len(names), "bytes": sum(shards[name]["bytes"] for name in names),
            "buckets": dict(sorted(Counter(row["bucket"] for row in rows).items())),
            "bad": sorted(bad, key=lambda b: b["key"]),
            "scan_problems": sorted(problems, key=lambda p: (p["key"], p["path"], p["reason"])),
            "corrupt_shards": [],
            "captions": None,  # these hand-made rows carry no caption counts (cache_build adds them)
            "upscaled": _upscaled(rows),
        }
        kept = ["128x128-legacy", "64x256-0000"] if not cache_text else ["64x256-0000"]
        assert sorted(p.stem for p in (root / "shards").iterdir()) == kept  # the stale shard is deleted
        assert not any((root / "parts").iterdir())
        same = {k: v for k, v in report.items() if k not in ("world_size", "encoded", "reused")}
        outputs[world_size] = ((root / "manifest.jsonl").read_bytes(), same)
    assert outputs[1] == outputs[3]


def test_merge_refuses_a_key_in_two_parts(tmp_path):
    root = tmp_path / "cache"
    (root / "shards").mkdir(parents=True)
    (root / "parts").mkdir()
    rows, shards = _rows(20, False, random.Random(0))
    for rank in range(2):
        summary = {"rank": rank, "world_size": 2, "fingerprint": "f", "scan": "s", "cache_text": False,
                   "shards": shards, "bad": [], "scan_problems": [], "corrupt_shards": [], "encoded": 0,
                   "reused": 0}
        write_part(root, rank, 2, summary, rows[rank * 5: rank * 5 + 10])  # rows 5..9 in both parts
    with pytest.raises(CacheError, match=r"key .* after .*repeated or out of order.*launch/cache\.py"):
        merge_parts(CacheConfig(source="/data", cache_dir=str(root)), 2)
