"""Run inside a ComfyUI checkout's Python: load a LoRA with ComfyUI's own key maps and patch rule.

    COMFYUI_PYTHON comfyui_lora.py COMFYUI_DIR BASE.safetensors LORA.safetensors OUT.safetensors

BASE: a single-file SDXL (SGM keys). ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` map LoRA
names to the weights of a model whose state dict has BASE's keys (`diffusion_model.*`; the text encoders as
`clip_l.transformer.text_model.*` / `clip_g.transformer.text_model.*`); `load_lora` reads the file (and logs
keys it does not use); ComfyUI's `calculate_weight` patches each weight at strength 1. OUT: the patched
weights (ComfyUI's key names), and in the metadata `not_loaded` (the LoRA keys ComfyUI did not use) and
`patched` (the weights it patches), which tests/test_lora.py checks.
"""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

comfy_dir, base_path, lora_path, out_path = sys.argv[1:5]
sys.path.insert(0, comfy_dir)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.lora  # noqa: E402
import comfy.model_patcher  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

UNET, CLIP_L = "model.diffusion_model.", "conditioner.embedders.0.transformer."
BIG_G = "conditioner.embedders.1.model."


class Model:
    """What the key-map functions read: state_dict() keys, and model_config.unet_config (empty: no
    diffusers-name aliases are made; the kohya names are SGM paths)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.model_config = keys, SimpleNamespace(unet_config={})

    def state_dict(self) -> dict:
        return dict.fromkeys(self.keys)


base = load_file(base_path)
weights = {"diffusion_model." + k.removeprefix(UNET): v for k, v in base.items() if k.startswith(UNET)}
weights |= {"clip_l.transformer." + k.removeprefix(CLIP_L): v
            for k, v in base.items() if k.startswith(CLIP_L)}
layers = {int(k.split(".")[2]) for k in (k.removeprefix(BIG_G) for k in base if k.startswith(BIG_G))
          if k.startswith("transformer.resblocks.")}
clip_g = [f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight" for b in layers
          for c in comfy.lora.LORA_CLIP_MAP]  # bigG's names once ComfyUI converted it (no weights needed)
key_map = comfy.lora.model_lora_keys_unet(Model(list(weights)), {})
key_map = comfy.lora.model_lora_keys_clip(Model(list(weights) + clip_g), key_map)

lora = load_file(lora_path)
warnings: list[str] = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger().addHandler(handler)
patches = comfy.lora.load_lora(lora, key_map)
not_loaded = sorted(m.removeprefix("lora key not loaded: ") for m in warnings
                    if m.startswith("lora key not loaded"))

calculate = getattr(comfy.lora, "calculate_weight", None)
if calculate is None:  # before ComfyUI moved it out of ModelPatcher (2024)
    def calculate(p, w, key):
        return comfy.model_patcher.ModelPatcher.calculate_weight(None, p, w, key)
out = {}
for key, patch in patches.items():
    if key in weights:
        out[key] = calculate([(1.0, patch, 1.0, None, None)], weights[key].float().clone(), key).contiguous()
save_file(out, out_path, {"not_loaded": json.dumps(not_loaded), "patched": json.dumps(sorted(patches))})
