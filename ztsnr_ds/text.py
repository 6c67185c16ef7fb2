"""SDXL prompt encoding with its two text encoders; shared by the latent cache and live encoding.

SDXL conditions the UNet on (Podell et al., "SDXL", 2023, sec. 2.1; diffusers
``StableDiffusionXLPipeline.encode_prompt``):
- ``embeds``: the penultimate hidden states (``hidden_states[-2]``, before the final layer norm)
  of CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280), concatenated on the last dim -> 2048;
- ``pooled``: bigG's projected pooled output (``text_embeds``, 1280), which the UNet receives as
  ``added_cond_kwargs["text_embeds"]``.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ztsnr_ds.device import to_device
from ztsnr_ds.models import FrozenParts


class PromptEncoder:
    """Encode prompts the way SDXL was trained: fixed 77-token windows, two encoders, no grad.

    Every prompt is padded to ``max_length`` tokens; longer prompts are truncated to
    ``max_length`` tokens (start and end tokens included), as the SDXL pipelines do, so
    tags past the 75th token are silently dropped. Outputs come in the encoders' dtype and device.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        max_length: int = 77,
    ) -> None:
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.max_length = max_length
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_parts(cls, parts: FrozenParts, max_length: int = 77) -> PromptEncoder:
        return cls(parts.tokenizer, parts.tokenizer_2, parts.text_encoder, parts.text_encoder_2, max_length)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids for both tokenizers. Shape: (B, max_length) each, int64."""
        ids = [tok(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in self.tokenizers]
        return ids[0], ids[1]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, pooled) of ``prompts``.

        Shape: embeds (B, max_length, D1 + D2), pooled (B, P) with P = text_encoder_2's projection dim.
        """
        ids, ids_2 = to_device(self.text_encoder.device, *self.tokenize(list(prompts)))  # one copy, no sync
        out = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2.to(self.text_encoder_2.device), output_hidden_states=True)
        embeds = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2].to(out.hidden_states[-2])], dim=-1)
        return embeds, out_2.text_embeds

    def empty(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, pooled) of the empty prompt "" for caption dropout, encoded once and cached.

        Returns broadcast views (``expand``) of one encoding; clone before writing into them.
        Shape: embeds (batch, max_length, D1 + D2), pooled (batch, P).
        """
        param = next(self.text_encoder_2.parameters())
        where = (param.dtype, param.device)
        if self._empty is None or (self._empty[1].dtype, self._empty[1].device) != where:  # moved or cast
            self._empty = self.encode([""])
        embeds, pooled = self._empty
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    def unconditional(self, batch: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional of captions.dropout_mode: `empty` (the encoded "", see `empty`) or `zeros`
        (zero embeddings and pooled vector, SDXL base's caption dropout). Shapes as `empty`."""
        embeds, pooled = self.empty(batch)
        return (embeds, pooled) if mode == "empty" else (torch.zeros_like(embeds), torch.zeros_like(pooled))
