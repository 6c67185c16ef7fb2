"""Reconstruction metrics of images in [-1, 1], per sample: PSNR and SSIM (Wang et al. 2004).

Both are computed on [0, 1] intensities (x / 2 + 0.5, clamped), the range their constants assume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, sec. III-C
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) on [0, 1] intensities. Shape: (B, C, H, W) x2 -> (B,)."""
    mse = (to_unit(x) - to_unit(y)).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian. Shape: (size, size)."""
    g = torch.exp(-((torch.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over channels and valid window positions (Wang et al. 2004, eq. 13):

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = 1; local statistics under an 11 x 11 Gaussian (sigma 1.5), windows
    shrunk to the image for crops smaller than 11 px. Shape: (B, C, H, W) x2 -> (B,).
    """
    x, y = to_unit(x), to_unit(y)
    channels = x.shape[1]
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    window = gaussian_window(size).to(x.device).expand(channels, 1, size, size)  # depthwise

    def local(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local(x), local(y)
    var_x = local(x * x) - mu_x**2
    var_y = local(y * y) - mu_y**2
    cov = local(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    score = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)
