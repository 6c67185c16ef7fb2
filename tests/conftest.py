"""Shared fixtures: a tiny SDXL-shaped diffusers folder, built once per session, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ztsnr_ds.models import write_tiny_sdxl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are op-overhead bound: one thread is faster, and OpenMP spin-waits stall a shared
    2-core machine (measured 10-30x slower tiny steps with 2 threads under load)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path to a tiny SDXL diffusers folder (unet, vae, text_encoder(_2), tokenizer(_2))."""
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def make_run_config(tiny_sdxl, tmp_path_factory):
    """Factory: configs/demo.yaml on the tiny model with a cache of n generated images, built here.

    Returns the YAML path; `trainer` and `validation` update those sections of the demo config.
    """
    import yaml

    from ztsnr_ds.data.buckets import BucketConfig
    from ztsnr_ds.data.cache import CacheConfig
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.data.synthetic import write_dataset
    from ztsnr_ds.models import load_frozen

    def make(name: str, n_images: int, trainer: dict, validation: dict) -> Path:
        root = tmp_path_factory.mktemp(name)
        config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        config["model"]["pretrained"] = str(tiny_sdxl)
        config["data"] |= {"source": str(write_dataset(root / "data", n=n_images)),
                           "cache_dir": str(root / "cache")}
        config["trainer"] |= trainer
        config["validation"] |= {"holdout": 0, "loss_every": 0} | validation  # the demo's holdout: opt-in
        config["logging"] = {"tensorboard": False, "progress": False}
        data = config["data"] | {"buckets": BucketConfig(**config["data"]["buckets"])}
        build_cache(CacheConfig(**data), load_frozen(tiny_sdxl, dtype=torch.float32), progress=False)
        path = root / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make
