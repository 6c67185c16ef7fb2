"""Key maps between diffusers and Stability's generative-models (SGM) layout of an SDXL checkpoint.

Single-file SDXL uses the SGM layout, which ComfyUI, A1111 and `diffusers.from_single_file` read.
The maps are data: dicts from diffusers module names to SGM ones (DESIGN.md section 8), expanded per
block by small functions. A key is renamed by its longest dotted prefix found in the map, so a map
and its inverse (`{v: k}`) convert both ways; only the UNet is ever read back (`models`).
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."


class ExportError(Exception):
    """Weights or files that do not fit a key map, a config or each other (export and import); the
    message names the path and how to fix it."""


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


# ---------------------------------------------------------------------------------------- SGM -> diffusers
# Read back by models.load_frozen_file; checked against diffusers' convert_open_clip_checkpoint /
# convert_ldm_vae_checkpoint and ComfyUI's clip_text_transformers_convert: q, k, v are the thirds of
# in_proj (rows), text_projection is transposed, LDM's 1x1-convolution attention becomes linear.
SGM_IGNORED = ("position_ids", "logit_scale", "attn_mask")  # buffers and CLIP's image-text temperature


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The keys under `prefix`, prefix removed; buffers that are no weights (SGM_IGNORED) dropped."""
    return {k.removeprefix(prefix): v for k, v in state.items()
            if k.startswith(prefix) and k.rsplit(".", 1)[-1] not in SGM_IGNORED}


def sgm_to_clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """conditioner.embedders.0.transformer.* -> CLIPTextModel keys (`text_model.*`);
    inverts clip_l_to_sgm."""
    return _under(state, CLIP_L_PREFIX)


def sgm_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """conditioner.embedders.1.model.* (OpenCLIP) -> CLIPTextModelWithProjection keys; inverse of
    openclip_to_sgm. in_proj (3D, D) rows are q, k, v; text_projection (D, P) -> nn.Linear's (P, D)."""
    model = _under(state, OPENCLIP_PREFIX)
    if "text_projection" not in model:
        raise ExportError(f"no {OPENCLIP_PREFIX}text_projection: bigG needs its projection for the pooled "
                          "embedding (is this an SDXL checkpoint?)")
    model["text_projection"] = model["text_projection"].T.contiguous()  # (D, P) -> (P, D)
    layers = len({k.split(".")[2] for k in model if k.startswith("transformer.resblocks.")})
    out = rename_keys(model, {v: k for k, v in openclip_module_map(layers).items()})
    for stem in [k.removesuffix(".in_proj_weight") for k in out if k.endswith(".in_proj_weight")]:
        for kind in ("weight", "bias"):
            q, k, v = out.pop(f"{stem}.in_proj_{kind}").clone().chunk(3)  # (3D, ...) -> 3 x (D, ...)
            out |= {f"{stem}.q_proj.{kind}": q, f"{stem}.k_proj.{kind}": k, f"{stem}.v_proj.{kind}": v}
    return out


def sgm_to_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """first_stage_model.* -> AutoencoderKL keys; inverse of vae_to_sgm (1x1 conv attention -> linear)."""
    vae = rename_keys(_under(state, VAE_PREFIX), {v: k for k, v in vae_module_map(config).items()})
    return {k: v[:, :, 0, 0] if ".attentions." in k and v.ndim == 4 else v for k, v in vae.items()}
