"""ZeRO checkpoint -> safetensors (diffusers UNet folder or single-file SDXL), and UNet import back.

The trained weights come from deepspeed's `zero_to_fp32` (any world size, no GPU needed; bf16 tensors
for bf16 masters). Single-file SDXL uses the key layout of Stability's generative-models (SGM), which
ComfyUI, A1111 and `diffusers.from_single_file` read; the empty `v_pred` marker tells the clients to
sample with v-prediction, and `ztsnr` (written for `rescale` models only) to rebuild Lin et al.'s table.

Key maps are data: dicts from diffusers module names to SGM ones (DESIGN.md section 8), expanded per
block by small functions. A key is renamed by its longest dotted prefix found in the map, so a map
and its inverse (`{v: k}`) convert both ways; only the UNet is ever read back.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from ztsnr_ds import checkpoint, safe_load
from ztsnr_ds.models import FrozenParts, load_frozen
from ztsnr_ds.schedule import NoiseSchedule, diffusers_scheduler_config

SDXL_UNET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sdxl_unet" / "config.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
META_UNET_CONFIG = "ztsnr_ds.unet_config"
NOISE_KEYS = ("ztsnr", "sigma_max", "resolution_scaling", "base_area")  # config.noise (ztsnr_ds.config)

# ---------------------------------------------------------------------------------------- key maps
# UNet top level, diffusers -> SGM.
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a ResnetBlock2D -> SGM ResBlock.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Attention transformers (SpatialTransformer) use the same inner names on both sides.
CODERS = ("encoder", "decoder")
VAE_TOP = {
    **{f"{part}.{name}": f"{part}.{name}" for part in CODERS for name in ("conv_in", "conv_out")},
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_RESNET = {**{n: n for n in ("norm1", "conv1", "norm2", "conv2")}, "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# transformers CLIPTextModelWithProjection (bigG) -> OpenCLIP, after q/k/v are fused into in_proj.
OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "text_projection.weight": "text_projection",
}
OPENCLIP_LAYER = {
    "self_attn": "attn",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class ExportError(Exception):
    """Bad input to export or import; the message names the path and how to fix it."""


def _nest(names: dict[str, str], src: str, dst: str, parts: dict[str, str]) -> None:
    names.update({f"{src}.{a}": f"{dst}.{b}" for a, b in parts.items()})


def unet_module_map(config: dict) -> dict[str, str]:
    """diffusers -> SGM module names of an SDXL-layout UNet (DESIGN.md 8); `{v: k}` inverts it.

    SGM numbers the blocks of all levels in one sequence: per + 1 input_blocks per level (per resnets,
    with attention at slot .1, then the downsampler) and per + 1 output_blocks per level.
    """
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ExportError(f"layers_per_block = {per}: SGM keys need one number for every level")
    levels = len(config["block_out_channels"])
    names = dict(UNET_TOP)
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per):
            slot = (per + 1) * i + j + 1
            _nest(names, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{slot}.0", UNET_RESNET)
            if "CrossAttn" in kind:
                names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{slot}.1"
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per + 1) * (i + 1)}.0.op"
    _nest(names, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    names["mid_block.attentions.0"] = "middle_block.1"
    _nest(names, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    for i, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for j in range(per + 1):
            _nest(names, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{(per + 1) * i + j}.0", UNET_RESNET)
            if attention:
                names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(per + 1) * i + j}.1"
        if i < levels - 1:  # the upsampler follows the last resnet (and its attention, if any)
            last = f"output_blocks.{(per + 1) * i + per}"
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"{last}.{2 if attention else 1}.conv"
    return names


def vae_module_map(config: dict) -> dict[str, str]:
    """diffusers AutoencoderKL -> LDM VAE module names. The LDM decoder numbers its levels bottom-up."""
    per, levels = config["layers_per_block"], len(config["block_out_channels"])
    names = dict(VAE_TOP)
    for i in range(levels):
        up = levels - 1 - i
        for j in range(per):
            _nest(names, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(per + 1):
            _nest(names, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    for part in CODERS:
        for k in (0, 1):
            _nest(names, f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", VAE_RESNET)
        _nest(names, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    return names


def openclip_module_map(num_layers: int) -> dict[str, str]:
    """transformers CLIP text model (q/k/v fused) -> OpenCLIP module names."""
    names = dict(OPENCLIP_TOP)
    for n in range(num_layers):
        _nest(names, f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}", OPENCLIP_LAYER)
    return names


def rename_keys(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename every key by its longest dotted prefix in `names`; keys with none raise ExportError."""
    out, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        head = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in names), None)
        if head is None:
            unknown.append(key)
        else:
            out[".".join([names[".".join(parts[:head])], *parts[head:]])] = value
    if unknown:
        raise ExportError(f"{len(unknown)} keys have no counterpart in the key map, e.g. {unknown[:3]} "
                          "(the weights do not have the layout of the model config)")
    return out


def unet_to_sgm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> model.diffusion_model.* keys."""
    return {UNET_PREFIX + k: v for k, v in rename_keys(state, unet_module_map(config)).items()}


def sgm_to_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """model.diffusion_model.* keys (others ignored) -> diffusers UNet state dict; inverse of unet_to_sgm."""
    inverse = {v: k for k, v in unet_module_map(config).items()}
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    return rename_keys(unet, inverse)


def vae_to_sgm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> first_stage_model.*; LDM's attention projections are 1x1 convolutions."""
    out = {}
    for key, value in rename_keys(state, vae_module_map(config)).items():
        if ".mid.attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        out[VAE_PREFIX + key] = value
    return out


def _text_model_key(key: str) -> str:
    """transformers >= 5.6 drops `text_model.` from CLIPTextModel keys; SGM keeps it."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def clip_l_to_sgm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L CLIPTextModel -> conditioner.embedders.0.transformer.text_model.* (transformers names)."""
    return {CLIP_L_PREFIX + _text_model_key(k): v for k, v in state.items()}


def openclip_to_sgm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bigG CLIPTextModelWithProjection -> conditioner.embedders.1.model.* in OpenCLIP layout.

    OpenCLIP's MultiheadAttention holds q, k, v as one in_proj (rows q, k, v) and applies the
    projection as x @ W, so nn.Linear's (P, D) text_projection is stored transposed, (D, P).
    """
    fused = {_text_model_key(k): v for k, v in state.items()}
    stems = [k.removesuffix(".q_proj.weight") for k in fused if k.endswith(".q_proj.weight")]
    for stem in stems:
        for kind in ("weight", "bias"):
            fused[f"{stem}.in_proj_{kind}"] = torch.cat([fused.pop(f"{stem}.{p}_proj.{kind}") for p in "qkv"])
    out = rename_keys(fused, openclip_module_map(len(stems)))
    out["text_projection"] = out["text_projection"].T.contiguous()  # (P, D) -> (D, P)
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainedUNet:
    """The UNet of one checkpoint tag and the training settings an export records."""

    state_dict: dict[str, torch.Tensor]
    unet_config: dict
    step: int
    noise: dict  # config.noise of the run: ztsnr, sigma_max, base_area, resolution_scaling
    tag_dir: Path

    @property
    def schedule(self) -> NoiseSchedule:
        base_area = self.noise["base_area"] if self.noise["resolution_scaling"] else None
        return NoiseSchedule(self.noise["ztsnr"], self.noise["sigma_max"], base_area)

    @property
    def title(self) -> str:
        return f"{self.tag_dir.parent.parent.name} step {self.step}"


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
            tag_dir = folder / latest.read_text().strip()
            if not (tag_dir / checkpoint.STATE_FILE).is_file():
                raise ExportError(f"{latest} names {tag_dir.name}, which is missing or incomplete "
                                  f"(no {checkpoint.STATE_FILE}); pass a complete tag folder instead")
            return tag_dir
    raise ExportError(f"{path} is not a checkpoint: no {checkpoint.STATE_FILE} and no "
                      f"{checkpoint.LATEST_FILE} file in it or in {path / 'checkpoints'}; {fix}")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> TrainedUNet:
    """Gather the UNet of a ZeRO checkpoint (all ranks' partitions) with its ztsnr_state.json settings."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
    except (KeyError, TypeError) as e:
        raise ExportError(f"{tag_dir / checkpoint.STATE_FILE} lacks {e}; export checkpoints written by "
                          "ztsnr_ds.checkpoint.save") from e
    try:
        with safe_load.weights_only():
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name, lazy_mode=True)
            # The flat partitions load with requires_grad: detach, or each tensor's graph keeps them alive.
            # copy: each tensor gets its own storage (views of one flat buffer cannot be saved separately).
            weights = {k: v.contiguous().detach().to(dtype, copy=True) for k, v in lazy.items()}
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ExportError(f"{tag_dir}: DeepSpeed files unreadable ({type(e).__name__}: {e}); was the save "
                          "interrupted? Pass an older complete tag folder") from e
    check_shapes(unet_shapes(unet_config), weights,
                 f"{tag_dir}: the weights do not match unet_config in {checkpoint.STATE_FILE}")
    return TrainedUNet(weights, unet_config, step, noise, tag_dir)


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    """Parameter shapes of the UNet a config describes, without allocating it."""

    with init_empty_weights():
        return {k: v.shape for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}


def check_shapes(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], problem: str) -> None:
    """Raise ExportError (starting with `problem`) unless `state` has exactly the expected keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise ExportError(f"{problem}: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                          f"{len(wrong)} of other shape (e.g. {wrong[:2]})")


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
    """modelspec.* (Stability's SAI model spec 1.0.0) where a key exists, ztsnr_ds.* for the rest."""
    base_area = trained.schedule.base_area
    side = math.isqrt(base_area) if base_area else 1024
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or trained.title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v",
        "ztsnr_ds.step": str(trained.step),
        "ztsnr_ds.checkpoint_tag": trained.tag_dir.name,
        "ztsnr_ds.ztsnr": trained.noise["ztsnr"],
        "ztsnr_ds.sigma_max": str(float(trained.noise["sigma_max"])),
        "ztsnr_ds.base_area": str(base_area),
        META_UNET_CONFIG: json.dumps(trained.unet_config),
    }


def export_diffusers(trained: TrainedUNet, out: str | Path, title: str | None = None) -> Path:
    """Write out/unet (config.json + safetensors), out/scheduler (ZTSNR Euler, v-pred) and out/README.md."""

    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # replaces `out` only once complete
    try:
        save_safetensors(trained.state_dict, tmp / "unet" / UNET_WEIGHTS,
                         {"format": "pt", **export_metadata(trained, title)})
        with init_empty_weights():
            config_json = UNet2DConditionModel.from_config(trained.unet_config).to_json_string()
        checkpoint.write_atomic(tmp / "unet" / "config.json", config_json)
        (tmp / "scheduler").mkdir(exist_ok=True)
        scheduler = diffusers_scheduler_config(trained.schedule)
        checkpoint.write_atomic(tmp / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2))
        checkpoint.write_atomic(tmp / "README.md", sampling_readme(trained, title))
        if out.exists():  # an earlier export: swapped out only now that the new one is whole
            os.replace(out, old := out.with_name(f"{out.name}.old{os.getpid()}"))
            shutil.rmtree(old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_base(base: str | Path, trained: TrainedUNet, dtype: torch.dtype) -> FrozenParts:
    """VAE and text encoders of the SDXL folder the run trained from; its UNet must match in shape."""
    base = Path(base)
    fix = "pass --base the diffusers SDXL folder the run was trained from (model.pretrained)"
    unet_json = base / "unet" / "config.json"
    if not unet_json.is_file():
        raise ExportError(f"--base {base} is not a diffusers SDXL folder (no {unet_json}); {fix}")
    check_shapes(unet_shapes(json.loads(unet_json.read_text())), trained.state_dict,
                 f"--base {base}: {unet_json} disagrees with the checkpoint {trained.tag_dir}; {fix}")
    try:
        return load_frozen(base, dtype)
    except (FileNotFoundError, OSError) as e:
        raise ExportError(f"--base {base}: {e}; {fix}") from e


def single_file_state(trained: TrainedUNet, parts: FrozenParts,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All SDXL weights in SGM keys, plus the empty `v_pred` marker and, for `rescale` only, `ztsnr`.

    ComfyUI, Forge, reForge and A1111 read `ztsnr` as "rebuild Lin et al.'s rescaled table" (top sigma
    4518.76 before the terminal step); only a `rescale` model was trained on that table. A `terminal`
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


def export_single_file(trained: TrainedUNet, base: str | Path, out: str | Path,
                       dtype: torch.dtype = torch.bfloat16, title: str | None = None) -> Path:
    """One SDXL .safetensors: trained UNet + the base's VAE and text encoders, SGM keys, metadata."""
    parts = load_base(base, trained, dtype)
    state = single_file_state(trained, parts, dtype)
    return save_safetensors(state, Path(out), export_metadata(trained, title))


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

## diffusers

```python
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained("OUT", subfolder="unet")
scheduler = EulerDiscreteScheduler.from_pretrained("OUT", subfolder="scheduler")
pipe = StableDiffusionXLPipeline.from_pretrained("BASE_SDXL", unet=unet, scheduler=scheduler)
image = pipe(prompt, num_inference_steps=28, guidance_scale=5.0, guidance_rescale=0.7).images[0]
```

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
    ", and `ztsnr`, which makes them rebuild this (Lin et al.'s rescaled) table" if s.mode == "rescale" else
    "; it carries no `ztsnr` marker, because the clients read that as Lin et al.'s rescaled table, not `"
    + s.mode + "`"}.
"""


# ---------------------------------------------------------------------------------------- import
def _read_unet_config(config: dict | str | Path) -> dict:
    """A config dict, a config.json, or a folder holding one."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ExportError(f"UNet config {path} does not exist; pass a config.json or a folder with one")
    return json.loads(path.read_text())


def load_unet_safetensors(path: str | Path, dtype: torch.dtype = torch.float32,
                          config: dict | str | Path | None = None):
    """A UNet2DConditionModel from a .safetensors: diffusers keys or a full single-file SDXL (SGM keys).

    Config, first found: `config`; the file's ztsnr_ds.unet_config metadata; for diffusers keys a
    config.json beside the file; for SGM keys configs/sdxl_unet/config.json (stock SDXL).
    """

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"UNet weights {path} do not exist; pass a .safetensors file")
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata() or {}, list(f.keys())
        sgm = any(k.startswith(UNET_PREFIX) for k in keys)
        state = {k: f.get_tensor(k) for k in keys if k.startswith(UNET_PREFIX) or not sgm}
    if config is None and META_UNET_CONFIG in metadata:
        config = json.loads(metadata[META_UNET_CONFIG])
    elif config is None:
        config = SDXL_UNET_CONFIG if sgm else path.parent
    config = _read_unet_config(config)
    fix = f"{path} does not fit its UNet config; pass config= (a UNet config.json or folder)"
    try:
        state = sgm_to_unet(state, config) if sgm else state
    except ExportError as e:
        raise ExportError(f"{fix}: {e}") from e
    check_shapes(unet_shapes(config), state, fix)
    return unet_from_state(config, state, dtype)


def unet_from_state(config: dict, state: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> UNet2DConditionModel:
    """A UNet from a config and its full state dict, without initialising random weights first."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(dtype).eval()
