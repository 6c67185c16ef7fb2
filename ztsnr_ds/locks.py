"""The two locks a run depends on: torch's JIT build lock (never wait on a stale one) and the
output_dir run lock (never two live runs writing one output_dir).

torch builds DeepSpeed's ops (the CPU shm op at start-up) under `<build root>/<op>/lock`; a
process killed mid-build leaves the file, and every later build of that op waits on it forever,
silently. `check_build_locks` refuses to start instead, naming the file to delete.

The run lock is an flock on `<output_dir>/run.lock`, held by rank 0 for its whole life. The
kernel drops it when the process ends, however it ends. A scheduler that requeues a job as soon
as the `deepspeed` launcher exits (the launcher does not wait for its workers' final save) starts
a run that waits here until the old rank 0 has finished writing its checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

STALE_AFTER_S = 60.0
"""A build lock this old with no ninja process alive is stale (a build holds it while ninja runs)."""
RUN_LOCK = "run.lock"


class StaleLock(RuntimeError):
    """A lock that nothing will ever release; the message says what to delete."""


def build_root() -> Path:
    """Where torch JIT-builds extensions: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def builds_running() -> bool:
    """True if any process on this machine is ninja (torch's JIT builds run through it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv0 = cmdline.read_bytes().split(b"\0", 1)[0]
        except OSError:  # the process ended while we looked
            continue
        if Path(argv0.decode(errors="replace")).name == "ninja":
            return True
    return False


def stale_build_locks(root: Path, now: float, stale_after: float = STALE_AFTER_S) -> list[Path]:
    """Build locks under `root` older than `stale_after` seconds while no build is running."""
    old = [p for p in root.glob("**/lock") if p.is_file() and now - p.stat().st_mtime > stale_after]
    return [] if not old or builds_running() else sorted(old)


def check_build_locks() -> None:
    """Raise StaleLock naming the files to delete, instead of letting DeepSpeed wait on them forever."""
    stale = stale_build_locks(build_root(), time.time())
    if stale:
        names = " ".join(str(p) for p in stale)
        raise StaleLock(f"stale torch JIT build lock(s): {names} (left by a process killed while building "
                        f"a DeepSpeed op; no build is running). Every DeepSpeed start would wait on them "
                        f"forever: delete them (rm {names}) and start again")


def hold_run_lock(output_dir: Path, timeout_s: float, poll_s: float = 1.0) -> int:
    """Take the run lock of output_dir (waiting up to timeout_s for a live run to end); returns its fd.

    Keep the fd open for the life of the process; the kernel releases the lock at exit.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if time.monotonic() > deadline:
                os.close(fd)
                raise StaleLock(f"{path} is held by pid {holder} (another run of this output_dir, maybe "
                                f"still saving): stop it or use another trainer.output_dir") from None
            if not told:
                print(f"waiting for {path}: held by pid {holder} (a run of this output_dir still saving?)",
                      flush=True)
                told = True
            time.sleep(poll_s)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
