"""v-prediction with sigma_data = 1: preconditioning, training target, denoiser output, loss weights.

The EDM preconditioning (Karras et al. 2022, Table 1) with sigma_data = 1 makes the network output F a
v-prediction (Salimans & Ho 2022): F's target is v = (eps - sigma * x0) / sqrt(sigma^2 + 1), which stays
finite at the ZTSNR terminal level (v -> -x0). Per-sample quantities are (B,) tensors broadcast with
`append_dims`; losses return (B,) and the caller reduces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ztsnr_ds.schedule import is_terminal


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts against (B, C, H, W)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target ndim is {ndim}, which is less")
    return x[(...,) + (None,) * missing]


def c_in(sigma: Tensor) -> Tensor:
    """Input scale c_in = 1 / sqrt(sigma^2 + 1): unit-variance UNet input (EDM Table 1, sigma_data = 1)."""
    return (sigma**2 + 1).rsqrt()


def c_skip(sigma: Tensor) -> Tensor:
    """Skip scale c_skip = 1 / (sigma^2 + 1) (EDM Table 1, sigma_data = 1)."""
    return 1 / (sigma**2 + 1)


def c_out(sigma: Tensor) -> Tensor:
    """Output scale c_out = -sigma / sqrt(sigma^2 + 1); the minus sign makes F a v-prediction."""
    return -sigma * (sigma**2 + 1).rsqrt()


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Noised latent x = x0 + sigma * eps. Shape: x0, noise (B, ...), sigma (B,)."""
    return x0 + append_dims(sigma, x0.ndim) * noise


def v_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """v = (eps - sigma * x0) / sqrt(sigma^2 + 1) = c_in * eps + c_out * x0 (Salimans & Ho 2022, sec. 4).

    Written with c_in and c_out so no sigma * x0 ~ 2e4 intermediate is formed. Shape: like x0.
    """
    return append_dims(c_in(sigma), x0.ndim) * noise + append_dims(c_out(sigma), x0.ndim) * x0


def denoised_from_v(x: Tensor, v_pred: Tensor, sigma: Tensor) -> Tensor:
    """Denoiser output D = c_skip * x + c_out * F (EDM eq. 7). With F = v it returns x0 exactly."""
    return append_dims(c_skip(sigma), x.ndim) * x + append_dims(c_out(sigma), x.ndim) * v_pred


def v_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """Inverse of `denoised_from_v`: F = (D - c_skip * x) / c_out. Needs sigma > 0."""
    return (denoised - append_dims(c_skip(sigma), x.ndim) * x) / append_dims(c_out(sigma), x.ndim)


def min_snr_weight(sigma: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma in v-space: w = min(SNR, gamma) / (SNR + 1), SNR = 1 / sigma^2.

    Hang et al. 2023, sec. 3.4 (the x0-space weight min(SNR, gamma) divided by SNR + 1).
    """
    snr = sigma.pow(-2)
    return snr.clamp(max=gamma) / (snr + 1)


def soft_min_snr_weight(sigma: Tensor, gamma: float) -> Tensor:
    """Smooth Min-SNR: x0-space weight 1 / (sigma^2 + 1/gamma) (harmonic soft min of SNR and gamma) times
    c_out^2 = sigma^2 / (sigma^2 + 1) for v-space. gamma = 1 is k-diffusion's soft_min_snr weighting.
    """
    return sigma**2 / ((sigma**2 + 1 / gamma) * (sigma**2 + 1))


def _no_weight(sigma: Tensor, gamma: float) -> Tensor:
    """Unweighted v-MSE: w = 1."""
    return torch.ones_like(sigma)


WEIGHTINGS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "min_snr": min_snr_weight,
    "soft_min_snr": soft_min_snr_weight,
    "none": _no_weight,
}


class VObjective:
    """Per-sample v-prediction loss  w(sigma) * sample_weight * mean((F - v)^2).

    Weights come from the sigma actually trained on (the ZTSNR, resolution-scaled table), so SNR is
    never taken from the pre-rescale table. At the terminal level (sigma >= sigma_max) every weighting
    gives ~2.5e-9 or 1, so it is replaced by `terminal_weight` (Min-SNR's reference code sets SNR = 0 to 1).
    """

    def __init__(
        self,
        weighting: str = "min_snr",
        gamma: float = 5.0,
        terminal_weight: float = 1.0,
        sigma_max: float = 20000.0,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.gamma = gamma
        self.terminal_weight = terminal_weight
        self.sigma_max = sigma_max

    def weight(self, sigma: Tensor) -> Tensor:
        """Loss weight per sample. Shape: (B,) -> (B,), in sigma's dtype."""
        w = WEIGHTINGS[self.weighting](sigma, self.gamma)
        return torch.where(is_terminal(sigma, self.sigma_max), self.terminal_weight, w)

    def loss(
        self, v_pred: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor, sample_weight: Tensor | None = None
    ) -> Tensor:
        """Weighted v-MSE per sample, in fp32 whatever the input dtypes.

        Shape: v_pred, x0, noise (B, C, h, w); sigma, sample_weight (B,) -> (B,) float32.
        """
        sigma = sigma.float()
        target = v_target(x0.float(), noise.float(), sigma)
        loss = (v_pred.float() - target).pow(2).flatten(1).mean(1) * self.weight(sigma)  # (B,)
        return loss if sample_weight is None else loss * sample_weight.float()
