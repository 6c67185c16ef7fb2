"""What the launch scripts print besides their own work: DeepSpeed's expected warnings cut to one line,
and a hint when the rendezvous port is taken. No torch import: the filter goes in before DeepSpeed's."""

from __future__ import annotations

import logging
import sys

from ztsnr_ds.machine import is_main_process

DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_NOISE = ("Setting accelerator to CPU", "untested optimizer")
"""Warnings DeepSpeed gives on every ztsnr_ds run: a CPU-only machine, and the client optimizer (AdamWSR,
passed on purpose with zero_allow_untested_optimizer)."""
PORT_IN_USE = ("EADDRINUSE", "Address already in use", "address already in use")
PORT_HINT = ("the rendezvous port is in use (EADDRINUSE): another distributed job on this machine holds it "
             "(deepspeed and torchrun use 29500). Give this job another one: deepspeed --master_port 29501 "
             "launch/train.py ... (torchrun: --master_port; by hand: MASTER_PORT=29501)")


class _DeepSpeedNoise(logging.Filter):
    """Drops DEEPSPEED_NOISE records; the first one dropped is replaced by one line from rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self.told = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(noise in message for noise in DEEPSPEED_NOISE):
            return True
        if not self.told and is_main_process():
            print("ztsnr_ds: DeepSpeed's expected warnings hidden (CPU accelerator; 'untested optimizer': "
                  "ztsnr_ds passes its own AdamWSR on purpose)", file=sys.stderr, flush=True)
        self.told = True
        return False


def quiet_deepspeed() -> None:
    """Install the filter on DeepSpeed's logger (once; before `import deepspeed` catches its first)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DeepSpeedNoise) for f in logger.filters):
        logger.addFilter(_DeepSpeedNoise())


def port_in_use(err: BaseException) -> bool:
    """Whether an init_process_group failure is a taken TCP port (torch's DistNetworkError text)."""
    return any(text in str(err) for text in PORT_IN_USE)
