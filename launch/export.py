"""Export a trained UNet from a ZeRO checkpoint; works on CPU, for checkpoints of any world size.

    python launch/export.py --checkpoint runs/x --format diffusers --out exports/x [--base path/to/sdxl]
        -> exports/x/unet/ (config.json + safetensors), exports/x/scheduler/, exports/x/README.md;
           with --base also its VAE, text encoders, tokenizers and model_index.json: a whole pipeline folder
    python launch/export.py --checkpoint runs/x/checkpoints/step00001000 --format single_file \\
        --base path/to/sdxl-diffusers-folder --out x.safetensors
        -> one SDXL checkpoint (SGM keys, v_pred / ztsnr markers) for ComfyUI, A1111, from_single_file

--checkpoint takes a run folder or its checkpoints/ folder (the tag named in `latest`) or a tag folder;
--weights ema exports the tag's EMA instead of the trained weights (runs with ema.enabled).
--vae runs/vae (a launch/train_vae.py run) puts its fine-tuned decoder into the export: the single file's
first_stage_model.*, the diffusers folder's vae/ (alone with --format diffusers and no --checkpoint);
the encoder stays bitwise the base's (docs/vae-decoder.md).
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
from ztsnr_ds.integrity import NoSpaceError, no_space_guard  # noqa: E402
from ztsnr_ds.vae_export import load_decoder_run, trained_vae, write_vae_folder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="run dir, its checkpoints/ dir, or a tag folder")
    parser.add_argument("--format", required=True, choices=("diffusers", "single_file"),
                        help="diffusers: a UNet folder (a whole pipeline with --base); single_file: one "
                             "SGM-keyed SDXL .safetensors for ComfyUI, A1111, Forge (needs --base)")
    parser.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file")
    parser.add_argument("--base", help="SDXL folder or single file the run trained from: its VAE and text "
                                       "encoders (needed by single_file; diffusers: a whole pipeline)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES),
                        help="precision of the written weights")
    parser.add_argument("--weights", default="model", choices=WEIGHTS,
                        help="the trained weights, or their EMA (runs with ema.enabled)")
    parser.add_argument("--title", help="modelspec.title (default: '<run name> step <N>')")
    parser.add_argument("--vae", help="a VAE decoder run (launch/train_vae.py): its decoder replaces the "
                                        "base's")
    parser.add_argument("--vae-weights", default="model", choices=WEIGHTS,
                        help="the decoder run's trained weights, or their EMA")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint and not (args.vae and args.format == "diffusers"):
        parser.error("--checkpoint is required (only --vae with --format diffusers exports a VAE alone)")
    if args.format == "single_file" and not args.base:
        parser.error("--format single_file needs --base, the SDXL folder or single file the run trained from")
    if args.format == "single_file" and not args.out.endswith(".safetensors"):
        parser.error(f"--format single_file writes one file: --out {args.out} must end in .safetensors")
    dtype = DTYPES[args.dtype]
    try:
        vae = trained_vae(load_decoder_run(args.vae, dtype, args.vae_weights), dtype,
                          args.base) if args.vae else None
        with no_space_guard(Path(args.out).parent, "the export", "free space or pass another --out"):
            if not args.checkpoint:
                out = write_vae_folder(vae, Path(args.out) / "vae")
                print(f"exported the decoder of {args.vae} ({args.vae_weights} weights) -> {out}")
                return 0
            trained = load_checkpoint(args.checkpoint, dtype, args.weights)
            if args.format == "diffusers":
                out = export_diffusers(trained, args.out, args.title, args.base)
                if vae is not None:  # after the base's vae/ (with --base): the fine-tuned one replaces it
                    write_vae_folder(vae, out / "vae")
            else:
                out = export_single_file(trained, args.base, args.out, dtype, args.title, vae)
    except (ExportError, NoSpaceError) as e:  # a full disk leaves no partial output (temporary + rename)
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    vae_note = f", VAE decoder of {args.vae} ({args.vae_weights})" if args.vae else ""
    print(f"exported {trained.tag_dir} (step {trained.step}, {trained.weights} weights{vae_note}) -> {out}")
    if args.format == "single_file":
        if Path(args.base).is_dir():  # diffusers reads the parts' configs from a folder
            loader = single_file_loader(out, args.base, trained.dropout_mode)
            print(f"diffusers, with the scheduler and the unconditional it was trained for:\n{loader}")
        print(f"ComfyUI: copy it to ComfyUI/models/checkpoints/; this `{trained.noise['ztsnr']}` model "
              "samples on its training table with the ZTSNR Model Sampling node of comfyui/ "
              "(docs/export-and-clients.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
