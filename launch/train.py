"""Train an SDXL UNet with the NAI V3 ZTSNR recipe under DeepSpeed.

    deepspeed --hostfile hosts launch/train.py --config configs/sdxl_ztsnr.yaml
    python launch/train.py --config configs/demo.yaml --trainer.max_steps 10

The whole config is validated (types, unknown keys, paths) before a process group is
joined or a model is loaded; `--print_config` shows the resolved config and exits.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_ds.console import PORT_HINT, port_in_use, quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import bf16_on_slow_cpu, is_main_process, one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # before DeepSpeed's first warning
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ztsnr_ds.config import ConfigError, parse_or_exit  # noqa: E402

RUN_LOCK_WAIT_S = 1800.0  # how long a new run waits for a previous one to finish its final save


def _exit_on_signal(signum: int, _frame) -> None:
    """Before the training loop there is nothing to save: end now, through every `finally`
    (torch releases its JIT build lock in one), instead of dying where the signal lands."""
    raise SystemExit(128 + signum)


def start(cfg, config_dict: dict) -> None:
    """Rank 0: hold output_dir's run lock, move the tags and snapshots trainer.overwrite replaces aside,
    write config.yaml."""
    from ztsnr_ds import checkpoint, locks, run_folder

    if os.environ.get("RANK", "0") != "0":
        return
    output_dir = Path(cfg.trainer.output_dir)
    locks.hold_run_lock(output_dir, RUN_LOCK_WAIT_S)  # the fd stays open (and locked) until exit
    resume = cfg.trainer.resume
    foreign = checkpoint.foreign_tags(output_dir, resume) + checkpoint.foreign_snapshots(output_dir, resume)
    if foreign and cfg.trainer.overwrite:
        print(f"trainer.overwrite: moved {checkpoint.folder_names(foreign)} to "
              f"{checkpoint.move_aside(output_dir, foreign)}", flush=True)
    run_folder.write_config(output_dir, config_dict)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    cfg, config_dict = parse_or_exit(argv)
    if is_main_process() and (warning := bf16_on_slow_cpu(cfg.deepspeed_config)):
        print(warning, file=sys.stderr, flush=True)
    from ztsnr_ds.checkpoint import CheckpointError
    from ztsnr_ds.data.cache_files import CacheError
    from ztsnr_ds.ema import EMAError
    from ztsnr_ds.engine import any_rank, init_distributed
    from ztsnr_ds.integrity import IntegrityError
    from ztsnr_ds.locks import StaleLock
    from ztsnr_ds.trainer import StopTraining, Trainer

    try:
        start(cfg, config_dict)
        dist = init_distributed()
    except StaleLock as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not port_in_use(err):
            raise
        print(f"error: {PORT_HINT}\n({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, config_dict, dist)
        trainer.train()
        if any_rank(trainer.cache.faults.stop):  # saved, then stopped: too many corrupt samples
            if trainer.cache.faults.stop:
                print(f"error: {trainer.cache.faults.message()}", file=sys.stderr)
            return 2
    except StopTraining as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, IntegrityError, CacheError, EMAError) as err:  # damaged input, or a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_main:
        from ztsnr_ds.run_folder import summary

        print(summary(trainer.output_dir, trainer.step, cfg.model.pretrained))
    return 0


if __name__ == "__main__":
    sys.exit(main())
