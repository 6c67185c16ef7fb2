"""LoRA extraction (ztsnr_ds/lora.py, launch/extract_lora.py): a delta of rank r comes back at rank r to
float precision, kept energy equals the singular values', and the file's keys are kohya's names of real
SGM weights (what ComfyUI's `model_lora_keys_unet` maps: `lora_unet_` + the SGM path with `_`)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ztsnr_ds import lora
from ztsnr_ds.export import TrainedUNet, export_single_file
from ztsnr_ds.keymaps import UNET_PREFIX, unet_to_sgm
from ztsnr_ds.models import load_unet

ROOT = Path(__file__).resolve().parents[1]
NOISE = {"ztsnr": "terminal", "sigma_max": 20000.0, "resolution_scaling": True, "base_area": 128 * 128}


def low_rank(shape: tuple[int, ...], r: int, g: torch.Generator) -> torch.Tensor:
    """A random delta of rank exactly r as a (out, rest) matrix, in the weight's shape."""
    rest = int(torch.tensor(shape[1:]).prod())
    return (torch.randn(shape[0], r, generator=g) @ torch.randn(r, rest, generator=g)).reshape(shape)


def patched(base: dict, lora_sd: dict, name: str, key: str) -> torch.Tensor:
    """The client's rule, written out: W + (alpha / k) * up @ down."""
    up, down = lora_sd[f"{name}.lora_up.weight"], lora_sd[f"{name}.lora_down.weight"]
    scale = float(lora_sd[f"{name}.alpha"]) / down.shape[0]
    return base[key] + scale * (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)


def test_rank_r_delta_is_reproduced_and_energy_is_the_singular_values():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(12, 10, generator=g), "c.weight": torch.randn(6, 4, 3, 3, generator=g),
            "n.weight": torch.randn(12, generator=g), "same.weight": torch.randn(5, 5, generator=g)}
    tuned = dict(base) | {"a.weight": base["a.weight"] + low_rank((12, 10), 3, g),
                          "c.weight": base["c.weight"] + low_rank((6, 4, 3, 3), 3, g),
                          "n.weight": base["n.weight"] + 1e-3}
    layers = lora.lora_layers(base, "lora_unet")
    assert layers == {"lora_unet_a": "a.weight", "lora_unet_c": "c.weight", "lora_unet_same": "same.weight"}
    tensors, reports = lora.extract(base, tuned, layers, rank=3, dtype=torch.float32)
    assert {r.name for r in reports} == {"lora_unet_a", "lora_unet_c"}  # `same` has no delta: no keys
    assert tensors["lora_unet_c.lora_up.weight"].shape == (6, 3, 1, 1)
    assert tensors["lora_unet_c.lora_down.weight"].shape == (3, 4, 3, 3)
    for name in ("lora_unet_a", "lora_unet_c"):
        key = layers[name]
        torch.testing.assert_close(patched(base, tensors, name, key), tuned[key], rtol=1e-5, atol=1e-5)
        assert lora.apply(base, tensors, layers)[key].equal(patched(base, tensors, name, key))
    assert all(abs(r.energy - 1) < 1e-6 for r in reports)
    _, reports = lora.extract(base, tuned, layers, rank=2, dtype=torch.float32)
    s = torch.linalg.svdvals((tuned["a.weight"] - base["a.weight"]).double())
    assert reports[0].energy == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-5)
    # --threshold: the smallest rank whose kept energy reaches it
    need = int((s.square().cumsum(0) / s.square().sum() >= 0.5).nonzero()[0]) + 1
    _, reports = lora.extract(base, tuned, layers, rank=3, threshold=0.5, dtype=torch.float32)
    assert reports[0].rank == need and reports[0].energy >= 0.5
    assert lora.dropped_energy(base, tuned, layers) > 0  # the norm's delta is in no LoRA layer


@pytest.fixture(scope="module")
def tuned_file(tiny_sdxl, tmp_path_factory) -> Path:
    """A single-file export whose UNet is the tiny base plus a rank-2 delta in every linear/conv layer."""
    g = torch.Generator().manual_seed(1)
    state = load_unet(tiny_sdxl, torch.float32).state_dict()
    tuned = {k: v + 0.01 * low_rank(tuple(v.shape), 2, g) if v.ndim in (2, 4) and min(v.shape[:2]) >= 2 else v
             for k, v in state.items()}
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    tag = tmp_path_factory.mktemp("tuned") / "run" / "checkpoints" / "step00000007"
    trained = TrainedUNet(tuned, config, 7, NOISE, tag)
    return export_single_file(trained, tiny_sdxl, tag.parents[2] / "t.safetensors", torch.float32)


def test_cli_writes_kohya_keys_that_patch_base_into_tuned(tiny_sdxl, tuned_file, tmp_path, capsys):
    tuned_path = tuned_file
    main = runpy.run_path(str(ROOT / "launch" / "extract_lora.py"))["main"]
    out = tmp_path / "x_lora.safetensors"
    assert main(["--base", str(tiny_sdxl), "--tuned", str(tuned_path), "--rank", "2", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    assert "kept energy: overall 1.0000" in capsys.readouterr().out
    lora_sd = load_file(out)
    energy = json.loads(out.with_suffix(".energy.json").read_text())
    assert len(energy) == len(lora_sd) // 3 and all(r["rank"] == 2 and r["energy"] > 1 - 1e-5 for r in energy)
    with safe_open(str(tuned_path), "pt") as f:  # SGM names of the file's UNet weights
        sgm = {k.removeprefix(UNET_PREFIX) for k in f.keys() if k.startswith(UNET_PREFIX)}
    names = {k.split(".")[0] for k in lora_sd}
    assert not any(n.startswith("lora_te") for n in names)  # text encoders equal the base's
    comfy_map = {lora.kohya_name("lora_unet", k.removesuffix(".weight")): k
                 for k in sgm if k.endswith(".weight")}
    assert names <= comfy_map.keys()  # every key is a weight ComfyUI's key map knows
    base_sgm = load_file(tuned_path)  # tuned UNet in SGM keys; compare each patched base weight with it
    base_unet = load_unet(tiny_sdxl, torch.float32)
    base = {k.removeprefix(UNET_PREFIX): v for k, v in unet_to_sgm(base_unet.state_dict(),
                                                                     dict(base_unet.config)).items()}
    assert len(names) == sum(1 for k, v in base.items() if not torch.equal(v, base_sgm[UNET_PREFIX + k]))
    for name in names:
        key = comfy_map[name]
        torch.testing.assert_close(patched(base, lora_sd, name, key), base_sgm[UNET_PREFIX + key],
                                   rtol=1e-5, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "2"
    assert meta["ss_v_parameterization"] == "True"
    assert meta["ztsnr_ds.ztsnr"] == "terminal" and meta["ztsnr_ds.step"] == "7"
    assert meta["ss_zero_terminal_snr"] == "True"


def test_comfyui_loads_every_key_and_patches_base_into_tuned(tiny_sdxl, tuned_file, tmp_path):
    """ComfyUI's own LoRA key maps, loader and patch rule (tests/comfyui_lora.py) on our file."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("set COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (its venv's python) to run")
    main = runpy.run_path(str(ROOT / "launch" / "extract_lora.py"))["main"]
    lora_path, base_file = tmp_path / "x_lora.safetensors", tmp_path / "base.safetensors"
    assert main(["--base", str(tiny_sdxl), "--tuned", str(tuned_file), "--rank", "2", "--dtype", "fp32",
                 "--out", str(lora_path)]) == 0
    base_unet = load_unet(tiny_sdxl, torch.float32)
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    tag = tmp_path / "run" / "checkpoints" / "step00000000"
    export_single_file(TrainedUNet(base_unet.state_dict(), config, 0, NOISE, tag), tiny_sdxl, base_file,
                       torch.float32)
    out = tmp_path / "patched.safetensors"
    probe = ROOT / "tests" / "comfyui_lora.py"
    subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(probe), comfy_dir, str(base_file),
                    str(lora_path), str(out)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": ""})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["not_loaded"]) == []
    patched, tuned = load_file(out), load_file(tuned_file)
    layers = {k.split(".")[0] for k in load_file(lora_path)}
    assert len(patched) == len(layers)
    for key, weight in patched.items():
        want = tuned[UNET_PREFIX + key.removeprefix("diffusion_model.")].float()
        torch.testing.assert_close(weight, want, rtol=1e-5, atol=1e-6)


def test_text_encoders_that_differ_get_kohya_te_keys(tiny_sdxl, tuned_file, tmp_path):
    """A tuned file whose CLIP-L and bigG differ from the base: `lora_te1_` / `lora_te2_` + the transformers
    path (ComfyUI's LORA_CLIP_MAP names, e.g. ..._self_attn_q_proj), patching each encoder into the tuned
    one."""
    from safetensors.torch import save_file

    from ztsnr_ds.models import load_frozen

    g = torch.Generator().manual_seed(2)
    state = load_file(tuned_file)
    l_key = "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    g_key = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"  # rows q, k, v
    state[l_key] = state[l_key] + low_rank(tuple(state[l_key].shape), 1, g)
    state[g_key] = state[g_key] + low_rank(tuple(state[g_key].shape), 2, g)
    with safe_open(str(tuned_file), "pt") as f:
        save_file(state, tmp_path / "te.safetensors", f.metadata())
    main = runpy.run_path(str(ROOT / "launch" / "extract_lora.py"))["main"]
    out = tmp_path / "te_lora.safetensors"
    assert main(["--base", str(tiny_sdxl), "--tuned", str(tmp_path / "te.safetensors"), "--rank", "2",
                 "--dtype", "fp32", "--out", str(out)]) == 0
    lora_sd = load_file(out)
    # bigG's fused in_proj: one LoRA layer per unfused projection, as ComfyUI maps them
    layers = {"lora_te1_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "layers.1.mlp.fc1")} | {
        f"lora_te2_text_model_encoder_layers_2_self_attn_{p}_proj": ("text_encoder_2",
                                                                     f"layers.2.self_attn.{p}_proj")
        for p in "qkv"}
    assert {k.split(".")[0] for k in lora_sd if k.startswith("lora_te")} == layers.keys()
    base = load_frozen(tiny_sdxl, torch.float32)
    tuned = load_frozen(tmp_path / "te.safetensors", torch.float32)
    for name, (encoder, module) in layers.items():
        have = {k.removeprefix("text_model."): v for k, v in getattr(base, encoder).state_dict().items()}
        want = {k.removeprefix("text_model."): v for k, v in getattr(tuned, encoder).state_dict().items()}
        key = f"encoder.{module}.weight"
        torch.testing.assert_close(patched(have, lora_sd, name, key), want[key], rtol=1e-5, atol=1e-5)
