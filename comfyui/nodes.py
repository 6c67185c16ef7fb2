"""ComfyUI node: sample a ztsnr_ds model on the noise levels it was trained on.

`ZTSNR Model Sampling` replaces the MODEL's `model_sampling` (as ComfyUI's own `ModelSamplingDiscrete`
node does) by one whose `sigmas` are the training table, resolution-scaled for the image size, and
whose `timestep()` is training's t(sigma) over the unscaled table (sigma_max -> 999, log-sigma
interpolation in between). ComfyUI's samplers and schedulers then run on that table unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_sampling
import comfy.utils
import folder_paths
from torch import Tensor

from . import ztsnr_table

FROM_SETTINGS = "(use the settings below)"
META = "ztsnr_ds."  # metadata prefix of ztsnr_ds exports: ztsnr, sigma_max, base_area


class ZTSNRSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
    """v-prediction over the ztsnr_ds table. `sigmas` (fp32, what schedulers read) is the scaled table;
    `timestep` maps a sigma to the t training gave it (fp64 on the CPU, like ztsnr_ds)."""

    def __init__(self, mode: str, sigma_max: float, base_area: int | None, width: int, height: int):
        super().__init__()
        self.table = ztsnr_table.ztsnr_sigmas(mode, sigma_max)  # unscaled fp64; not a buffer: never cast
        self.terminal = mode != "off"
        scale = ztsnr_table.resolution_scale(height, width, base_area)
        self.set_sigmas(ztsnr_table.scale_sigmas(self.table, scale, sigma_max))

    def timestep(self, sigma: Tensor) -> Tensor:
        t = ztsnr_table.timestep_of(sigma.detach().float().cpu(), self.table, self.terminal)
        return t.to(sigma.device)

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent_image: Tensor,
                      max_denoise: bool = False) -> Tensor:
        """x = latent + sigma * noise at every level, as in training (x = x0 + sigma * eps); ComfyUI's
        sqrt(1 + sigma^2) for the first step of a full denoise is a VP-model convention."""
        sigma = comfy.model_sampling.reshape_sigma(sigma, noise.ndim)
        return latent_image + noise * sigma


def read_settings(path: str | Path) -> dict:
    """mode, sigma_max, base_area from the ztsnr_ds.* metadata of a safetensors export."""
    header = comfy.utils.safetensors_header(str(path), max_size=64 * 1024 * 1024)
    meta = json.loads(header or b"{}").get("__metadata__", {})
    if META + "ztsnr" not in meta:
        raise ValueError(f"{path} has no {META}ztsnr metadata (not a ztsnr_ds export): choose "
                         f"'{FROM_SETTINGS}' and set mode, sigma_max and base_area by hand")
    area = meta.get(META + "base_area", "None")
    return {"mode": meta[META + "ztsnr"], "sigma_max": float(meta[META + "sigma_max"]),
            "base_area": None if area == "None" else int(area)}


class ZTSNRModelSampling:
    """The node. base_area 0 means no resolution scaling; width and height are the image's pixels."""

    CATEGORY = "advanced/model"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("Sample a ztsnr_ds model on its training noise table (v-prediction, zero terminal "
                   "SNR): reads mode, sigma_max and base area from the checkpoint's metadata.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            "ckpt_name": ([FROM_SETTINGS, *folder_paths.get_filename_list("checkpoints")],),
            "mode": (list(ztsnr_table.MODES), {"default": "terminal"}),
            "sigma_max": ("FLOAT", {"default": 20000.0, "min": 1.0, "max": 1e6, "step": 1.0}),
            "base_area": ("INT", {"default": 1024 * 1024, "min": 0, "max": 1 << 26}),
            "width": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8}),
            "height": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8}),
        }}

    def patch(self, model, ckpt_name: str, mode: str, sigma_max: float, base_area: int,
              width: int, height: int) -> tuple:
        if ckpt_name == FROM_SETTINGS:
            settings = {"mode": mode, "sigma_max": sigma_max, "base_area": base_area or None}
        else:
            settings = read_settings(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        patched = model.clone()
        patched.add_object_patch("model_sampling", ZTSNRSampling(**settings, width=width, height=height))
        return (patched,)


NODE_CLASS_MAPPINGS = {"ZTSNRModelSampling": ZTSNRModelSampling}
NODE_DISPLAY_NAME_MAPPINGS = {"ZTSNRModelSampling": "ZTSNR Model Sampling (ztsnr_ds)"}
