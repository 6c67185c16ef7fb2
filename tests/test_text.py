"""PromptEncoder on the tiny SDXL: penultimate layers of both encoders, bigG pooled, 77-token windows."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from ztsnr_ds.config import CaptionConfig
from ztsnr_ds.data.caption_control import CaptionControl, CaptionRule
from ztsnr_ds.models import TINY_TEXT_HIDDEN, load_frozen
from ztsnr_ds.text import PromptEncoder
from ztsnr_ds.trainer import Trainer

PROMPTS = ["1girl, solo, looking at viewer", "landscape, mountains, sunset"]


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return load_frozen(tiny_sdxl, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(parts):
    return PromptEncoder.from_parts(parts)


def _ids(tokenizer, prompts):
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return tokenizer(prompts, **kw).input_ids


def test_shapes_and_dtype(encoder):
    embeds, pooled, chunks = encoder.encode(PROMPTS)
    assert chunks.tolist() == [1, 1]
    assert embeds.shape == (2, 77, 2 * TINY_TEXT_HIDDEN) and pooled.shape == (2, TINY_TEXT_HIDDEN)
    assert embeds.dtype == pooled.dtype == torch.float32
    assert not embeds.requires_grad and not pooled.requires_grad


def test_penultimate_hidden_states_and_projected_pool(encoder, parts):
    embeds, pooled, _ = encoder.encode(PROMPTS)
    with torch.no_grad():
        out = parts.text_encoder(_ids(parts.tokenizer, PROMPTS), output_hidden_states=True)
        out_2 = parts.text_encoder_2(_ids(parts.tokenizer_2, PROMPTS), output_hidden_states=True)
    d = TINY_TEXT_HIDDEN
    torch.testing.assert_close(embeds[..., :d], out.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(embeds[..., d:], out_2.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(pooled, out_2.text_embeds, rtol=0, atol=0)
    # the last layer (and the final-layer-normed output) would be a different conditioning
    assert not torch.allclose(embeds[..., :d], out.hidden_states[-1], atol=1e-3)
    assert not torch.allclose(embeds[..., d:], out_2.last_hidden_state, atol=1e-3)


def test_matches_diffusers_sdxl_pipeline(encoder, parts):
    """diffusers' own SDXL prompt encoding is the independent reference."""
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=None,
        scheduler=EulerDiscreteScheduler(),
    )
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                      do_classifier_free_guidance=False)
    embeds, pooled, _ = encoder.encode(PROMPTS)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_empty_prompt_cached_and_reproducible(encoder):
    embeds, pooled = encoder.empty(3)
    assert embeds.shape == (3, 77, 2 * TINY_TEXT_HIDDEN) and pooled.shape == (3, TINY_TEXT_HIDDEN)
    fresh = PromptEncoder(*encoder.tokenizers, encoder.text_encoder, encoder.text_encoder_2)
    ref_embeds, ref_pooled, _ = fresh.encode([""])
    torch.testing.assert_close(embeds, ref_embeds.expand(3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled.expand(3, -1), rtol=0, atol=0)
    again, _ = encoder.empty(1)
    assert again.data_ptr() == embeds.data_ptr()  # served from the cache, not re-encoded
    assert not torch.allclose(embeds[0], encoder.encode(["x"])[0][0])


@pytest.mark.parametrize("mode", ["empty", "zeros"])
@pytest.mark.parametrize("cached", [True, False])
def test_caption_dropout_trains_the_chosen_unconditional(encoder, mode, cached):
    """Trainer.conditioning: dropped rows are the encoded "" (empty) or zeros (zeros), cached or live."""
    captions = [f"tag{i}, solo" for i in range(6)]
    drop = [random.Random(i).random() < 0.5 for i in range(6)]  # the streams' first draw
    assert any(drop) and not all(drop)
    embeds, pooled, chunks = encoder.encode(captions)
    batch = ({"embeds": embeds.clone(), "pooled": pooled.clone(), "chunks": chunks} if cached
             else {"captions": captions, "source": torch.zeros(6, dtype=torch.int64)})
    caps = CaptionConfig(shuffle_tags=False, dropout=0.5, dropout_mode=mode)
    trainer = SimpleNamespace(cfg=SimpleNamespace(captions=caps), device=torch.device("cpu"), prompts=encoder,
                              captions=CaptionControl([CaptionRule.of(caps)]))
    got_embeds, got_pooled, _ = Trainer.conditioning(trainer, batch, [random.Random(i) for i in range(6)])
    empty = encoder.encode([""])[:2]
    for i, dropped in enumerate(drop):
        want = (empty if mode == "empty" else [torch.zeros_like(t[:1]) for t in empty]) if dropped else (
            embeds[i : i + 1], pooled[i : i + 1])
        torch.testing.assert_close(got_embeds[i : i + 1], want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got_pooled[i : i + 1], want[1], rtol=0, atol=1e-6)


def test_dropout_mode_is_validated():
    with pytest.raises(ValueError, match="captions.dropout_mode = 'none' is not one of empty, zeros"):
        CaptionConfig(dropout_mode="none")
