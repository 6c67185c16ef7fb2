"""SDXL's two CLIP tokenizers built offline, from a vocabulary file a package ships.

A single-file SDXL holds no tokenizer and nothing may be downloaded. Both SDXL tokenizers are OpenAI's CLIP
BPE (49408 ids: 256 byte symbols, the same with `</w>`, 48894 merges, then <|startoftext|> and
<|endoftext|>); they differ only in padding: CLIP-L pads with <|endoftext|>, bigG with "!" (id 0), as
SDXL's `tokenizer_2/special_tokens_map.json` and ComfyUI's `SDXLClipGTokenizer` (pad_with_end=False) do.

The BPE merges come from `open-clip-torch`'s `bpe_simple_vocab_16e6.txt.gz` (OpenAI's own file), read by
path: importing open_clip would import torchvision, which is not installed (the Makefile installs
open-clip-torch with --no-deps). The tiny test model uses the same byte symbols without merges (514 ids),
so its ids equal the real ones for single-character words.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ztsnr_ds.keymaps import ExportError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # OpenAI CLIP: merges[1 : 49152 - 256 - 2 + 1] (the first line is a header)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_CLIP_L, PAD_BIGG = EOS, "!"
CLIP_VOCAB_SIZE = 49408
TINY_VOCAB_SIZE = 514
MAX_LENGTH = 77


class TokenizerError(ExportError):
    """No vocabulary to build a tokenizer from; the message names the fix."""


def bpe_vocab_path() -> Path:
    """open-clip-torch's copy of OpenAI's BPE file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    raise TokenizerError(f"no {BPE_FILE}: a single-file SDXL needs the CLIP vocabulary; install it with "
                         "`pip install --no-deps open-clip-torch` (make venv does), or pass a diffusers "
                         "folder")


def clip_merges(path: Path | None = None) -> list[tuple[str, str]]:
    """The 48894 merges of OpenAI's CLIP BPE, in rank order."""
    lines = gzip.open(path or bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]]


def byte_symbols() -> list[str]:
    """The 512 base symbols: each byte's printable stand-in, then the same ending a word (`</w>`)."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def build_tokenizer(merges: list[tuple[str, str]], pad_token: str) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte symbols, each merge's result, BOS, EOS (CLIP's order)."""
    tokens = byte_symbols() + ["".join(m) for m in merges] + [BOS, EOS]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges))
    # Set after construction, "!" pads without becoming a special token: a prompt's "!!" still reads as
    # BPE "!!</w>" (OpenCLIP and ComfyUI do so; a tokenizer built with pad_token="!" splits it into pads).
    tokenizer.pad_token = pad_token
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer


def sdxl_tokenizers(vocab_size: int = CLIP_VOCAB_SIZE) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(CLIP-L, bigG) tokenizers for text encoders with `vocab_size` token embeddings: 49408 (every SDXL)
    or 514 (the tiny test model's byte-level vocabulary)."""
    if vocab_size == CLIP_VOCAB_SIZE:
        merges = clip_merges()
    elif vocab_size == TINY_VOCAB_SIZE:
        merges = []
    else:
        raise TokenizerError(f"text encoders with {vocab_size} token embeddings: no shipped tokenizer fits "
                             f"(SDXL's have {CLIP_VOCAB_SIZE}); pass a diffusers folder with tokenizer/ and "
                             "tokenizer_2/")
    return build_tokenizer(merges, PAD_CLIP_L), build_tokenizer(merges, PAD_BIGG)
