"""Export a trained UNet from a ZeRO checkpoint; works on CPU, for checkpoints of any world size.

    python launch/export.py --checkpoint runs/x --format diffusers --out exports/x [--base path/to/sdxl]
        -> exports/x/unet/ (config.json + safetensors), exports/x/scheduler/, exports/x/README.md;
           with --base also its VAE, text encoders, tokenizers and model_index.json: a whole pipeline folder
    python launch/export.py --checkpoint runs/x/checkpoints/step00001000 --format single_file \\
        --base path/to/sdxl-diffusers-folder --out x.safetensors
        -> one SDXL checkpoint (SGM keys, v_pred / ztsnr markers) for ComfyUI, A1111, from_single_file

--checkpoint takes a run folder or its checkpoints/ folder (the tag named in `latest`) or a tag folder;
--weights ema exports the tag's EMA instead of the trained weights (runs with ema.enabled).
Bad input prints what is wrong and how to fix it, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # DeepSpeed's expected warnings: one line
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ztsnr_ds.export import (  # noqa: E402
    DTYPES,
    WEIGHTS,
    ExportError,
    export_diffusers,
    export_single_file,
    load_checkpoint,
    single_file_loader,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or a tag folder")
    parser.add_argument("--format", required=True, choices=("diffusers", "single_file"),
                        help="diffusers: a UNet folder (a whole pipeline with --base); single_file: one "
                             "SGM-keyed SDXL .safetensors for ComfyUI, A1111, Forge (needs --base)")
    parser.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file")
    parser.add_argument("--base", help="diffusers SDXL folder the run trained from: its VAE and text "
                                       "encoders (needed by single_file; diffusers: a whole pipeline)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES),
                        help="precision of the written weights")
    parser.add_argument("--weights", default="model", choices=WEIGHTS,
                        help="the trained weights, or their EMA (runs with ema.enabled)")
    parser.add_argument("--title", help="modelspec.title (default: '<run name> step <N>')")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "single_file" and not args.base:
        parser.error("--format single_file needs --base, the diffusers SDXL folder the run trained from")
    if args.format == "single_file" and not args.out.endswith(".safetensors"):
        parser.error(f"--format single_file writes one file: --out {args.out} must end in .safetensors")
    try:
        trained = load_checkpoint(args.checkpoint, DTYPES[args.dtype], args.weights)
        if args.format == "diffusers":
            out = export_diffusers(trained, args.out, args.title, args.base)
        else:
            out = export_single_file(trained, args.base, args.out, DTYPES[args.dtype], args.title)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    print(f"exported {trained.tag_dir} (step {trained.step}, {trained.weights} weights) -> {out}")
    if args.format == "single_file":
        loader = single_file_loader(out, args.base, trained.dropout_mode)
        print(f"diffusers, with the scheduler and the unconditional it was trained for:\n{loader}")
        print(f"ComfyUI: copy it to ComfyUI/models/checkpoints/; this `{trained.noise['ztsnr']}` model "
              "samples on its training table with the ZTSNR Model Sampling node of comfyui/ "
              "(docs/export-and-clients.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
