"""Post-hoc EMA: the UNet of any EMA width sigma_rel, rebuilt from a run's power-EMA snapshots (EDM2).

    python launch/posthoc_ema.py --run runs/x --sigma-rel 0.07 --out ema_007.safetensors
    python launch/posthoc_ema.py --run runs/x --sigma-rel 0.12 --out exports/ema_012 --base path/to/sdxl

The run must have trained with ema.enabled and ema.posthoc (snapshots in runs/x/ema_snapshots/). --out
ending in .safetensors writes a UNet file (diffusers keys, the run's noise settings in its metadata) that
launch/sample.py --model and the ComfyUI node read; a folder gets a diffusers export (with --base, a whole
pipeline). The printed residual: how far the snapshots' profiles are from the asked one (ztsnr_ds/posthoc.py);
sum(x): the coefficients' sum (1 after normalising; the least-squares mass before it in brackets).
Bad input names the flag and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_ds.console import quiet_deepspeed  # noqa: E402
from ztsnr_ds.machine import one_thread_per_process  # noqa: E402

one_thread_per_process()  # before torch is imported
quiet_deepspeed()  # DeepSpeed's expected warnings: one line
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ztsnr_ds.ema import EMAError, power_gamma  # noqa: E402
from ztsnr_ds.export import (  # noqa: E402
    DTYPES,
    ExportError,
    checkpoint_settings,
    export_diffusers,
    export_metadata,
    save_safetensors,
)
from ztsnr_ds.integrity import NoSpaceError, no_space_guard  # noqa: E402
from ztsnr_ds.posthoc import find_snapshots, reconstruct  # noqa: E402
from ztsnr_ds.text_training import split_encoders  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="the run folder (trainer.output_dir)")
    p.add_argument("--sigma-rel", required=True, type=float, help="EMA width to rebuild, in (0, 0.28)")
    p.add_argument("--out", required=True, type=Path, help="UNet .safetensors or a folder")
    p.add_argument("--step", type=int, help="the snapshot step to rebuild at (default: the last one)")
    p.add_argument("--from-sigma-rels", type=float, nargs="+",
                   help="use only the tracks of these widths (default: every tracked one)")
    p.add_argument("--base", help="diffusers SDXL folder: with a folder --out, write a whole pipeline")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="precision of the written weights")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.sigma_rel < 0.28:
        parser.error(f"--sigma-rel {args.sigma_rel} must lie in (0, 0.28) (EDM2 uses 0.05-0.20)")
    try:
        snapshots = find_snapshots(args.run)
        if args.step is not None:
            steps = [s.step for s in snapshots]
            if args.step not in steps:
                parser.error(f"--step {args.step}: no snapshot at that step; snapshots: {steps}")
            snapshots = [s for s in snapshots if s.step <= args.step]
        state, solution = reconstruct(snapshots, args.sigma_rel, sources=args.from_sigma_rels)
        settings = checkpoint_settings(args.run)
        dtype = DTYPES[args.dtype]
        state, encoders = split_encoders({k: v.to(dtype) for k, v in state.items()}, settings.encoder_names)
        trained = replace(settings, state_dict=state, encoders=encoders, step=snapshots[-1].step,
                          weights=f"post-hoc EMA sigma_rel {args.sigma_rel:g}")
        with no_space_guard(args.out.parent, "the post-hoc EMA", "free space or pass another --out"):
            if args.out.suffix == ".safetensors":
                if encoders:  # a UNet file has no place for them
                    print(f"note: {args.out} holds the UNet only; the run also trained "
                          f"{', '.join(encoders)}: pass a folder as --out for a diffusers export with them",
                          file=sys.stderr)
                meta = {"format": "pt", **export_metadata(trained)}
                out = save_safetensors(trained.state_dict, args.out, meta)
            else:
                out = export_diffusers(trained, args.out, base=args.base)
    except (EMAError, ExportError, NoSpaceError) as e:  # a full disk leaves no partial output
        print(f"posthoc_ema failed: {e}", file=sys.stderr)
        return 2
    gamma = power_gamma(args.sigma_rel)
    print(f"sigma_rel {args.sigma_rel:g} (gamma {gamma:.3f}) at step {trained.step} from "
          f"{len(solution.coefficients)} snapshot tracks ({len(snapshots)} snapshots); profile residual "
          f"{solution.residual:.2e}, sum(x) {solution.coefficients.sum():.6f} "
          f"(least squares {solution.mass:.6f}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
