"""Models as users have them: a single-file SDXL (SGM keys, no tokenizers) as model.pretrained and --base.

The tiny SDXL goes through our own exporter into one .safetensors; from there cache, training, export and
sampling run with no diffusers folder. Tokenizers are checked against OpenAI's own BPE code (the copy in
open-clip-torch) and, with COMFYUI_DIR set, against ComfyUI's bundled SDXL tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ztsnr_ds.export import TrainedUNet, export_single_file
from ztsnr_ds.keymaps import OPENCLIP_PREFIX, ExportError, sgm_to_clip_l, sgm_to_openclip, sgm_to_vae
from ztsnr_ds.models import base_noise_notes, load_frozen, load_unet, part_config_key
from ztsnr_ds.tokenizers import EOS, bpe_vocab_path, sdxl_tokenizers

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("1girl, solo, looking at viewer, masterpiece, best quality",
           "A photo of an astronaut riding a horse on Mars!!",
           "scenery,  mountain, sky\nclouds", "hatsune miku, absurdres, very_long_tag_with_underscores",
           "café, naïve, 3d, 2024, 1boy, :3, ^_^", "")
NOISE = {"ztsnr": "terminal", "sigma_max": 20000.0, "resolution_scaling": True, "base_area": 128 * 128}


@pytest.fixture(scope="module")
def real_tokenizers():
    return sdxl_tokenizers()


def _openai_bpe():
    """OpenAI's SimpleTokenizer as open-clip-torch ships it, loaded alone (its package imports torchvision).
    ftfy.fix_text (not installed) only repairs mojibake: the identity on these prompts."""
    sys.modules.setdefault("ftfy", types.SimpleNamespace(fix_text=lambda text: text))
    path = bpe_vocab_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_tokenizers_equal_openai_bpe_and_pad_as_sdxl(real_tokenizers):
    clip_l, big_g = real_tokenizers
    reference = _openai_bpe()
    for prompt in PROMPTS:
        want = [49406, *reference.encode(prompt), 49407]
        for tokenizer, pad in ((clip_l, 49407), (big_g, 0)):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert ids == want + [pad] * (77 - len(want)), prompt
    assert len(clip_l) == len(big_g) == 49408 and clip_l.eos_token == EOS


def test_tiny_vocabulary_agrees_where_it_overlaps(real_tokenizers, tiny_sdxl):
    """The tiny model's tokenizer holds the 512 byte symbols without merges (BOS/EOS 512/513): words of one
    character have the same ids as in the real vocabulary."""
    tiny = load_frozen(tiny_sdxl, torch.float32)
    for prompt in ("a b c, d", "1 2 3 . x y z", "! ? ~"):
        real = real_tokenizers[0](prompt).input_ids
        assert tiny.tokenizer(prompt).input_ids == [512, *real[1:-1], 513]
    assert sdxl_tokenizers(514)[0].get_vocab() == tiny.tokenizer.get_vocab()
    with pytest.raises(Exception, match="49408"):
        sdxl_tokenizers(1000)


@pytest.fixture(scope="module")
def tiny_file(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL as one file, written by our exporter from the folder (UNet weights as they are)."""
    unet = load_unet(tiny_sdxl, torch.float32)
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    tag = tmp_path_factory.mktemp("base") / "run" / "checkpoints" / "step00000000"
    trained = TrainedUNet(unet.state_dict(), config, 0, NOISE, tag)
    return export_single_file(trained, tiny_sdxl, tag.parents[2] / "tiny.safetensors", torch.float32)


def test_single_file_parts_equal_the_folder(tiny_file, tiny_sdxl):
    got, want = load_frozen(tiny_file, torch.float32), load_frozen(tiny_sdxl, torch.float32)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(got, name).state_dict(), getattr(want, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ids = got.tokenizer(["a b, c"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = got.text_encoder_2(ids, output_hidden_states=True)
        ref = want.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert torch.equal(out.hidden_states[-2], ref.hidden_states[-2])


def test_key_maps_equal_diffusers_single_file_conversions(tiny_file):
    """Our SGM -> diffusers maps give diffusers' from_single_file conversions, key for key, bit for bit."""
    from diffusers.loaders import single_file_utils as sfu

    state, parts = load_file(tiny_file), load_frozen(tiny_file, torch.float32)
    vae_config = dict(parts.vae.config)
    pairs = ((sgm_to_clip_l(state), sfu.convert_ldm_clip_checkpoint(state)),
             (sgm_to_openclip(state), sfu.convert_open_clip_checkpoint(parts.text_encoder_2, state,
                                                                       prefix=OPENCLIP_PREFIX)),
             (sgm_to_vae(state, vae_config), sfu.convert_ldm_vae_checkpoint(state, vae_config)))
    for ours, theirs in pairs:
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_stock_file_without_our_metadata_uses_shipped_configs(tiny_file, tmp_path):
    """A file from elsewhere carries no ztsnr_ds.*_config: the shipped SDXL configs apply and a mismatch
    names them; a UNet-only file names what is missing."""
    with safe_open(str(tiny_file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if k != part_config_key("text_encoder")}
    save_file(state, tmp_path / "stock.safetensors", metadata)
    with pytest.raises(ExportError, match="sdxl_text_encoder/config.json"):
        load_frozen(tmp_path / "stock.safetensors")
    save_file({k: v for k, v in state.items() if k.startswith("model.")}, tmp_path / "unet.safetensors")
    with pytest.raises(ExportError, match="holds no CLIP-L"):
        load_frozen(tmp_path / "unet.safetensors")


def test_markers_and_our_metadata_read_back(tiny_file, tmp_path):
    assert base_noise_notes(tiny_file, NOISE) == []
    notes = base_noise_notes(tiny_file, NOISE | {"ztsnr": "rescale", "resolution_scaling": False})
    assert len(notes) == 2 and "set noise.ztsnr: terminal" in notes[0] and "noise.base_area" in notes[1]
    state = {k: v for k, v in load_file(tiny_file).items() if k != "v_pred"} | {"ztsnr": torch.zeros(0)}
    save_file(state, tmp_path / "eps.safetensors")  # no metadata: a file from elsewhere
    notes = base_noise_notes(tmp_path / "eps.safetensors", NOISE)
    assert "no v_pred marker" in notes[0] and "noise.ztsnr = rescale" in notes[1]


def test_cache_train_export_sample_from_one_file(tiny_file, tmp_path, capsys):
    """Done-when of issue 26: with model.pretrained a single file, no diffusers folder anywhere."""
    from ztsnr_ds.config import parse
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.data.synthetic import write_dataset
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.export import export_diffusers, load_checkpoint
    from ztsnr_ds.trainer import Trainer

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["pretrained"] = str(tiny_file)
    config["data"] |= {"source": str(write_dataset(tmp_path / "data", n=4)), "cache_dir": str(tmp_path / "c")}
    config["trainer"] |= {"micro_batch": 2, "max_steps": 1, "save_every": 1, "log_every": 1,
                          "warmup_steps": 0, "output_dir": str(tmp_path / "run")}
    config |= {"validation": {"every": 0}, "logging": {"tensorboard": False, "progress": False},
               "optimizer": {"fused": False},
               "noise": {**config["noise"], "ztsnr": "rescale"}}  # the file records terminal
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    read_sections = runpy.run_path(str(ROOT / "launch" / "cache.py"))["read_sections"]
    cache_cfg, pretrained, _ = read_sections(tmp_path / "run.yaml")
    build_cache(cache_cfg, load_frozen(pretrained, torch.float32), progress=False)  # launch/cache.py's load
    cfg, config_dict = parse(["--config", str(tmp_path / "run.yaml")])
    assert "set noise.ztsnr: terminal to continue it as trained" in capsys.readouterr().err
    Trainer(cfg, config_dict, init_distributed()).train()
    trained = load_checkpoint(tmp_path / "run", torch.float32)
    single = export_single_file(trained, tiny_file, tmp_path / "out.safetensors", torch.float32)
    folder = export_diffusers(trained, tmp_path / "out", base=tiny_file)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model_index.json", "scheduler",
                                                        "text_encoder", "text_encoder_2", "tokenizer",
                                                        "tokenizer_2", "unet", "vae"]
    sample = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    assert sample(["--model", str(single), "--prompt", "a b", "--width", "64", "--height", "64", "--steps",
                   "2", "--dtype", "fp32", "--out", str(tmp_path / "samples")]) == 0
    err = capsys.readouterr().err
    assert f"base {single}" in err and "ztsnr rescale (model)" in err  # its own base, its noise settings
    assert load_unet(single, torch.float32).state_dict().keys() == trained.state_dict.keys()
    extract = runpy.run_path(str(ROOT / "launch" / "extract_lora.py"))["main"]  # a LoRA of the run
    assert extract(["--base", str(tiny_file), "--tuned", str(tmp_path / "run"), "--rank", "4",
                    "--out", str(tmp_path / "run_lora.safetensors")]) == 0
    with safe_open(str(tmp_path / "run_lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ztsnr_ds.ztsnr"] == "rescale" and meta["ss_network_dim"] == "4" and keys


def test_tokenizers_equal_comfyui(real_tokenizers, tmp_path):
    """ComfyUI's bundled SDXL tokenizer (comfy/sdxl_clip.py: CLIP-L pads with EOS, clip_g with 0)."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("set COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (its venv's python) to run")
    prompts = [p for p in PROMPTS if "(" not in p]  # ComfyUI reads (x:1.2) as weights
    out = tmp_path / "ids.json"
    probe = ROOT / "tests" / "comfyui_tokens.py"
    subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(probe), comfy_dir,
                    json.dumps(prompts), str(out)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": ""})
    comfy = json.loads(out.read_text())
    for prompt in prompts:
        for key, tokenizer in zip(("l", "g"), real_tokenizers):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert comfy[prompt][key] == ids, (prompt, key)


def test_config_refuses_a_unet_only_file(tiny_file, tmp_path):
    """model.pretrained must be a full single file: a UNet-only one fails at config time, naming the key."""
    from ztsnr_ds.config import ConfigError, check_base_file

    save_file({k: v for k, v in load_file(tiny_file).items() if k.startswith("model.")},
              tmp_path / "unet.safetensors")
    config = types.SimpleNamespace(model=types.SimpleNamespace(pretrained=str(tmp_path / "unet.safetensors")))
    with pytest.raises(ConfigError, match="model.pretrained: .* holds no CLIP-L"):
        check_base_file(config)  # config.check_inputs runs it before any model loads


def test_shipped_sdxl_configs_fit_the_sgm_layout_at_full_size():
    """Stock SDXL shapes (meta tensors, no memory): CLIP-L, bigG (32 fused in_proj layers, projection) and
    the VAE from configs/sdxl_* go to SGM keys and back to exactly the shapes those configs build; the
    buffers SGM files carry besides (position_ids, logit_scale) are ignored."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ztsnr_ds.keymaps import clip_l_to_sgm, openclip_to_sgm, vae_to_sgm
    from ztsnr_ds.models import SDXL_PART_CONFIGS

    configs = {p: json.loads(path.read_text()) for p, path in SDXL_PART_CONFIGS.items()}
    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        vae = AutoencoderKL.from_config(configs["vae"])
    sgm = clip_l_to_sgm(clip_l.state_dict()) | openclip_to_sgm(big_g.state_dict())
    sgm |= vae_to_sgm(vae.state_dict(), vae.config)
    sgm |= {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
            "conditioner.embedders.1.model.logit_scale": torch.zeros(())}
    assert sgm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    in_proj = sgm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"]
    assert in_proj.shape == (3840, 1280)
    for model, back in ((clip_l, sgm_to_clip_l(sgm)), (big_g, sgm_to_openclip(sgm)),
                        (vae, sgm_to_vae(sgm, vae.config))):
        want = {k: v.shape for k, v in model.state_dict().items()}
        strip = not any(k.startswith("text_model.") for k in want)  # transformers >= 5.6 CLIPTextModel
        assert {k.removeprefix("text_model.") if strip else k: v.shape for k, v in back.items()} == want
