"""ZeRO checkpoint -> safetensors: a diffusers UNet folder or a single-file SDXL.

The trained weights come from deepspeed's `zero_to_fp32` (any world size, no GPU needed; bf16 tensors
for bf16 masters). Single-file SDXL uses the key layout of Stability's generative-models (SGM), which
ComfyUI, A1111 and `diffusers.from_single_file` read; the empty `v_pred` marker tells the clients to
sample with v-prediction, and `ztsnr` (written for `rescale` models only) to rebuild Lin et al.'s table.

The key maps are in `keymaps`; reading a UNet back (diffusers or SGM keys) is `models.load_unet`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ztsnr_ds import checkpoint, ema, safe_load
from ztsnr_ds.keymaps import ExportError, clip_l_to_sgm, openclip_to_sgm, unet_to_sgm, vae_to_sgm
from ztsnr_ds.models import (
    FROZEN_PARTS,
    META_UNET_CONFIG,
    SDXL_MODEL_INDEX,
    UNET_WEIGHTS,
    FrozenParts,
    check_shapes,
    file_unet_shapes,
    is_single_file,
    load_frozen,
    parts_metadata,
    save_frozen,
    unet_shapes,
)
from ztsnr_ds.schedule import NoiseSchedule, diffusers_scheduler_config
from ztsnr_ds.text_training import encoder_metadata, load_encoders, split_encoders, trained_encoder_names

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS = ("model", "ema")  # the trained weights, or their EMA (ema.enabled; ztsnr_ds/ema.py)
NOISE_KEYS = ("ztsnr", "sigma_max", "resolution_scaling", "base_area")  # config.noise (ztsnr_ds.config)
EMPTY_PROMPT = {  # what each captions.dropout_mode trained as the unconditional, and how a client sends it
    "empty": 'the encoded empty prompt "" (an empty negative prompt in ComfyUI and A1111)',
    "zeros": "zero text embeddings (diffusers without a negative prompt; ComfyUI: ConditioningZeroOut)",
}

# ---------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainedUNet:
    """The UNet of one checkpoint tag and the training settings an export records."""

    state_dict: dict[str, torch.Tensor]
    unet_config: dict
    step: int
    noise: dict  # config.noise of the run: ztsnr, sigma_max, base_area, resolution_scaling
    tag_dir: Path
    dropout_mode: str = "empty"  # captions.dropout_mode: the unconditional it learned ("" or zeros)
    weights: str = "model"  # one of WEIGHTS
    lineage: list = field(default_factory=list)  # runs it started from (trainer.init_from: init_from.py)
    max_chunks: int = 1  # captions.max_chunks: 75-token chunks per caption it was trained with (older: 1)
    encoder_names: list[str] = field(default_factory=list)  # trained text encoders (text_training.py)
    encoders: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # their weights, by name
    encoder_meta: dict[str, str] = field(default_factory=dict)  # their lr and steps (encoder_metadata)
    pretrained: str | None = None  # model.pretrained of the run: the trained encoders' configs

    @property
    def schedule(self) -> NoiseSchedule:
        base_area = self.noise["base_area"] if self.noise["resolution_scaling"] else None
        return NoiseSchedule(self.noise["ztsnr"], self.noise["sigma_max"], base_area)

    @property
    def title(self) -> str:
        ema_note = "" if self.weights == "model" else f" ({self.weights})"
        return f"{self.tag_dir.parent.parent.name} step {self.step}{ema_note}"


def resolve_tag(path: str | Path) -> Path:
    """A tag folder from a run dir, its checkpoints/ dir (both: the `latest` tag) or a tag folder."""
    path = Path(path)
    fix = "pass --checkpoint runs/NAME, runs/NAME/checkpoints or runs/NAME/checkpoints/stepNNNNNNNN"
    if not path.is_dir():
        tags = sorted(p.name for p in checkpoint.complete_tags(path.parent))
        hint = f"; tags in {path.parent}: {', '.join(tags)}" if tags else ""
        raise ExportError(f"checkpoint {path} does not exist{hint}; {fix}")
    if (path / checkpoint.STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        latest = folder / checkpoint.LATEST_FILE
        if latest.is_file():
            try:
                tag_dir = checkpoint.read_latest(folder)
            except checkpoint.CheckpointError as e:
                raise ExportError(str(e)) from None
            if not (tag_dir / checkpoint.STATE_FILE).is_file():
                raise ExportError(f"{latest} names {tag_dir.name}, which is missing or incomplete "
                                  f"(no {checkpoint.STATE_FILE}); pass a complete tag folder instead")
            return tag_dir
    raise ExportError(f"{path} is not a checkpoint: no {checkpoint.STATE_FILE} and no "
                      f"{checkpoint.LATEST_FILE} file in it or in {path / 'checkpoints'}; {fix}")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    weights: str = "model") -> TrainedUNet:
    """Gather the UNet of a ZeRO checkpoint (all ranks' partitions) with its ztsnr_state.json settings.

    weights "ema": the EMA the tag holds (its ema/ folder), joined from every rank's slice."""
    if weights not in WEIGHTS:
        raise ExportError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    settings = checkpoint_settings(path)
    tag_dir = settings.tag_dir
    state_dict = _ema_weights(tag_dir, dtype) if weights == "ema" else _model_weights(tag_dir, dtype)
    state_dict, encoders = split_encoders(state_dict, settings.encoder_names)  # UNet keys keep their names
    check_shapes(unet_shapes(settings.unet_config), state_dict,
                 f"{tag_dir}: the {weights} weights do not match unet_config in {checkpoint.STATE_FILE}")
    return replace(settings, state_dict=state_dict, weights=weights, encoders=encoders)


def checkpoint_settings(path: str | Path) -> TrainedUNet:
    """A verified tag's settings (UNet config, step, noise, dropout mode), with no weights loaded yet."""
    tag_dir = resolve_tag(path)
    try:
        state = checkpoint.read_state(tag_dir)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from e
    problems = checkpoint.verify(tag_dir)  # checksums, then no .pt that could run code
    if problems:
        raise ExportError(f"{tag_dir} refused: {'; '.join(problems)}")
    try:
        noise = state[checkpoint.CONFIG]["noise"]
        unet_config, step = state[checkpoint.UNET_CONFIG], state[checkpoint.STEP]
        noise = {key: noise[key] for key in NOISE_KEYS}
        captions = state[checkpoint.CONFIG].get("captions", {})
        dropout_mode = captions.get("dropout_mode", "empty")  # older: ""
    except (KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{tag_dir / checkpoint.STATE_FILE} lacks {e}; export checkpoints written by "
                          "ztsnr_ds.checkpoint.save") from e
    config = state[checkpoint.CONFIG]
    return TrainedUNet({}, unet_config, step, noise, tag_dir, dropout_mode,
                       lineage=config.get("lineage", []),
                       max_chunks=captions.get("max_chunks", 1),  # older runs: 77 tokens
                       encoder_names=trained_encoder_names(config),
                       encoder_meta=encoder_metadata(config, step),
                       pretrained=config.get("model", {}).get("pretrained"))


def _model_weights(tag_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with safe_load.weights_only():
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name, lazy_mode=True)
            # The flat partitions load with requires_grad: detach, or each tensor's graph keeps them alive.
            # copy: each tensor gets its own storage (views of one flat buffer cannot be saved separately).
            return {k: v.contiguous().detach().to(dtype, copy=True) for k, v in lazy.items()}
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ExportError(f"{tag_dir}: DeepSpeed files unreadable ({type(e).__name__}: {e}); was the save "
                          "interrupted? Pass an older complete tag folder") from e


def _ema_weights(tag_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    folder = tag_dir / ema.EMA_DIR
    if not folder.is_dir():
        raise ExportError(f"{tag_dir} holds no EMA (the run trained without ema.enabled); export "
                          "--weights model, or train with ema.enabled: true")
    try:
        return ema.read_named(folder, ema.MAIN_TRACK, dtype)
    except ema.EMAError as e:
        raise ExportError(str(e)) from e


# ---------------------------------------------------------------------------------------- writing
def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write via a temporary file and rename, so no half-written file ever carries the final name.

    safetensors creates its file 0600; an export is meant for other programs (a ComfyUI or A1111 running
    as another user), so it gets what `open` would give: 0666 less the umask (0644 with the usual 022).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_metadata(trained: TrainedUNet, title: str | None = None) -> dict[str, str]:
    """modelspec.* (Stability's SAI model spec 1.0.0) where a key exists, ztsnr_ds.* for the rest.

    The noise table (mode, sigma_max, base area) is in both: ztsnr_ds.* for programs (generate.py, the
    ComfyUI node), modelspec.description for people; ztsnr_ds.scheduler_config is the diffusers
    scheduler that samples it (`diffusers_scheduler_config`).
    """
    s = trained.schedule
    side = math.isqrt(s.base_area) if s.base_area else 1024
    area = f"base area {s.base_area} px" if s.base_area else "no resolution scaling"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or trained.title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v",
        "modelspec.description": f"ztsnr_ds: v-prediction, zero terminal SNR mode {s.mode} (sigma_max "
                                 f"{s.sigma_max:g}), {area}; unconditional (empty prompt): "
                                 f"{EMPTY_PROMPT[trained.dropout_mode]}",
        "ztsnr_ds.step": str(trained.step),
        "ztsnr_ds.checkpoint_tag": trained.tag_dir.name,
        "ztsnr_ds.ztsnr": s.mode,
        "ztsnr_ds.sigma_max": str(float(s.sigma_max)),
        "ztsnr_ds.base_area": str(s.base_area),
        "ztsnr_ds.dropout_mode": trained.dropout_mode,
        "ztsnr_ds.lineage": json.dumps(trained.lineage),
        "ztsnr_ds.max_chunks": str(trained.max_chunks),  # 75-token chunks (docs/long-captions.md)
        "ztsnr_ds.scheduler_config": json.dumps(diffusers_scheduler_config(s)),
        META_UNET_CONFIG: json.dumps(trained.unet_config),
        **trained.encoder_meta,  # trained text encoders only
    }


def copy_tree_new_modes(src: Path, dst: Path) -> None:
    """Copy a folder tree with the modes new files and folders get (0666 / 0777 less the umask), not the
    source's: a base kept 0700 must not make the export unreadable to a client running as another user
    (shutil.copytree copies folder modes even with copy_function=copyfile). Symlinks are followed (HF
    cache snapshots link to blobs)."""
    for root, _, files in os.walk(src, followlinks=True):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(root) / name, target / name)


def export_diffusers(trained: TrainedUNet, out: str | Path, title: str | None = None,
                     base: str | Path | None = None) -> Path:
    """Write out/unet (config.json + safetensors), out/scheduler (ZTSNR Euler, v-pred), out/README.md and,
    with `base`, the base's other parts and a model_index.json: a whole StableDiffusionXLPipeline folder."""
    out = Path(out)
    base = check_base(base, trained) if base is not None else None
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # replaces `out` only once complete
    try:
        save_safetensors(trained.state_dict, tmp / "unet" / UNET_WEIGHTS,
                         {"format": "pt", **export_metadata(trained, title)})
        with init_empty_weights():
            config_json = UNet2DConditionModel.from_config(trained.unet_config).to_json_string()
        checkpoint.write_atomic(tmp / "unet" / "config.json", config_json)  # open(): 0666 less the umask
        (tmp / "scheduler").mkdir()
        scheduler = diffusers_scheduler_config(trained.schedule)
        checkpoint.write_atomic(tmp / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2))
        checkpoint.write_atomic(tmp / "README.md", sampling_readme(trained, title))
        if base is not None and is_single_file(base):  # its parts as diffusers folders
            save_frozen(load_frozen(base, next(iter(trained.state_dict.values())).dtype), tmp)
            index = pipeline_index(SDXL_MODEL_INDEX, trained)
        elif base is not None:
            for part in FROZEN_PARTS:
                copy_tree_new_modes(base / part, tmp / part)
            index = pipeline_index(json.loads((base / "model_index.json").read_text()), trained)
        if base is not None:
            checkpoint.write_atomic(tmp / "model_index.json", json.dumps(index, indent=2))
        write_encoders(trained, tmp, tmp if base is not None else None)  # configs: the base's parts copied
        if out.exists():  # an earlier export: swapped out only now that the new one is whole
            os.replace(out, old := out.with_name(f"{out.name}.old{os.getpid()}"))
            shutil.rmtree(old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_encoders(trained: TrainedUNet, out: Path, base: Path | None) -> None:
    """The trained text encoders as diffusers folders out/text_encoder(_2)/, configs from `base` (else the
    run's model.pretrained); nothing for a run that trained none."""
    folder = base or (Path(trained.pretrained) if trained.pretrained else None)
    for name, state in trained.encoders.items():
        if folder is None or not (folder / name / "config.json").is_file():
            raise ExportError(f"{trained.tag_dir} trained {name}, whose config is read from the base: pass "
                              "--base, the diffusers SDXL folder the run trained from (model.pretrained)")
        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        dtype = next(iter(state.values())).dtype
        with init_empty_weights():
            model = cls(cls.config_class.from_pretrained(folder / name))
        model.load_state_dict(state, strict=True, assign=True)
        shutil.rmtree(out / name, ignore_errors=True)  # the base's copy, if any
        model.to(dtype).save_pretrained(out / name)


def pipeline_index(base_index: dict, trained: TrainedUNet) -> dict:
    """The base's model_index.json with our scheduler and the run's empty-prompt convention: diffusers
    zeroes the negative embeddings when none is given iff force_zeros_for_empty_prompt."""
    return {**base_index, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "force_zeros_for_empty_prompt": trained.dropout_mode == "zeros"}


def check_base(base: str | Path, trained: TrainedUNet) -> Path:
    """The SDXL folder or single file the run trained from, checked: its UNet matches in shape, it has every
    frozen part."""
    base = Path(base)
    fix = "pass --base the SDXL folder or single file the run was trained from (model.pretrained)"
    if is_single_file(base):
        check_shapes(file_unet_shapes(base, trained.unet_config), trained.state_dict,
                     f"--base {base}: its UNet disagrees with the checkpoint {trained.tag_dir}; {fix}")
        return base
    unet_json = base / "unet" / "config.json"
    if not unet_json.is_file():
        raise ExportError(f"--base {base} is not a diffusers SDXL folder (no {unet_json}); {fix}")
    check_shapes(unet_shapes(json.loads(unet_json.read_text())), trained.state_dict,
                 f"--base {base}: {unet_json} disagrees with the checkpoint {trained.tag_dir}; {fix}")
    missing = [p for p in (*FROZEN_PARTS, "model_index.json") if not (base / p).exists()]
    if missing:
        raise ExportError(f"--base {base} lacks {', '.join(missing)}; {fix}")
    return base


def load_base(base: str | Path, trained: TrainedUNet, dtype: torch.dtype) -> FrozenParts:
    """VAE and text encoders of the SDXL folder the run trained from (`check_base`)."""
    base = check_base(base, trained)
    try:
        return load_frozen(base, dtype)
    except (FileNotFoundError, OSError) as e:
        raise ExportError(f"--base {base}: {e}; pass --base the diffusers SDXL folder the run was "
                          "trained from (model.pretrained)") from e


def single_file_state(trained: TrainedUNet, parts: FrozenParts,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All SDXL weights in SGM keys, plus the empty `v_pred` marker and, for `rescale` only, `ztsnr`.

    ComfyUI, Forge and A1111 read `ztsnr` as "rebuild Lin et al.'s rescaled table" (top sigma 4518.76
    before the terminal step); only a `rescale` model was trained on that table. reForge builds it and
    then rescales it again before each generation (docs/reforge.md: drop the key there). A `terminal`
    model would be told other timesteps than training used at nearly every step, so it carries no
    `ztsnr` marker; the metadata (`ztsnr_ds.ztsnr`, `sigma_max`, `base_area`) records its table.
    """
    state = unet_to_sgm(trained.state_dict, trained.unet_config)
    state |= clip_l_to_sgm(parts.text_encoder.state_dict())
    state |= openclip_to_sgm(parts.text_encoder_2.state_dict())
    state |= vae_to_sgm(parts.vae.state_dict(), parts.vae.config)
    markers = ["v_pred"] + (["ztsnr"] if trained.noise["ztsnr"] == "rescale" else [])
    state |= {name: torch.zeros(0) for name in markers}
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def single_file_loader(path: str | Path, base: str | Path, dropout_mode: str) -> str:
    """Python that loads a single-file export into diffusers with the scheduler it was trained for (the
    file's ztsnr_ds.scheduler_config metadata) and the unconditional it learned: diffusers zeroes the
    negative embeddings when none is given iff force_zeros_for_empty_prompt, and a base SDXL folder's
    model_index.json says true. `base` gives the configs and tokenizers, offline."""
    return ("import json, safetensors\n"
            "from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline\n"
            f"pipe = StableDiffusionXLPipeline.from_single_file({str(path)!r}, config={str(base)!r}, "
            f"local_files_only=True,\n    force_zeros_for_empty_prompt={dropout_mode == 'zeros'})  "
            f"# captions.dropout_mode {dropout_mode}: {EMPTY_PROMPT[dropout_mode]}\n"
            f"pipe.scheduler = EulerDiscreteScheduler.from_config(json.loads(safetensors.safe_open("
            f"{str(path)!r}, 'pt').metadata()['ztsnr_ds.scheduler_config']))")


def export_single_file(trained: TrainedUNet, base: str | Path, out: str | Path,
                       dtype: torch.dtype = torch.bfloat16, title: str | None = None,
                       vae: AutoencoderKL | None = None) -> Path:
    """One SDXL .safetensors: trained UNet (and trained text encoders, if any) + the base's VAE and text
    encoders, SGM keys, metadata.

    vae: instead of the base's (a fine-tuned decoder, ztsnr_ds/vae_export.py)."""
    parts = load_encoders(load_base(base, trained, dtype), trained.encoders)  # trained encoders, if any
    if vae is not None:
        parts = replace(parts, vae=vae.to(dtype))
    state = single_file_state(trained, parts, dtype)
    return save_safetensors(state, Path(out), export_metadata(trained, title) | parts_metadata(parts))


def encoder_readme(trained: TrainedUNet) -> str:
    """README lines for the text encoders the run trained (none: "")."""
    classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    return "".join(f"- `{name}/`: the text encoder this run trained; give it to the pipeline too, e.g.\n"
                   f'  `{name}={classes[name]}.from_pretrained("OUT", subfolder="{name}")`.\n'
                   for name in trained.encoders)


def sampling_readme(trained: TrainedUNet, title: str | None = None) -> str:
    """How to sample the exported UNet with its ZTSNR sigmas (diffusers, ztsnr_ds, ComfyUI)."""
    s = trained.schedule
    area = "off" if s.base_area is None else f"{s.base_area} px (sigma x sqrt(H*W / {s.base_area}))"
    return f"""# {title or trained.title}

SDXL UNet trained with ztsnr_ds: v-prediction, zero terminal SNR mode `{s.mode}` (sigma_max {s.sigma_max:g}),
resolution-aware noise {area}; checkpoint {trained.tag_dir.name} (step {trained.step}).

- `unet/`: diffusers UNet2DConditionModel (training settings in the safetensors metadata).
- `scheduler/`: EulerDiscreteScheduler, `prediction_type: v_prediction`, `timestep_spacing: trailing`,
  `trained_betas` that reproduce the ZTSNR sigma table (diffusers' fp32 cumprod reads the top sigma as
  ~19880 instead of {s.sigma_max:g}; at that noise level the model predicts the image outright, v = -x0).
{encoder_readme(trained)}
## diffusers

```python
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained("OUT", subfolder="unet")
scheduler = EulerDiscreteScheduler.from_pretrained("OUT", subfolder="scheduler")
zeros = {trained.dropout_mode == "zeros"}  # captions.dropout_mode {trained.dropout_mode}
pipe = StableDiffusionXLPipeline.from_pretrained("BASE_SDXL", unet=unet, scheduler=scheduler,
                                                 force_zeros_for_empty_prompt=zeros)
image = pipe(prompt, num_inference_steps=28, guidance_scale=5.0, guidance_rescale=0.7).images[0]
```

An export made with `--base` is a whole pipeline: `StableDiffusionXLPipeline.from_pretrained("OUT")`.
The unconditional the model learned (captions.dropout_mode `{trained.dropout_mode}`):
{EMPTY_PROMPT[trained.dropout_mode]}. force_zeros_for_empty_prompt (model_index.json, or the argument
above) follows it, so a call without a negative prompt gives it.

Trailing spacing makes the first step the terminal sigma, where sampling starts from pure noise as in
training; `leading` spacing would skip it (Lin et al. 2023, sec. 3.3). CFG-rescale (0.5-0.7, same paper)
counters over-exposure at high guidance.

## Other resolutions: ZTSNR sigmas

Training scaled every finite sigma with the image area. For sizes other than the base area pass the
scaled sigmas yourself, ending with 0. Above the base area, sigmas beyond the table's last finite level
got timesteps past 998 in training (the last step's log slope continued); diffusers' stock scheduler
clamps them to [998, 999), so use ztsnr_ds' subclass, which maps them as training did:

```python
from ztsnr_ds.sampling import ZTSNREulerDiscreteScheduler
from ztsnr_ds.schedule import NoiseSchedule
pipe.scheduler = ZTSNREulerDiscreteScheduler.from_pretrained("OUT", subfolder="scheduler")
schedule = NoiseSchedule("{s.mode}", {s.sigma_max:g}, {s.base_area})
sigmas = schedule.inference_sigmas("trailing", 28, height, width).tolist()  # 29 levels, last 0
image = pipe(prompt, sigmas=sigmas, height=height, width=width, guidance_scale=5.0).images[0]
```

ztsnr_ds' own Euler sampler (`ztsnr_ds.sampling`) takes the same sigmas. A single-file export of this
checkpoint carries the `v_pred` marker that ComfyUI, A1111 and Forge read to pick v-prediction{
    ", and `ztsnr`, which makes them rebuild this (Lin et al.'s rescaled) table (not reForge, which "
    "rescales it twice: see ztsnr_ds' docs/reforge.md)" if s.mode == "rescale" else
    "; it carries no `ztsnr` marker, because the clients read that as Lin et al.'s rescaled table, not `"
    + s.mode + "`"}.
"""
