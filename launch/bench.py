"""Micro-benchmarks: ``python launch/bench.py <name> [options]`` (``--help`` lists the names).

Each benchmark is one function in ``launch/benches/<name>.py`` registered with ``@benchmark(arg(...), ...)``:
its name is the function name without ``bench_``, its arguments become the subcommand's options, and it
prints a Markdown table (after the command, machine and date) ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # DeepSpeed's expected warnings: one line

import torch  # noqa: E402

from launch.benches import BENCHMARKS, machine  # noqa: E402

MODULES = ("optim", "step", "memory", "mfu", "data", "sampler", "merge", "scan", "vae", "sources", "captions")
"""launch/benches/<module>.py: importing one registers its benchmarks."""
for module in MODULES:
    importlib.import_module(f"launch.benches.{module}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    commands = parser.add_subparsers(dest="name", required=True, metavar="name")
    for name, (func, arguments) in BENCHMARKS.items():
        sub = commands.add_parser(name, parents=[common], help=func.__doc__.splitlines()[0])
        for flags, kwargs in arguments:
            sub.add_argument(*flags, **kwargs)
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"`python launch/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n{machine()}\n")
    args.func(args)


if __name__ == "__main__":
    main()
