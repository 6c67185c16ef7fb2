"""VAE decoder fine-tune (launch/train_vae.py) on the tiny SDXL, CPU, fp32, LPIPS with a random tiny VGG
(the real one needs torchvision's VGG16 weights, which tests never download): the encoder stays bitwise
the base's, the decoder learns, resume repeats the straight run bit for bit, and the exports decode with
the new decoder while encoding exactly as before."""

from __future__ import annotations

import json
import runpy
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from PIL import Image
from safetensors.torch import load_file, save_file

from ztsnr_ds import checkpoint, engine
from ztsnr_ds.config import ConfigError
from ztsnr_ds.data.sources import ImageRecord
from ztsnr_ds.data.synthetic import write_dataset
from ztsnr_ds.image_metrics import gaussian_window, psnr, ssim
from ztsnr_ds.keymaps import VAE_PREFIX
from ztsnr_ds.models import TINY_UNET_CONFIG
from ztsnr_ds.patch_gan import hinge_d, hinge_g
from ztsnr_ds.perceptual import LPIPS
from ztsnr_ds.vae_config import parse
from ztsnr_ds.vae_data import CropStream
from ztsnr_ds.vae_decoder import TRAINED_PREFIXES
from ztsnr_ds.vae_export import load_decoder_run, load_sampling_vae
from ztsnr_ds.vae_trainer import VAETrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_VGG = [4, 8, 8, 8, 8]
pytestmark = pytest.mark.filterwarnings("ignore:perceptual.backbone = random")


@pytest.fixture(scope="module")
def vae_yaml(tiny_sdxl, tmp_path_factory) -> Path:
    """configs/vae_demo.yaml on the tiny model and 10 generated images; 4 steps, a save every 2, EMA and
    patch-GAN on."""
    root = tmp_path_factory.mktemp("vae")
    config = yaml.safe_load((ROOT / "configs" / "vae_demo.yaml").read_text())
    config["model"]["pretrained"] = str(tiny_sdxl)
    config["data"] |= {"source": str(write_dataset(root / "data", n=10)), "crop_min": 32, "crop_max": 64,
                       "crop_step": 32}
    config["perceptual"]["widths"] = TINY_VGG
    config["trainer"] |= {"micro_batch": 2, "max_steps": 4, "save_every": 2, "log_every": 1,
                          "warmup_steps": 1, "output_dir": str(root / "unused")}
    config["optimizer"] |= {"fused": False, "lr": 0.001}  # no 20 s compile of a fused step; a random VAE
    config["ema"] = {"enabled": True, "decay": 0.9}
    config["gan"] = {"weight": 0.1, "start_step": 1, "width": 8, "layers": 2}  # D trains from the 2nd step
    config["validation"] |= {"every": 2, "holdout": 2, "crop": 32}
    config["logging"] = {"tensorboard": False, "progress": False}
    path = root / "vae.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make(vae_yaml: Path, output_dir: Path, *overrides: str) -> VAETrainer:
    cfg, config_dict = parse(["--config", str(vae_yaml), "--trainer.output_dir", str(output_dir), *overrides])
    return VAETrainer(cfg, config_dict, engine.init_distributed())


def records(output_dir: Path) -> list[dict]:
    """metrics.jsonl less the wall-clock step_time."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in lines]


@pytest.fixture(scope="module")
def runs(vae_yaml, tmp_path_factory) -> dict:
    """A straight 4-step run, and the same run stopped by SIGTERM in step 2 (it saves, then returns) and
    resumed. A save_every of 4 makes the SIGTERM save the only one before step 4."""
    root = tmp_path_factory.mktemp("vae_runs")
    straight = make(vae_yaml, root / "a")
    straight.train()
    stopped = make(vae_yaml, root / "b", "--trainer.save_every", "4")
    train_step = stopped.train_step

    def step_then_signal() -> dict:
        if stopped.step == 1:  # the handler train() installed sets a flag; the step finishes first
            signal.raise_signal(signal.SIGTERM)
        return train_step()

    stopped.train_step = step_then_signal
    stopped.train()
    tags = [t.name for t in checkpoint.complete_tags(root / "b" / "checkpoints")]
    resumed = make(vae_yaml, root / "b")
    resumed.train()
    return {"straight": straight, "resumed": resumed, "a": root / "a", "b": root / "b", "stopped": stopped,
            "sigterm_tags": tags}


def test_resume_is_bitwise_and_the_encoder_never_changes(runs, tiny_sdxl):
    straight, resumed = runs["straight"], runs["resumed"]
    assert runs["stopped"].step == 2 and runs["sigterm_tags"] == ["step00000002"]
    # Every term and held-out metric, full float precision; the stopped run saved and left before its
    # step-2 validation, which the resumed run does not repeat.
    assert [r for r in records(runs["a"]) if r != records(runs["a"])[3]] == records(runs["b"])
    assert records(runs["a"])[3]["step"] == 2 and "holdout/l1" in records(runs["a"])[3]
    for p, q in zip(straight.engine.module.parameters(), resumed.engine.module.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.state["ema"], resumed.ema.state["ema"]))
    gan_a, gan_b = straight.gan.state(), resumed.gan.state()  # discriminator weights and AdamW moments
    assert gan_a.keys() == gan_b.keys() and all(torch.equal(gan_a[k], gan_b[k]) for k in gan_a)
    assert any(k.startswith("opt/") for k in gan_a)
    log = records(runs["a"])
    assert "disc" not in log[1] and log[2]["disc"] > 0 and log[2]["gan"] != 0  # from step 1 (0-based) on
    base = AutoencoderKL.from_pretrained(tiny_sdxl / "vae", local_files_only=True).state_dict()
    trained = {name for name, _ in straight.engine.module.named_parameters()}
    assert trained == {k for k in base if k.startswith(TRAINED_PREFIXES)}  # the optimizer's, and no more
    frozen = straight.vae.state_dict()
    assert frozen and all(torch.equal(v, base[k]) for k, v in frozen.items())  # encoder + quant_conv
    assert not any(p.requires_grad for p in straight.vae.parameters())
    assert any(not torch.equal(p, base[n]) for n, p in straight.engine.module.named_parameters())
    held = [r for r in records(runs["a"]) if "holdout/psnr" in r]
    assert [r["step"] for r in held] == [0, 2, 4] and {"ema_holdout/ssim", "holdout/lpips"} <= set(held[0])
    assert {"l1", "mse", "lpips", "loss", "grad_norm"} <= set(records(runs["a"])[1])
    with Image.open(runs["a"] / "samples" / "step00000004.png") as grid:  # 2 pairs of 32 px + a header line
        assert grid.size == (64, 64 + 14)


def test_decoder_loss_falls_on_the_demo_images(vae_yaml, tmp_path):
    run = make(vae_yaml, tmp_path, "--trainer.max_steps", "16", "--trainer.save_every", "16", "--ema.enabled",
               "false", "--validation.every", "16", "--optimizer.lr", "0.003", "--loss.lpips", "0",
               "--trainer.lr_schedule", "constant", "--gan.weight", "0")
    fixed = run.crops.batch(10**6, 0, 8)  # 8 crops of the training images, a step the run never draws
    with torch.no_grad():
        before = run.terms(fixed)["l1"].mean().item()
    run.train()
    with torch.no_grad():
        after = run.terms(fixed)["l1"].mean().item()
    assert after < 0.75 * before, (before, after)  # measured 0.834 -> 0.563
    held = [r["holdout/l1"] for r in records(tmp_path) if "holdout/l1" in r]
    assert held[1] < held[0], held  # the held-out crops, never trained on: 0.739 -> 0.653


@pytest.fixture(scope="module")
def unet_run(tiny_sdxl, tmp_path_factory) -> Path:
    """A UNet checkpoint (checkpoint.save of the base's own UNet): the export's other half."""
    dist = engine.init_distributed()
    ds_config = engine.build_ds_config(ROOT / "ds_configs" / "zero2_fp32.json", 1, 1, dist.world_size)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    ds_engine = engine.initialize(unet, torch.optim.AdamW(unet.parameters()), ds_config)
    noise = {"ztsnr": "terminal", "sigma_max": 20000.0, "resolution_scaling": True, "base_area": 128 * 128}
    state = {checkpoint.STEP: 0, checkpoint.CONFIG: {"noise": noise, "model": {"pretrained": str(tiny_sdxl)}},
             checkpoint.UNET_CONFIG: json.loads(json.dumps(dict(unet.config), default=str))}
    out = tmp_path_factory.mktemp("unet_run") / "tiny"
    checkpoint.save(ds_engine, out, 0, state, keep_last=1, is_main=dist.is_main)
    return out


def _sgm_vae(path: Path, config: dict) -> AutoencoderKL:
    """The first_stage_model.* of a single file as a diffusers VAE, through diffusers' own converter."""
    state = {k: v for k, v in load_file(str(path)).items() if k.startswith(VAE_PREFIX)}
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae.config), strict=True)
    return vae.eval()


def test_exports_decode_with_the_new_decoder_and_encode_as_before(runs, unet_run, tiny_sdxl, tmp_path):
    export = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    single = tmp_path / "model.safetensors"
    assert export(["--checkpoint", str(unet_run), "--vae", str(runs["a"]), "--format", "single_file",
                   "--base", str(tiny_sdxl), "--out", str(single), "--dtype", "fp32"]) == 0
    assert export(["--checkpoint", str(unet_run), "--vae", str(runs["a"]), "--format", "diffusers",
                   "--base", str(tiny_sdxl), "--out", str(tmp_path / "pipe"), "--dtype", "fp32"]) == 0
    assert export(["--vae", str(runs["a"]), "--vae-weights", "ema", "--format", "diffusers",
                   "--out", str(tmp_path / "alone"), "--dtype", "fp32"]) == 0
    base = AutoencoderKL.from_pretrained(tiny_sdxl / "vae", local_files_only=True).eval()
    decoder = runs["straight"].engine.module
    ema = load_decoder_run(runs["a"], weights="ema").state_dict
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = base.encode(images).latent_dist.mean
        want = decoder(z)
        model = decoder.state_dict()
        for vae, trained in ((_sgm_vae(single, base.config), model),
                             (AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae"), model),
                             (AutoencoderKL.from_pretrained(tmp_path / "alone" / "vae"), ema)):
            for key, value in vae.state_dict().items():  # encoder bitwise the base's; decoder the run's
                reference = trained if key.startswith(TRAINED_PREFIXES) else base.state_dict()
                assert torch.equal(value, reference[key]), key
            assert torch.equal(vae.encode(images).latent_dist.mean, z)
            if trained is model:  # same weights; another module instance may pick other CPU kernels: 3e-6
                torch.testing.assert_close(vae.decode(z).sample, want, rtol=0, atol=1e-5)
        assert not torch.allclose(base.decode(z).sample, want, atol=1e-3)  # the base decodes otherwise
    sampled = load_sampling_vae(runs["a"], torch.float32, "model", tiny_sdxl)  # sample.py --vae
    assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in sampled.state_dict().items()
               if k.startswith(TRAINED_PREFIXES))


def test_sample_decodes_with_the_fine_tuned_vae(runs, tiny_sdxl, tmp_path):
    sample = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    argv = ["--model", str(tiny_sdxl), "--prompt", "red circle", "--width", "32", "--height", "32", "--steps",
            "2", "--dtype", "fp32", "--save-latents", "--vae", str(runs["a"]), "--out", str(tmp_path)]
    assert sample(argv) == 0
    latents = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    vae = load_sampling_vae(runs["a"], torch.float32, "model", tiny_sdxl)
    with torch.no_grad():
        want = ((vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) * 127.5)[0]
    with Image.open(next(tmp_path.glob("0000*.png"))) as png:
        pixels = torch.from_numpy(np.asarray(png.convert("RGB")).copy()).permute(2, 0, 1).float()
    assert (pixels - want).abs().max() <= 0.5 + 1e-3


def test_crop_stream_skips_and_lists_bad_images_and_repeats_itself(tmp_path):
    write_dataset(tmp_path, n=2)
    (tmp_path / "broken.png").write_bytes((tmp_path / "img0000.png").read_bytes()[:60])  # truncated
    recs = [ImageRecord(tmp_path / n, "", n) for n in ("broken.png", "img0000.png", "img0001.png")]
    stream = CropStream(recs, [32, 128], seed=3, rank=0, max_pixels=1 << 20)  # img0001 is 192 x 96 px
    batches = [stream.batch(step, 0, 4) for step in range(4)]
    reasons = {p.key: p.reason for p in stream.problems}
    assert sorted(reasons) == ["broken.png", "img0001.png"]
    assert reasons["broken.png"].startswith("unreadable") and "crop_max" in reasons["img0001.png"]
    again = CropStream(recs, [32, 128], seed=3, rank=0, max_pixels=1 << 20)
    assert all(torch.equal(b, again.batch(step, 0, 4)) for step, b in enumerate(batches))
    assert {b.shape[-1] for b in batches} == {32, 128} and all(b.abs().max() <= 1 for b in batches)


def test_psnr_and_ssim_match_their_formulas():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.1).clamp(-1, 1)
    mse = ((x / 2 + 0.5) - (y / 2 + 0.5)).square().flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), -0.4)  # constant: sigma = 0
    ua, ub, c1 = 0.6, 0.3, 0.01**2
    want = torch.tensor([(2 * ua * ub + c1) / (ua**2 + ub**2 + c1)])  # the contrast term is C2 / C2 = 1
    torch.testing.assert_close(ssim(a, b), want, rtol=1e-4, atol=0)  # fp32 E[x^2] - mu^2 leaves ~1e-8
    assert gaussian_window().sum().item() == pytest.approx(1.0)


def test_lpips_reads_torchvision_keys_and_matches_its_definition(tmp_path):
    torch.manual_seed(0)
    random_vgg = LPIPS(widths=tuple(TINY_VGG), seed=5)
    state = {f"features.{k}": v for k, v in random_vgg.features.state_dict().items()}
    state |= {"classifier.0.weight": torch.zeros(1)}  # torchvision files carry the classifier too: ignored
    save_file(state, str(tmp_path / "vgg.safetensors"))
    lin = {f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1) for k, w in enumerate(TINY_VGG)}
    torch.save(lin, tmp_path / "lin.pth")
    model = LPIPS(str(tmp_path / "vgg.safetensors"), str(tmp_path / "lin.pth"), tuple(TINY_VGG))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
    hx, hy = ((t - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1) for t in (x, y))
    want, k = torch.zeros(2), 0
    for i, layer in enumerate(random_vgg.features):
        hx, hy = layer(hx), layer(hy)
        if i in (3, 8, 15, 22, 29):  # relu1_2 ... relu5_3 of torchvision's vgg16.features
            unit_x, unit_y = (h / (h.norm(dim=1, keepdim=True) + 1e-10) for h in (hx, hy))
            d = (unit_x - unit_y).square()
            want += (d * lin[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
            k += 1
    torch.testing.assert_close(model(x, y), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, x), torch.zeros(2))


@pytest.mark.parametrize(("args", "key"), [
    (["--loss.lpips", "1", "--perceptual.backbone", "null"], "perceptual.backbone"),
    (["--perceptual.backbone", "/nowhere/vgg16.pth", "--perceptual.widths", "[64,128,256,512,512]"],
     "perceptual.backbone"),
    (["--data.crop_min", "36"], "data.crop_min"),
    (["--validation.crop", "128"], "validation.crop"),
    (["--trainer.batch_by_area", "true"], "trainer.batch_by_area"),
])
def test_config_errors_name_the_key(vae_yaml, args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse(["--config", str(vae_yaml), *args])


def test_hinge_losses_match_their_formulas():
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -0.5)
    torch.testing.assert_close(hinge_d(real, fake), torch.full((2,), 0.5 * (0.0 + 0.5)))  # relu(-1), relu(.5)
    torch.testing.assert_close(hinge_d(fake, real), torch.full((2,), 0.5 * (1.5 + 3.0)))
    torch.testing.assert_close(hinge_g(fake), torch.full((2,), 0.5))


def test_vae_flags_refuse_what_is_not_a_decoder_run(runs, unet_run, tiny_sdxl, tmp_path, capsys):
    export = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    assert export(["--vae", str(unet_run), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert "not a VAE decoder run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a single file needs the UNet checkpoint
        export(["--vae", str(runs["a"]), "--format", "single_file", "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    sample = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    with pytest.raises(SystemExit) as exit_info:
        sample(["--model", str(tiny_sdxl), "--prompt", "x", "--vae", str(unet_run), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "error: --vae:" in capsys.readouterr().err
