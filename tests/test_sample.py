"""launch/sample.py on the tiny SDXL: a real ZeRO-2 checkpoint, its single-file and diffusers exports and
a plain diffusers folder, sampled at 64 x 64 px (8 x 8 latents), 4 Euler steps, fp32 on the CPU."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from ztsnr_ds import checkpoint, engine
from ztsnr_ds.export import export_diffusers, export_single_file, load_checkpoint
from ztsnr_ds.generate import LATENTS_FILE, resolve_schedule
from ztsnr_ds.models import TINY_UNET_CONFIG
from ztsnr_ds.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
# Not the defaults, so each source must hand its own settings to the sampler: scale sqrt(64^2 / 128^2).
NOISE = {"ztsnr": "rescale", "sigma_max": 5000.0, "resolution_scaling": True, "base_area": 128 * 128}
PROMPTS = ("1girl, solo", "scenery, mountain")
SIZE = ["--width", "64", "--height", "64", "--steps", "4", "--dtype", "fp32", "--negative", "lowres"]
ONE_IMAGE = ["--prompt", PROMPTS[0], "--seed", "8", "--n", "1", *SIZE]  # = image 1 of the main run


@pytest.fixture(scope="module")
def sample_main():
    return runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]


@pytest.fixture(scope="module")
def run_dir(tiny_sdxl, tmp_path_factory) -> Path:
    """A ZeRO-2 checkpoint (ztsnr_ds.checkpoint.save) of a UNet other than the base's, trained from it."""
    dist = engine.init_distributed()
    ds_config = engine.build_ds_config(ROOT / "ds_configs" / "zero2_bf16.json", 1, 1, dist.world_size)
    torch.manual_seed(1)  # the base UNet is seed 0: a sampler that read the base's UNet would be caught
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    ds_engine = engine.initialize(unet, torch.optim.AdamW(unet.parameters()), ds_config)
    state = {
        checkpoint.STEP: 0,
        checkpoint.CONFIG: {"noise": NOISE, "model": {"pretrained": str(tiny_sdxl)}},
        checkpoint.UNET_CONFIG: json.loads(json.dumps(dict(unet.config), default=str)),
    }
    out = tmp_path_factory.mktemp("run") / "tiny"
    checkpoint.save(ds_engine, out, 0, state, keep_last=2, is_main=dist.is_main)
    return out


@pytest.fixture(scope="module")
def exports(run_dir, tiny_sdxl, tmp_path_factory) -> tuple[Path, Path]:
    """fp32 single-file and diffusers exports (bf16 weights widened exactly, as load_checkpoint does)."""
    trained = load_checkpoint(run_dir, torch.float32)
    out = tmp_path_factory.mktemp("exports")
    single = export_single_file(trained, tiny_sdxl, out / "model.safetensors", torch.float32)
    return single, export_diffusers(trained, out / "diffusers")


@pytest.fixture(scope="module")
def main_run(sample_main, run_dir, tmp_path_factory) -> Path:
    """2 prompts (--prompt and --prompts) x 2 images, seed 7, from the checkpoint, base from its config."""
    out = tmp_path_factory.mktemp("main")
    (out / "prompts.txt").write_text(f"\n{PROMPTS[1]}\n\n")
    argv = ["--model", str(run_dir), "--prompt", PROMPTS[0], "--prompts", str(out / "prompts.txt"),
            "--n", "2", "--seed", "7", "--save-latents", "--out", str(out / "samples"), *SIZE]
    assert sample_main(argv) == 0
    return out / "samples"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def _latents(folder: Path) -> torch.Tensor:
    with safe_open(str(folder / LATENTS_FILE), "pt") as f:
        return f.get_tensor("latents")


def _text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def _sigmas(text: dict[str, str]) -> torch.Tensor:
    return torch.tensor([float(s) for s in text["sigmas"].split(",")])


def test_pngs_carry_prompt_seed_sigmas_and_checkpoint_settings(main_run):
    names = ["0000-seed7.png", "0001-seed8.png", "0002-seed9.png", "0003-seed10.png"]
    assert sorted(p.name for p in main_run.iterdir()) == sorted([*names, "grid.png", LATENTS_FILE])
    want = NoiseSchedule("rescale", 5000.0, 128 * 128).inference_sigmas("trailing", 4, 64, 64)
    assert want[0] == 5000.0 and want[1] < 14.6146 / 2 + 1e-3  # terminal level, then scale 0.5
    for index, name in enumerate(names):
        text = _text(main_run / name)
        assert (text["prompt"], text["negative"]) == (PROMPTS[index // 2], "lowres")
        assert text["seed"] == str(7 + index)
        assert torch.equal(_sigmas(text), want)
        settings = json.loads(text["settings"])
        assert settings["noise"] == {"ztsnr": "rescale", "sigma_max": 5000.0, "base_area": 128 * 128}
        assert set(settings["noise_from"].values()) == {"model"} and settings["kind"] == "checkpoint"
        assert (settings["cfg"], settings["cfg_rescale"], settings["steps"]) == (5, 0.7, 4)
        assert settings["index"] == index
    grid = _pixels(main_run / "grid.png")  # one row per prompt
    assert grid.shape == (128, 128, 3)
    np.testing.assert_array_equal(grid[64:, :64], _pixels(main_run / names[2]))


def test_saved_latents_decode_to_the_pngs(main_run, tiny_sdxl):
    latents = _latents(main_run)
    assert latents.shape == (4, 4, 8, 8) and latents.dtype == torch.float32
    assert not torch.equal(latents[0], latents[1])  # seeds 7 and 8
    vae = AutoencoderKL.from_pretrained(tiny_sdxl / "vae", local_files_only=True).eval()
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample  # (4, 3, 64, 64) in [-1, 1]
    want = ((decoded.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # unrounded
    for index, name in enumerate(sorted(main_run.glob("000*.png"))):
        assert np.abs(_pixels(name) - want[index]).max() <= 0.5 + 1e-3  # rounding only


@pytest.mark.parametrize("source", ["checkpoint", "single_file", "diffusers"])
def test_same_seed_same_latents_from_checkpoint_and_exports(source, sample_main, main_run, run_dir, exports,
                                                            tiny_sdxl, tmp_path):
    """Image 1 of the main run (seed 7 + 1) again, alone: from the checkpoint (a second run) and from both
    exports, whose noise settings come from their safetensors metadata."""
    model = {"checkpoint": [str(run_dir)], "single_file": [str(exports[0]), "--base", str(tiny_sdxl)],
             "diffusers": [str(exports[1]), "--base", str(tiny_sdxl)]}[source]
    assert sample_main(["--model", *model, *ONE_IMAGE, "--save-latents", "--out", str(tmp_path)]) == 0
    assert torch.equal(_latents(tmp_path)[0], _latents(main_run)[1])
    np.testing.assert_array_equal(_pixels(tmp_path / "0000-seed8.png"), _pixels(main_run / "0001-seed8.png"))
    text = _text(tmp_path / "0000-seed8.png")
    assert text["sigmas"] == _text(main_run / "0001-seed8.png")["sigmas"]
    assert json.loads(text["settings"])["kind"] == source


def test_flags_override_and_defaults(sample_main, main_run, tiny_sdxl, tmp_path, capsys):
    """The base folder itself (its own UNet, no recorded settings) with the checkpoint's settings as flags:
    same sigmas, other latents (so the checkpoint runs did not sample the base UNet)."""
    flags = ["--ztsnr", "rescale", "--sigma-max", "5000", "--base-area", str(128 * 128)]
    assert sample_main(["--model", str(tiny_sdxl), *ONE_IMAGE, *flags, "--save-latents",
                        "--out", str(tmp_path)]) == 0
    assert "records no noise settings" in capsys.readouterr().err
    text = _text(tmp_path / "0000-seed8.png")
    assert text["sigmas"] == _text(main_run / "0001-seed8.png")["sigmas"]
    assert set(json.loads(text["settings"])["noise_from"].values()) == {"flag"}
    assert not torch.allclose(_latents(tmp_path)[0], _latents(main_run)[1], atol=1e-2)
    schedule, origin = resolve_schedule({}, {})
    assert (schedule.mode, schedule.sigma_max, schedule.base_area) == ("terminal", 20000.0, 1024 * 1024)
    assert set(origin.values()) == {"default"}
    recorded = {"ztsnr": "rescale", "sigma_max": 5000.0, "base_area": 16384}
    schedule, origin = resolve_schedule(recorded, {"ztsnr": "off", "base_area": None})
    assert (schedule.mode, schedule.sigma_max, schedule.base_area) == ("off", 5000.0, None)
    assert origin == {"ztsnr": "flag", "sigma_max": "model", "base_area": "flag"}


def test_bad_arguments_exit_2_naming_the_flag(sample_main, run_dir, exports, tiny_sdxl, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_text("junk")
    model = ["--model", str(run_dir), "--prompt", "x"]
    cases = [
        (["--width", "65", *model], "--width"),
        (["--height", "0", *model], "--height"),
        (["--model", str(run_dir), "--prompts", str(tmp_path / "missing.txt")], "--prompts"),
        (["--model", str(run_dir)], "--prompt"),
        (["--schedule", "list", *model], "--sigmas"),
        (["--schedule", "list", "--sigmas", "1,5", *model], "--sigmas"),
        (["--model", str(tmp_path / "empty"), "--prompt", "x"], "--model"),
        (["--model", str(tmp_path / "nothing"), "--prompt", "x"], "--model"),
        (["--model", str(tmp_path / "junk.safetensors"), "--prompt", "x"], "--model"),
        (["--model", str(exports[1]), "--prompt", "x"], "--base"),
        (["--base", str(tmp_path / "empty"), *model], "--base"),
    ]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            sample_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert f"error: argument {flag}:" in err or f"error: {flag}" in err, (argv, err)
