"""The ComfyUI node against real ComfyUI code: ComfyUI's own model_sampling, schedulers and KSampler
with `ZTSNR Model Sampling` applied, compared with ztsnr_ds.schedule / ztsnr_ds.sampling.

ComfyUI is not a dependency: set COMFYUI_DIR to a ComfyUI checkout and COMFYUI_PYTHON to a Python with
its requirements (README "Using the model"). tests/comfyui_probe.py runs there and writes what ComfyUI
computed; this file checks it. The node's self-contained table copy is checked here without ComfyUI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ztsnr_ds import schedule as zs
from ztsnr_ds.export import TrainedUNet, export_metadata
from ztsnr_ds.objective import append_dims, c_in, denoised_from_v
from ztsnr_ds.sampling import sample_euler

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "comfyui"
MODES = ("terminal", "rescale", "off")
SIZES = ((1024, 1024), (1536, 1536), (832, 1216))  # as comfyui_probe.py
STEPS, CFG, SDXL_SCALE_FACTOR = 28, 5.0, 0.13025
# A run whose export metadata the node reads (settings unlike the node's inputs in the probe).
METADATA_RUN = TrainedUNet({}, {}, 1, {"ztsnr": "rescale", "sigma_max": 5000.0, "resolution_scaling": False,
                                       "base_area": 1024 * 1024}, Path("runs/x/checkpoints/step00000001"))


def _table_module():
    spec = importlib.util.spec_from_file_location("ztsnr_table", NODE_DIR / "ztsnr_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_table_copy_equals_ztsnr_ds_schedule():
    """The node cannot import ztsnr_ds in ComfyUI; its copy must give bit-identical tables and t(sigma)."""
    table = _table_module()
    probe = torch.cat([torch.logspace(-2, 4.4, 2001, dtype=torch.float32), torch.tensor([20000.0, 19900.0])])
    for mode in MODES:
        ours = zs.NoiseSchedule(mode, 20000.0, 1024 * 1024)
        assert torch.equal(table.ztsnr_sigmas(mode, 20000.0), ours.table), mode
        for h, w in SIZES:
            s = table.resolution_scale(h, w, 1024 * 1024)
            assert s == ours.scale(h, w)
            assert torch.equal(table.scale_sigmas(ours.table, s, 20000.0), ours.scaled_table(h, w))
        got = table.timestep_of(probe, ours.table, mode != "off")
        assert torch.equal(got, ours.timestep(probe)), mode
    assert table.resolution_scale(2048, 2048, None) == 1.0


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> dict[str, torch.Tensor]:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("set COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (its venv's python) to run")
    tmp = tmp_path_factory.mktemp("comfy")
    g = torch.Generator().manual_seed(0)
    inputs = {"noise": torch.randn(1, 4, 16, 16, generator=g), "cond": torch.randn(1, 8, 64, generator=g),
              "uncond": torch.randn(1, 8, 64, generator=g)}
    save_file(inputs, tmp / "in.safetensors")
    (tmp / "ckpt").mkdir()
    save_file({"v_pred": torch.zeros(0)}, tmp / "ckpt" / "model.safetensors", export_metadata(METADATA_RUN))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    cmd = [python, str(ROOT / "tests" / "comfyui_probe.py"), comfy_dir, str(NODE_DIR),
           str(tmp / "in.safetensors"), str(tmp / "out.safetensors"), str(tmp / "ckpt")]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ""})
    return {**load_file(tmp / "out.safetensors"), **{f"in.{k}": v for k, v in inputs.items()}}


def test_stock_comfyui_tables_without_the_node(comfy):
    """What the markers alone give: `v_pred` is SDXL's table (top 14.61: no terminal step, nearest-integer
    t); `v_pred` + `ztsnr` is Lin's rescaled table, which is `rescale`'s below t = 999 but not
    `terminal`'s: ComfyUI tells the UNet t = 876 for sigma 14, terminal training used 991.9."""
    assert torch.equal(comfy["stock.sigmas"], zs.sdxl_sigmas().float())
    assert torch.equal(comfy["stock.timestep"], torch.arange(1000.0))
    lin, rescale = comfy["stock_ztsnr.sigmas"].double(), zs.ztsnr_sigmas("rescale")
    assert float(((lin[:-1] - rescale[:-1]) / rescale[:-1]).abs().max()) < 1e-6
    assert float(lin[-1]) == pytest.approx(4518.76, abs=0.01)
    assert float(comfy["stock_ztsnr.t14"]) == 876
    assert float(zs.NoiseSchedule("terminal").timestep(torch.tensor(14.0))) == pytest.approx(991.9, abs=0.05)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_model_sampling_matches_ztsnr_ds(comfy, mode, width, height):
    key, ours = f"{mode}.{width}x{height}", zs.NoiseSchedule(mode, 20000.0, 1024 * 1024)
    table = ours.scaled_table(height, width).float()
    assert torch.equal(comfy[f"{key}.sigmas"], table)  # all 1000 levels
    assert torch.equal(comfy[f"{key}.timestep"], ours.timestep(table))
    assert torch.equal(comfy[f"{key}.sigma_minmax"], table[[0, -1]])
    noise = comfy["in.noise"]
    for name in ("normal", "karras", "simple"):
        sigmas = comfy[f"{key}.{name}.sigmas"]
        torch.testing.assert_close(sigmas, _scheduler(name, ours, table), rtol=1e-5, atol=0)
        levels = sigmas[:-1]
        assert torch.equal(comfy[f"{key}.{name}.timestep"], ours.timestep(levels)), name
        x = noise.expand(len(levels), -1, -1, -1)
        torch.testing.assert_close(comfy[f"{key}.{name}.input"], append_dims(c_in(levels), 4) * x,
                                   rtol=1e-6, atol=0)
        assert torch.equal(comfy[f"{key}.{name}.noise"], append_dims(levels, 4) * x)  # x = x0 + sigma eps
        assert torch.equal(comfy[f"{key}.{name}.noise_max"], levels[0] * noise)


def test_comfyui_loads_the_node_and_accepts_the_example_workflow(comfy):
    assert float(comfy["workflow_valid"]) == 1.0  # execution.validate_prompt, node via load_custom_node


def test_node_reads_the_export_metadata(comfy):
    assert torch.equal(comfy["from_metadata.sigmas"], zs.NoiseSchedule("rescale", 5000.0, None).table.float())


def _scheduler(name: str, ours: zs.NoiseSchedule, table: torch.Tensor) -> torch.Tensor:
    """ComfyUI's normal / karras / simple schedulers written with ztsnr_ds' functions on our table."""
    if name == "simple":  # every (1000 / steps)-th level from the top
        index = [len(table) - 1 - int(i * len(table) / STEPS) for i in range(STEPS)]
        return zs.append_zero(table[index])
    if name == "karras":
        return zs.karras_sigmas(STEPS, float(table[0]), float(table[-1])).float()
    ends = ours.timestep(table[[-1, 0]])  # normal: uniform in t from t(sigma_max) to t(sigma_min)
    return zs.append_zero(zs.t_to_sigma(torch.linspace(float(ends[0]), float(ends[1]), STEPS), table))


def test_ksampler_matches_ztsnr_ds_euler(comfy):
    """ComfyUI's KSampler (euler, simple, CFG 5) on the probe UNet = ztsnr_ds' sample_euler on the same
    model: the probe saw training's timesteps, and the latents agree."""
    ours = zs.NoiseSchedule("terminal")
    sigmas = comfy["ksampler.sigmas"]
    t = ours.timestep(sigmas[:-1])
    assert torch.equal(comfy["ksampler.t"].view(STEPS, -1), t[:, None].expand(-1, 2))  # cond, uncond

    def denoiser(x, sigma, context):  # the probe: v = 0.5 c_in x - t / 2000 + mean(context)
        xc = append_dims(c_in(sigma), x.ndim) * x
        ctx = context.mean(dim=(1, 2))[:, None, None, None]
        v = 0.5 * xc - append_dims(ours.timestep(sigma), 4) / 2000 + ctx
        return denoised_from_v(x, v, sigma)

    cond, uncond = {"context": comfy["in.cond"]}, {"context": comfy["in.uncond"]}
    x0 = sample_euler(denoiser, comfy["in.noise"], sigmas, cond, uncond, CFG)
    x0_64 = sample_euler(lambda x, s, context: denoiser(x.double(), s.double(), context.double()),
                         comfy["in.noise"].double(), sigmas.double(), cond, uncond, CFG)
    got = comfy["ksampler.latent"] * SDXL_SCALE_FACTOR
    print(f"max |comfy - ours| {float((got - x0).abs().max()):.3g}, |comfy - fp64| "
          f"{float((got - x0_64).abs().max()):.3g}, |ours - fp64| {float((x0 - x0_64).abs().max()):.3g}")
    # ComfyUI's Euler (k-diffusion) steps x + d * dt in fp32: from sigma_max, x ~ 2e4 |eps| rounds to ulp
    # 2e-3 (the bound used here); later steps shrink that error. Measured: 2.7e-4 from fp64, ours 6e-7.
    torch.testing.assert_close(x0, x0_64.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, x0, rtol=0, atol=2e-3)
