"""`make demo`: the whole job on a tiny SDXL-shaped model and generated data, on CPU, judged by looking.

    tiny model (hand-set pooling VAE) + captioned images -> VAE check -> latent cache
    -> two training runs through DeepSpeed, `ztsnr: terminal` and `ztsnr: off`, same budget
    -> samples of training captions from both -> scores + ZTSNR-vs-off PNG -> safetensors export

Each stage runs the same command a user would run, printed before it runs. Training runs in fp32
(ds_configs/zero2_fp32.json): on CPUs without bf16 units that is what fits the demo in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

# One thread per process (inherited by every stage): the tiny model is op-overhead bound, and OpenMP threads
# spinning on a busy 2-core machine made a training step 30x slower (3 s vs 0.1-0.2 s, measured).
one_thread_per_process()
quiet_deepspeed()  # DeepSpeed's expected warnings: one line
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ztsnr_ds import demo_scores  # noqa: E402
from ztsnr_ds.data.synthetic import write_dataset  # noqa: E402
from ztsnr_ds.models import TINY_UNET_CONFIG, write_tiny_sdxl  # noqa: E402
from ztsnr_ds.pooling_vae import pooling_vae  # noqa: E402

# GroupNorm of one channel per group would subtract each channel's own mean before conv_out, so the
# UNet could not say how bright a plain image is: 8 groups (4-8 channels each), as SDXL has 10 per group.
DEMO_UNET_CONFIG = TINY_UNET_CONFIG | {"norm_num_groups": 8}
SHAPE_PROMPTS = ["red circle, circle, red, white background", "blue square, square, blue, dark background",
                 "yellow square, square, yellow, dark background",
                 "green circle, circle, green, white background"]
PLAIN_PROMPTS = ["plain black, black, plain", "plain white, white, plain"]
RUNS = {"ZTSNR": "terminal", "off": "off"}  # column title -> noise.ztsnr


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def write_config(out: Path, name: str, ztsnr: str, steps: int) -> str:
    """configs/demo.yaml with paths into `out` and noise.ztsnr set; one file serves cache, train, export."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["pretrained"] = str(out / "model")
    config["data"] |= {"source": None, "sources": demo_sources(out / "data"), "cache_dir": str(out / "cache")}
    config["noise"]["ztsnr"] = ztsnr
    config["deepspeed_config"] = "ds_configs/zero2_fp32.json"  # CPU convenience; the YAML (tests) keeps bf16
    config["trainer"] |= {"output_dir": str(out / name), "max_steps": steps}
    path = out / f"config_{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def demo_sources(data: Path) -> list[dict]:
    """Two sources (docs/sources.md): every image once, and the plain ones again from a JSONL manifest,
    twice per epoch with tag dropout (their tone tag "plain <tone>" is the first tag: never dropped)."""
    plain = [t for t in sorted(data.glob("*.txt")) if t.read_text().startswith("plain")]
    (data / "plain.jsonl").write_text("".join(json.dumps({"image": t.with_suffix(".png").name,
                                                          "caption": t.read_text()}) + "\n" for t in plain))
    return [{"path": str(data), "name": "all", "repeats": 1.0},
            {"path": str(data / "plain.jsonl"), "name": "plain", "repeats": 2.0,
             "captions": {"tag_dropout": 0.3, "keep_tags": ["plain"]}}]


def loss_summary(metrics_file: Path, window: int = 20) -> tuple[float, float]:
    """Mean loss of the first and last `window` steps (the last record of each step wins)."""
    by_step = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:  # held-out lines carry holdout/* keys instead
            by_step[record["step"]] = record["loss"]
    losses = [by_step[s] for s in sorted(by_step)]
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def holdout_summary(metrics_file: Path) -> list[tuple[int, float]]:
    """(step, held-out loss) of every held-out evaluation in metrics.jsonl, in order."""
    records = map(json.loads, metrics_file.read_text().splitlines())
    return [(r["step"], r["holdout/loss"]) for r in records if "holdout/loss" in r]


def read_image(path: Path) -> torch.Tensor:
    """A PNG as (1, 3, H, W) float in [-1, 1]."""
    with Image.open(path) as img:
        pixels = np.array(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


def check_vae(model: Path, data: Path) -> None:
    """Print the reconstruction error of the demo images and the latent separation of their colours."""
    vae = AutoencoderKL.from_pretrained(model / "vae", local_files_only=True).eval()
    images = [read_image(p) for p in sorted(data.glob("*.png"))]
    rmse = demo_scores.reconstruction_rmse(vae, images)
    sep = demo_scores.latent_separation(vae, images)
    print(f"\nVAE (hand-set pooling map, ztsnr_ds/pooling_vae.py) on the {len(images)} demo images:")
    print(f"  reconstruction error: RMS {rmse:.1f} of 255 levels (8x8 blocks across shape edges)")
    print("  latent mean of one-colour 8x8 blocks:")
    for name, mean in sep.means.items():
        values = ", ".join(f"{v:+.3f}" for v in mean.tolist())
        print(f"    {name:<7} {sep.counts[name]:>5} blocks  [{values}]")
    print(f"  nearest two colour means {sep.nearest:.3f} apart; spread of a block around its colour's mean "
          f"<= {sep.spread:.4f} (ratio {sep.ratio():.0f})")


def sample(run_dir: Path, out: Path, n: int, steps: int) -> list[list[torch.Tensor]]:
    """Sample every demo prompt n times with launch/sample.py; returns the images per prompt."""
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(SHAPE_PROMPTS + PLAIN_PROMPTS) + "\n")
    folder = run_dir / "demo_samples"
    run([sys.executable, "launch/sample.py", "--model", str(run_dir), "--prompts", str(prompts),
         "--n", str(n), "--steps", str(steps), "--cfg", "4", "--width", "128", "--height", "128",
         "--out", str(folder)])
    images = [read_image(p)[0] for p in sorted(folder.glob("*-seed*.png"))]  # prompt-major
    return [images[i * n:(i + 1) * n] for i in range(len(SHAPE_PROMPTS) + len(PLAIN_PROMPTS))]


def print_caption_chunks(report: Path) -> None:
    """The cache report's caption histogram: how many captions took 1, 2, 3 CLIP chunks of 75 tokens."""
    captions = json.loads(report.read_text())["captions"]
    over, counts = "/".join(captions["tokens_over"]), "/".join(map(str, captions["tokens_over"].values()))
    print(f"\nCaption lengths (tiny tokenizer; docs/long-captions.md): over {over} tokens: {counts}; "
          "cut at max_chunks "
          f"{captions['max_chunks']}: {captions['truncated']}")
    for k, n in captions["chunks"].items():
        print(f"  {k} chunk{'s' if k != '1' else ' '} ({int(k) * 77:>3} tokens) {n:>4} captions {'#' * n}")


def print_colour_scores(samples: dict[str, list[list[torch.Tensor]]]) -> None:
    """Mean colour inside / outside the drawn shape per shape prompt, per run."""
    print("\nSamples of training captions: mean colour inside / outside the shape (RGB 0-255), "
          "pixels nearer the prompted colour than the prompted background count as inside")
    for p, prompt in enumerate(SHAPE_PROMPTS):
        colour, background = demo_scores.parse_shape_prompt(prompt)
        wanted = f"{colour} {demo_scores.PALETTE[colour]} on {demo_scores.PALETTE[background]}"
        print(f"  {prompt!r}: wanted {wanted}")
        for title, per_prompt in samples.items():
            scores = [demo_scores.colour_score(img, prompt) for img in per_prompt[p]]
            inside = torch.stack([s.inside for s in scores]).nanmean(0)
            outside = torch.stack([s.outside for s in scores]).nanmean(0)  # NaN: a sample with no outside
            share = sum(s.shape_share for s in scores) / len(scores)
            ok = sum(s.ok for s in scores)
            print(f"    {title:<6} inside {_rgb(inside)} outside {_rgb(outside)}  shape {share:4.0%} of the "
                  f"image, {ok}/{len(scores)} samples read as prompted")


def _rgb(rgb: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:3.0f}" for v in rgb.tolist()) + ")"


def print_brightness(samples: dict[str, list[list[torch.Tensor]]]) -> dict[str, dict[str, float]]:
    """NAI V3 Fig. 2 in numbers: mean brightness (0-255) of plain-tone samples per run."""
    print("\nZTSNR vs off: mean brightness of the samples (0-255), same training budget")
    print(f"  {'prompt':<28} {'data':>6} " + " ".join(f"{t:>7}" for t in samples))
    table = {}
    for k, prompt in enumerate(PLAIN_PROMPTS):
        tone = prompt.split(",")[1].strip()
        p = len(SHAPE_PROMPTS) + k
        table[prompt] = {t: sum(map(demo_scores.brightness, s[p])) / len(s[p]) for t, s in samples.items()}
        print(f"  {prompt:<28} {np.mean(demo_scores.PALETTE[tone]):6.0f} "
              + " ".join(f"{table[prompt][t]:7.0f}" for t in samples))
    return table


def side_by_side(samples: dict[str, list[list[torch.Tensor]]], path: Path, per_cell: int = 2) -> Path:
    """One PNG: a row per prompt (plain tones first), a column per run, `per_cell` seeds in each cell."""
    order = list(range(len(SHAPE_PROMPTS), len(SHAPE_PROMPTS) + len(PLAIN_PROMPTS))) + [0, 1]
    labels = [(SHAPE_PROMPTS + PLAIN_PROMPTS)[p].split(",")[0] for p in order]
    side, gap, left, top = 96, 8, 110, 22
    width = left + len(samples) * (per_cell * side + gap)
    canvas = Image.new("RGB", (width, top + len(order) * (side + gap)), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for c, (title, per_prompt) in enumerate(samples.items()):
        draw.text((left + c * (per_cell * side + gap) + 4, 5), f"ztsnr: {RUNS[title]}", fill=(0, 0, 0))
        for r, p in enumerate(order):
            for i, img in enumerate(per_prompt[p][:per_cell]):
                pixels = demo_scores.levels(img).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
                tile = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
                canvas.paste(tile, (left + c * (per_cell * side + gap) + i * side, top + r * (side + gap)))
    for r, label in enumerate(labels):
        draw.text((4, top + r * (side + gap) + side // 2 - 6), label, fill=(0, 0, 0))
    canvas.save(path, optimize=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="Folder for everything the demo writes.")
    parser.add_argument("--steps", type=int, default=600, help="Training steps of each run.")
    parser.add_argument("--n", type=int, default=4, help="Samples per prompt and run.")
    parser.add_argument("--sample-steps", type=int, default=12, help="Sampler steps.")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    start = time.time()
    write_tiny_sdxl(out / "model", unet_config=DEMO_UNET_CONFIG, vae=pooling_vae())  # cheap: always fresh
    write_dataset(out / "data", n=64)
    check_vae(out / "model", out / "data")
    configs = {title: write_config(out, f"run_{ztsnr}", ztsnr, args.steps) for title, ztsnr in RUNS.items()}
    run([sys.executable, "launch/cache.py", "--config", configs["ZTSNR"]])
    print_caption_chunks(out / "cache" / "report.json")
    for config in configs.values():  # a fresh run each time: an earlier demo's tags are moved aside
        run([sys.executable, "launch/train.py", "--config", config, "--trainer.resume", "none",
             "--trainer.overwrite", "true"])
    runs = {title: out / f"run_{ztsnr}" for title, ztsnr in RUNS.items()}
    samples = {title: sample(run_dir, out, args.n, args.sample_steps) for title, run_dir in runs.items()}
    export = out / "export"
    run([sys.executable, "launch/export.py", "--checkpoint", str(runs["ZTSNR"]), "--format", "single_file",
         "--base", str(out / "model"), "--out", str(export / "demo_sdxl_ztsnr.safetensors")])
    run([sys.executable, "launch/export.py", "--checkpoint", str(runs["ZTSNR"]), "--format", "diffusers",
         "--out", str(export / "diffusers")])
    for title, run_dir in runs.items():
        first, last = loss_summary(run_dir / "metrics.jsonl")
        print(f"\nloss ({title}): first 20 steps {first:.4f} -> last 20 {last:.4f} ({last / first:.0%})")
        if held_out := holdout_summary(run_dir / "metrics.jsonl"):  # validation.holdout images
            (s0, h0), (s1, h1) = held_out[0], held_out[-1]
            print(f"held-out loss ({title}): step {s0} {h0:.4f} -> step {s1} {h1:.4f} ({h1 / h0:.0%})")
    print_colour_scores(samples)
    print_brightness(samples)
    png = side_by_side(samples, out / "ztsnr_vs_off.png")
    print(f"\nZTSNR vs off:      {png}")
    print(f"samples:           {', '.join(str(r / 'demo_samples') for r in runs.values())}")
    print(f"checkpoints:       {', '.join(str(r / 'checkpoints') for r in runs.values())}")
    print(f"tensorboard:       tensorboard --logdir {out}")
    print(f"exports:           {export}")
    print(f"cache report:      {out / 'cache' / 'report.json'}")
    print(f"demo took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
