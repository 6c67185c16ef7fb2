"""Share a fine-tune as a LoRA: the SVD of (tuned - base) per layer, in kohya's keys (ComfyUI, A1111, Forge).

    python launch/extract_lora.py --base sdxl.safetensors --tuned runs/x --rank 32 --out x_lora.safetensors
    python launch/extract_lora.py --base sdxl_folder --tuned export.safetensors --rank 64 --threshold 0.9 \\
        --out x_lora.safetensors

--base: the SDXL the fine-tune started from (diffusers folder or single file). --tuned: a run (its latest
checkpoint), a tag folder, an export folder or a single file; text encoders are compared too when --tuned
holds them (a single file or a whole-pipeline folder), and a LoRA layer is written only for weights that
differ. --threshold t: per layer the smallest rank <= --rank that keeps a share t of the delta's energy.
Prints the kept energy (ztsnr_ds/lora.py) and writes it per layer to OUT.energy.json. The file's metadata:
kohya's ss_* keys and the run's ztsnr_ds.*
noise settings (v-prediction, ZTSNR mode, sigma_max, base area). Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ztsnr_ds import lora  # noqa: E402
from ztsnr_ds.export import DTYPES, ExportError, export_metadata, load_checkpoint, save_safetensors  # noqa: E402
from ztsnr_ds.generate import SampleInputError, inspect_model  # noqa: E402
from ztsnr_ds.keymaps import CLIP_L_PREFIX, UNET_PREFIX, clip_l_to_sgm, unet_to_sgm  # noqa: E402
from ztsnr_ds.models import load_frozen, load_unet  # noqa: E402

F32 = torch.float32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the SDXL fine-tuned from: diffusers folder or single file")
    p.add_argument("--tuned", required=True, help="run folder, tag folder, export folder or single file")
    p.add_argument("--rank", required=True, type=int, help="largest rank per layer")
    p.add_argument("--threshold", type=float, help="per layer, the smallest rank keeping this share (0, 1] "
                                                   "of the delta's energy")
    p.add_argument("--out", required=True, type=Path, help="the LoRA .safetensors")
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the SVDs run (default: cuda if available)")
    return p


def text_states(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"lora_te1": CLIP-L, "lora_te2": bigG} state dicts with `text_model.` keys, or {} without encoders."""
    try:
        parts = load_frozen(path, F32)
    except (OSError, ExportError):
        return {}
    return {prefix: {k.removeprefix(CLIP_L_PREFIX): v for k, v in clip_l_to_sgm(module.state_dict()).items()}
            for prefix, module in ((lora.TE1, parts.text_encoder), (lora.TE2, parts.text_encoder_2))}


def load_tuned(path: str) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """(SGM UNet state, text encoder states, ztsnr_ds/modelspec metadata to carry) of --tuned."""
    source = inspect_model(path)
    if source.kind == "checkpoint":
        trained = load_checkpoint(source.path, F32)
        return sgm_unet(trained.state_dict, trained.unet_config), {}, export_metadata(trained)
    unet = load_unet(path, F32)
    metadata = {}
    if Path(path).is_file():
        with safe_open(path, "pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items()
                        if k.startswith(("ztsnr_ds.", "modelspec."))}
    return sgm_unet(unet.state_dict(), dict(unet.config)), text_states(path), metadata


def sgm_unet(state: dict, config: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix(UNET_PREFIX): v for k, v in unet_to_sgm(state, config).items()}


def lora_metadata(args: argparse.Namespace, carried: dict[str, str], ranks: set[int]) -> dict[str, str]:
    """kohya's ss_* keys (what A1111's and kohya's tools show) and the tuned model's own settings."""
    dim = str(args.rank) if ranks == {args.rank} else "Dynamic"
    mode = carried.get("ztsnr_ds.ztsnr")
    return {**carried,
            "ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
            "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "True",
            "ss_zero_terminal_snr": str(mode not in (None, "off")),
            "ss_sd_model_name": Path(args.base).name, "ss_output_name": args.out.stem,
            "ss_training_comment": f"extracted by ztsnr_ds from {args.tuned} minus {args.base}",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.prediction_type": "v", "modelspec.title": args.out.stem,
            "ztsnr_ds.lora_rank": str(args.rank), "ztsnr_ds.lora_threshold": str(args.threshold)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank {args.rank} must be >= 1")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        parser.error(f"--threshold {args.threshold} must lie in (0, 1]")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out {args.out} must end in .safetensors")
    try:
        unet, texts, carried = load_tuned(args.tuned)
        base_unet = load_unet(args.base, F32)
        base = {lora.UNET: sgm_unet(base_unet.state_dict(), dict(base_unet.config))}
        base |= text_states(args.base) if texts else {}
    except (ExportError, SampleInputError, OSError) as e:
        parser.error(f"--base / --tuned: {e}")
    if texts.keys() - base.keys():
        print(f"--base {args.base} holds no text encoders: only the UNet is compared", file=sys.stderr)
    tensors, reports, dropped = {}, [], []
    for prefix, tuned in {lora.UNET: unet, **{p: s for p, s in texts.items() if p in base}}.items():
        if tuned.keys() != base[prefix].keys() or any(tuned[k].shape != base[prefix][k].shape for k in tuned):
            parser.error(f"--tuned {args.tuned} and --base {args.base} differ in architecture ({prefix}); "
                         "pass the base the fine-tune started from")
        layers = lora.lora_layers(tuned, prefix, text=prefix != lora.UNET)
        found, report = lora.extract(base[prefix], tuned, layers, args.rank, args.threshold,
                                     DTYPES[args.dtype], args.device)
        tensors |= found
        reports += report
        dropped.append(lora.dropped_energy(base[prefix], tuned, layers))
    if not tensors:
        parser.error(f"--tuned {args.tuned} equals --base {args.base}: nothing to extract")
    save_safetensors(tensors, args.out, lora_metadata(args, carried, {r.rank for r in reports}))
    energy = args.out.with_suffix(".energy.json")  # per layer: rank kept, energy kept, ||delta||
    energy.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    print(lora.summary(reports, max(dropped)))
    print(f"wrote {len(tensors) // 3} LoRA layers -> {args.out}; per-layer kept energy -> {energy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
