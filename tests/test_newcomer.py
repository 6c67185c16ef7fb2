"""A newcomer's mistakes are named: misspelt keys, a stale cache, a changed recipe on resume, CPU threads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ztsnr_ds import checkpoint, drift, machine
from ztsnr_ds.config import ConfigError, build_parser, parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    return make_run_config("newcomer", 8, {"micro_batch": 2, "max_steps": 2}, {"every": 0})


def test_help_prints_each_fields_docstring():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "Zero terminal SNR: terminal (NAI: sigma_999 := sigma_max)" in text  # noise.ztsnr's docstring
    assert "Let a resumed run change recipe keys" in text  # trainer.allow_recipe_change's


@pytest.mark.parametrize("typo, section, expected", [
    (["--noise.ztnsr", "off"], None, "noise.ztsnr"),  # command line
    ([], {"optimizer": {"lrr": 0.1}}, "optimizer.lr"),  # a key inside a YAML section
    ([], {"trainr": {"max_steps": 3}}, "trainer.max_steps"),  # a misspelt section
])
def test_misspelt_key_gets_did_you_mean(run_config, tmp_path, typo, section, expected):
    argv = ["--config", str(run_config), *typo]
    if section:
        (extra := tmp_path / "extra.yaml").write_text(yaml.safe_dump(section))
        argv += ["--config", str(extra)]
    with pytest.raises(ConfigError, match=rf"did you mean {expected.replace('.', '[.]')}\b"):
        parse(argv)


def test_stale_cache_stops_naming_the_keys_and_the_command(run_config, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path),
               "--data.buckets.max_side", "512", "--data.crop", "random"])
    message = str(err.value)
    assert "data.buckets.max_side 256 -> 512" in message and "data.crop 'center' -> 'random'" in message
    assert f"python launch/cache.py --config {run_config}" in message
    parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path),
           "--data.shard_max_mb", "8"])  # how shards are cut does not change what training reads


def fake_checkpoint(output_dir: Path, config_dict: dict, step: int = 10) -> Path:
    """A tag with just the completeness marker: all the config checks read."""
    tag = output_dir / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    state = {checkpoint.STEP: step, checkpoint.CONFIG: config_dict}
    (tag / checkpoint.STATE_FILE).write_text(json.dumps(state))
    return tag


def test_resume_with_changed_recipe_exits_naming_the_keys(run_config, tmp_path, capsys):
    base = ["--config", str(run_config), "--trainer.output_dir", str(tmp_path)]
    _, saved = parse(base)
    fake_checkpoint(tmp_path, saved)
    with pytest.raises(ConfigError) as err:
        parse([*base, "--noise.ztsnr", "off", "--loss.gamma", "1"])
    assert "noise.ztsnr 'terminal' -> 'off'" in str(err.value) and "loss.gamma 5.0 -> 1.0" in str(err.value)
    assert "--trainer.allow_recipe_change true" in str(err.value)

    _, allowed = parse([*base, "--noise.ztsnr", "off", "--trainer.allow_recipe_change", "true"])
    assert allowed["noise"]["ztsnr"] == "off"
    assert allowed[drift.HISTORY] == [{"step": 10, "changed": {"noise.ztsnr": ["terminal", "off"]}}]

    capsys.readouterr()
    _, warned = parse([*base, "--optimizer.lr", "0.002", "--validation.cfg_scale", "3"])  # not recipe: warns
    assert "optimizer.lr 0.001 -> 0.002" in capsys.readouterr().err
    assert warned[drift.HISTORY][-1]["changed"] == {"optimizer.lr": [0.001, 0.002],
                                                    "validation.cfg_scale": [4.0, 3.0]}


def test_history_accumulates_over_resumes():
    saved = {"optimizer": {"lr": 1.0}, drift.HISTORY: [{"step": 5, "changed": {"x": [1, 2]}}]}
    new = drift.check_resume(saved, {"optimizer": {"lr": 2.0}, "trainer": {"resume": "auto"}}, 9, False)
    assert new[drift.HISTORY] == [{"step": 5, "changed": {"x": [1, 2]}},
                                  {"step": 9, "changed": {"optimizer.lr": [1.0, 2.0]}}]
    same = drift.check_resume(new, {"optimizer": {"lr": 2.0}, "trainer": {"resume": "none"}}, 12, False)
    assert same[drift.HISTORY] == new[drift.HISTORY]  # nothing changed (trainer.resume is how, not what)
    added = drift.check_resume(same, {"optimizer": {"lr": 2.0}, "noise": {"new_key": 1}}, 13, False)
    assert added[drift.HISTORY][-1] == {"step": 13, "changed": {"noise.new_key": [None, 1]}}  # a warning


def test_bf16_tag_resumed_with_fp32_json_is_refused_first(tmp_path):
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="saved in bf16"):
        drift.check_precision(tmp_path, str(ROOT / "ds_configs" / "zero2_fp32.json"))
    drift.check_precision(tmp_path, str(ROOT / "ds_configs" / "zero2_bf16.json"))


def test_one_openmp_thread_on_a_cpu_only_machine_unless_set(monkeypatch, capsys):
    monkeypatch.setattr(machine, "cpu_only", lambda: True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    machine.one_thread_per_process()
    assert machine.os.environ["OMP_NUM_THREADS"] == "1" and "OMP_NUM_THREADS=1" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    machine.one_thread_per_process()
    assert machine.os.environ["OMP_NUM_THREADS"] == "4" and capsys.readouterr().err == ""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine, "cpu_only", lambda: False)  # GPUs: torch's default threads
    machine.one_thread_per_process()
    assert "OMP_NUM_THREADS" not in machine.os.environ


def test_bf16_json_on_a_cpu_without_bf16_units_warns_with_the_fp32_json(monkeypatch):
    monkeypatch.setattr(machine, "cpu_only", lambda: True)
    bf16, fp32 = str(ROOT / "ds_configs" / "zero2_bf16.json"), str(ROOT / "ds_configs" / "zero2_fp32.json")
    warning = machine.bf16_on_slow_cpu(bf16, cpuinfo="flags\t\t: fpu sse avx2 fma")
    assert machine.FP32_JSON in warning and "per step" in warning
    assert machine.bf16_on_slow_cpu(fp32, cpuinfo="flags\t\t: fpu sse avx2") is None
    assert machine.bf16_on_slow_cpu(bf16, cpuinfo="flags\t\t: avx2 avx512_bf16 amx_tile") is None
    assert machine.bf16_on_slow_cpu(bf16, cpuinfo="Features\t: fp asimd bf16 i8mm") is None  # Arm


def test_cache_report_counts_the_upscaled_images(tiny_sdxl, tmp_path):
    import torch
    from PIL import Image

    from ztsnr_ds.data.buckets import BucketConfig
    from ztsnr_ds.data.cache import CacheConfig
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.models import load_frozen

    sizes = {"small.png": (50, 40), "wide.png": (300, 60), "big.png": (400, 400)}  # (w, h)
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("red")
    buckets = BucketConfig(max_area=16384, step=64, min_side=64, max_side=256, max_aspect=4.0)
    cfg = CacheConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache"), buckets=buckets)
    report = build_cache(cfg, load_frozen(tiny_sdxl, dtype=torch.float32), progress=False).report
    lines = (tmp_path / "cache/manifest.jsonl").read_text().splitlines()
    rows = {r["key"]: r for r in map(json.loads, lines)}
    # cover scale of each image: max(bucket_h / h, bucket_w / w), from the buckets the build chose
    scale = {k: max(int(b) / o for o, b in zip(r["orig_hw"], r["bucket"].split("x"), strict=True))
             for k, r in rows.items()}
    assert scale["big.png"] < 1 < scale["wide.png"] < scale["small.png"]
    assert report["upscaled"] == {"images": 2, "max_factor": round(scale["small.png"], 3)}


def test_labelled_grid_writes_each_prompt_under_its_image():
    import torch

    from ztsnr_ds.metrics import labelled_grid

    images = torch.zeros(3, 3, 64, 48)  # mid grey
    grid = np.asarray(labelled_grid(images, ["red circle", "", "blue square, dark background"]))
    assert grid.shape[1] == 3 * 48 and grid.shape[0] > 64  # one row: no blank cell for 3 prompts
    band = grid[64:]
    inked = [(band[:, c * 48:(c + 1) * 48] < 128).any() for c in range(3)]
    assert inked == [True, False, True]  # text where there is a label
    assert (grid[:64] == 128).all()  # the images themselves untouched


def test_sample_default_size_is_the_models_base_area():
    import runpy

    base_side = runpy.run_path(str(ROOT / "launch" / "sample.py"))["base_side"]
    assert base_side(16384) == 128  # configs/demo.yaml's base area: 128 x 128 images
    assert base_side(1024 * 1024) == 1024 and base_side(None) == 1024  # SDXL; no resolution scaling
    assert base_side(832 * 1216) == 960  # not a square: its side, to the 64-px step


def test_port_in_use_gets_the_master_port_hint():
    from ztsnr_ds import console

    err = RuntimeError("The server socket has failed to listen on any local network address. port: 29500, "
                       "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert console.port_in_use(err) and not console.port_in_use(RuntimeError("connection refused"))
    assert "--master_port" in console.PORT_HINT


def test_deepspeed_noise_is_one_line(monkeypatch, capsys):
    import logging

    from ztsnr_ds import console

    monkeypatch.delenv("RANK", raising=False)
    noise = console._DeepSpeedNoise()
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, message, None, None)

    assert not noise.filter(record("Setting accelerator to CPU. If you have GPU ..."))
    assert not noise.filter(record("**** You are using ZeRO with an untested optimizer, proceed with care"))
    assert noise.filter(record("a warning that matters"))
    assert capsys.readouterr().err.count("\n") == 1  # one line for both hidden warnings


def test_a_folder_of_unsupported_files_is_reported_and_training_says_why(run_config, tiny_sdxl, tmp_path):
    import torch

    from ztsnr_ds.data.cache import CacheConfig
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.models import load_frozen

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.tiff").write_bytes(b"II*\0")
    (tmp_path / "data" / "scan.txt").write_text("a scan")
    cfg = CacheConfig(source=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    report = build_cache(cfg, load_frozen(tiny_sdxl, dtype=torch.float32), progress=False).report
    assert report["images"] == 0
    assert [p["reason"].split(":")[0] for p in report["scan_problems"]] == ["unsupported format"]
    with pytest.raises(ConfigError, match="holds no images.*report.json"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path / "run"),
               "--data.source", cfg.source, "--data.cache_dir", cfg.cache_dir])


def test_run_folder_config_yaml_is_the_resolved_config_and_valid_as_config(run_config, tmp_path):
    from ztsnr_ds.run_folder import write_config

    _, resolved = parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path),
                         "--optimizer.lr", "0.003"])
    path = write_config(tmp_path, resolved | {drift.HISTORY: [{"step": 4, "changed": {"a": [1, 2]}}]})
    _, again = parse(["--config", str(path)])
    assert again == resolved  # the same config: sections, sampler, deepspeed_config, paths
    assert '#   {"step": 4, "changed": {"a": [1, 2]}}' in path.read_text()


def test_cache_py_names_a_misspelt_data_key(tmp_path, capsys):
    import runpy

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["data"]["cache_txet"] = config["data"].pop("cache_text")
    (path := tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as err:
        runpy.run_path(str(ROOT / "launch" / "cache.py"))["read_sections"](path)
    assert err.value.code == 2 and "did you mean data.cache_text" in capsys.readouterr().err
