"""v-prediction preconditioning, target, denoiser output and loss weights, checked against the formulas
in DESIGN.md section 3 and diffusers' DDPM (VP) noising and velocity."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ztsnr_ds.objective import (
    WEIGHTINGS,
    VObjective,
    add_noise,
    append_dims,
    c_in,
    c_out,
    c_skip,
    denoised_from_v,
    v_from_denoised,
    v_target,
)
from ztsnr_ds.schedule import NoiseSchedule


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _log_uniform_sigmas(n, seed=0, lo=0.01, hi=20000.0):
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _min_snr_formula(sigma, gamma=5.0):
    snr = 1 / sigma**2
    return min(snr, gamma) / (snr + 1)


def test_append_dims():
    assert append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    assert append_dims(torch.ones(3, 2), 2).shape == (3, 2)
    with pytest.raises(ValueError):
        append_dims(torch.ones(3, 2), 1)


def test_scalings_match_formulas():
    for sigma in (0.029167, 1.0, 14.6146, 20000.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        assert c_in(s).item() == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-12)
        assert c_skip(s).item() == pytest.approx(1 / (sigma**2 + 1), rel=1e-12)
        assert c_out(s).item() == pytest.approx(-sigma / math.sqrt(sigma**2 + 1), rel=1e-12)


def test_noising_and_target_match_diffusers_vp_form():
    """c_in * (x0 + sigma eps) is DDPM's sqrt(abar) x0 + sqrt(1 - abar) eps, and v is DDPM's velocity."""
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 250, 500, 750, 999])
    sigma = NoiseSchedule("off").table[t].float()
    x0, noise = _randn(5, 4, 8, 8, seed=1), _randn(5, 4, 8, 8, seed=2)
    vp_input = append_dims(c_in(sigma), 4) * add_noise(x0, noise, sigma)
    torch.testing.assert_close(vp_input, ddpm.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        v_target(x0, noise, sigma), ddpm.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5
    )


def test_v_target_at_terminal_sigma_is_minus_x0():
    x0, noise = _randn(2, 4, 16, 16, seed=3), _randn(2, 4, 16, 16, seed=4)
    v = v_target(x0, noise, torch.full((2,), 20000.0))
    assert ((v + x0).norm() / x0.norm()).item() < 1e-4  # v = -x0 + eps / 20000


def test_denoised_from_true_v_reconstructs_x0():
    sigma = torch.cat([_log_uniform_sigmas(62, seed=5), torch.tensor([1.0, 20000.0], dtype=torch.float64)])
    x0, noise = (
        _randn(64, 4, 8, 8, seed=6, dtype=torch.float64),
        _randn(64, 4, 8, 8, seed=7, dtype=torch.float64),
    )
    x = add_noise(x0, noise, sigma)
    torch.testing.assert_close(denoised_from_v(x, v_target(x0, noise, sigma), sigma), x0, rtol=0, atol=1e-10)
    s32, x0_32, n32 = sigma.float(), x0.float(), noise.float()
    d32 = denoised_from_v(add_noise(x0_32, n32, s32), v_target(x0_32, n32, s32), s32)
    torch.testing.assert_close(d32, x0_32, rtol=0, atol=2e-5)  # fp32 holds at sigma = 2e4 too


def test_denoiser_returns_its_input_as_sigma_goes_to_zero():
    x, v = _randn(2, 4, 8, 8, seed=8), _randn(2, 4, 8, 8, seed=9)
    torch.testing.assert_close(denoised_from_v(x, v, torch.full((2,), 1e-7)), x, rtol=0, atol=1e-6)


def test_v_from_denoised_inverts_denoised_from_v():
    sigma = _log_uniform_sigmas(16, seed=10)
    x, v = (
        _randn(16, 4, 8, 8, seed=11, dtype=torch.float64),
        _randn(16, 4, 8, 8, seed=12, dtype=torch.float64),
    )
    torch.testing.assert_close(v_from_denoised(x, denoised_from_v(x, v, sigma), sigma), v, rtol=0, atol=1e-8)


def test_min_snr_weights_match_formula():
    sigmas = [1.0, 14.6146, 0.029167, 3.0]
    weight = VObjective("min_snr", gamma=5.0).weight(torch.tensor(sigmas, dtype=torch.float64))
    assert weight[0].item() == 0.5  # SNR 1: min(1, 5) / 2
    for w, sigma in zip(weight.tolist(), sigmas, strict=True):
        assert w == pytest.approx(_min_snr_formula(sigma), rel=1e-12)
    assert weight[2].item() == pytest.approx(5 / (1 / 0.029167**2 + 1), rel=1e-12)  # SNR 1175 > gamma


def test_soft_min_snr_weights_match_formula():
    sigma = _log_uniform_sigmas(32, seed=13, hi=1000.0)
    weight = VObjective("soft_min_snr", gamma=5.0).weight(sigma)
    x0_space = 1 / (sigma**2 + 1 / 5.0)
    torch.testing.assert_close(weight, x0_space * sigma**2 / (sigma**2 + 1), rtol=1e-12, atol=0)
    k_diffusion = sigma**2 / (sigma**2 + 1) ** 2  # k-diffusion's soft_min_snr, sigma_data = 1 (gamma 1)
    torch.testing.assert_close(VObjective("soft_min_snr", gamma=1.0).weight(sigma), k_diffusion)
    assert torch.equal(VObjective("none").weight(sigma), torch.ones_like(sigma))


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_terminal_sample_gets_terminal_weight(weighting):
    sigma = torch.tensor([20000.0, 19999.998, 14.6146])
    weight = VObjective(weighting, terminal_weight=0.3).weight(sigma)
    assert weight[:2].tolist() == pytest.approx([0.3, 0.3])
    if weighting != "none":  # what the formula alone would give: ~2.5e-9
        assert WEIGHTINGS[weighting](sigma[:1].double(), 5.0).item() == pytest.approx(2.5e-9, rel=1e-3)
    assert VObjective(weighting).weight(sigma[:1]).item() == 1.0  # default terminal_weight


def test_weights_come_from_the_table_in_use():
    objective = VObjective("min_snr", terminal_weight=0.7)
    off, terminal, rescale = (
        NoiseSchedule(mode).scaled_table(512, 512) for mode in ("off", "terminal", "rescale")
    )
    assert objective.weight(off[-1:]).item() == pytest.approx(_min_snr_formula(off[-1].item()), rel=1e-12)
    assert objective.weight(terminal[-1:]).item() == 0.7
    assert objective.weight(rescale[-1:]).item() == 0.7
    # rescale's sigma_998 (2254 / 2 here) is finite and gets its own, post-rescale SNR weight
    assert objective.weight(rescale[-2:-1]).item() == pytest.approx(
        _min_snr_formula(rescale[-2].item()), rel=1e-12
    )


def test_loss_is_weighted_per_sample_mse_in_fp32():
    objective = VObjective("min_snr")
    sigma = torch.tensor([0.5, 3.0, 20000.0])
    x0, noise = _randn(3, 4, 8, 8, seed=14), _randn(3, 4, 8, 8, seed=15)
    v_pred = _randn(3, 4, 8, 8, seed=16)
    tag_weight = torch.tensor([1.0, 2.0, 0.5])
    loss = objective.loss(v_pred, x0, noise, sigma, sample_weight=tag_weight)
    target = (noise - append_dims(sigma, 4) * x0) / append_dims((sigma**2 + 1).sqrt(), 4)
    mse = ((v_pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = mse * torch.tensor([_min_snr_formula(0.5), _min_snr_formula(3.0), 1.0]) * tag_weight
    assert loss.shape == (3,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    perfect = objective.loss(v_target(x0, noise, sigma), x0, noise, sigma)
    assert perfect.abs().max().item() < 1e-10
    bf16 = objective.loss(v_pred.bfloat16(), x0.bfloat16(), noise.bfloat16(), sigma, tag_weight)
    assert bf16.dtype == torch.float32


def test_unknown_weighting_raises_and_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        VObjective("snr")
    assert "'snr'" in str(err.value) and all(name in str(err.value) for name in WEIGHTINGS)
