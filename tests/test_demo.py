"""What `make demo` rests on: the hand-set pooling VAE, the demo data and scores, and the fp32 engine."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ztsnr_ds import demo_scores
from ztsnr_ds.config import parse
from ztsnr_ds.data.synthetic import BACKGROUNDS, COLOURS, TONES, draw_plain, draw_sample, write_dataset
from ztsnr_ds.demo_scores import to_unit
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.pooling_vae import pooling_vae
from ztsnr_ds.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def pixels(img) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    rng = random.Random(0)
    drawn = [draw_sample(rng, w, h)[0] for w, h in ((128, 128), (192, 96), (64, 256))]
    drawn += [draw_plain(rng, 128, 64, tone)[0] for tone in TONES]
    return [pixels(img) for img in drawn]


@torch.no_grad()
def test_pooling_vae_encodes_block_means_and_decodes_them_back(images):
    vae = pooling_vae()
    for x in images:
        z = vae.encode(x).latent_dist.mean  # (1, 4, H/8, W/8)
        pooled = F.avg_pool2d(x, 8)  # (1, 3, H/8, W/8): the independent implementation
        assert (z[:, :3] - pooled).abs().max() < 1e-4  # K = 100 bounds GroupNorm's error by 5e-5
        assert (z[:, 3] - pooled.mean(1)).abs().max() < 1e-4
        decoded = vae.decode(z).sample
        assert (decoded - F.interpolate(pooled, scale_factor=8, mode="nearest")).abs().max() < 1e-4
    # bf16, as the trainer's validation images decode: within bf16's 8 bits of the fp32 latents
    x = images[0]
    z16 = vae.to(torch.bfloat16).encode(x.bfloat16()).latent_dist.mean.float()
    assert (z16[:, :3] - F.avg_pool2d(x, 8)).abs().max() < 2e-2


def test_latent_separation_and_reconstruction_of_the_demo_images(images):
    vae = pooling_vae()
    rmse = demo_scores.reconstruction_rmse(vae, images)
    # the only error is the 8x8 blocks across shape edges: well under the 60 levels between data colours
    assert 5 < rmse < 25
    sep = demo_scores.latent_separation(vae, images)
    assert {"black", "white"} <= set(sep.means)
    black = (torch.tensor(TONES["black"]) / 127.5 - 1).float()
    assert torch.allclose(sep.means["black"][:3], black, atol=2e-3)  # plain noise averages out in a block
    # The spread is the plain images' noise: grey, uniform on {-6..6} levels, averaged over 64 pixels, in all
    # 4 latent channels (3 colours and their mean): sqrt(4) * sqrt((13^2 - 1) / 12) / 8 levels.
    noise = 2 * ((13**2 - 1) / 12) ** 0.5 / 8 / 127.5
    assert sep.spread == pytest.approx(noise, rel=0.1)
    # black vs dark background is the closest pair, near-grey: the mean channel adds x sqrt(4/3) = 1.155
    dark = to_unit(BACKGROUNDS["dark background"])
    assert sep.nearest == pytest.approx(float((black - dark).norm()) * 1.155, rel=0.02)
    assert sep.ratio() > 30


def test_colour_score_and_brightness_of_drawn_images():
    img, caption = draw_sample(random.Random(3), 128, 128)
    colour, background = demo_scores.parse_shape_prompt(caption)
    score = demo_scores.colour_score(pixels(img)[0], caption)
    assert torch.allclose(score.inside, torch.tensor(COLOURS[colour], dtype=torch.float32), atol=0.01)
    assert torch.allclose(score.outside, torch.tensor(demo_scores.PALETTE[background], dtype=torch.float32),
                          atol=0.01)
    assert score.ok and 0.2 < score.shape_share < 0.7
    plain, _ = draw_plain(random.Random(0), 64, 64, "black")
    assert abs(demo_scores.brightness(pixels(plain)[0]) - np.mean(TONES["black"])) < 0.5
    with pytest.raises(ValueError, match="not a shape caption"):
        demo_scores.colour_score(pixels(plain)[0], "plain black, black, plain")


def test_dataset_has_plain_black_and_white_images(tmp_path):
    folder = write_dataset(tmp_path, n=16)
    captions = [(folder / f"img{i:04d}.txt").read_text() for i in range(16)]
    plain = ["plain black, black, plain", "plain white, white, plain"] * 2
    assert [captions[i] for i in (3, 7, 11, 15)] == plain
    assert all(demo_scores.parse_shape_prompt(c) for i, c in enumerate(captions) if i % 4 != 3)


@pytest.fixture(scope="module")
def fp32_config(make_run_config) -> Path:
    trainer = {"micro_batch": 2, "max_steps": 1, "save_every": 100, "log_every": 1, "warmup_steps": 1}
    return make_run_config("fp32", 8, trainer, {"every": 0})


def test_fp32_engine_keeps_fp32_and_takes_the_exact_first_adamw_step(fp32_config, tmp_path):
    """ZeRO-2 without bf16: fp32 weights, and step 1 of AdamW moves every weight with a gradient by
    lr * g / (|g| + eps) (bias-corrected m / (sqrt(v) + eps), m_hat = g, v_hat = g^2) plus the decay
    lr * wd * p, which bf16 would round. That is lr for all but the tiniest gradients: eps / |g| is the
    relative gap, and the round-off residues of gradients that are 0 in exact arithmetic (7.7e-17 on one
    AMD EPYC, other sizes with another CPU's summation order) put it above 1e-3 even with eps 1e-20 (the
    rtol-1e-3 failure seen on some CPUs). eps is 1e-18 here so that this machine meets that case too;
    the reference keeps eps, in fp64, from the optimizer's own m and v (v = 0.1 m^2 where v is normal)."""
    cfg, config_dict = parse(["--config", str(fp32_config), "--trainer.output_dir", str(tmp_path / "run"),
                              "--deepspeed_config", str(ROOT / "ds_configs" / "zero2_fp32.json"),
                              "--optimizer.eps", "1e-18", "--optimizer.fused", "false"])  # eager: no compile
    trainer = Trainer(cfg, config_dict, init_distributed())
    params = list(trainer.engine.module.parameters())
    assert trainer.dtype == torch.float32 and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    trainer.train()
    opt = cfg.optimizer
    lr, wd, (b1, b2), eps = opt.lr, opt.weight_decay, opt.betas, opt.eps
    step = torch.cat([(p.detach() - b + lr * wd * b).flatten() for p, b in zip(params, before)])
    moved = step != 0  # the rest had no gradient (e.g. unused time ids)
    assert moved.float().mean() > 0.9
    ((flat,),) = [group["params"] for group in trainer.optimizer.param_groups]  # the flat fp32 partition
    m, v = (trainer.optimizer.state[flat][key][:step.numel()].double() for key in ("exp_avg", "exp_avg_sq"))
    normal = v >= torch.finfo(torch.float32).tiny
    torch.testing.assert_close(v[normal], (1 - b2) / (1 - b1) ** 2 * m[normal] ** 2, rtol=1e-6, atol=0)
    want = -lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)  # step 1: bias corrections 1 - b^1
    # fp32 rounds p - lr * (...) to 1.2e-7 |p|; bf16 weights would round to 4e-3 |p|, ~0.2 lr at |p| = 0.05
    torch.testing.assert_close(step[moved].double(), want[moved], rtol=1e-3, atol=0)
    assert (step[moved].abs() > 0.99 * lr).float().mean() > 0.999  # eps matters only for the tiniest g
    losses = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"step": 1' in losses and "NaN" not in losses
