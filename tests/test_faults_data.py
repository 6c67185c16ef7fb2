"""The data side of the fault table (docs/integrity.md): the cache index's column checksums, --verify and
--convert on damaged caches, captions bounded at build time, shards checked at start-up, corrupt samples
met mid-run (skipped and reported, then save and stop), a full disk during a cache build.

One tiny cache is built per module and copied per test; the one training run (a corrupt sample met
mid-run, through launch/train.py) is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from ztsnr_ds import checkpoint, integrity
from ztsnr_ds.data.buckets import BucketConfig
from ztsnr_ds.data.cache import CacheConfig, LatentCache
from ztsnr_ds.data.cache_build import build_cache
from ztsnr_ds.data.cache_files import REBUILD_HINT, CacheError, shard_path
from ztsnr_ds.data.cache_verify import verify_cache
from ztsnr_ds.data.caption_cap import bound_captions, cut_caption
from ztsnr_ds.data.index import CacheIndex
from ztsnr_ds.data.sample_faults import SampleFaults
from ztsnr_ds.data.sources import ImageRecord, Scan
from ztsnr_ds.data_checks import open_cache
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.models import load_frozen

ROOT = Path(__file__).resolve().parents[1]
REBUILD = r"launch/cache\.py --config"


def _launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_yaml(make_run_config) -> Path:
    return make_run_config("faults_data", 8, {"micro_batch": 2, "max_steps": 8, "save_every": 100,
                                              "log_every": 1, "warmup_steps": 1}, {"every": 0})


@pytest.fixture
def cache(run_yaml, tmp_path) -> Path:
    """A private copy of the module's cache."""
    source = yaml.safe_load(run_yaml.read_text())["data"]["cache_dir"]
    return Path(shutil.copytree(source, tmp_path / "cache"))


def _folder(cache: Path) -> Path:
    return cache / json.loads((cache / "index.json").read_text())["folder"]


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 4
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ index columns
def test_every_index_column_is_checksummed_generically(cache):
    """Row 'columns without a CRC read silently, --verify said 0 problems': a flip in ANY file of the index
    folder (captions.bin, weight.npy, time_ids.npy, key_hash.npy, ... and any column added later)."""
    folder = _folder(cache)
    sums = json.loads((folder / integrity.CHECKSUM_FILE).read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != integrity.CHECKSUM_FILE)
    assert sorted(sums) == files
    assert {"captions.bin", "weight.npy", "time_ids.npy", "key_hash.npy"} <= set(files)
    init_distributed()
    assert verify_cache(cache, progress=False)["problems"] == []
    for name in files:
        original = (folder / name).read_bytes()
        _flip(folder / name, at=len(original) - 1)  # the last byte: data, not the .npy header
        try:  # a flip that breaks the index's structure stops the open, naming the column too
            problems = [p["column"] for p in verify_cache(cache, progress=False)["problems"] if "column" in p]
        except CacheError as err:
            problems = [str(err)]
        message = f"{folder / name} does not match its sha256 in checksums.json (damaged or changed)"
        assert len(problems) == 1 and message in problems[0] and REBUILD_HINT in problems[0], name
        with pytest.raises(CacheError, match=f"{folder / name} does not match"):
            open_cache(cache, 0, init_distributed())
        (folder / name).write_bytes(original)


def test_index_json_is_sealed_and_old_indexes_load_with_a_note(cache):
    text = (cache / "index.json").read_text()
    (cache / "index.json").write_text(text.replace('"rows": 8', '"rows": 9'))  # valid JSON, one digit
    with pytest.raises(CacheError, match="index.json does not match its seal"):
        LatentCache(cache)
    old = json.loads(text)
    old.pop(integrity.SEAL_KEY)
    old.pop("checksums_sha256")
    (cache / "index.json").write_text(json.dumps(old))
    (_folder(cache) / integrity.CHECKSUM_FILE).unlink()  # an index written before column checksums
    with pytest.warns(UserWarning, match="carry no checksums.*--convert"):
        assert len(LatentCache(cache)) == 8
    assert _launch("cache").main(["--cache_dir", str(cache), "--convert"]) == 8  # the fix it names
    assert CacheIndex(cache).column_sums


def test_empty_index_column_names_its_file(cache):
    """Row 'an empty index column: EOFError naming no file'; also in an index without checksums."""
    (_folder(cache) / "weight.npy").write_bytes(b"")
    with pytest.raises(CacheError, match=rf"weight\.npy does not match its sha256.*{REBUILD}"):
        LatentCache(cache)
    (_folder(cache) / integrity.CHECKSUM_FILE).unlink()
    old = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({k: v for k, v in old.items()
                                                  if k not in (integrity.SEAL_KEY, "checksums_sha256")}))
    with pytest.warns(UserWarning, match="no checksums"), \
            pytest.raises(CacheError, match=rf"weight\.npy is damaged \(EOFError.*{REBUILD}"):
        LatentCache(cache)


# ------------------------------------------------------------------------------ verify and convert
def test_verify_on_swapped_shards_of_different_sizes_reports_them(cache, capsys):
    """Row '--verify on two swapped shards of different sizes: IndexError'."""
    shards = json.loads((cache / "index.json").read_text())["shards"]
    a, b = sorted(shards, key=lambda s: s["count"])[0], sorted(shards, key=lambda s: s["count"])[-1]
    assert a["count"] < b["count"]
    pa, pb = shard_path(cache, a["name"]), shard_path(cache, b["name"])
    pa.rename(cache / "tmp")
    pb.rename(pa)
    (cache / "tmp").rename(pb)
    with pytest.raises(SystemExit) as exit_:
        _launch("cache").main(["--cache_dir", str(cache), "--verify", "--workers", "1"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "sha256 mismatch" in out and "beyond the shard's" in out


@pytest.mark.parametrize("damage", ["row_without_shard", "index_out_of_range", "record_without_fingerprint"])
def test_convert_on_a_malformed_cache_is_a_named_error(cache, capsys, damage):
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    record = json.loads((cache / "shards.json").read_text())
    if damage == "row_without_shard":
        rows[0].pop("shard")
    elif damage == "index_out_of_range":
        for row in rows:
            row.pop("crc32")
        rows[0]["index"] = 999
    else:
        record.pop("fingerprint")
    (cache / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cache / "shards.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_:
        _launch("cache").main(["--cache_dir", str(cache), "--convert"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "malformed" in err and "launch/cache.py --config" in err


# ------------------------------------------------------------------------------ captions bounded
def test_captions_are_cut_at_a_tag_boundary_and_reported():
    huge = ", ".join(f"tag_{i}" for i in range(500_000))  # ~5 MB, the 4.8M-tag file in small
    records = [ImageRecord(Path("a.png"), huge, "a"), ImageRecord(Path("b.png"), "x, y", "b")]
    scan = bound_captions(Scan(records, [], "digest"), 1000)
    cut = scan.records[0].caption
    assert len(cut.encode()) <= 1000 and huge.startswith(cut) and huge[len(cut)] == ","  # whole tags only
    assert scan.records[1].caption == "x, y"
    assert [(p.key, p.reason.split(" (")[0]) for p in scan.problems] == [
        ("a", f"caption cut from {len(huge)} to {len(cut)} bytes at a tag boundary")]
    assert cut_caption("é" * 10, 5) == "éé"  # never half a character


def test_a_huge_caption_is_bounded_in_the_built_cache(run_yaml, tmp_path):
    """Row 'a 50 MB caption stored whole; every use shuffled and tokenised it': bounded at build."""
    config = yaml.safe_load(run_yaml.read_text())
    data = Path(shutil.copytree(config["data"]["source"], tmp_path / "data"))
    caption = data / "img0000.txt"
    caption.write_text(", ".join(["long_tag"] * 400_000))  # 4 MB
    cfg = CacheConfig(**config["data"] | {"source": str(data), "cache_dir": str(tmp_path / "cache"),
                                          "buckets": BucketConfig(**config["data"]["buckets"]),
                                          "max_caption_bytes": 4096})
    stats = build_cache(cfg, load_frozen(config["model"]["pretrained"], dtype=torch.float32), progress=False)
    index = CacheIndex(tmp_path / "cache")
    longest = max(len(index.caption(i).encode()) for i in range(index.rows))
    assert longest <= 4096
    cuts = [p for p in stats.report["scan_problems"] if "caption cut" in p["reason"]]
    assert [p["key"] for p in cuts] == ["img0000.png"]


# ------------------------------------------------------------------------------ start-up and mid-run
def test_a_missing_or_cut_shard_is_found_at_start_up(cache):
    """Row 'a deleted shard is only found at step 3, not at start-up'."""
    shards = json.loads((cache / "index.json").read_text())["shards"]
    shard_path(cache, shards[0]["name"]).unlink()
    with open(shard_path(cache, shards[1]["name"]), "ab") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match=rf"{shards[0]['name']}.safetensors is missing; .*"
                                         rf"{shards[1]['name']}.safetensors has 100 bytes.*{REBUILD}"):
        open_cache(cache, 0, init_distributed())


def _corrupt_sample(cache: Path, sample_id: int) -> None:
    index = CacheIndex(cache)
    shard = shard_path(cache, index.shard_names[index.columns["shard"][sample_id]])
    header = int.from_bytes(shard.read_bytes()[:8], "little")
    meta = json.loads(shard.read_bytes()[8:8 + header])
    start, stop = meta["latents"]["data_offsets"]
    count = meta["latents"]["shape"][0]
    item = (stop - start) // count
    _flip(shard, at=8 + header + start + int(index.columns["index"][sample_id]) * item + item // 2)


def test_a_corrupt_sample_met_mid_run_is_skipped_with_weight_zero_and_reported(cache, capsys):
    faults = SampleFaults(limit=1)
    reader = LatentCache(cache, faults)
    bucket, ids = next((k, v) for k, v in reader.buckets.items() if len(v) >= 2)
    before = LatentCache(cache).batch(ids[:2])
    _corrupt_sample(cache, int(ids[0]))
    with pytest.raises(CacheError, match="fails its checksum"):  # without a budget (tools): an error
        LatentCache(cache).batch(ids[:2])
    batch = reader.batch(ids[:2])
    assert batch["weight"].tolist() == [0.0, before["weight"][1].item()] and batch["captions"][0] == ""
    torch.testing.assert_close(batch["latents"][0], before["latents"][1], rtol=0, atol=0)  # a stand-in
    assert faults.count == 1 and not faults.stop and f"skipped sample id {ids[0]}" in capsys.readouterr().err
    alone = reader.batch(ids[:1])  # a micro-batch of only the corrupt sample: a readable one of its bucket
    assert alone["weight"].tolist() == [0.0] and faults.stop  # 2 > limit 1: the run saves and stops
    assert REBUILD.replace("\\", "") in faults.message()


@pytest.mark.slow
def test_too_many_corrupt_samples_mid_run_save_then_stop_with_the_rebuild_command(run_yaml, tmp_path, capsys):
    """Row 'a corrupt shard met mid-run kills the run without saving (7 steps lost)': the run saves the
    step it reached and exits 2 naming the rebuild command."""
    cache = Path(shutil.copytree(yaml.safe_load(run_yaml.read_text())["data"]["cache_dir"], tmp_path / "c"))
    index = CacheIndex(cache)
    for i in range(3, index.rows, 4):
        _corrupt_sample(cache, i)
    train_main = _launch("train").main
    out = tmp_path / "run"
    code = train_main(["--config", str(run_yaml), "--trainer.output_dir", str(out), "--data.cache_dir",
                       str(cache), "--trainer.max_bad_samples", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt cache samples met" in err and "launch/cache.py --config" in err
    tags = checkpoint.complete_tags(out / "checkpoints")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(tags) == 1 and checkpoint.read_state(tags[0])["step"] == steps[-1] < 8  # nothing lost


def test_full_disk_during_a_cache_build_exits_2(run_yaml, tmp_path, capsys):
    """Row 'full disk during the cache build': the no-space message, exit 2, no half-written shard."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        config = yaml.safe_load(run_yaml.read_text())
        config["data"]["cache_dir"] = str(mount / "cache")
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exit_:
            _launch("cache").main(["--config", str(path), "--workers", "1"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "no space left on" in err and "the cache build" in err
        assert not list((mount / "cache" / "shards").glob("*.tmp"))
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
