"""Build and load the SDXL parts: UNet (trained), VAE and two text encoders (frozen).

A real SDXL and the tiny SDXL-shaped model that tests and `make demo` use go
through the same loaders: both are diffusers folders (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`).
Nothing here reaches a hub: every load is `local_files_only`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ztsnr_ds.keymaps import (
    CLIP_L_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ExportError,
    sgm_to_clip_l,
    sgm_to_openclip,
    sgm_to_unet,
    sgm_to_vae,
)
from ztsnr_ds.model_metadata import noise_from_metadata
from ztsnr_ds.tokenizers import sdxl_tokenizers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SDXL_UNET_CONFIG = CONFIGS / "sdxl_unet" / "config.json"
FILE_PARTS = ("text_encoder", "text_encoder_2", "vae")  # what a single file holds besides the UNet
SDXL_PART_CONFIGS = {part: CONFIGS / f"sdxl_{part}" / "config.json" for part in FILE_PARTS}  # stock SDXL
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
META_UNET_CONFIG = "ztsnr_ds.unet_config"  # safetensors metadata key of an export's UNet config (JSON)
FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # diffusers subfolders

# Tiny SDXL-shaped UNet: the same block structure as SDXL (3 levels, no attention in the
# first, 2 resnets per level, linear projections, text_time added conditions) with
# channels small enough for bf16 on a CPU. 6 * 8 (time ids) + 32 (pooled) = 80.
TINY_UNET_CONFIG: dict = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=32,
)
SDXL_BASE_SCHEDULER: dict = dict(  # scheduler_config.json of stable-diffusion-xl-base-1.0
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)
SDXL_MODEL_INDEX: dict = {  # no force_zeros_for_empty_prompt: exports set it
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TINY_TEXT_HIDDEN = 32  # each encoder; concatenated 2 * 32 = 64 = cross_attention_dim
TINY_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=256,
    scaling_factor=0.13025,
)


@dataclass
class FrozenParts:
    """Everything the trainer does not train: VAE, text encoders, tokenizers."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer


def load_unet(path: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Load a UNet from a diffusers SDXL folder (`<path>/unet`), a UNet folder, or safetensors.

    A `.safetensors` file with diffusers keys needs a `config.json` beside it; one with SGM
    keys (a full single-file SDXL) is converted by `load_unet_safetensors`.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is neither a diffusers SDXL folder (with unet/config.json) nor a UNet folder "
                "(with config.json); pass --model.unet_path to a folder or .safetensors file"
            )
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    if path.suffix == ".safetensors" and path.is_file():
        return load_unet_safetensors(path, dtype=dtype)
    raise FileNotFoundError(f"UNet path {path} does not exist or is not a folder / .safetensors file")


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


def load_frozen(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> FrozenParts:
    """Load VAE, both text encoders and tokenizers from a diffusers SDXL folder (or a single-file SDXL:
    `load_frozen_file`); frozen, eval."""
    folder = Path(folder)
    if is_single_file(folder):
        return load_frozen_file(folder, dtype)
    missing = [s for s in FROZEN_PARTS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a diffusers SDXL folder: missing {', '.join(missing)}/")
    kw = dict(torch_dtype=dtype, local_files_only=True)
    parts = FrozenParts(
        vae=AutoencoderKL.from_pretrained(folder / "vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True),
    )
    for module in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        module.requires_grad_(False).eval()
    return parts


def _write_tiny_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a 514-entry vocabulary and no merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return tokenizer


def _tiny_text_config(hidden_act: str, vocab_size: int, hidden: int = TINY_TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        hidden_act=hidden_act, projection_dim=hidden, bos_token_id=512, eos_token_id=513,
        pad_token_id=513,
    )


def write_tiny_sdxl(out: str | Path, seed: int = 0,
                    text_hidden: tuple[int, int] = (TINY_TEXT_HIDDEN, TINY_TEXT_HIDDEN),
                    unet_config: dict = TINY_UNET_CONFIG, vae: AutoencoderKL | None = None) -> Path:
    """Write a tiny SDXL-shaped diffusers folder with random weights; needs no download.

    CLIP-L stand-in uses quick_gelu, the bigG stand-in gelu and a projection, as in SDXL; the scheduler
    is SDXL base's (epsilon, leading), which `from_single_file(config=...)` reads. text_hidden: the two
    encoders' widths; (768, 1280) gives the full SDXL UNet its 2048-wide text and 1280 pooled inputs
    (launch/gpu_check.py then puts that UNet in unet/). unet_config: the UNet's; vae: a VAE to write
    instead of a random TINY_VAE_CONFIG one (`make demo` passes `pooling_vae.pooling_vae()`).
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = _write_tiny_tokenizer(out / "tokenizer", pad_token="<|endoftext|>")
    _write_tiny_tokenizer(out / "tokenizer_2", pad_token="!")
    clip_l = _tiny_text_config("quick_gelu", len(tok), text_hidden[0])
    clip_g = _tiny_text_config("gelu", len(tok), text_hidden[1])
    CLIPTextModel(clip_l).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(clip_g).save_pretrained(out / "text_encoder_2")
    UNet2DConditionModel(**unet_config).save_pretrained(out / "unet")
    (vae or AutoencoderKL(**TINY_VAE_CONFIG)).save_pretrained(out / "vae")
    EulerDiscreteScheduler(**SDXL_BASE_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2))
    return out


# ---------------------------------------------------------------------------------------- single file
def is_single_file(path: str | Path) -> bool:
    """A .safetensors file (model.pretrained, --base, --model may name one instead of a folder)."""
    return Path(path).suffix == ".safetensors" and Path(path).is_file()


def part_config_key(part: str) -> str:
    """Safetensors metadata key of a part's config (JSON), written by `parts_metadata`."""
    return f"ztsnr_ds.{part}_config"


def parts_metadata(parts: FrozenParts) -> dict[str, str]:
    """The configs of VAE and text encoders, for a single file's metadata: `load_frozen_file` reads them
    back (files without them are stock SDXL: configs/sdxl_*)."""
    modules = {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2, "vae": parts.vae}
    return {part_config_key(p): m.to_json_string() if p == "vae" else m.config.to_json_string(use_diff=False)
            for p, m in modules.items()}


def _fit(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, part: str,
         dtype: torch.dtype) -> torch.nn.Module:
    """Load `state` into an empty `model` (keys and shapes checked); transformers >= 5.6 names
    CLIPTextModel's keys without `text_model.`."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if not any(k.startswith("text_model.") for k in expected):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    check_shapes(expected, state, f"{path}: its {part} does not fit the {part} config (the file's "
                 f"{part_config_key(part)} metadata, else {SDXL_PART_CONFIGS[part]}); pass a diffusers "
                 "folder")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).requires_grad_(False).eval()


def check_single_file(path: str | Path, keys: list[str] | None = None) -> None:
    """ExportError unless the file (its header, or `keys`) holds all four SDXL parts in SGM keys."""
    try:
        if keys is None:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
    except (OSError, SafetensorError) as err:
        raise ExportError(f"{path} is not a readable .safetensors file ({err})") from err
    parts = ((UNET_PREFIX, "UNet"), (CLIP_L_PREFIX, "CLIP-L"), (OPENCLIP_PREFIX, "bigG"), (VAE_PREFIX, "VAE"))
    for prefix, part in parts:
        if not any(k.startswith(prefix) for k in keys):
            raise ExportError(f"{path} holds no {part} ({prefix}*): not a full single-file SDXL; pass a "
                              "diffusers SDXL folder or a full single-file SDXL as model.pretrained / --base")


def load_frozen_file(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FrozenParts:
    """VAE and both text encoders of a single-file SDXL (SGM keys), tokenizers built offline (`tokenizers`).

    Configs: the file's ztsnr_ds.*_config metadata (our exports), else stock SDXL (configs/sdxl_*).
    Only the non-UNet tensors are read.
    """
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata() or {}, list(f.keys())
        check_single_file(path, keys)
        frozen = (CLIP_L_PREFIX, OPENCLIP_PREFIX, VAE_PREFIX)  # the UNet is load_unet's
        state = {k: f.get_tensor(k) for k in keys if k.startswith(frozen)}
    configs = {p: json.loads(metadata.get(part_config_key(p)) or SDXL_PART_CONFIGS[p].read_text())
               for p in FILE_PARTS}
    with init_empty_weights():
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        vae = AutoencoderKL.from_config(configs["vae"])
    text_encoder = _fit(text_encoder, sgm_to_clip_l(state), path, "text_encoder", dtype)
    text_encoder_2 = _fit(text_encoder_2, sgm_to_openclip(state), path, "text_encoder_2", dtype)
    vae = _fit(vae, sgm_to_vae(state, vae.config), path, "vae", dtype)
    tokenizer, tokenizer_2 = sdxl_tokenizers(text_encoder.config.vocab_size)
    return FrozenParts(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)


def save_frozen(parts: FrozenParts, folder: Path) -> None:
    """The parts as diffusers subfolders (FROZEN_PARTS) of `folder`: a single-file base made a folder."""
    for name in FROZEN_PARTS:
        getattr(parts, name).save_pretrained(folder / name)


def file_unet_shapes(path: str | Path, config: dict) -> dict[str, torch.Size]:
    """Diffusers-named shapes of a single file's UNet (its header only), renamed for `config`."""
    with safe_open(str(path), "pt") as f:
        shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(UNET_PREFIX)}
    return sgm_to_unet(shapes, config)


def base_noise_notes(path: str | Path, noise: dict) -> list[str]:
    """What a single-file base says about its training against this run's config.noise (ztsnr, sigma_max,
    resolution_scaling, base_area): the `v_pred` / `ztsnr` markers of any SDXL file, and the ztsnr_ds.*
    settings of our own exports, each difference named with the key that continues the file as trained."""
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata() or {}, set(f.keys())
    notes = []
    if "v_pred" not in keys:
        notes.append(f"{path} has no v_pred marker: an epsilon-prediction base; this run trains "
                     "v-prediction from it (as NAI V3 did from SDXL), which needs more steps than continuing")
    recorded = noise_from_metadata(metadata)
    if not recorded and "ztsnr" in keys:
        recorded = {"ztsnr": "rescale"}  # the clients read the marker as Lin et al.'s rescaled table
    ours = dict(noise, base_area=noise["base_area"] if noise.get("resolution_scaling", True) else None)
    for key, value in recorded.items():
        if ours.get(key) != value:
            notes.append(f"{path} was trained with noise.{key} = {value}, this run uses {ours.get(key)}: set "
                         f"noise.{key}: {value}" + (" (noise.resolution_scaling: false)" if value is None
                                                    and key == "base_area" else "")
                         + " to continue it as trained")
    return notes
