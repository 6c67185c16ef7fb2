"""What a run folder holds besides checkpoints: config.yaml, labelled validation grids, and the summary
of where things are that launch/train.py prints at the end.

    <output_dir>/config.yaml              the resolved config of the latest start (with its change history)
    <output_dir>/samples/stepNNNNNNNN.png validation grid: each prompt under its image; PNG text chunks
                                          prompts, negative, seeds, sigmas and settings, as sample.py writes
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from ztsnr_ds.data.cache_files import write_atomic
from ztsnr_ds.drift import HISTORY
from ztsnr_ds.generate import Samples, SampleSpec, png_info, sigmas_text
from ztsnr_ds.metrics import labelled_grid

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"


def write_config(output_dir: Path, config_dict: dict) -> Path:
    """<output_dir>/config.yaml: the resolved config, valid as `--config`; the history of changes on
    resume (drift.py) follows as comments, since it is a record, not a setting."""
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in json.loads(json.dumps(config_dict)).items() if k != HISTORY}
    text = yaml.safe_dump(settings, sort_keys=False)
    if history := config_dict.get(HISTORY):
        text += "# changes on resume (drift.py):\n" + "".join(f"#   {json.dumps(h)}\n" for h in history)
    path = output_dir / CONFIG_FILE
    write_atomic(path, text.encode())
    return path


def save_validation_grid(samples: Samples, spec: SampleSpec, out: Path, step: int) -> Image.Image:
    """Write the grid of one validation (the prompt under each image, what made it in PNG text chunks)
    to ``out``; returns it."""
    text = {"prompts": json.dumps(samples.prompts), "negative": spec.negative,
            "seeds": json.dumps(samples.seeds), "sigmas": sigmas_text(samples.sigmas),
            "settings": json.dumps({"step": step, "steps": spec.steps, "schedule": spec.schedule,
                                    "cfg": spec.cfg, "cfg_rescale": spec.cfg_rescale, "width": spec.width,
                                    "height": spec.height, "dropout_mode": spec.dropout_mode})}
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = labelled_grid(samples.images, samples.prompts)
    grid.save(out, pnginfo=png_info(text))
    return grid


def summary(output_dir: Path, step: int, base: str) -> str:
    """Where a run's outputs are, and the next commands (``base``: model.pretrained); only what exists."""
    items = [("checkpoints", "checkpoints"), ("validation grids", SAMPLES_DIR),
             ("TensorBoard", "tensorboard"), ("metrics", "metrics.jsonl"), ("resolved config", CONFIG_FILE),
             ("post-hoc EMA snapshots", "ema_snapshots")]
    lines = [f"done: step {step}. Where things are:"]
    lines += [f"  {what:<24} {output_dir / name}" for what, name in items if (output_dir / name).exists()]
    lines += ["next:", f"  tensorboard --logdir {output_dir / 'tensorboard'}",
              f"  python launch/sample.py --model {output_dir} --prompt \"...\" --out {output_dir}/sampled",
              f"  python launch/export.py --checkpoint {output_dir} --format single_file --base {base} "
              "--out model.safetensors"]
    return "\n".join(lines)
