"""Export: a real ZeRO-2 checkpoint (DeepSpeed on CPU, tiny SDXL UNet) -> diffusers folder / single-file
SDXL, read back with diffusers' own loaders and converters; key maps checked on the full SDXL shapes."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ztsnr_ds import checkpoint, engine
from ztsnr_ds.export import (
    ExportError,
    current_umask,
    export_diffusers,
    export_metadata,
    export_single_file,
    load_base,
    load_checkpoint,
    sampling_readme,
    single_file_loader,
    single_file_state,
)
from ztsnr_ds.keymaps import OPENCLIP_PREFIX, openclip_to_sgm, sgm_to_unet, unet_to_sgm, vae_to_sgm
from ztsnr_ds.model_metadata import noise_from_metadata, recorded
from ztsnr_ds.models import (
    SDXL_UNET_CONFIG,
    UNET_WEIGHTS,
    load_frozen,
    load_unet,
    load_unet_safetensors,
    unet_shapes,
)
from ztsnr_ds.sampling import ZTSNREulerDiscreteScheduler
from ztsnr_ds.schedule import NoiseSchedule, diffusers_scheduler_config, ztsnr_sigmas
from ztsnr_ds.text import PromptEncoder

ROOT = Path(__file__).resolve().parents[1]
TAG = checkpoint.tag_for(1)
# config.noise of the run, as ztsnr_ds.config.NoiseConfig writes it into ztsnr_state.json
NOISE = {"ztsnr": "terminal", "sigma_max": 20000.0, "resolution_scaling": True, "base_area": 1024 * 1024}


def _train_step(ds_engine) -> None:
    """One optimizer step on random inputs: enough to move every weight off the base model."""
    bf16 = dict(dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    cond = {"text_embeds": torch.randn(1, 32, **bf16), "time_ids": torch.randn(1, 6, **bf16)}
    x, context = torch.randn(1, 4, 8, 8, **bf16), torch.randn(1, 8, 64, **bf16)  # latent 8x8, 8 tokens
    out = ds_engine(x, torch.tensor([500]), context, added_cond_kwargs=cond).sample
    ds_engine.backward(out.float().square().mean())
    ds_engine.step()


@pytest.fixture(scope="module")
def run_dir(tiny_sdxl, tmp_path_factory) -> Path:
    """A run folder holding one ZeRO-2 pure-bf16 checkpoint written by ztsnr_ds.checkpoint.save."""
    dist = engine.init_distributed()
    ds_config = engine.build_ds_config(ROOT / "ds_configs" / "zero2_bf16.json", 1, 1, dist.world_size)
    unet = load_unet(tiny_sdxl, dtype=torch.bfloat16)
    ds_engine = engine.initialize(unet, torch.optim.AdamW(unet.parameters(), lr=1e-3), ds_config)
    _train_step(ds_engine)
    out = tmp_path_factory.mktemp("run") / "tiny"
    state = {
        checkpoint.STEP: 1,
        checkpoint.CONFIG: {"noise": NOISE, "model": {}, "captions": {"max_chunks": 3}},
        checkpoint.UNET_CONFIG: json.loads(json.dumps(dict(unet.config), default=str)),
    }
    checkpoint.save(ds_engine, out, 1, state, keep_last=2, is_main=dist.is_main)
    return out


@pytest.fixture(scope="module")
def sample_main():
    return runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[str, torch.Tensor]:
    """The trained weights as DeepSpeed's own zero_to_fp32 gathers them (bf16 masters -> bf16)."""
    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), TAG)


@pytest.fixture(scope="module")
def single_file(run_dir, tiny_sdxl, tmp_path_factory) -> Path:
    """fp32 single-file export, so text encoders and VAE compare bit-exactly with the fp32 originals."""
    out = tmp_path_factory.mktemp("sf") / "model.safetensors"
    return export_single_file(load_checkpoint(run_dir, torch.float32), tiny_sdxl, out, torch.float32)


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key].to(value.dtype), value), key


def test_checkpoint_holds_trained_weights(run_dir, reference, tiny_sdxl):
    trained = load_checkpoint(run_dir / "checkpoints")  # `latest` -> step00000001
    assert trained.tag_dir.name == TAG and trained.step == 1
    assert_state_equal(trained.state_dict, reference)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet", torch_dtype=torch.bfloat16).state_dict()
    assert not torch.equal(base["conv_in.weight"], reference["conv_in.weight"])  # training moved it


def test_single_file_unet_and_vae_load_with_from_single_file(single_file, reference, tiny_sdxl):
    kw = dict(local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_single_file(str(single_file), config=str(tiny_sdxl / "unet"), **kw)
    assert_state_equal(unet.state_dict(), reference)
    vae = AutoencoderKL.from_single_file(str(single_file), config=str(tiny_sdxl / "vae"), **kw)
    assert_state_equal(vae.state_dict(), AutoencoderKL.from_pretrained(tiny_sdxl / "vae").state_dict())


def test_single_file_text_encoders_match_originals(single_file, tiny_sdxl):
    """CLIP-L through diffusers' from_single_file CLIP loader; bigG through diffusers'
    convert_open_clip_checkpoint (the loader's CLIP-L check would claim the tiny bigG, same width)."""
    with safe_open(str(single_file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.")}
    clip_l = sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, config=str(tiny_sdxl / "text_encoder"), local_files_only=True
    )
    config_g = CLIPTextConfig.from_pretrained(tiny_sdxl / "text_encoder_2")
    big_g = CLIPTextModelWithProjection(config_g).eval()
    big_g.load_state_dict(sfu.convert_open_clip_checkpoint(big_g, state, prefix=OPENCLIP_PREFIX), strict=True)
    tokens = torch.randint(0, config_g.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_l = CLIPTextModel.from_pretrained(tiny_sdxl / "text_encoder")(tokens).last_hidden_state
        want_g = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")(tokens)
        got_g = big_g(tokens)
        torch.testing.assert_close(clip_l(tokens).last_hidden_state, want_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_g.last_hidden_state, want_g.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_g.text_embeds, want_g.text_embeds, rtol=0, atol=1e-6)  # the transpose


def test_single_file_markers_and_metadata(single_file, run_dir, tiny_sdxl):
    with safe_open(str(single_file), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor("v_pred").numel() == 0 and "ztsnr" not in f.keys()  # terminal: not Lin's table
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.title"] == "tiny step 1"
    assert (meta["ztsnr_ds.ztsnr"], meta["ztsnr_ds.sigma_max"]) == ("terminal", "20000.0")
    assert meta["ztsnr_ds.step"] == "1"
    assert meta["ztsnr_ds.max_chunks"] == "3"  # captions.max_chunks of the run
    assert recorded(meta, "max_chunks") == 3  # what launch/sample.py reads back
    assert meta["ztsnr_ds.base_area"] == "1048576" and meta["modelspec.resolution"] == "1024x1024"
    assert {
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "model.diffusion_model.out.2.weight",
    } <= keys
    assert [p.name for p in single_file.parent.iterdir()] == [single_file.name]  # no temporary file left
    assert single_file.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # safetensors alone gives 0600
    trained = load_checkpoint(run_dir)
    parts = load_base(tiny_sdxl, trained, torch.bfloat16)
    for mode, marked in (("off", False), ("terminal", False), ("rescale", True)):
        state = single_file_state(replace(trained, noise={**NOISE, "ztsnr": mode}), parts, torch.bfloat16)
        assert "v_pred" in state and ("ztsnr" in state) == marked, mode
        readme = sampling_readme(replace(trained, noise={**NOISE, "ztsnr": mode}))
        assert ("no `ztsnr` marker" in readme) != marked, mode
        for noise in ({**NOISE, "ztsnr": mode, "sigma_max": 5000.0},
                      {**NOISE, "ztsnr": mode, "resolution_scaling": False}):
            meta = export_metadata(replace(trained, noise=noise))  # the exact table, in every mode
            area = 1024**2 if noise["resolution_scaling"] else None
            schedule = NoiseSchedule(mode, noise["sigma_max"], area)
            assert noise_from_metadata(meta) == {"ztsnr": mode, "sigma_max": noise["sigma_max"],
                                                 "base_area": schedule.base_area}
            assert f"mode {mode} (sigma_max {noise['sigma_max']:g})" in meta["modelspec.description"]
            assert ("base area 1048576 px" in meta["modelspec.description"]) == noise["resolution_scaling"]
            scheduler = EulerDiscreteScheduler.from_config(json.loads(meta["ztsnr_ds.scheduler_config"]))
            assert scheduler.config.trained_betas == diffusers_scheduler_config(schedule)["trained_betas"]


def test_import_single_file_reproduces_trained_unet(single_file, reference, tiny_sdxl, tmp_path):
    unet = load_unet_safetensors(single_file, dtype=torch.bfloat16)  # config from the metadata
    assert_state_equal(unet.state_dict(), reference)
    bare = tmp_path / "bare_sgm.safetensors"  # SGM keys without metadata: needs the config argument
    save_file({k: v.contiguous() for k, v in unet_to_sgm(reference, dict(unet.config)).items()}, str(bare))
    assert_state_equal(
        load_unet_safetensors(bare, torch.bfloat16, config=tiny_sdxl / "unet").state_dict(), reference
    )
    with pytest.raises(ExportError, match="pass config="):  # falls back to the real SDXL config
        load_unet_safetensors(bare)


SDXL_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
)
SDXL_BIG_G = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def _meta_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def test_key_maps_round_trip_full_sdxl_through_diffusers():
    """Real SDXL shapes (meta tensors): ours -> SGM -> diffusers' converters gives back every key."""
    config = json.loads(SDXL_UNET_CONFIG.read_text())
    shapes = unet_shapes(config)
    assert sum(s.numel() for s in shapes.values()) == 2_567_463_684  # DESIGN.md 9: 2.567e9
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sgm = unet_to_sgm(state, config)
    # Keys of the released sd_xl_base_1.0.safetensors that diffusers' converter would accept either way
    # (it reads upsamplers from slot .1 or .2); ComfyUI and SGM need exactly these.
    known = ["output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.bias", "input_blocks.3.0.op.weight",
             "input_blocks.6.0.op.bias", "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
             "middle_block.1.proj_out.weight", "output_blocks.8.0.skip_connection.weight",
             "label_emb.0.2.bias"]
    assert {"model.diffusion_model." + k for k in known} <= set(sgm) and len(sgm) == 1680
    assert _shapes(sfu.convert_ldm_unet_checkpoint(sgm, config)) == shapes
    assert _shapes(sgm_to_unet(sgm, config)) == shapes
    with init_empty_weights():
        vae = AutoencoderKL(**SDXL_VAE)
        big_g = CLIPTextModelWithProjection(SDXL_BIG_G)
    converted = sfu.convert_ldm_vae_checkpoint(vae_to_sgm(_meta_state(vae), vae.config), vae.config)
    assert _shapes(converted) == _shapes(vae.state_dict())
    converted = sfu.convert_open_clip_checkpoint(big_g, openclip_to_sgm(_meta_state(big_g)), OPENCLIP_PREFIX)
    assert _shapes(converted) == _shapes(big_g.state_dict())


def test_cli_diffusers_export_loads_with_from_pretrained(run_dir, reference, tmp_path):
    out = tmp_path / "diffusers"
    cmd = [
        sys.executable,
        "launch/export.py",
        "--checkpoint",
        str(run_dir),
        "--format",
        "diffusers",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out / "unet" / UNET_WEIGHTS), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.bfloat16  # --dtype default
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    assert_state_equal(unet.state_dict(), reference)
    assert_state_equal(load_unet(out / "unet" / UNET_WEIGHTS, torch.bfloat16).state_dict(), reference)
    scheduler = EulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    table = ztsnr_sigmas("terminal", 20000.0)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double()
    torch.testing.assert_close(sigmas[:-1], table[:-1], rtol=1e-4, atol=0)
    assert 19000 < sigmas[-1] < 20001  # fp32 cumprod: ~19880
    assert "ztsnr" in (out / "README.md").read_text().lower()
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", UNET_WEIGHTS]


def test_bad_inputs_name_path_and_fix(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(ExportError, match=f"step99999999 does not exist.*{TAG}"):
        load_checkpoint(run_dir / "checkpoints" / "step99999999")
    stale = tmp_path / "stale" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "latest").write_text("step00000009")
    with pytest.raises(ExportError, match="names step00000009"):
        load_checkpoint(tmp_path / "stale")
    only_state = tmp_path / "only_state" / TAG  # a complete-looking tag without DeepSpeed's files
    only_state.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / TAG / checkpoint.STATE_FILE, only_state)
    with pytest.raises(ExportError, match="DeepSpeed files unreadable"):
        load_checkpoint(only_state)
    with pytest.raises(ExportError, match="holds no EMA .*ema.enabled"):
        load_checkpoint(run_dir, weights="ema")
    trained = load_checkpoint(run_dir)
    base = tmp_path / "base"
    with pytest.raises(ExportError, match="not a diffusers SDXL folder"):
        export_single_file(trained, base, tmp_path / "x.safetensors")
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text(json.dumps(trained.unet_config | {"cross_attention_dim": 32}))
    with pytest.raises(ExportError, match="disagrees with the checkpoint"):
        export_single_file(trained, base, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    cli_main = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    assert cli_main(["--checkpoint", str(tmp_path / "empty"), "--format", "diffusers", "--out", "o"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("dropout_mode", ["empty", "zeros"])
def test_pipeline_export_samples_like_sample_py(run_dir, tiny_sdxl, tmp_path, sample_main, dropout_mode):
    """--base makes a whole pipeline folder; diffusers with our scheduler and the same noise and sigmas
    gives sample.py's latents, and its default negative (none given) is the run's unconditional."""
    trained = replace(load_checkpoint(run_dir), dropout_mode=dropout_mode)  # terminal mode, bf16 weights
    out = export_diffusers(trained, tmp_path / "pipe", base=tiny_sdxl)
    index = json.loads((out / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] == (dropout_mode == "zeros")
    readable = 0o666 & ~current_umask()
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {readable}
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True, torch_dtype=torch.float32)
    assert_state_equal(pipe.unet.state_dict(), trained.state_dict)
    assert pipe.scheduler.config.trained_betas is not None
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler = ZTSNREulerDiscreteScheduler.from_config(pipe.scheduler.config)  # training's t(sigma)

    flags = ["--prompt", "1girl", "--seed", "3", "--steps", "4", "--width", "128", "--height", "128",
             "--dtype", "fp32", "--cfg", "5", "--cfg-rescale", "0.7", "--save-latents",
             "--out", str(tmp_path / "s")]
    assert sample_main(["--model", str(out), *flags]) == 0
    with safe_open(str(tmp_path / "s" / "latents.safetensors"), "pt") as f:
        ours, sigmas = f.get_tensor("latents"), [float(s) for s in f.metadata()["sigmas"].split(",")]
    assert sigmas == NoiseSchedule("terminal").inference_sigmas("trailing", 4, 128, 128).tolist()
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))  # generate.py's draw
    theirs = pipe("1girl", height=128, width=128, sigmas=sigmas, guidance_scale=5.0, guidance_rescale=0.7,
                  latents=noise, output_type="latent").images
    assert theirs.abs().max() > 1  # latents of unit scale: atol is absolute and relative alike
    # diffusers' Euler steps x + d * dt in fp32 from sigma_max (tests/test_sampling.py: 5.5e-3 from fp64
    # at 4 trailing steps, CFG 5, rescale 0.7); ours is within 9e-6 of fp64.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1.5e-2)


def test_pipeline_export_of_a_private_base_is_readable(run_dir, tiny_sdxl, tmp_path):
    """A base whose folders are 0700 and files 0600 (one user's private copy): the exported pipeline gets
    new modes (0777 / 0666 less the umask), so a client running as another user can read every part."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sdxl, base)
    for path in [base, *base.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    out = export_diffusers(load_checkpoint(run_dir), tmp_path / "pipe", base=base)
    mask = current_umask()
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_dir()} == {0o777 & ~mask}
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o666 & ~mask}
    assert {p.relative_to(out) for p in out.rglob("*") if p.parent == out} >= {Path("vae"), Path("tokenizer")}


def test_single_file_loads_in_diffusers_with_its_scheduler(single_file, reference, tiny_sdxl):
    """The lines launch/export.py prints after a single-file export run as printed."""
    scope: dict = {}
    exec(single_file_loader(single_file, tiny_sdxl, "empty"), scope)
    pipe = scope["pipe"]
    assert_state_equal(pipe.unet.state_dict(), reference)
    ours = diffusers_scheduler_config(NoiseSchedule("terminal"))
    assert pipe.scheduler.config.trained_betas == ours["trained_betas"]
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.timestep_spacing) == (
        "v_prediction", "trailing")


@pytest.mark.parametrize("dropout_mode", ["empty", "zeros"])
def test_printed_loader_gives_the_unconditional_our_sampler_uses(single_file, tiny_sdxl, dropout_mode):
    """Without a negative prompt, the pipeline launch/export.py's lines build encodes the same negative
    (embeddings and pooled) as ztsnr_ds' sampler for that dropout_mode."""
    scope: dict = {}
    exec(single_file_loader(single_file, tiny_sdxl, dropout_mode), scope)
    pipe = scope["pipe"]
    # from_single_file takes the tiny bigG (CLIP-L's width) for a CLIP-L (see the test above); SDXL's is not
    pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")
    _, negative, _, negative_pooled = pipe.encode_prompt("1girl", do_classifier_free_guidance=True)
    prompts = PromptEncoder.from_parts(load_frozen(tiny_sdxl, torch.float32))
    embeds, pooled = prompts.unconditional(1, dropout_mode)
    assert (negative.abs().max() > 0) == (dropout_mode == "empty")
    torch.testing.assert_close(negative, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(negative_pooled, pooled, rtol=0, atol=1e-5)
