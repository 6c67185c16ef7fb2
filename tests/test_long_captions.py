"""Long captions (NAI V3 "CLIP context concatenation"): chunking rules, the chunked encoding, and that a
sample's UNet output does not depend on the chunk counts of its batch neighbours (cross-attention mask)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from ztsnr_ds.models import TINY_TEXT_HIDDEN, TINY_UNET_CONFIG, load_frozen
from ztsnr_ds.sampling import SDXLDenoiser, cfg_denoise
from ztsnr_ds.schedule import NoiseSchedule
from ztsnr_ds.text import (
    PromptEncoder,
    TextConditioning,
    count_tags,
    frame_chunk,
    join_contexts,
    limit_chunks,
    split_chunks,
)

C = 0  # the comma id in the pure-function tests; tokens are 1, 2, ...


def tags(*lengths: int) -> list[int]:
    """Token ids of tags of the given lengths, each followed by a comma (C)."""
    out, next_id = [], 1
    for n in lengths:
        out += list(range(next_id, next_id + n)) + [C]
        next_id += n
    return out


# --------------------------------------------------------------------------- pure chunking
def test_short_caption_is_one_chunk():
    ids = tags(4, 4, 4)
    assert split_chunks(ids, C) == [ids]
    assert split_chunks(list(range(1, 76)), C) == [list(range(1, 76))]  # exactly 75: still one
    assert split_chunks([], C) == [[]]


def test_split_backs_up_to_a_comma_within_20_tokens():
    ids = tags(*[9] * 9)  # 10 tokens a tag: the chunk fills at 75, its last comma is token 69 (index)
    chunks = split_chunks(ids, C)
    assert chunks[0] == ids[:70] and chunks[0][-1] == C  # tag 8 moved whole to chunk 2
    assert chunks[1] == ids[70:]
    assert [t for c in chunks for t in c] == ids  # nothing lost or reordered


def test_split_without_a_near_comma_cuts_at_75():
    ids = tags(30, 60)  # the only comma is 45 tokens before the end of the first chunk
    chunks = split_chunks(ids, C)
    assert [len(c) for c in chunks] == [75, len(ids) - 75]
    long_tag = list(range(1, 200))  # no comma at all
    assert [len(c) for c in split_chunks(long_tag, C)] == [75, 75, 49]


def test_comma_after_a_full_chunk_starts_the_next():
    ids = list(range(1, 76)) + [C] + [99]
    assert split_chunks(ids, C) == [list(range(1, 76)), [C, 99]]  # A1111: the comma goes on


def test_limit_cuts_at_a_tag_boundary_and_counts():
    ids = tags(*[9] * 30)  # 300 tokens, 30 tags: 5 chunks of 7 tags
    chunks = split_chunks(ids, C)
    kept = limit_chunks(chunks, 3, C)
    assert kept == chunks[:3] and kept[-1][-1] == C
    assert count_tags(ids, C) == 30 and count_tags([t for c in kept for t in c], C) == 21
    hard = split_chunks(tags(30, 60, 100, 80), C)  # cuts fall inside tags
    cut = limit_chunks(hard, 2, C)
    assert cut[0] == hard[0] and cut[1] == hard[1][:hard[1].index(C) + 1]  # back to the tag's end
    assert limit_chunks(chunks, 5, C) == chunks


def test_frame_matches_the_tokenizer(parts):
    for tok in (parts.tokenizer, parts.tokenizer_2):  # pad "<|endoftext|>" and "!"
        for caption in ("", "red circle, circle", "x" * 75):
            want = tok(caption, padding="max_length", max_length=77, truncation=True).input_ids
            ids = tok(caption, add_special_tokens=False).input_ids
            assert frame_chunk(ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == want


# --------------------------------------------------------------------------- the encoder
@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return load_frozen(tiny_sdxl, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(parts):
    return PromptEncoder.from_parts(parts, max_chunks=3)


def _tokens(parts, caption: str) -> int:
    return len(parts.tokenizer(caption, add_special_tokens=False).input_ids)


def _caption(n_tags: int, start: int = 0) -> str:
    """6 tokens a tag with ", " (the tiny tokenizer has a token per character)."""
    return ", ".join(f"tag{i:02d}" for i in range(start, start + n_tags))


def _reference_77(parts, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 77-token SDXL encoding (diffusers encode_prompt's recipe), written out independently."""
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = parts.text_encoder(parts.tokenizer(captions, **kw).input_ids, output_hidden_states=True)
        out_2 = parts.text_encoder_2(parts.tokenizer_2(captions, **kw).input_ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], -1), out_2.text_embeds


def test_up_to_75_tokens_is_bitwise_the_77_token_encoding(encoder, parts):
    captions = ["x" * 75, _caption(10), ""]
    assert _tokens(parts, captions[0]) == 75
    embeds, pooled, chunks = encoder.encode(captions)
    ref_embeds, ref_pooled = _reference_77(parts, captions)
    assert chunks.tolist() == [1, 1, 1] and embeds.shape == ref_embeds.shape
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)


def test_200_token_caption_sees_a_tag_past_token_150(encoder, parts):
    base = _caption(34)  # ~200 tokens
    changed = base.rsplit(", ", 1)[0] + ", other"  # only the last tag differs
    assert 190 < _tokens(parts, base) <= 225
    assert len(parts.tokenizer(base.rsplit(", ", 1)[0], add_special_tokens=False).input_ids) > 150
    embeds, pooled, chunks = encoder.encode([base, changed])
    assert chunks.tolist() == [3, 3] and embeds.shape == (2, 3 * 77, 2 * TINY_TEXT_HIDDEN)
    assert not torch.allclose(embeds[0, 154:], embeds[1, 154:], atol=1e-4)  # the third chunk sees it
    assert torch.equal(embeds[0, :154], embeds[1, :154])  # each chunk is encoded alone
    assert torch.equal(pooled[0], pooled[1])  # pooled: the first chunk's (ComfyUI, A1111)
    # the 77-token encoder never saw the difference
    ref, _ = _reference_77(parts, [base, changed])
    assert torch.equal(ref[0], ref[1])


def test_chunks_are_encoded_alone_and_concatenated(encoder, parts):
    caption = _caption(30)
    embeds, pooled, chunks = encoder.encode([caption])
    ids, ids_2, _ = encoder.tokenize([caption])  # (k, 77) framed chunks
    with torch.no_grad():
        for j in range(int(chunks[0])):
            out = parts.text_encoder(ids[j : j + 1], output_hidden_states=True).hidden_states[-2]
            out_2 = parts.text_encoder_2(ids_2[j : j + 1], output_hidden_states=True)
            want = torch.cat([out, out_2.hidden_states[-2]], -1)[0]
            torch.testing.assert_close(embeds[0, 77 * j : 77 * (j + 1)], want, rtol=0, atol=1e-6)
            if j == 0:
                torch.testing.assert_close(pooled[0], out_2.text_embeds[0], rtol=0, atol=1e-6)


def test_mixed_batch_pads_and_masks(encoder):
    short, long = _caption(3), _caption(30)
    cond = encoder.encode([short, long])
    assert cond.chunks.tolist() == [1, 3]
    alone = encoder.encode([short])
    torch.testing.assert_close(cond.embeds[0, :77], alone.embeds[0], rtol=0, atol=1e-6)
    assert not cond.embeds[0, 77:].any()  # zero padding
    assert cond.mask().tolist() == [[True] * 77 + [False] * 154, [True] * 231]
    assert alone.mask() is None


def test_max_chunks_truncates_at_a_tag_boundary(parts):
    one = PromptEncoder.from_parts(parts, max_chunks=1)
    counts = one.counts(_caption(30))
    assert counts.chunks == 1 and counts.tags == 30 and 0 < counts.tags_cut < 30
    assert one.encode([_caption(30)]).embeds.shape[1] == 77
    with pytest.raises(ValueError, match="captions.max_chunks = 9"):
        PromptEncoder.from_parts(parts, max_chunks=9)


def test_dropout_of_a_long_row_trims_the_context(encoder):
    cond = encoder.encode([_caption(3), _caption(30)])
    out = encoder.with_dropout(cond, torch.tensor([False, True]), "empty")
    assert out.chunks.tolist() == [1, 1] and out.embeds.shape[1] == 77 and out.mask() is None
    empty = encoder.encode([""])
    torch.testing.assert_close(out.embeds[1], empty.embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(out.embeds[0], cond.embeds[0, :77], rtol=0, atol=0)
    zeros = encoder.with_dropout(encoder.encode([_caption(30), _caption(10)]), torch.tensor([False, True]),
                                 "zeros")
    assert zeros.chunks.tolist() == [3, 1] and not zeros.embeds[1].any() and not zeros.pooled[1].any()


# --------------------------------------------------------------------------- the UNet: masked padding
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def _v(unet, text: TextConditioning, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    time_ids = torch.tensor([[128, 128, 0, 0, 128, 128]], dtype=torch.float32).expand(len(x), -1)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text.embeds, encoder_attention_mask=text.mask(),
                    added_cond_kwargs={"text_embeds": text.pooled, "time_ids": time_ids}).sample


def test_prediction_in_a_mixed_batch_equals_alone(encoder, unet):
    """A 1-chunk and a 2-chunk sample next to a 3-chunk one: each v prediction equals its own alone."""
    captions = [_caption(3), _caption(16), _caption(30)]
    batch = encoder.encode(captions)
    assert batch.chunks.tolist() == [1, 2, 3]
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 500.0, 20.0])
    mixed = _v(unet, batch, x, t)
    for i, caption in enumerate(captions):
        alone = _v(unet, encoder.encode([caption]), x[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # without the mask the zero padding is attended to: the short sample's output changes
    unmasked = TextConditioning(batch.embeds, batch.pooled, torch.full((3,), 3))
    alone = _v(unet, encoder.encode([captions[0]]), x[:1], t[:1])
    assert (_v(unet, unmasked, x, t)[:1] - alone).abs().max() > 1e-3


def test_cfg_with_prompts_of_different_lengths(encoder, unet):
    """Validation/sample CFG batches uncond (77) and cond (231) in one call: each equals its own call."""
    denoiser = SDXLDenoiser(unet, NoiseSchedule())
    time_ids = torch.tensor([[128, 128, 0, 0, 128, 128]], dtype=torch.float32)
    cond_text, uncond_text = encoder.encode([_caption(30)]), encoder.encode([""])
    cond = dict(encoder_hidden_states=cond_text.embeds, text_embeds=cond_text.pooled, time_ids=time_ids)
    uncond = dict(encoder_hidden_states=uncond_text.embeds, text_embeds=uncond_text.pooled, time_ids=time_ids)
    x, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0])
    with torch.no_grad():
        guided = cfg_denoise(denoiser, x, sigma, cond, uncond, 5.0, 0.0)
        d_c, d_u = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
    torch.testing.assert_close(guided, d_u + 5.0 * (d_c - d_u), rtol=1e-5, atol=1e-4)


def test_join_contexts():
    a, b = torch.ones(1, 77, 4), torch.ones(2, 231, 4)
    embeds, mask = join_contexts([a, b], [None, None])
    assert embeds.shape == (3, 231, 4) and not embeds[0, 77:].any()
    assert mask.sum(1).tolist() == [77, 231, 231]
    same, none = join_contexts([a, a], [None, None])
    assert same.shape == (2, 77, 4) and none is None


def test_cached_text_of_another_max_chunks_is_reported(tmp_path):
    from types import SimpleNamespace

    from ztsnr_ds.preflight import check_cached_text

    index = SimpleNamespace(cache_text=True, root=tmp_path)
    config = SimpleNamespace(captions=SimpleNamespace(max_chunks=3))
    with pytest.warns(UserWarning, match="built with max_chunks 1.*set captions.max_chunks: 1"):
        check_cached_text(config, index)  # a cache from before long captions (no report captions)
    (tmp_path / "report.json").write_text('{"captions": {"max_chunks": 3}}')
    check_cached_text(config, index)  # the same: silent
    config.captions.max_chunks = 2
    with pytest.warns(UserWarning, match="captions.max_chunks = 2, but"):
        check_cached_text(config, index)
