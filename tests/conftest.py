"""Shared fixtures: a tiny SDXL-shaped diffusers folder, built once per session, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ztsnr_ds.models import write_tiny_sdxl  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are op-overhead bound: one thread is faster, and OpenMP spin-waits stall a shared
    2-core machine (measured 10-30x slower tiny steps with 2 threads under load)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path to a tiny SDXL diffusers folder (unet, vae, text_encoder(_2), tokenizer(_2))."""
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)
