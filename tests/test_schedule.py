"""Sigma tables, ZTSNR modes, sigma <-> t, resolution scaling, sigma sampling and inference schedules,
checked against DESIGN.md values and diffusers' schedulers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

from ztsnr_ds.schedule import (
    INFERENCE_SCHEDULES,
    ZTSNR_MODES,
    NoiseSchedule,
    diffusers_scheduler_config,
    is_terminal,
    resolution_scale,
    sdxl_sigmas,
    sigma_to_t,
    t_to_sigma,
    ztsnr_sigmas,
)

DESIGN_LIST = [20000, 17.8, 12.4, 9.2, 7.2, 5.4, 3.9, 2.1, 0.9, 0.0292]
# How close diffusers' fp32 table top comes to ours: 19880 vs 20000 (terminal), 20000.01 (rescale).
TOP_RTOL = {"terminal": 1e-2, "rescale": 1e-5, "off": 1e-6}


def test_sdxl_table_check_values():
    sigmas = sdxl_sigmas()
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float64
    assert (sigmas.diff() > 0).all()
    assert sigmas[0].item() == pytest.approx(0.029167, abs=5e-7)
    assert sigmas[998].item() == pytest.approx(14.5263, abs=5e-5)
    assert sigmas[999].item() == pytest.approx(14.6146, abs=5e-5)


def test_terminal_mode_replaces_only_the_last_entry():
    plain, table = sdxl_sigmas(), ztsnr_sigmas("terminal")
    assert torch.equal(table[:999], plain[:999]) and table[999] == 20000.0
    assert ztsnr_sigmas("terminal", sigma_max=4096.0)[999] == 4096.0
    assert torch.equal(ztsnr_sigmas("off"), plain)


def test_rescale_mode_check_values():
    table = ztsnr_sigmas("rescale")
    assert table[990].item() == pytest.approx(245.95, abs=5e-3)
    assert table[900].item() == pytest.approx(18.352, abs=5e-4)
    assert table[500].item() == pytest.approx(1.7746, abs=5e-5)
    assert table[0].item() == pytest.approx(0.029167, abs=5e-7)  # Algorithm 1 keeps sigma_0
    assert table[999] == 20000.0 and (table.diff() > 0).all()


def test_off_table_equals_diffusers_scaled_linear():
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = ztsnr_sigmas("off")
    # diffusers: descending, final 0 appended, abar as an fp32 cumprod (our table is float64).
    torch.testing.assert_close(sched.sigmas[:-1].flip(0).double(), ours, rtol=2e-5, atol=0)


def test_rescale_table_equals_diffusers_rescale_zero_terminal_snr():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
    assert abar[-1] == 0  # diffusers' SNR 0; we store the stand-in sigma_max
    reference = ((1 - abar[:-1]) / abar[:-1]).sqrt()
    torch.testing.assert_close(ztsnr_sigmas("rescale")[:-1], reference, rtol=1e-9, atol=0)


@pytest.mark.parametrize("mode", ZTSNR_MODES)
def test_sigma_t_round_trips(mode):
    table = ztsnr_sigmas(mode)
    t = torch.linspace(0, 999, 3997, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, table), table), t, rtol=0, atol=1e-9)
    sigma = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(table[0].log(), table[-1].log()))
    torch.testing.assert_close(t_to_sigma(sigma_to_t(sigma, table), table), sigma, rtol=1e-12, atol=0)
    index = torch.arange(1000)
    torch.testing.assert_close(t_to_sigma(index, table), table, rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_to_t(table, table), index.double(), rtol=0, atol=1e-9)


def test_sigma_to_t_interpolates_log_sigma_and_clamps():
    table = ztsnr_sigmas("terminal")
    geometric_mid = (table[10] * table[11]).sqrt()  # halfway in log sigma, not in sigma
    assert sigma_to_t(geometric_mid, table).item() == pytest.approx(10.5, abs=1e-9)
    high = torch.tensor([20000.0, 1e9, 17.8])
    t_high = sigma_to_t(high, table)
    assert t_high.dtype == torch.float32 and t_high[0] == 999 and t_high[1] == 999
    assert 998 < t_high[2] < 999
    assert sigma_to_t(torch.tensor([1e-6, 0.0]), table).tolist() == [0.0, 0.0]
    assert sigma_to_t(torch.tensor(14.6146412), ztsnr_sigmas("off")).item() == pytest.approx(999, abs=1e-4)


def test_resolution_scale_doubles_sigma_with_the_side():
    assert resolution_scale(2048, 2048) == 2.0 and resolution_scale(512, 512) == 0.5
    assert resolution_scale(1024, 512) == pytest.approx(math.sqrt(0.5))
    for mode in ("terminal", "rescale"):
        schedule = NoiseSchedule(mode)
        big, base = schedule.scaled_table(2048, 2048), schedule.scaled_table(1024, 1024)
        torch.testing.assert_close(big[:999], 2 * base[:999], rtol=1e-15, atol=0)
        assert big[999] == base[999] == 20000.0  # the stand-in for infinity is not scaled
    off = NoiseSchedule("off")
    torch.testing.assert_close(off.scaled_table(2048, 2048), 2 * off.table, rtol=1e-15, atol=0)
    assert torch.equal(NoiseSchedule(base_area=None).scaled_table(2048, 2048), NoiseSchedule().table)


def test_scaled_table_never_passes_sigma_max():
    table = NoiseSchedule("rescale").scaled_table(16384, 16384)  # s = 16: 2254 * 16 > 20000
    assert table.max() == 20000.0 and (table.diff() >= 0).all()


def test_sample_sigmas_uniform_over_the_scaled_table():
    schedule = NoiseSchedule("terminal")
    table = schedule.scaled_table(768, 1344)
    draw = schedule.sample_sigmas(100_000, 768, 1344, torch.Generator().manual_seed(3))
    assert draw.shape == (100_000,) and draw.dtype == torch.float32
    index = torch.searchsorted(table.float(), draw)
    assert torch.equal(table.float()[index], draw)  # every draw is a table entry
    counts = torch.bincount(index, minlength=1000).double()
    chi2 = ((counts - 100) ** 2 / 100).sum().item()  # 999 dof: mean 999, sd 45
    assert counts.min() > 0 and chi2 < 1250
    again = schedule.sample_sigmas(100_000, 768, 1344, torch.Generator().manual_seed(3))
    other = schedule.sample_sigmas(100_000, 768, 1344, torch.Generator().manual_seed(4))
    assert torch.equal(draw, again) and not torch.equal(draw, other)


def test_timestep_uses_the_unscaled_table():
    schedule = NoiseSchedule("terminal")
    sigma = schedule.scaled_table(512, 512)[[0, 500, 998, 999]].float()
    t = schedule.timestep(sigma)
    assert t.dtype == torch.float32
    assert t[3] == 999  # sigma_max maps to 999 at any resolution
    torch.testing.assert_close(t, sigma_to_t(sigma.double(), schedule.table).float())
    assert t[1] < 500  # half the sigma -> an earlier timestep


def test_is_terminal():
    sigma = torch.tensor([20000.0, 19880.0, 14.6146, 2254.0 * 4])
    assert is_terminal(sigma, 20000.0).tolist() == [True, True, False, False]
    assert is_terminal(torch.tensor(20000.0, dtype=torch.bfloat16), 20000.0)  # bf16 reads 19968
    assert not NoiseSchedule("off").is_terminal(NoiseSchedule("off").table).any()


def test_trailing_schedule_is_resolution_scaled():
    schedule = NoiseSchedule("terminal")
    sigmas = schedule.inference_sigmas("trailing", 10, 1024, 1024)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    assert sigmas[0] == 20000.0 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    torch.testing.assert_close(sigmas[1:-1], schedule.table[[899 - 100 * k for k in range(9)]].float())
    half = schedule.inference_sigmas("trailing", 10, 512, 512)
    torch.testing.assert_close(half[1:], sigmas[1:] / 2)
    assert half[0] == 20000.0


@pytest.mark.parametrize("steps", [1, 3, 10, 16, 28])
@pytest.mark.parametrize("mode", ["terminal", "rescale"])
def test_trailing_schedule_matches_diffusers(mode, steps):
    schedule = NoiseSchedule(mode)
    sigmas = schedule.inference_sigmas("trailing", steps, 1024, 1024)
    sched = EulerDiscreteScheduler.from_config(diffusers_scheduler_config(schedule))
    sched.set_timesteps(steps)  # timestep_spacing="trailing" from the exported config
    assert sched.timesteps[0] == 999 and sigmas[0] == 20000.0  # diffusers reads its top as 19880
    torch.testing.assert_close(sigmas[1:], sched.sigmas[1:], rtol=2e-5, atol=0)


@pytest.mark.parametrize("mode", ["terminal", "rescale"])
def test_karras_schedule_prepends_sigma_max(mode):
    schedule = NoiseSchedule(mode)
    sigmas = schedule.inference_sigmas("karras", 8, 512, 512)
    assert sigmas.shape == (9,) and sigmas[0] == 20000.0 and sigmas[-1] == 0
    lo, hi = 0.029167158 / 2, 14.614641 / 2
    reference = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=lo, sigma_max=hi)
    reference.set_timesteps(7)
    torch.testing.assert_close(sigmas[1:], reference.sigmas, rtol=1e-6, atol=0)
    assert schedule.inference_sigmas("karras", 1, 1024, 1024).tolist() == [20000.0, 0.0]


def test_karras_schedule_off_mode_has_no_terminal_level():
    sigmas = NoiseSchedule("off").inference_sigmas("karras", 6, 1024, 1024)
    reference = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.029167158, sigma_max=14.614641)
    reference.set_timesteps(6)
    torch.testing.assert_close(sigmas, reference.sigmas, rtol=1e-6, atol=0)


def test_explicit_schedule_is_used_as_given():
    schedule = NoiseSchedule()
    sigmas = schedule.inference_sigmas(DESIGN_LIST, None, 512, 512)
    assert sigmas.tolist() == torch.tensor(DESIGN_LIST + [0.0]).tolist()
    assert torch.equal(schedule.inference_sigmas(DESIGN_LIST + [0.0], 10, 512, 512), sigmas)
    with pytest.raises(ValueError, match="10 steps but steps=28"):
        schedule.inference_sigmas(DESIGN_LIST, 28, 512, 512)
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedule.inference_sigmas([1.0, 2.0, 0.0], None, 512, 512)


def test_unknown_names_raise_and_list_valid_ones():
    with pytest.raises(ValueError) as err:
        NoiseSchedule("zsnr")
    assert "'zsnr'" in str(err.value) and all(mode in str(err.value) for mode in ZTSNR_MODES)
    with pytest.raises(ValueError) as err:
        NoiseSchedule().inference_sigmas("linspace", 10, 1024, 1024)
    assert "'linspace'" in str(err.value) and all(name in str(err.value) for name in INFERENCE_SCHEDULES)


@pytest.mark.parametrize("mode", ZTSNR_MODES)
def test_diffusers_config_reproduces_the_table(mode):
    schedule = NoiseSchedule(mode)
    config = json.loads(json.dumps(diffusers_scheduler_config(schedule)))  # what export writes
    sched = EulerDiscreteScheduler.from_config(config)
    assert sched.config.prediction_type == "v_prediction"
    theirs = sched.sigmas[:-1].flip(0).double()
    torch.testing.assert_close(theirs[:999], schedule.table[:999], rtol=2e-5, atol=0)
    assert theirs[999].item() == pytest.approx(schedule.table[999].item(), rel=TOP_RTOL[mode])


@pytest.mark.parametrize(("side", "levels", "top_t"), [(1536, 71, 1064.95), (2048, 125, 1112.45)])
def test_timesteps_above_the_base_area_continue_the_last_log_slope(side, levels, top_t):
    """s * sigma_i > sigma_998 for the top 71 (s = 1.5) / 125 (s = 2) finite levels: they get timesteps
    998 + log(sigma / sigma_998) / log(sigma_998 / sigma_997), strictly increasing a level at a time, where
    interpolating towards sigma_max squeezed them into [998, 998.1]; sigma_max stays 999."""
    schedule = NoiseSchedule("terminal")
    table = schedule.table
    sigma = schedule.scaled_table(side, side)  # (1000,) float64
    high = sigma[:999] > table[998]
    assert high.sum() == levels
    t = schedule.timestep(sigma.float())
    slope = (table[998] / table[997]).log()
    expected = 998 + (sigma[:999][high] / table[998]).log() / slope
    torch.testing.assert_close(t[:999][high].double(), expected, rtol=0, atol=2e-3)
    assert t[998].item() == pytest.approx(top_t, abs=0.01) and t[999] == 999
    assert (t[:999].diff() > 0.8).all()  # one level ~ one timestep, all distinct
    old = sigma_to_t(sigma[:999][high], table)
    assert old.max() - old.min() < 0.1  # interpolating towards 20000: 0.056 (s = 1.5), 0.096 (s = 2)
    base = NoiseSchedule("terminal").scaled_table(1024, 1024).float()  # at the base area nothing changes
    assert torch.equal(schedule.timestep(base), sigma_to_t(base, table))


def test_timestep_terminal_and_off_modes():
    terminal = NoiseSchedule("terminal").timestep(torch.tensor([20000.0, 19880.0, 19968.0, 17.8]))
    assert terminal[:3].tolist() == [999.0] * 3 and 1031 < terminal[3] < 1032  # 17.8 is finite
    off = NoiseSchedule("off")
    t = off.timestep(off.scaled_table(2048, 2048).float())
    slope = (off.table[999] / off.table[998]).log().item()
    assert t[999].item() == pytest.approx(999 + math.log(2) / slope, abs=2e-3)  # off: no terminal level
    assert (t.diff() > 0.8).all()
    rescale = NoiseSchedule("rescale")
    t = rescale.timestep(rescale.scaled_table(2048, 2048).float())
    assert t[999] == 999 and (t[:999].diff() > 0).all()


def clients_rescale(sigmas: torch.Tensor) -> torch.Tensor:
    """Lin et al. Alg. 1 in sigma form as the clients do it (`rescale_zero_terminal_snr_sigmas`): sqrt(abar)
    shifted to 0 at the end and scaled back at the start; the last abar := 4.8973451890853435e-8."""
    root = (1 / (sigmas * sigmas + 1)).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    abar = root**2
    abar[-1] = 4.8973451890853435e-08
    return ((1 - abar) / abar).sqrt()


def test_rescaling_lins_table_again_moves_44_levels():
    """docs/reforge.md: a `ztsnr` file gives Lin's table (our `rescale` below t = 999), and reForge
    rescales it again before each generation: 44 levels (t = 955..998) move by more than 1%, sigma at
    t = 998 goes from 2254 to 4497."""
    lin = clients_rescale(NoiseSchedule("off").table.double())
    ours = NoiseSchedule("rescale").table.double()
    torch.testing.assert_close(lin[:999], ours[:999], rtol=1e-9, atol=0)
    twice = clients_rescale(lin)
    moved = torch.nonzero((twice - lin).abs() / lin > 0.01).flatten().tolist()
    assert moved == list(range(955, 999))
    assert lin[998].item() == pytest.approx(2254.24, abs=0.01)
    assert twice[998].item() == pytest.approx(4497.24, abs=0.01)
