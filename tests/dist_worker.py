"""launch/train.py's run plus a record of what tests/test_distributed.py compares, one file per rank.

    deepspeed --num_gpus 2 tests/dist_worker.py --record DIR <launch/train.py arguments>

The run is launch/train.py's (parse, init_distributed, Trainer, train); afterwards each rank writes
DIR/rank{r}.pt with its module's weights, its UNet group's optimizer partition right after resume, and the
sample ids of every micro-batch it trained on. Only observation is added: nothing in the run changes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ztsnr_ds.config import parse_or_exit  # noqa: E402


def partition(optimizer: torch.optim.Optimizer, group: int = 0) -> dict:
    """A copy of this rank's ZeRO partition of param group `group` (the UNet's: the first) as the client
    optimizer holds it: flat weights, state. ZeRO gives the client one flat tensor per group."""
    (param,) = optimizer.param_groups[group]["params"]
    state = optimizer.state[param]
    return {"param": param.detach().clone()} | {k: v.clone() if torch.is_tensor(v) else v
                                                 for k, v in state.items()}


def record_ids(trainer) -> list[list[int]]:
    """A list that fills with the sample ids of each micro-batch the trainer reads from its cache."""
    ids: list[list[int]] = []
    read = trainer.cache.batch

    def batch(batch_ids: list[int]) -> dict:
        ids.append(list(batch_ids))
        return read(batch_ids)

    trainer.cache.batch = batch
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", type=Path, required=True, help="folder for rank{r}.pt")
    args, train_argv = parser.parse_known_args(argv)
    cfg, config_dict = parse_or_exit(train_argv)
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.trainer import Trainer

    dist = init_distributed()
    trainer = Trainer(cfg, config_dict, dist)
    ids, resumed = record_ids(trainer), {}
    resume = trainer.resume

    def resume_and_record() -> None:
        resume()
        resumed.update(partition(trainer.optimizer))

    trainer.resume = resume_and_record
    trainer.train()
    args.record.mkdir(parents=True, exist_ok=True)
    torch.save({"module": trainer.engine.module.state_dict(), "resumed": resumed, "ids": ids,
                "step": trainer.step}, args.record / f"rank{dist.rank}.pt")


if __name__ == "__main__":
    main()
