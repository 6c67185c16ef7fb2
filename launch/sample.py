"""Sample images from a trained model with the ZTSNR Euler sampler (v-prediction, CFG + CFG-rescale).

    python launch/sample.py --model runs/x --prompt "1girl, solo" --n 4 --out samples/
    python launch/sample.py --model x.safetensors --base path/to/sdxl --prompts prompts.txt \\
        --schedule list --sigmas "20000,17.8,12.4,9.2,7.2,5.4,3.9,2.1,0.9,0.0292"

--model: a checkpoint (run folder, its checkpoints/ folder or a tag folder), a diffusers UNet or SDXL
folder (an export_diffusers folder included), or a .safetensors file (single-file SDXL or UNet).
The training noise settings (--ztsnr, --sigma-max, --base-area) are read from the model (ztsnr_state.json
or the ztsnr_ds.* safetensors metadata); flags override them, defaults fill what the model lacks.
Writes NNNN-seedS.png per image (prompt, negative, seed, sigmas and settings in PNG text chunks),
grid.png (one row per prompt) and, with --save-latents, latents.safetensors (denoised latents x0, before
the division by the VAE scaling factor). Image i of prompt p uses seed --seed + p * n + i.
--vae decodes with a fine-tuned decoder: a VAE decoder run (launch/train_vae.py; --vae-weights ema for
its EMA) or an AutoencoderKL folder (an export's vae/).
Bad input names the flag and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # DeepSpeed's expected warnings: one line
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ztsnr_ds.config import DROPOUT_MODES  # noqa: E402
from ztsnr_ds.generate import (  # noqa: E402
    NOISE_SETTINGS,
    SampleInputError,
    SampleSpec,
    generate,
    inspect_model,
    load_model,
    noise_settings,
    resolve_base,
    resolve_schedule,
    write_samples,
)
from ztsnr_ds.keymaps import ExportError  # noqa: E402
from ztsnr_ds.schedule import INFERENCE_SCHEDULES, ZTSNR_MODES, explicit_sigmas  # noqa: E402
from ztsnr_ds.text import MAX_CHUNKS  # noqa: E402
from ztsnr_ds.vae_export import load_sampling_vae  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _side(text: str) -> int:
    """Image side in pixels: the VAE maps 8 x 8 pixels to one latent."""
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE's downsampling)")
    return value


def _sigmas(text: str) -> list[float]:
    try:
        levels = [float(s) for s in text.split(",") if s.strip()]
        explicit_sigmas(levels, None)  # positive, strictly decreasing
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
    return levels


def _base_area(text: str) -> int | None:
    """Pixel area at which sigmas are unscaled; 'none': no resolution scaling."""
    return None if text.lower() == "none" else _positive_int(text)


def base_side(base_area: int | None) -> int:
    """The side of the square the model trained at (its base area, to the 64-px bucket step); 1024 for a
    model trained without resolution scaling."""
    return max(64, math.isqrt(base_area) // 64 * 64) if base_area else 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint, diffusers folder or .safetensors")
    p.add_argument("--base", help="SDXL folder or single file: VAE, text encoders, tokenizers (default: "
                                  "model.pretrained of a checkpoint, a full single file itself; required for "
                                  "UNet-only models)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--negative", default="", help="negative prompt (unconditional CFG branch); empty: the "
                                                  "model's unconditional, see --dropout-mode")
    p.add_argument("--steps", type=_positive_int, default=28, help="sampler steps (ignored with a list)")
    p.add_argument("--schedule", default="trailing", choices=(*INFERENCE_SCHEDULES, "list"),
                   help="sigma schedule: trailing or karras (resolution-scaled, first step at sigma_max), or "
                        "list with --sigmas")
    p.add_argument("--sigmas", type=_sigmas, help="--schedule list: descending levels, e.g. '20000,17.8,...' "
                                                  "(used as given: not resolution-scaled)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--cfg-rescale", type=float, default=0.7, help="CFG-rescale phi in [0, 1] (0: off)")
    p.add_argument("--width", type=_side, help="default: the side of the model's base area (its square "
                                               "training bucket: 1024 for SDXL), else 1024")
    p.add_argument("--height", type=_side, help="default: as --width")
    p.add_argument("--seed", type=int, default=0, help="image i of prompt p uses seed + p * n + i")
    p.add_argument("--n", type=_positive_int, default=1, help="images per prompt")
    p.add_argument("--out", type=Path, default=Path("samples"),
                   help="folder for NNNN-seedS.png, grid.png (and latents.safetensors)")
    p.add_argument("--save-latents", action="store_true", help="also write latents.safetensors")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="a checkpoint's trained weights, or their EMA (runs with ema.enabled)")
    p.add_argument("--vae", help="decode with this fine-tuned VAE: a launch/train_vae.py run or a VAE folder")
    p.add_argument("--vae-weights", choices=("model", "ema"), default="model",
                   help="a VAE decoder run's trained weights, or their EMA")
    s = argparse.SUPPRESS  # absent unless given: the model's own settings apply
    p.add_argument("--ztsnr", choices=ZTSNR_MODES, default=s, help="override the model's ZTSNR mode")
    p.add_argument("--sigma-max", type=float, default=s, help="override the model's sigma_max")
    p.add_argument("--base-area", type=_base_area, default=s, help="override the model's base area (px, "
                                                                    "or 'none')")
    p.add_argument("--dropout-mode", choices=DROPOUT_MODES, default=s,
                   help="what an empty --negative stands for: the encoded '' (empty) or zero embeddings "
                        "(zeros); default: the model's captions.dropout_mode, else empty")
    p.add_argument("--max-chunks", type=int, choices=range(1, MAX_CHUNKS + 1), default=s, metavar="1..8",
                   help="prompts up to 75 x this many tokens, in chunks encoded alone and concatenated "
                        "(docs/long-captions.md); default: the model's captions.max_chunks, else 3")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check flag combinations; errors exit 2 naming the flag."""
    args = parser.parse_args(argv)
    if args.prompts is not None:
        if not args.prompts.is_file():
            parser.error(f"--prompts: {args.prompts} does not exist")
        args.prompt += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not args.prompt:
        parser.error("--prompt or --prompts: give at least one prompt")
    if (args.schedule == "list") != (args.sigmas is not None):
        parser.error("--sigmas: needed with --schedule list, and only with it")
    if not 0 <= args.cfg_rescale <= 1:
        parser.error(f"--cfg-rescale: {args.cfg_rescale} is outside [0, 1]")
    if getattr(args, "sigma_max", 1) <= 0:
        parser.error(f"--sigma-max: {args.sigma_max} must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    try:
        source = inspect_model(args.model)
        base = resolve_base(args.base, source)
        overrides = {k: getattr(args, k) for k in NOISE_SETTINGS if hasattr(args, k)}
        schedule, origin = resolve_schedule(source.noise, overrides)
        noise = noise_settings(schedule)
        print(f"{source.kind} {source.path}; base {base}; noise: "
              + ", ".join(f"{k} {v} ({origin[k]})" for k, v in noise.items()), file=sys.stderr)
        if not source.noise:
            print(f"{args.model} records no noise settings: the defaults above apply unless flags set "
                  "them; pass --ztsnr, --sigma-max, --base-area if it was trained otherwise", file=sys.stderr)
        unet, parts = load_model(source, base, DTYPES[dtype_name], args.weights)
        if args.vae:
            parts.vae = load_sampling_vae(args.vae, DTYPES[dtype_name], args.vae_weights, base)
    except SampleInputError as e:
        parser.error(str(e))
    except ExportError as e:
        parser.error(f"--vae: {e}")
    for module in (unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        module.to(device)
    dropout_mode = getattr(args, "dropout_mode", source.dropout_mode) or "empty"
    if args.width is None or args.height is None:
        side = base_side(schedule.base_area)
        args.width, args.height = args.width or side, args.height or side
        print(f"size {args.width}x{args.height} (the model's base area; --width / --height to change)",
              file=sys.stderr)
    spec = SampleSpec(args.prompt, args.negative, args.n, args.seed,
                      None if args.sigmas else args.steps, args.sigmas or args.schedule,
                      args.cfg, args.cfg_rescale, args.width, args.height, dropout_mode,
                      max_chunks=getattr(args, "max_chunks", source.max_chunks) or 3)
    settings = {"model": str(source.path), "kind": source.kind, "weights": args.weights, "base": str(base),
                "steps": spec.steps,
                "schedule": args.schedule, "cfg": args.cfg, "cfg_rescale": args.cfg_rescale,
                "width": args.width, "height": args.height, "n": args.n, "dtype": dtype_name,
                "device": device.type, "noise": noise, "noise_from": origin, "dropout_mode": dropout_mode,
                "max_chunks": spec.max_chunks, "vae": args.vae and f"{args.vae} ({args.vae_weights})"}
    paths = write_samples(generate(unet, parts, schedule, spec), spec, args.out, settings, args.save_latents)
    print(f"wrote {len(paths)} files to {args.out}: {json.dumps([p.name for p in paths])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
