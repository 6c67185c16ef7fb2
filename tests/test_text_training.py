"""Training the text encoders with the UNet (ztsnr_ds/text_training.py): tiny model, CPU, the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.test_train import EMA_BF16, make_trainer
from ztsnr_ds import checkpoint, export
from ztsnr_ds.config import ConfigError, parse, parse_or_exit
from ztsnr_ds.generate import inspect_model, load_model
from ztsnr_ds.keymaps import OPENCLIP_PREFIX
from ztsnr_ds.models import load_frozen
from ztsnr_ds.text import PromptEncoder

TRAIN_L = ("--text_encoders.train", "[clip_l]", "--text_encoders.clip_l.lr_ratio", "2",
           "--text_encoders.clip_l.stop_at_step", "3", "--trainer.save_every", "1", *EMA_BF16)
CAPTIONS = ["red circle, circle, red, white background, " * 4, "blue square", ""]  # 2 chunks, 1, 1


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    trainer = {"micro_batch": 2, "max_steps": 4, "log_every": 1, "warmup_steps": 1}
    return make_run_config("text_training", 16, trainer, {"every": 0, "steps": 3, "height": 64, "width": 64})


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k].to(a[k].dtype))]


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


@pytest.fixture(scope="module")
def runs(run_config, tiny_sdxl, tmp_path_factory):
    """The same 4 steps (CLIP-L trained in steps 1-3 at 2x the UNet's lr) straight, and stopped at 2 and
    resumed; the CLIP-L weights after step 2 of the resumed run."""
    root = tmp_path_factory.mktemp("text_runs")
    straight = make_trainer(run_config, root / "a", *TRAIN_L)
    straight.train()
    first = make_trainer(run_config, root / "b", *TRAIN_L, "--trainer.max_steps", "2")
    first.train()
    at_2 = weights(first.parts.text_encoder)
    resumed = make_trainer(run_config, root / "b", *TRAIN_L)
    resumed.train()
    return straight, resumed, at_2, root


def test_only_the_trained_encoder_changes_and_stops(runs, tiny_sdxl):
    straight, _, at_2, root = runs
    base = load_frozen(tiny_sdxl, torch.bfloat16)
    assert_equal(weights(base.text_encoder_2), weights(straight.parts.text_encoder_2))  # clip_g: bitwise
    assert changed(weights(base.text_encoder), at_2)  # clip_l trained in steps 1-2 ...
    tags = {t.name: export.load_checkpoint(t) for t in checkpoint.complete_tags(root / "a" / "checkpoints")}
    step3, step4 = tags["step00000003"], tags["step00000004"]
    assert changed(at_2, step3.encoders["text_encoder"])  # ... and in step 3 (after the resume)
    assert_equal(step3.encoders["text_encoder"], step4.encoders["text_encoder"])  # stop_at_step 3: frozen
    assert changed(step3.state_dict, step4.state_dict)  # the UNet trains on
    assert list(step4.encoders) == ["text_encoder"] and "conv_in.weight" in step4.state_dict  # UNet keys
    assert_equal(step4.encoders["text_encoder"], weights(straight.parts.text_encoder))
    groups = straight.optimizer.param_groups
    assert "name" not in groups[0] and groups[1]["name"] == "clip_l" and groups[1]["frozen"]
    assert not any(p.requires_grad for p in straight.parts.text_encoder.parameters())
    assert all(layer.gradient_checkpointing for layer in straight.parts.text_encoder.encoder.layers)


def test_resume_with_a_trained_encoder_is_bitwise(runs):
    straight, resumed, _, _ = runs
    for (name, p), (_, q) in zip(straight.engine.module.named_parameters(),
                                 resumed.engine.module.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for track, slices in straight.ema.state.items():  # the sharded EMA covers the encoder's group
        assert len(slices) == 2 and all(torch.equal(a, b) for a, b in zip(slices, resumed.ema.state[track]))


def live_embeddings(encoder: PromptEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        cond = encoder.encode(CAPTIONS)
    return cond.embeds.float(), cond.pooled.float()


def test_export_reload_gives_the_trained_embeddings(runs, tiny_sdxl, tmp_path):
    straight, _, _, root = runs
    want = live_embeddings(straight.prompts)
    trained = export.load_checkpoint(root / "a", torch.bfloat16)
    meta = export.export_metadata(trained)
    assert meta["ztsnr_ds.text_encoders.trained"] == "clip_l"
    assert meta["ztsnr_ds.text_encoders.clip_l.steps"] == "3"
    assert float(meta["ztsnr_ds.text_encoders.clip_l.lr"]) == 2 * straight.cfg.optimizer.lr
    folder = export.export_diffusers(trained, tmp_path / "pipe", base=tiny_sdxl)
    parts = load_frozen(folder, torch.bfloat16)  # text_encoder/, text_encoder_2/ written by the export
    got = live_embeddings(PromptEncoder.from_parts(parts, straight.cfg.captions.max_chunks))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for weights in ("model", "ema"):  # launch/sample.py --model <run> [--weights ema]: the run's encoders
        _, parts = load_model(inspect_model(root / "a"), tiny_sdxl, torch.bfloat16, weights)
        if weights == "ema":
            with straight.ema.swapped_in():  # what the EMA validation grid and held-out loss encode with
                want_ema = live_embeddings(straight.prompts)
            assert not torch.equal(want_ema[0], want[0])
        got = live_embeddings(PromptEncoder.from_parts(parts, straight.cfg.captions.max_chunks))
        for g, w in zip(got, want if weights == "model" else want_ema):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    single = export.export_single_file(trained, tiny_sdxl, tmp_path / "one.safetensors")
    with safe_open(str(single), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.")}
    clip_l = sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, config=str(tiny_sdxl / "text_encoder"), local_files_only=True)
    big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tiny_sdxl / "text_encoder_2"))
    big_g.load_state_dict(sfu.convert_open_clip_checkpoint(big_g, state, prefix=OPENCLIP_PREFIX), strict=True)
    encoder = PromptEncoder(parts.tokenizer, parts.tokenizer_2, clip_l.to(torch.bfloat16).eval(),
                            big_g.to(torch.bfloat16).eval(), straight.cfg.captions.max_chunks)
    for g, w in zip(live_embeddings(encoder), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_chunked_encoding_carries_gradients(tiny_sdxl):
    """Each 75-token chunk goes through the trained encoder: the second chunk's states have a gradient,
    and the grad-enabled encoding equals the no-grad one bit for bit."""
    parts = load_frozen(tiny_sdxl, torch.float32)
    encoder = PromptEncoder.from_parts(parts, max_chunks=3)
    expected = live_embeddings(encoder)
    parts.text_encoder.requires_grad_(True)
    cond = encoder.encode(CAPTIONS)
    assert cond.embeds.shape[1] == 2 * 77 and cond.chunks.tolist() == [2, 1, 1]
    assert torch.equal(cond.embeds.detach(), expected[0]) and torch.equal(cond.pooled.detach(), expected[1])
    cond.embeds[0, 77:].sum().backward()  # the second chunk only
    grad = parts.text_encoder.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in parts.text_encoder_2.parameters())  # frozen: no graph


def test_cached_text_with_a_trained_encoder_is_refused(run_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_or_exit(["--config", str(run_config), "--trainer.output_dir", str(tmp_path),
                       "--data.cache_text", "true", "--text_encoders.train", "[clip_g]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.cache_text" in err and "text_encoders.train" in err



def test_resume_with_other_encoders_is_refused(runs, run_config):
    with pytest.raises(ConfigError, match=r"text_encoders.train = \[\], but .* trained with \['clip_l'\]"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(runs[3] / "a")])
