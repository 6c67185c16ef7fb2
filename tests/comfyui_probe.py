"""Run inside a ComfyUI checkout's Python (not ours): apply the ztsnr_ds node to an SDXL model and
record what ComfyUI's own code computes with it. tests/test_comfyui.py runs this and checks the numbers.

    COMFYUI_PYTHON comfyui_probe.py COMFYUI_DIR NODE_DIR INPUTS.safetensors OUT.safetensors CKPT_DIR

The SDXL model has a probe in place of its UNet (ComfyUI builds the rest: model_base.SDXL, ModelPatcher,
KSampler): it records the (input, timestep) ComfyUI gives it and returns
v = 0.5 xc - t / 2000 + mean(context), so tests can replay the same model through ztsnr_ds.
INPUTS: noise (1, 4, h, w), cond, uncond (1, L, D). CKPT_DIR/model.safetensors: a file with an export's
metadata, which the node reads when chosen by name, as ComfyUI's checkpoint list offers it. The node is
loaded by ComfyUI's own custom-node loader, which then validates comfyui/example_workflow_api.json.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch

comfy_dir, node_dir, inputs_path, out_path, ckpt_dir = sys.argv[1:6]
sys.path.insert(0, comfy_dir)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # `python main.py --cpu`: before model_management looks for a GPU
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

MODES = ("terminal", "rescale", "off")
SIZES = ((1024, 1024), (1536, 1536), (832, 1216))
SCHEDULERS = ("normal", "karras", "simple")
STEPS = 28
CFG = 5.0


async def load_node_and_validate_workflow() -> bool:
    """ComfyUI's start-up: built-in extra nodes, then our folder as a custom node; then the example."""
    await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    assert await nodes.load_custom_node(node_dir), f"ComfyUI could not load {node_dir}"
    workflow = json.loads((Path(node_dir) / "example_workflow_api.json").read_text())
    valid, error, _, node_errors = await execution.validate_prompt("probe", workflow, None)
    if not valid:
        print(f"example workflow invalid: {error} {node_errors}", file=sys.stderr)
    return valid


class Probe(torch.nn.Module):
    """Stands in for SDXL's UNet; remembers every call."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kw):
        self.calls.append((x.clone(), timesteps.clone()))
        ctx = context.float().mean(dim=(1, 2))[:, None, None, None]
        return 0.5 * x - timesteps[:, None, None, None] / 2000 + ctx


def sdxl_patcher(ztsnr: bool = False) -> tuple[comfy.model_patcher.ModelPatcher, Probe]:
    """ComfyUI's SDXL v-prediction model as a `v_pred` single file loads (with `ztsnr` too: Lin's table,
    as supported_models.SDXL.model_type sets it), the UNet replaced by a probe."""
    config = comfy.supported_models.SDXL({"disable_unet_model_creation": True})
    config.sampling_settings["zsnr"] = ztsnr
    model = comfy.model_base.SDXL(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    model.diffusion_model = Probe()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher, model.diffusion_model


def record(out: dict, key: str, ms, noise: torch.Tensor) -> None:
    """model_sampling's table, timesteps and scalings, and each scheduler's sigmas."""
    out[f"{key}.sigmas"] = ms.sigmas
    out[f"{key}.timestep"] = ms.timestep(ms.sigmas).float()
    out[f"{key}.sigma_minmax"] = torch.stack([ms.sigma_min, ms.sigma_max])
    for name in SCHEDULERS:
        s = comfy.samplers.calculate_sigmas(ms, name, STEPS)
        levels = s[:-1]
        x = noise.expand(len(levels), *noise.shape[1:])
        out[f"{key}.{name}.sigmas"] = s
        out[f"{key}.{name}.timestep"] = ms.timestep(levels).float()
        out[f"{key}.{name}.input"] = ms.calculate_input(levels, x)
        out[f"{key}.{name}.noise"] = ms.noise_scaling(levels, x, torch.zeros_like(x))
        out[f"{key}.{name}.noise_max"] = ms.noise_scaling(s[:1], noise, torch.zeros_like(noise), True)


def main() -> None:
    folder_paths.add_model_folder_path("checkpoints", ckpt_dir)
    valid = asyncio.run(load_node_and_validate_workflow())
    node = nodes.NODE_CLASS_MAPPINGS["ZTSNRModelSampling"]()
    inputs = load_file(inputs_path)
    noise = inputs["noise"]
    patcher, probe = sdxl_patcher()
    stock = patcher.get_model_object("model_sampling")  # what ComfyUI gives a `v_pred` file by itself
    out = {"workflow_valid": torch.tensor(float(valid)), "stock.sigmas": stock.sigmas,
           "stock.timestep": stock.timestep(stock.sigmas).float()}
    stock_ztsnr = sdxl_patcher(ztsnr=True)[0].get_model_object("model_sampling")  # `v_pred` + `ztsnr`
    out["stock_ztsnr.sigmas"] = stock_ztsnr.sigmas
    out["stock_ztsnr.t14"] = stock_ztsnr.timestep(torch.tensor([14.0])).float()
    for mode in MODES:
        for width, height in SIZES:
            key = f"{mode}.{width}x{height}"
            (patched,) = node.patch(patcher, "(use the settings below)", mode, 20000.0, 1024 * 1024,
                                    width, height)
            record(out, key, patched.get_model_object("model_sampling"), noise)
    assert "model.safetensors" in node.INPUT_TYPES()["required"]["ckpt_name"][0]
    (patched,) = node.patch(patcher, "model.safetensors", "terminal", 20000.0, 1024 * 1024, 1024, 1024)
    out["from_metadata.sigmas"] = patched.get_model_object("model_sampling").sigmas  # its settings win
    # ComfyUI's own KSampler (euler, simple, CFG 5) on a terminal model at 1024 x 1024, the probe as UNet.
    (patched,) = node.patch(patcher, "(use the settings below)", "terminal", 20000.0, 1024 * 1024, 1024, 1024)
    pooled = {"pooled_output": torch.zeros(1, 1280), "width": 1024, "height": 1024}
    positive, negative = [[inputs["cond"], pooled]], [[inputs["uncond"], dict(pooled)]]
    latent = comfy.sample.sample(patched, noise, STEPS, CFG, "euler", "simple", positive, negative,
                                 torch.zeros_like(noise), disable_pbar=True, seed=0)
    out["ksampler.latent"] = latent  # VAE latent: ComfyUI divides x0 by SDXL's scale factor 0.13025
    out["ksampler.sigmas"] = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"),
                                                             "simple", STEPS)
    out["ksampler.x"] = torch.cat([x for x, _ in probe.calls])
    out["ksampler.t"] = torch.cat([t for _, t in probe.calls])
    save_file({k: v.detach().float().contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main()
