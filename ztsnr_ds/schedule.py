"""Noise levels for SDXL with Zero Terminal SNR (ZTSNR): sigma tables, sigma <-> timestep, resolution
scaling, training sigma sampling and inference schedules.

sigma is the currency: x = x0 + sigma * eps. Timesteps t exist only to tell the UNet where a sigma sits on
SDXL's 1000-entry table (k-diffusion's `DiscreteSchedule` convention). References: Ossa et al. 2024
(NovelAI Diffusion V3, arXiv 2409.15997), Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
Steps are Flawed"), Karras et al. 2022 (EDM).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ZTSNR_MODES = ("terminal", "rescale", "off")
INFERENCE_SCHEDULES = ("trailing", "karras")
NUM_TRAIN_TIMESTEPS = 1000
SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012
KARRAS_RHO = 7.0  # EDM (Karras et al. 2022), eq. 5
# sigma >= sigma_max * (1 - TERMINAL_RTOL) counts as the terminal (infinite-noise) level. Wide enough for
# bf16 (20000 reads 19968) and diffusers' fp32 table (top sigma 19880); the next-largest table entries are
# far below (terminal: 14.6 * s, rescale: 2254 * s).
TERMINAL_RTOL = 1e-2


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma = sqrt((1 - abar) / abar): VP (DDPM) signal level -> VE noise level. abar = 0 gives inf."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def alphas_cumprod_from_sigmas(sigmas: Tensor) -> Tensor:
    """abar = 1 / (1 + sigma^2), the inverse of `sigmas_from_alphas_cumprod`."""
    return 1 / (1 + sigmas**2)


def sdxl_sigmas(
    num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = SDXL_BETA_START, beta_end: float = SDXL_BETA_END
) -> Tensor:
    """SDXL's discrete noise levels ("scaled_linear" betas of latent diffusion), ascending.

    beta_i = linspace(sqrt(beta_start), sqrt(beta_end), N)_i^2,  abar_i = prod_{j<=i} (1 - beta_j),
    sigma_i = sqrt((1 - abar_i) / abar_i).   sigma_0 = 0.029167, sigma_999 = 14.6146.
    Shape: (N,) float64.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, dim=0))


def _rescale_zero_terminal_snr(sigmas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1 in sigma form: s = sqrt(abar); s <- (s - s_T) * s_0 / (s_0 - s_T).

    Keeps sigma_0 and makes the last level pure noise (sigma_T = inf).
    """
    s = alphas_cumprod_from_sigmas(sigmas).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return sigmas_from_alphas_cumprod(s**2)


def check_mode(mode: str) -> None:
    """Raise ValueError for a ZTSNR mode that does not exist, naming the valid ones."""
    if mode not in ZTSNR_MODES:
        raise ValueError(f"unknown ZTSNR mode {mode!r}; valid modes: {', '.join(ZTSNR_MODES)}")


def ztsnr_sigmas(mode: str = "terminal", sigma_max: float = 20000.0) -> Tensor:
    """SDXL's table with Zero Terminal SNR, ascending; sigma_max is the finite stand-in for infinity.

    terminal (NAI V3): SDXL table with sigma_999 := sigma_max.
    rescale (Lin et al. 2023 Alg. 1): rescaled table (sigma_990 = 245.95), infinite sigma_999 := sigma_max.
    off: the plain SDXL table (top 14.6146), for comparison runs.
    Shape: (1000,) float64.
    """
    check_mode(mode)
    sigmas = sdxl_sigmas()
    if mode == "rescale":
        sigmas = _rescale_zero_terminal_snr(sigmas)
    if mode != "off":
        sigmas[-1] = sigma_max
    return sigmas


def is_terminal(sigma: Tensor, sigma_max: float) -> Tensor:
    """True where sigma is the terminal level: sigma >= sigma_max up to TERMINAL_RTOL. Bool, like sigma."""
    return sigma >= sigma_max * (1 - TERMINAL_RTOL)


def sigma_to_t(sigma: Tensor, table: Tensor) -> Tensor:
    """Timestep of a noise level by piecewise-linear interpolation of log sigma (k-diffusion sigma_to_t).

    For table[i] <= sigma <= table[i+1]: t = i + (log sigma - log table[i]) / (log table[i+1] - log table[i]),
    clamped to [0, N-1] (so sigma_max and anything above maps to N-1, sigma <= table[0] to 0).
    Shape: sigma (...) any float dtype, table (N,) ascending -> t (...) in sigma's dtype.
    """
    log_table = table.to(sigma.device).log()
    log_sigma = sigma.to(log_table.dtype).log().reshape(-1)  # (M,)
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    w = (log_sigma - log_table[low]) / (log_table[low + 1] - log_table[low])
    return (low + w.clamp(0, 1)).reshape(sigma.shape).to(sigma.dtype)


def timestep_of(sigma: Tensor, table: Tensor, terminal: bool) -> Tensor:
    """UNet timestep of a noise level over an ascending table whose top entry stands for infinity when
    `terminal` (the ZTSNR modes): terminal sigmas (`is_terminal` of the top) map to N-1 exactly; finite
    sigmas interpolate log sigma over the K finite entries (`sigma_to_t`) and, above the last one,
    continue its last step's log slope instead of clamping:

        t = (K - 1) + (log sigma - log table[K-1]) / (log table[K-1] - log table[K-2]).

    Resolution-scaled levels above the base area (s * sigma_i > sigma_998 = 14.53 in `terminal` mode)
    thus get as distinct timesteps as the levels below (t up to 998 + log(s) / 0.00606: 1065 at s = 1.5,
    1112 at s = 2), where interpolating towards sigma_max = 20000 squeezed them into [998, 998.06];
    at or below the base area nothing changes. Shape: sigma (...) -> t (...) in sigma's dtype.
    """
    finite = table[:-1] if terminal else table
    log_top, log_below = finite[-1].log(), finite[-2].log()
    t = sigma_to_t(sigma, finite)
    above = (len(finite) - 1) + (sigma.to(table.dtype).log() - log_top) / (log_top - log_below)
    t = torch.where(sigma.to(table.dtype) > finite[-1], above.to(t.dtype), t)
    if terminal:
        t = torch.where(is_terminal(sigma, float(table[-1])), float(len(table) - 1), t)
    return t


def t_to_sigma(t: Tensor, table: Tensor) -> Tensor:
    """Noise level of a (fractional) timestep, the inverse of `sigma_to_t` (k-diffusion t_to_sigma).

    log sigma = (1 - w) log table[floor t] + w log table[ceil t], w = t - floor t; t clamped to [0, N-1].
    Shape: t (...) -> sigma (...) in t's dtype (the table's for integer t).
    """
    dtype = t.dtype if t.is_floating_point() else table.dtype
    log_table = table.to(t.device).log()
    t = t.to(log_table.dtype).clamp(0, len(table) - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * log_table[low] + w * log_table[high]).exp().to(dtype)


def resolution_scale(height: int, width: int, base_area: int = 1024 * 1024) -> float:
    """Noise scale of an H x W image, s = sqrt(H * W / base_area): doubling the side doubles sigma.

    NAI V3 (Ossa et al. 2024, sec. 2.3); SD3's resolution shift (Esser et al. 2024) written in sigma.
    """
    return math.sqrt(height * width / base_area)


def scale_sigmas(sigmas: Tensor, scale: float, sigma_max: float) -> Tensor:
    """Resolution-scaled noise levels: sigma' = min(s * sigma, sigma_max); terminal levels stay sigma_max.

    sigma_max stands in for infinity, which no scaling changes and no finite level may pass.
    Shape: like sigmas.
    """
    scaled = torch.where(is_terminal(sigmas, sigma_max), sigma_max, sigmas * scale)
    return scaled.clamp(max=sigma_max)


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final noise level 0 (the sampler's last step lands on the denoised image)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def trailing_sigmas(table: Tensor, steps: int) -> Tensor:
    """Lin et al. 2023 "trailing" spacing (diffusers timestep_spacing="trailing"), descending, final 0.

    t_k = round(N - k * N / steps) - 1, k = 0..steps-1, so sampling starts at the last table entry.
    Shape: table (N,) -> (steps + 1,).
    """
    n = len(table)
    t = np.round(np.arange(n, 0, -n / steps)) - 1  # numpy, as diffusers: same rounding of .5 ties
    return append_zero(table[torch.from_numpy(t).long()])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. 2022 (EDM) eq. 5, then a final 0 (k-diffusion get_sigmas_karras):
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < steps.
    Shape: (steps + 1,) float64.
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def explicit_sigmas(sigmas: list[float], steps: int | None) -> Tensor:
    """A user-given schedule, used as given (not resolution-scaled), with a final 0 appended if absent.

    Raises ValueError unless the levels are positive and strictly decreasing and `steps` is None or
    the number of levels. Shape: (steps + 1,) float64.
    """
    levels = torch.tensor(sigmas, dtype=torch.float64)
    if len(levels) and levels[-1] == 0:
        levels = levels[:-1]
    if len(levels) == 0 or (levels <= 0).any() or (levels.diff() >= 0).any():
        raise ValueError(f"an explicit sigma schedule must be positive and strictly decreasing, got {sigmas}")
    if steps is not None and steps != len(levels):
        raise ValueError(
            f"explicit sigma schedule has {len(levels)} steps but steps={steps}; pass steps=None"
        )
    return append_zero(levels)


def betas_from_sigmas(sigmas: Tensor) -> Tensor:
    """DDPM betas that reproduce a sigma table: abar_i = 1 / (1 + sigma_i^2), beta_0 = 1 - abar_0,
    beta_i = 1 - abar_i / abar_{i-1}. Shape: (N,) -> (N,).
    """
    abar = alphas_cumprod_from_sigmas(sigmas.to(torch.float64))
    return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])


class NoiseSchedule:
    """The noise levels of one run: the ZTSNR table, resolution scaling, t(sigma) and sigma sampling.

    base_area None turns resolution scaling off. In mode `off` the table tops out at 14.6146 < sigma_max,
    so every entry scales and nothing is terminal.
    """

    def __init__(
        self, mode: str = "terminal", sigma_max: float = 20000.0, base_area: int | None = 1024 * 1024
    ):
        self.table = ztsnr_sigmas(mode, sigma_max)  # (1000,) float64, unscaled
        self._tables = {self.table.device: self.table}  # per device: copied once, not at every step
        self.mode = mode
        self.sigma_max = sigma_max
        self.base_area = base_area

    def scale(self, height_px: int, width_px: int) -> float:
        """Resolution noise scale s of an H x W pixel bucket (1.0 without resolution scaling)."""
        return 1.0 if self.base_area is None else resolution_scale(height_px, width_px, self.base_area)

    def scaled_table(self, height_px: int, width_px: int) -> Tensor:
        """The table for an H x W pixel bucket. Shape: (1000,) float64."""
        return scale_sigmas(self.table, self.scale(height_px, width_px), self.sigma_max)

    def sample_sigmas(self, n: int, height_px: int, width_px: int, generator: torch.Generator) -> Tensor:
        """Training noise levels: i ~ Uniform{0..999} per sample, sigma = scaled_table[i].

        Shape: (n,) float32 on the generator's device.
        """
        index = torch.randint(0, len(self.table), (n,), generator=generator, device=generator.device)
        return self.scaled_table(height_px, width_px).to(generator.device)[index].float()

    def timestep(self, sigma: Tensor) -> Tensor:
        """UNet timestep of a (scaled) sigma over the UNSCALED table (`timestep_of`): sigma_max -> 999,
        finite sigmas above the last finite entry extrapolated past it. Float32, like sigma."""
        if sigma.device not in self._tables:  # a copy from pageable memory would sync the host each call
            self._tables[sigma.device] = self.table.to(sigma.device)
        return timestep_of(sigma.float(), self._tables[sigma.device], self.mode != "off")

    def is_terminal(self, sigma: Tensor) -> Tensor:
        """True where sigma is the terminal level sigma_max (see `is_terminal`)."""
        return is_terminal(sigma, self.sigma_max)

    def inference_sigmas(
        self, schedule: str | list[float], steps: int | None, height_px: int, width_px: int
    ) -> Tensor:
        """Sampling noise levels, descending, ending with 0. Shape: (steps + 1,) float32.

        trailing: `trailing_sigmas` of the resolution-scaled table (first level sigma_max in ZTSNR modes).
        karras: EDM rho = 7 ramp from the scaled SDXL top 14.6146 down to the scaled sigma_0. In ZTSNR modes
          sigma_max is prepended and the ramp has steps - 1 levels, so `steps` counts all model calls.
        list: explicit levels, see `explicit_sigmas`.
        """
        if not isinstance(schedule, str):
            return explicit_sigmas(schedule, steps).float()
        if schedule not in INFERENCE_SCHEDULES:
            raise ValueError(
                f"unknown inference schedule {schedule!r}; valid: {', '.join(INFERENCE_SCHEDULES)} "
                "or a list of sigmas"
            )
        if steps is None or steps < 1:
            raise ValueError(f"schedule {schedule!r} needs steps >= 1, got {steps}")
        table = self.scaled_table(height_px, width_px)
        if schedule == "trailing":
            return trailing_sigmas(table, steps).float()
        s = self.scale(height_px, width_px)
        if self.mode == "off":
            return karras_sigmas(steps, float(table[0]), float(table[-1])).float()
        ramp = karras_sigmas(steps - 1, float(table[0]), float(sdxl_sigmas()[-1]) * s)
        return torch.cat([ramp.new_full((1,), self.sigma_max), ramp]).float()


def diffusers_scheduler_config(schedule: NoiseSchedule) -> dict:
    """Config of a diffusers EulerDiscreteScheduler that samples `schedule`'s model (written next to exports).

    v-prediction, trailing spacing (Lin et al. 2023), and in ZTSNR modes `trained_betas` that reproduce the
    table (`betas_from_sigmas`). diffusers rebuilds abar as an fp32 cumprod: its top sigma reads 19880 for
    sigma_max = 20000 (1 - beta_999 is a few fp32 ulps), the other entries agree to 1.3e-5 relative.
    Resolution scaling is not in it: give diffusers scaled sigmas via `set_timesteps(sigmas=...)`.
    JSON-serialisable; `EulerDiscreteScheduler.from_config(cfg)` builds it.
    """
    trained = None if schedule.mode == "off" else betas_from_sigmas(schedule.table).tolist()
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": SDXL_BETA_START,
        "beta_end": SDXL_BETA_END,
        "beta_schedule": "scaled_linear",
        "trained_betas": trained,
        "prediction_type": "v_prediction",
        "interpolation_type": "linear",
        "timestep_spacing": "trailing",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
        "use_karras_sigmas": False,
    }
