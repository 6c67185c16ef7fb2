"""The ztsnr_ds noise table and its sigma -> timestep rule, self-contained (torch only) for ComfyUI.

ComfyUI users do not have ztsnr_ds installed, so this is a copy of the few functions of
`ztsnr_ds.schedule` the node needs, with the same operations in the same order; tests/test_comfyui.py
checks that every result is bit-identical to ztsnr_ds.schedule's. Change both together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("terminal", "rescale", "off")
NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SDXL's scaled_linear betas
TERMINAL_RTOL = 1e-2  # sigma >= sigma_max * (1 - rtol) is the terminal level (ztsnr_ds.schedule)


def sdxl_sigmas() -> Tensor:
    """SDXL's 1000 levels: beta_i = linspace(sqrt(b0), sqrt(b1))_i^2, abar = cumprod(1 - beta),
    sigma = sqrt((1 - abar) / abar). Shape (1000,) float64, ascending."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    return ((1 - abar) / abar).sqrt()


def rescaled_sigmas(sigmas: Tensor) -> Tensor:
    """Lin et al. 2023 Alg. 1 in sigma form: s = sqrt(abar); s <- (s - s_T) s_0 / (s_0 - s_T); last = inf."""
    s = (1 / (1 + sigmas**2)).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    abar = s**2
    return ((1 - abar) / abar).sqrt()


def ztsnr_sigmas(mode: str, sigma_max: float) -> Tensor:
    """The training table: terminal = SDXL's with sigma_999 := sigma_max; rescale = Lin's with
    sigma_999 := sigma_max; off = SDXL's. Shape (1000,) float64, ascending."""
    if mode not in MODES:
        raise ValueError(f"unknown ZTSNR mode {mode!r}; valid modes: {', '.join(MODES)}")
    sigmas = sdxl_sigmas()
    if mode == "rescale":
        sigmas = rescaled_sigmas(sigmas)
    if mode != "off":
        sigmas[-1] = sigma_max
    return sigmas


def resolution_scale(height: int, width: int, base_area: int | None) -> float:
    """s = sqrt(H * W / base_area) (NAI V3 sec. 2.3); 1 without resolution scaling (base_area None)."""
    return 1.0 if base_area is None else math.sqrt(height * width / base_area)


def is_terminal(sigma: Tensor, sigma_max: float) -> Tensor:
    return sigma >= sigma_max * (1 - TERMINAL_RTOL)


def scale_sigmas(sigmas: Tensor, scale: float, sigma_max: float) -> Tensor:
    """sigma' = min(s * sigma, sigma_max); the terminal level stays sigma_max."""
    scaled = torch.where(is_terminal(sigmas, sigma_max), sigma_max, sigmas * scale)
    return scaled.clamp(max=sigma_max)


def sigma_to_t(sigma: Tensor, table: Tensor) -> Tensor:
    """t = i + (log sigma - log table[i]) / (log table[i+1] - log table[i]), clamped to [0, N-1]."""
    log_table = table.to(sigma.device).log()
    log_sigma = sigma.to(log_table.dtype).log().reshape(-1)
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    w = (log_sigma - log_table[low]) / (log_table[low + 1] - log_table[low])
    return (low + w.clamp(0, 1)).reshape(sigma.shape).to(sigma.dtype)


def timestep_of(sigma: Tensor, table: Tensor, terminal: bool) -> Tensor:
    """Training's timestep of a noise level: sigma_max -> N-1 when `terminal`; finite sigmas interpolate
    log sigma over the finite entries and continue the last step's log slope above them.
    Shape: sigma (...) -> t (...) in sigma's dtype."""
    finite = table[:-1] if terminal else table
    log_top, log_below = finite[-1].log(), finite[-2].log()
    t = sigma_to_t(sigma, finite)
    above = (len(finite) - 1) + (sigma.to(table.dtype).log() - log_top) / (log_top - log_below)
    t = torch.where(sigma.to(table.dtype) > finite[-1], above.to(t.dtype), t)
    if terminal:
        t = torch.where(is_terminal(sigma, float(table[-1])), float(len(table) - 1), t)
    return t
