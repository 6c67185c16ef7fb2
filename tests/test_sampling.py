"""Euler sampler and SDXL denoiser on a tiny SDXL-shaped UNet (fp32, 1x4x16x16 latents), checked
against diffusers' EulerDiscreteScheduler + rescale_noise_cfg driving the same UNet with the same sigmas
(through ZTSNREulerDiscreteScheduler, which gives diffusers training's timesteps above sigma_998)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from ztsnr_ds.models import TINY_UNET_CONFIG
from ztsnr_ds.objective import append_dims, c_in, c_out, c_skip
from ztsnr_ds.sampling import SDXLDenoiser, ZTSNREulerDiscreteScheduler, rescale_cfg, sample_euler
from ztsnr_ds.schedule import NoiseSchedule, diffusers_scheduler_config, sigma_to_t

SIZE_PX = 128  # latent 16 x 16; resolution scale s = 1/8
DESIGN_LIST = [20000, 17.8, 12.4, 9.2, 7.2, 5.4, 3.9, 2.1, 0.9, 0.0292]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cond(seed: int) -> dict:
    return {
        "encoder_hidden_states": _randn(1, 8, 64, seed=seed),  # (B, L, 2 x 32) both text encoders
        "text_embeds": _randn(1, 32, seed=seed + 1),  # pooled
        "time_ids": torch.tensor([[SIZE_PX, SIZE_PX, 0, 0, SIZE_PX, SIZE_PX]], dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("terminal")


@pytest.fixture(scope="module")
def denoiser(unet, schedule):
    return SDXLDenoiser(unet, schedule)


@torch.no_grad()
def _diffusers_euler(unet, schedule, sigmas, noise, cond, uncond, cfg_scale, cfg_rescale):
    """The SDXL pipeline's denoising loop, reduced: diffusers does CFG and its rescale on the v output."""
    scheduler = ZTSNREulerDiscreteScheduler.from_config(diffusers_scheduler_config(schedule))
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    latents = noise * scheduler.init_noise_sigma
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        v_uncond, v_cond = unet(
            model_input,
            t,
            encoder_hidden_states=both["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": both["text_embeds"], "time_ids": both["time_ids"]},
        ).sample.chunk(2)
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
        if cfg_rescale > 0:
            v = rescale_noise_cfg(v, v_cond, guidance_rescale=cfg_rescale)
        latents = scheduler.step(v, t, latents).prev_sample
    return latents


# diffusers' first step from sigma_max, x + d * dt in fp32, rounds x ~ 2e4 to ulp 2e-3; CFG 5 amplifies
# it. Against a float64 run: diffusers 3.2e-4 (list), 5.5e-3 (trailing), 2.4e-3 (karras); ours <= 9e-6.
@pytest.mark.parametrize(
    ("sigma_schedule", "steps", "cfg_rescale", "atol"),
    [(DESIGN_LIST, None, 0.0, 1e-3), ("trailing", 4, 0.7, 1.5e-2), ("karras", 4, 0.0, 1e-2)],
)
def test_matches_diffusers_euler(unet, schedule, denoiser, sigma_schedule, steps, cfg_rescale, atol):
    sigmas = schedule.inference_sigmas(sigma_schedule, steps, SIZE_PX, SIZE_PX)
    noise, cond, uncond = _randn(1, 4, 16, 16, seed=0), _cond(1), _cond(3)
    ours = sample_euler(denoiser, noise, sigmas, cond, uncond, cfg_scale=5.0, cfg_rescale=cfg_rescale)
    theirs = _diffusers_euler(unet, schedule, sigmas, noise, cond, uncond, 5.0, cfg_rescale)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert theirs.abs().max() > 1  # latents of unit scale: atol is absolute and relative alike
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


def test_step_from_sigma_max_keeps_fp32_precision():
    """The ideal denoiser of unit-Gaussian data, D = x / (1 + sigma^2), against the same Euler in float64."""

    def gaussian_denoiser(x, sigma):
        return append_dims(c_skip(sigma), x.ndim) * x

    noise, levels = _randn(4, 4, 16, 16, seed=4), [20000.0, 1.0, 0.0]
    result = sample_euler(gaussian_denoiser, noise, torch.tensor(levels), {})
    x = 20000.0 * noise.double()
    x = x / (1 + 20000.0**2) + (x - x / (1 + 20000.0**2)) * (1.0 / 20000.0)  # D + (x - D) sigma_1 / sigma_0
    torch.testing.assert_close(result.double(), x / 2, rtol=0, atol=1e-6)  # textbook x + d dt: 5e-4


def test_denoiser_is_the_v_preconditioning(unet, schedule, denoiser):
    x, sigma, cond = 17.8 * _randn(2, 4, 16, 16, seed=5), torch.tensor([17.8, 0.9]), _cond(7)
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
    table = schedule.table
    above = 998 + (math.log(17.8) - table[998].log()) / (table[998].log() - table[997].log())  # extrapolated
    below = sigma_to_t(torch.tensor(0.9, dtype=torch.float64), table)
    t = torch.stack([above, below]).float()  # 1031.56, 322.58
    with torch.no_grad():
        v = unet(
            append_dims(c_in(sigma), 4) * x,
            t,
            encoder_hidden_states=cond2["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond2["text_embeds"], "time_ids": cond2["time_ids"]},
        ).sample
        denoised = denoiser(x, sigma, **cond2)
        scalar_sigma = denoiser(x[:1], sigma[0], **cond)  # a 0-dim sigma broadcasts over the batch
    expected = append_dims(c_skip(sigma), 4) * x + append_dims(c_out(sigma), 4) * v
    torch.testing.assert_close(denoised, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scalar_sigma, expected[:1], rtol=0, atol=1e-5)


def test_bf16_unet_gets_fp32_timesteps_and_gives_fp32_denoised(unet, schedule):
    bf16 = SDXLDenoiser(UNet2DConditionModel(**TINY_UNET_CONFIG).to(torch.bfloat16).eval(), schedule)
    bf16.unet.load_state_dict(unet.state_dict())
    seen = []
    bf16.unet.register_forward_pre_hook(lambda module, args: seen.append(args))
    x, sigma, cond = _randn(1, 4, 16, 16, seed=6), torch.tensor([17.8]), _cond(9)
    with torch.no_grad():
        low, full = bf16(x, sigma, **cond), SDXLDenoiser(unet, schedule)(x, sigma, **cond)
    sample, t = seen[0]
    assert sample.dtype == torch.bfloat16 and t.dtype == torch.float32  # bf16 would make 1031.56 -> 1032
    assert t.item() == pytest.approx(1031.56, abs=0.01)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0, atol=0.05)


def test_one_step_from_sigma_max_returns_the_denoised(denoiser):
    noise, cond = _randn(1, 4, 16, 16, seed=1), _cond(1)
    result = sample_euler(denoiser, noise, torch.tensor([20000.0, 0.0]), cond)
    with torch.no_grad():
        expected = denoiser(20000.0 * noise, torch.tensor([20000.0]), **cond)
    assert torch.equal(result, expected)


def test_sampling_is_deterministic_given_the_seed(schedule, denoiser):
    sigmas = schedule.inference_sigmas("trailing", 2, SIZE_PX, SIZE_PX)
    runs = [sample_euler(denoiser, _randn(1, 4, 16, 16, seed=s), sigmas, _cond(1)) for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_cfg_scale_one_equals_cond_only(schedule, denoiser):
    sigmas = schedule.inference_sigmas("trailing", 2, SIZE_PX, SIZE_PX)
    noise, cond, uncond = _randn(1, 4, 16, 16, seed=2), _cond(1), _cond(3)
    guided = sample_euler(denoiser, noise, sigmas, cond, uncond, cfg_scale=1.0)
    cond_only = sample_euler(denoiser, noise, sigmas, cond)
    uncond_only = sample_euler(denoiser, noise, sigmas, uncond)
    torch.testing.assert_close(guided, cond_only, rtol=0, atol=1e-5)
    assert not torch.allclose(guided, uncond_only, atol=1e-3)


def test_cfg_rescale_zero_equals_plain_cfg(schedule, denoiser):
    sigmas = schedule.inference_sigmas("trailing", 2, SIZE_PX, SIZE_PX)
    noise, cond, uncond = _randn(1, 4, 16, 16, seed=2), _cond(1), _cond(3)

    def plain_cfg(x, sigma):  # D_u + g (D_c - D_u), two separate calls
        d_uncond = denoiser(x, sigma, **uncond)
        return d_uncond + 4.0 * (denoiser(x, sigma, **cond) - d_uncond)

    plain = sample_euler(plain_cfg, noise, sigmas, {})
    for phi in (0.0, 1e-7):  # phi -> 0 through the v round trip lands on plain CFG too
        ours = sample_euler(denoiser, noise, sigmas, cond, uncond, cfg_scale=4.0, cfg_rescale=phi)
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-4 * plain.abs().max().item())
    rescaled = sample_euler(denoiser, noise, sigmas, cond, uncond, cfg_scale=4.0, cfg_rescale=0.7)
    assert not torch.allclose(rescaled, plain, atol=1e-2)


def test_rescale_cfg_matches_diffusers():
    v_cfg, v_cond = 3 * _randn(2, 4, 8, 8, seed=3), _randn(2, 4, 8, 8, seed=4)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_cfg(v_cfg, v_cond, phi), rescale_noise_cfg(v_cfg, v_cond, phi))
    assert torch.equal(rescale_cfg(v_cfg, v_cond, 0.0), v_cfg)


def test_progress_bar(denoiser, capsys):
    sample_euler(
        denoiser, _randn(1, 4, 16, 16, seed=0), torch.tensor([20000.0, 1.0, 0.0]), _cond(1), progress=True
    )
    assert "2/2" in capsys.readouterr().err


def test_diffusers_scheduler_gets_training_timesteps_above_the_base_area():
    """At 2048^2 the trailing levels above sigma_998 = 14.53 get training's extrapolated timesteps from
    ZTSNREulerDiscreteScheduler; the stock scheduler squeezes them into [998, 999) (the clamp it keeps)."""
    schedule = NoiseSchedule("terminal")
    sigmas = schedule.inference_sigmas("trailing", 28, 2048, 2048)
    config = diffusers_scheduler_config(schedule)
    ours, stock = ZTSNREulerDiscreteScheduler.from_config(config), EulerDiscreteScheduler.from_config(config)
    for sched in (ours, stock):
        sched.set_timesteps(sigmas=sigmas.tolist())
    expected = schedule.timestep(sigmas[:-1])
    assert ours.timesteps[0] == 999 and (expected[1:4] > 1000).all()
    torch.testing.assert_close(ours.timesteps, expected, rtol=0, atol=2e-3)  # diffusers' fp32 table
    high = sigmas[1:-1] > schedule.table[998]
    assert high.sum() >= 3 and ((stock.timesteps[1:][high] >= 998) & (stock.timesteps[1:][high] < 999)).all()
    torch.testing.assert_close(stock.timesteps[1:][~high], expected[1:][~high], rtol=0, atol=2e-3)
