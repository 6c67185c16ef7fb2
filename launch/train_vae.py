"""Fine-tune the SDXL VAE decoder (NAI V3), encoder frozen, under DeepSpeed.

    deepspeed --hostfile hosts launch/train_vae.py --config configs/sdxl_vae.yaml
    python launch/train_vae.py --config configs/vae_demo.yaml --trainer.max_steps 20

The config is validated before a process group is joined or a model is loaded (exit 2, naming the key);
docs/vae-decoder.md says when this is worth doing and what it costs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from launch.train import _exit_on_signal, start  # noqa: E402
from ztsnr_ds.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from ztsnr_ds.vae_config import parse

    try:
        cfg, config_dict = parse(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from ztsnr_ds.checkpoint import CheckpointError
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.locks import StaleLock
    from ztsnr_ds.vae_trainer import StopTraining, VAETrainer

    try:
        start(cfg, config_dict)  # the run lock, config.yaml; trainer.overwrite moves other runs' tags aside
        dist = init_distributed()
    except StaleLock as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = VAETrainer(cfg, config_dict, dist)
        trainer.train()
    except StopTraining as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as err:  # a refused checkpoint, no room, no usable images
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_main:
        print(f"done: step {trainer.step}; checkpoints in {trainer.output_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
