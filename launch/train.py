"""Train an SDXL UNet with the NAI V3 ZTSNR recipe under DeepSpeed.

    deepspeed --hostfile hosts launch/train.py --config configs/sdxl_ztsnr.yaml
    python launch/train.py --config configs/demo.yaml --trainer.max_steps 10

The whole config is validated (types, unknown keys, paths) before a process group is
joined or a model is loaded; `--print_config` shows the resolved config and exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ztsnr_ds.config import ConfigError, parse_or_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, config_dict = parse_or_exit(argv)
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.trainer import StopTraining, Trainer

    dist = init_distributed()
    trainer = Trainer(cfg, config_dict, dist)
    try:
        trainer.train()
    except StopTraining as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_main:
        print(f"done: step {trainer.step}; checkpoints in {trainer.output_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
