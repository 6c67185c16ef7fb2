"""Euler sampling in sigma (k-diffusion style) for validation images: the SDXL denoiser wrapper,
classifier-free guidance with optional CFG-rescale, the sampler loop, and diffusers' Euler scheduler
with this package's sigma -> timestep rule.

A denoiser is any callable D(x, sigma, **cond) -> denoised latents (fp32); the sampler only sees D.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor
from tqdm.auto import tqdm

from ztsnr_ds.objective import append_dims, c_in, denoised_from_v, v_from_denoised
from ztsnr_ds.schedule import NoiseSchedule, timestep_of
from ztsnr_ds.text import join_contexts

Denoiser = Callable[..., Tensor]


class SDXLDenoiser:
    """D(x; sigma) of an SDXL v-prediction UNet: F = unet(c_in x, t(sigma), text, added conds),
    D = c_skip x + c_out F (EDM preconditioning with sigma_data = 1, see `objective`).
    """

    def __init__(self, unet: UNet2DConditionModel, schedule: NoiseSchedule):
        self.unet = unet
        self.schedule = schedule

    def __call__(
        self, x: Tensor, sigma: Tensor, encoder_hidden_states: Tensor, text_embeds: Tensor, time_ids: Tensor,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Shape: x (B, 4, h, w); sigma (B,) or scalar; encoder_hidden_states (B, L, D); text_embeds (B, P);
        time_ids (B, 6); encoder_attention_mask (B, L) or None (1: a real token, 0: padding of a shorter
        prompt, see text.join_contexts) -> D (B, 4, h, w) float32. The UNet runs in its own dtype; t stays
        fp32 (bf16 would round t = 998.03 to 996).
        """
        x = x.float()
        sigma = sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        dtype = self.unet.dtype
        v = self.unet(
            (append_dims(c_in(sigma), x.ndim) * x).to(dtype),
            self.schedule.timestep(sigma),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            encoder_attention_mask=encoder_attention_mask,
            added_cond_kwargs={"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
        ).sample
        return denoised_from_v(x, v.float(), sigma)


class ZTSNREulerDiscreteScheduler(EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler with training's t(sigma) (`schedule.timestep_of`) for sigmas it is
    given (`set_timesteps(sigmas=...)`, `pipe(sigmas=...)`): the stock one clamps every finite sigma above
    its second-highest level into [998, 999], which for resolution-scaled sigmas above the base area (and
    explicit lists such as 17.8) is not the timestep the model was trained with. With `trained_betas`
    (the ZTSNR export) the top level is terminal. Loads from an export: `.from_pretrained(OUT,
    subfolder="scheduler")`.
    """

    def _sigma_to_t(self, sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
        table = torch.from_numpy(np.exp(np.asarray(log_sigmas, dtype=np.float64)))  # (N,) ascending
        sigma = torch.as_tensor(np.asarray(sigma, dtype=np.float64))
        return timestep_of(sigma, table, self.config.trained_betas is not None).numpy()


def rescale_cfg(v_cfg: Tensor, v_cond: Tensor, phi: float) -> Tensor:
    """CFG-rescale (Lin et al. 2023, Alg. 2): v = phi * v_cfg * std(v_cond) / std(v_cfg) + (1 - phi) * v_cfg,
    std per sample over all other dims. Undoes the over-exposure strong guidance causes with ZTSNR.
    Shape: (B, ...) -> (B, ...).
    """
    dims = list(range(1, v_cfg.ndim))
    ratio = v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    return phi * v_cfg * ratio + (1 - phi) * v_cfg


def cfg_denoise(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    cond: dict,
    uncond: dict | None,
    cfg_scale: float,
    cfg_rescale: float,
) -> Tensor:
    """Guided D: D = D_u + g * (D_c - D_u) (Ho & Salimans 2022), cond and uncond in one batched call.

    With cfg_rescale > 0 the rescale works on v (D and v are affine in each other for fixed x and sigma,
    so guidance itself is the same in both; the std ratio is not). uncond None: D_c alone.
    Shape: x (B, ...), sigma (B,) -> (B, ...).
    """
    if uncond is None:
        return denoiser(x, sigma, **cond)
    context = "encoder_hidden_states", "encoder_attention_mask"
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond if k not in context}  # (2B, ...): uncond first
    # prompts of different lengths (77 k tokens): the shorter zero-padded and masked (text.join_contexts)
    embeds, mask = join_contexts([uncond[context[0]], cond[context[0]]],
                                 [uncond.get(context[1]), cond.get(context[1])])
    both |= {context[0]: embeds} | ({context[1]: mask} if mask is not None else {})
    d_uncond, d_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
    denoised = d_uncond + cfg_scale * (d_cond - d_uncond)
    if cfg_rescale:
        v = rescale_cfg(v_from_denoised(x, denoised, sigma), v_from_denoised(x, d_cond, sigma), cfg_rescale)
        denoised = denoised_from_v(x, v, sigma)
    return denoised


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    cond: dict,
    uncond: dict | None = None,
    cfg_scale: float = 1.0,
    cfg_rescale: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Euler in sigma (k-diffusion sample_euler; Karras et al. 2022 Alg. 1 without churn):
    x = sigma_0 * eps;  d = (x - D(x; sigma_i)) / sigma_i;  x <- x + d * (sigma_{i+1} - sigma_i).

    The step is computed as the identical x <- D + (x - D) * sigma_{i+1} / sigma_i: from sigma_0 = 2e4 the
    textbook form loses up to ulp(2e4) ~ 2e-3 to fp32 cancellation (diffusers' Euler does), and a step to
    sigma = 0 returns D exactly. cond/uncond are kwargs dicts for the denoiser (see `cfg_denoise`).
    Shape: noise (B, C, h, w) unit normal; sigmas (steps + 1,) descending, last 0 -> (B, C, h, w) fp32.
    """
    levels = [float(s) for s in sigmas]  # host floats: no per-step device syncs
    x = noise.float() * levels[0]
    steps = range(len(levels) - 1)
    for i in tqdm(steps, desc="sampling", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = cfg_denoise(
            denoiser, x, x.new_full((x.shape[0],), sigma), cond, uncond, cfg_scale, cfg_rescale
        )
        x = denoised + (x - denoised) * (sigma_next / sigma)
    return x
