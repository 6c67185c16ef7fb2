"""SDXL prompt encoding with its two text encoders; shared by the latent cache, training and sampling.

SDXL conditions the UNet on (Podell et al., "SDXL", 2023, sec. 2.1; diffusers
``StableDiffusionXLPipeline.encode_prompt``):
- ``embeds``: the penultimate hidden states (``hidden_states[-2]``, before the final layer norm)
  of CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280), concatenated on the last dim -> 2048;
- ``pooled``: bigG's projected pooled output (``text_embeds``, 1280), which the UNet receives as
  ``added_cond_kwargs["text_embeds"]``.

Long captions: CLIP context concatenation (NAI V3; A1111's ``sd_hijack_clip``, ComfyUI's
``sd1_clip``). The caption's tokens (no BOS/EOS) are cut into chunks of at most 75 (`split_chunks`,
backing up to a comma so that no tag is split), at most ``max_chunks`` of them (`limit_chunks`, cut at a
tag boundary); each chunk is framed BOS + tokens + EOS + padding to 77 (`frame_chunk`) and goes through
each encoder alone (positions 0..76 again); the penultimate states are concatenated along the sequence:
(77 k, 2048) for k chunks. Pooled is bigG's pooled output of the first chunk (ComfyUI's
``first_pooled``, A1111's ``zs[0].pooled``). A caption of at most 75 tokens is one chunk: exactly the
77-token encoding. In a batch, rows of fewer chunks are zero-padded to the longest and carry a key mask
(`TextConditioning.mask`) for the UNet's cross-attention, so a row's output does not depend on its
neighbours. See docs/long-captions.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ztsnr_ds.device import to_device
from ztsnr_ds.models import FrozenParts

CHUNK = 75
"""Caption tokens per CLIP window: 77 positions = BOS + 75 + EOS."""
WINDOW = CHUNK + 2
"""Positions per chunk in the encoders' output (CLIP's max_position_embeddings)."""
COMMA_BACKTRACK = 20
"""A chunk that fills up moves the tokens after its last comma to the next chunk if that comma lies within
this many tokens of its end (A1111's ``comma_padding_backtrack`` default, 20)."""
MAX_CHUNKS = 8
"""Upper bound of captions.max_chunks (8 x 75 = 600 tokens; NAI V1 used 3)."""
COMMA = ",</w>"
"""The CLIP BPE token of a comma followed by a space or the end: the tag boundary."""


# ------------------------------------------------------------------------- pure chunking (ids in, ids out)
def split_chunks(ids: Sequence[int], comma: int, size: int = CHUNK,
                 backtrack: int = COMMA_BACKTRACK) -> list[list[int]]:
    """Cut a caption's token ids (no BOS/EOS) into chunks of at most ``size``, as A1111's
    ``tokenize_line`` does (without its weights and BREAK): when a chunk is full and the next token is not
    a comma, the tokens after the chunk's last comma move to the next chunk if that comma is at most
    ``backtrack`` tokens from the end, so a tag is not split; otherwise the cut falls where the chunk is
    full. Always at least one chunk (possibly empty). ``len(ids) <= size`` gives ``[list(ids)]``.
    """
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1
    for token in ids:
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= backtrack:
            chunks.append(chunk[:last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1:], -1
        if len(chunk) == size:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def limit_chunks(chunks: list[list[int]], max_chunks: int, comma: int) -> list[list[int]]:
    """The first ``max_chunks`` chunks, cut at a tag boundary: if the cut would split a tag (the last kept
    chunk does not end with a comma and the first dropped one does not start with one), the last kept
    chunk loses the tokens after its last comma (a chunk without a comma is kept whole)."""
    if len(chunks) <= max_chunks:
        return chunks
    kept = [list(c) for c in chunks[:max_chunks]]
    last = kept[-1]
    if last and last[-1] != comma and chunks[max_chunks][:1] != [comma] and comma in last:
        kept[-1] = last[:len(last) - last[::-1].index(comma)]
    return kept


def count_tags(ids: Sequence[int], comma: int) -> int:
    """Comma-separated tags in a token sequence: the non-empty runs between comma tokens."""
    tags, run = 0, 0
    for token in [*ids, comma]:
        if token == comma:
            tags, run = tags + (run > 0), 0
        else:
            run += 1
    return tags


def frame_chunk(chunk: Sequence[int], bos: int, eos: int, pad: int, size: int = CHUNK) -> list[int]:
    """BOS + chunk + EOS + pad to size + 2 positions: what the tokenizer gives a caption of <= ``size``
    tokens with padding="max_length" (CLIP-L pads with EOS, SDXL's bigG tokenizer with "!", id 0)."""
    return [bos, *chunk, eos] + [pad] * (size - len(chunk))


@dataclass(frozen=True)
class CaptionCounts:
    """What chunking does to one caption: its tokens (no BOS/EOS), chunks encoded, tags, tags cut."""

    tokens: int
    chunks: int
    tags: int
    tags_cut: int


# ------------------------------------------------------------------------- batches of conditioning
def chunk_mask(chunks: torch.Tensor, width: int) -> torch.Tensor:
    """Cross-attention key mask of rows with ``chunks`` real chunks in a context of ``width`` positions:
    1 for the 77 positions of each real chunk, 0 for the zero padding after them.
    Shape: chunks (B,) int -> (B, width) bool."""
    return torch.arange(width) < (chunks.long() * WINDOW)[:, None]


class TextConditioning(NamedTuple):
    """Text conditioning of a batch. Rows with fewer chunks than the longest are zero-padded.

    Shape: embeds (B, 77 K, D), K = max(chunks); pooled (B, P); chunks (B,) int64 on the CPU (so the
    mask and K need no device sync).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    chunks: torch.Tensor

    def mask(self) -> torch.Tensor | None:
        """The UNet's ``encoder_attention_mask`` (B, 77 K) on the embeds' device, or None when every row
        fills all K chunks: then no mask, the unmasked attention kernels, and exactly the old numbers."""
        width = self.embeds.shape[1]
        if bool((self.chunks * WINDOW == width).all()):  # CPU tensor: no device sync
            return None
        return to_device(self.embeds.device, chunk_mask(self.chunks, width))[0]


def join_contexts(contexts: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate text contexts of different lengths along the batch (e.g. CFG's uncond and cond):
    each zero-padded to the longest, with a key mask (None if none is padded and none had a mask).
    Shape: contexts (B_i, L_i, D), masks (B_i, L_i) or None -> (sum B_i, max L_i, D), (sum B_i, max L_i).
    """
    width = max(c.shape[1] for c in contexts)
    if all(c.shape[1] == width for c in contexts) and all(m is None for m in masks):
        return torch.cat(list(contexts)), None
    padded = [F.pad(c, (0, 0, 0, width - c.shape[1])) for c in contexts]
    full = [m if m is not None else torch.ones(c.shape[:2], dtype=torch.bool, device=c.device)
            for c, m in zip(contexts, masks, strict=True)]
    return torch.cat(padded), torch.cat([F.pad(m.bool(), (0, width - m.shape[1])) for m in full])


class PromptEncoder:
    """Encode prompts the way SDXL is sampled by ComfyUI and A1111: 75-token chunks, two encoders.

    The encoders run in `run_encoders` only (one call over every chunk of the batch). Autograd records
    them only where their parameters require grad (a trained encoder, ztsnr_ds/text_training.py; every
    chunk then carries the gradient); frozen encoders build no graph. Outputs come in the encoders' dtype
    and device.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        max_chunks: int = 3,
    ) -> None:
        if not 1 <= max_chunks <= MAX_CHUNKS:
            raise ValueError(f"captions.max_chunks = {max_chunks} must lie in 1..{MAX_CHUNKS}")
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.max_chunks = max_chunks
        self._empty: TextConditioning | None = None

    @classmethod
    def from_parts(cls, parts: FrozenParts, max_chunks: int = 3) -> PromptEncoder:
        return cls(parts.tokenizer, parts.tokenizer_2, parts.text_encoder, parts.text_encoder_2, max_chunks)

    def _chunks(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> list[list[list[int]]]:
        """Every prompt's chunks (limit_chunks of split_chunks) under one tokenizer."""
        comma = tokenizer.convert_tokens_to_ids(COMMA)
        ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
        return [limit_chunks(split_chunks(row, comma), self.max_chunks, comma) for row in ids]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Framed chunk ids for both tokenizers, the chunks of all prompts in order, and chunks per prompt.

        Shape: ids (N, 77), ids_2 (N, 77) int64 with N = chunks.sum(); chunks (B,) int64.
        """
        framed, counts = [], []
        for tok in self.tokenizers:
            per_prompt = self._chunks(tok, prompts)
            counts.append([len(c) for c in per_prompt])
            special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
            rows = [frame_chunk(chunk, *special) for chunks in per_prompt for chunk in chunks]
            framed.append(torch.tensor(rows, dtype=torch.int64))
        if counts[0] != counts[1]:
            raise ValueError("the two tokenizers cut a prompt into different numbers of chunks: they must "
                             "share the CLIP BPE vocabulary (SDXL's do)")
        return framed[0], framed[1], torch.tensor(counts[0], dtype=torch.int64)

    def counts(self, caption: str) -> CaptionCounts:
        """Tokens, chunks, tags and tags cut by max_chunks of a caption (first tokenizer), for the report."""
        tok = self.tokenizers[0]
        comma = tok.convert_tokens_to_ids(COMMA)
        ids = tok(caption, add_special_tokens=False, truncation=False, verbose=False).input_ids
        kept = limit_chunks(split_chunks(ids, comma), self.max_chunks, comma)
        flat = [t for chunk in kept for t in chunk]
        # kept is a prefix of ids; a tag it ends inside of counts as cut
        partial = 0 < len(flat) < len(ids) and flat[-1] != comma and ids[len(flat)] != comma
        tags = count_tags(ids, comma)
        return CaptionCounts(len(ids), len(kept), tags, tags - count_tags(flat, comma) + partial)

    def run_encoders(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate states of both encoders, concatenated, and bigG's pooled output, per 77-token row.
        Shape: ids, ids_2 (N, 77) -> hidden (N, 77, D1 + D2), pooled (N, P)."""
        out = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2.to(self.text_encoder_2.device), output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2].to(out.hidden_states[-2])], dim=-1)
        return hidden, out_2.text_embeds

    def encode(self, prompts: list[str]) -> TextConditioning:
        """Conditioning of ``prompts``: one encoder call over all N chunks of the batch, then each prompt's
        chunk states concatenated along the sequence and zero-padded to the batch's most chunks K.

        Shape: embeds (B, 77 K, D1 + D2), pooled (B, P) (of each prompt's first chunk), chunks (B,).
        """
        ids, ids_2, chunks = self.tokenize(list(prompts))
        k = int(chunks.max())
        starts = torch.cumsum(chunks, 0) - chunks  # (B,) row of each prompt's first chunk
        slot = torch.arange(k)
        # (B, K): row of chunk j of prompt b, or N (a zero row) past its last chunk
        rows = torch.where(slot < chunks[:, None], starts[:, None] + slot, len(ids))
        ids, ids_2, rows, starts = to_device(self.text_encoder.device, ids, ids_2, rows, starts)  # one copy
        hidden, pooled = self.run_encoders(ids, ids_2)  # (N, 77, D), (N, P)
        if k == 1:  # every prompt one chunk: the 77-token encoding as is
            return TextConditioning(hidden, pooled, chunks)
        padded = torch.cat([hidden, hidden.new_zeros(1, *hidden.shape[1:])])  # (N + 1, 77, D)
        embeds = padded[rows].flatten(1, 2)  # (B, K, 77, D) -> (B, 77 K, D)
        return TextConditioning(embeds, pooled[starts], chunks)

    def empty(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, pooled) of the empty prompt "" for caption dropout, encoded once and cached.

        Returns broadcast views (``expand``) of one encoding; clone before writing into them.
        Shape: embeds (batch, 77, D1 + D2), pooled (batch, P).
        """
        param = next(self.text_encoder_2.parameters())
        where = (param.dtype, param.device)
        if self._empty is None or (self._empty.pooled.dtype, self._empty.pooled.device) != where:  # moved
            with torch.no_grad():  # a cached graph would keep a trained encoder's activations alive
                self._empty = self.encode([""])
        return self._empty.embeds.expand(batch, -1, -1), self._empty.pooled.expand(batch, -1)

    def unconditional(self, batch: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional of captions.dropout_mode: `empty` (the encoded "", see `empty`) or `zeros`
        (zero embeddings and pooled vector, SDXL base's caption dropout). Shapes as `empty`: one chunk."""
        embeds, pooled = self.empty(batch)
        return (embeds, pooled) if mode == "empty" else (torch.zeros_like(embeds), torch.zeros_like(pooled))

    def with_dropout(self, cond: TextConditioning, drop: torch.Tensor, mode: str) -> TextConditioning:
        """``cond`` with the rows where ``drop`` replaced by the unconditional (one chunk, zero-padded and
        masked like any short row); the context is trimmed to the most chunks left.
        Shape: drop (B,) bool on the CPU (a select on the device, no host sync)."""
        if not bool(drop.any()):
            return cond
        u_embeds, u_pooled = self.unconditional(1, mode)
        chunks = torch.where(drop, 1, cond.chunks)
        width = WINDOW * int(chunks.max())
        embeds = cond.embeds[:, :width]
        u_embeds = F.pad(u_embeds, (0, 0, 0, width - u_embeds.shape[1])).to(embeds)
        (mask,) = to_device(embeds.device, drop)
        embeds = torch.where(mask[:, None, None], u_embeds, embeds)
        pooled = torch.where(mask[:, None], u_pooled.to(cond.pooled), cond.pooled)
        return TextConditioning(embeds, pooled, chunks)
