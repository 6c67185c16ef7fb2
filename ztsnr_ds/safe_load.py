"""Load DeepSpeed checkpoint files without running code from them: weights_only plus an allow-list.

A `.pt` file is a pickle, and `torch.load(weights_only=False)` (what DeepSpeed's checkpoint engine,
zero_to_fp32 and ds_to_universal call) runs whatever a crafted file asks for. Checkpoints get
shared, so every load of one goes through here:
  1. `check_files` lists the globals each file's pickle names (torch reads the opcodes, runs
     nothing) and refuses a file naming anything outside ALLOWED_GLOBALS, naming file and globals;
  2. `weights_only()` forces weights_only=True for every torch.load inside it (torch's
     TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides DeepSpeed's explicit False; child processes inherit
     it) with the allow-list registered, so even a file that was not checked cannot run code.
`python -m ztsnr_ds.safe_load MODULE ARGS...` runs a module (ds_to_universal) the same way.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# The classes (besides tensors and containers) that DeepSpeed 0.19's ZeRO checkpoint files hold.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that cannot be loaded safely (refused or unreadable); names the file."""


def allowed_classes() -> list[type]:
    """The ALLOWED_GLOBALS classes, imported by name."""
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def check_files(paths: Iterable[Path]) -> None:
    """Raise UnsafeCheckpoint for the first file that is unreadable or names a global not allowed."""
    for path in paths:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # truncated or empty zip, not a torch file: torch raises several types
            raise UnsafeCheckpoint(f"{path} is not a readable torch file ({type(err).__name__}: {err}); "
                                   "the save was interrupted or the file is damaged: pass an older "
                                   "complete tag") from err
        refused = sorted(set(found) - set(ALLOWED_GLOBALS))
        if refused:
            raise UnsafeCheckpoint(f"{path} names {', '.join(refused)}, which a DeepSpeed checkpoint never "
                                   "holds: refusing to unpickle it (it could run code). Load only "
                                   "checkpoints written by ztsnr_ds; see ztsnr_ds.safe_load.ALLOWED_GLOBALS")


@contextmanager
def weights_only() -> Iterator[None]:
    """Every torch.load in this block (and in child processes started in it) is weights_only=True."""
    torch.serialization.add_safe_globals(allowed_classes())
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def main(argv: list[str]) -> None:
    """Run `python -m MODULE ARGS...` with weights-only loading and the allow-list registered."""
    module, *args = argv
    sys.argv = [module, *args]
    with weights_only():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
