"""Which kernels the UNet runs: its attention backend (`model.attention`), torch.compile
(`model.compile`) and deterministic algorithms (`trainer.deterministic`).

Attention: every diffusers attention layer calls `F.scaled_dot_product_attention`; `sdpa` lets PyTorch
pick a backend per call, the others force one through `torch.nn.attention.sdpa_kernel`, entered inside
each layer's processor, so that it also holds when gradient checkpointing recomputes the forward in
backward. A backend the device or the shapes cannot run fails at the first step ("No available
kernel"): flash and cudnn need CUDA (flash also runs on CPU), efficient CUDA, math runs anywhere.

Compile: `full` compiles the whole UNet, `regional` each transformer block (diffusers'
`BasicTransformerBlock`, the UNet's `_repeated_blocks`): far less to compile, most of the gain, as
attention and its MLP dominate SDXL's FLOP. Both compile the modules in place (`nn.Module.compile`),
so parameter names, state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "sdpa": None,  # PyTorch's choice per call
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
COMPILE_MODES = ("none", "full", "regional")
REGIONAL_BLOCK = "BasicTransformerBlock"  # diffusers' UNet2DConditionModel._repeated_blocks
CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (torch.use_deterministic_algorithms docs)


def attention_processor(name: str):
    """A diffusers SDPA attention processor that runs the named backend (ATTENTION_BACKENDS)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    backend = ATTENTION_BACKENDS[name]
    if backend is None:
        return AttnProcessor2_0()

    class ForcedBackend(AttnProcessor2_0):
        """AttnProcessor2_0 with `F.scaled_dot_product_attention` restricted to one backend."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            with sdpa_kernel(backend):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        *args, **kwargs)

    ForcedBackend.__name__ = ForcedBackend.__qualname__ = f"AttnProcessor2_0_{name}"
    return ForcedBackend()


def set_attention(unet: torch.nn.Module, name: str) -> None:
    """Every attention layer of `unet` runs SDPA with the named backend."""
    unet.set_attn_processor(attention_processor(name))


def compile_unet(unet: torch.nn.Module, mode: str) -> int:
    """torch.compile `unet` in place: none, full (one module) or regional (each transformer block).

    Returns the number of modules compiled. Compilation itself happens at the first forward.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return 0
    if mode == "full":
        unet.compile()
        return 1
    blocks = [m for m in unet.modules() if type(m).__name__ == REGIONAL_BLOCK]
    for block in blocks:
        block.compile()
    return len(blocks)


def make_deterministic() -> None:
    """Deterministic kernels everywhere (cuDNN, cuBLAS, SDPA backward, index ops) for this process.

    On a GPU this is what makes two runs (and a resumed one) repeat each other bit for bit; on the CPU
    the trainer is deterministic without it. Call before the first matmul: cuBLAS reads its workspace
    setting when its handle is created. An op with no deterministic kernel then raises, naming itself.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    # Filling every new tensor with NaN (on by default in this mode) finds reads of uninitialised memory,
    # a debugging aid that tripled the tiny CPU step; kernels stay deterministic without it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
