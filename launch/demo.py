"""`make demo`: the whole job on a tiny SDXL-shaped model and generated data, on CPU.

    tiny model + captioned images -> latent cache -> ZTSNR training through DeepSpeed
    (checkpoints, validation grids, TensorBoard) -> safetensors export

Each stage runs the same command a user would run, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ztsnr_ds.data.synthetic import write_dataset  # noqa: E402
from ztsnr_ds.models import write_tiny_sdxl  # noqa: E402


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def write_config(out: Path, run_dir: Path, steps: int) -> str:
    """configs/demo.yaml with its paths pointed into `out`; one file serves cache, train and export."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["pretrained"] = str(out / "model")
    config["data"] |= {"source": str(out / "data"), "cache_dir": str(out / "cache")}
    config["trainer"] |= {"output_dir": str(run_dir), "max_steps": steps}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def loss_summary(metrics_file: Path, window: int = 20) -> tuple[float, float]:
    """Mean loss of the first and last `window` steps (the last record of each step wins)."""
    by_step = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]
    losses = [by_step[s] for s in sorted(by_step)]
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="Folder for everything the demo writes.")
    parser.add_argument("--steps", type=int, default=200, help="Training steps.")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    start = time.time()
    if not (out / "model" / "model_index.json").is_file():
        write_tiny_sdxl(out / "model")
    write_dataset(out / "data", n=64)
    run_dir = out / "run"
    config = write_config(out, run_dir, args.steps)
    run([sys.executable, "launch/cache.py", "--config", config])
    run([sys.executable, "launch/train.py", "--config", config, "--trainer.resume", "none",
         "--trainer.overwrite", "true"])  # a fresh run each time: an earlier demo's tags are moved aside
    export = out / "export"
    run([sys.executable, "launch/export.py", "--checkpoint", str(run_dir), "--format", "single_file",
         "--base", str(out / "model"), "--out", str(export / "demo_sdxl_ztsnr.safetensors")])
    run([sys.executable, "launch/export.py", "--checkpoint", str(run_dir), "--format", "diffusers",
         "--out", str(export / "diffusers")])
    first, last = loss_summary(run_dir / "metrics.jsonl")
    print(f"\nloss: first 20 steps {first:.4f} -> last 20 steps {last:.4f} ({last / first:.0%} of start)")
    print(f"checkpoints:       {run_dir / 'checkpoints'}")
    print(f"validation grids:  {run_dir / 'samples'}")
    print(f"tensorboard:       tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"metrics (jsonl):   {run_dir / 'metrics.jsonl'}")
    print(f"exports:           {export}")
    print(f"cache report:      {out / 'cache' / 'report.json'}")
    batching = json.loads((run_dir / "sampler_summary.json").read_text())
    print(f"sampler:           {batching['images']} images in {len(batching['buckets'])} buckets, "
          f"{batching['unused']} unused per epoch ({run_dir / 'sampler_summary.json'})")
    print(f"demo took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
