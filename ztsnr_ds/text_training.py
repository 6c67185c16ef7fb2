"""Training the text encoders with the UNet (optional): which encoders, their param groups, the stop rule.

One DeepSpeed engine holds everything that trains. A trained encoder is registered as a child of the UNet
module under its diffusers folder name (`text_encoder` for CLIP-L, `text_encoder_2` for bigG), so the engine
module stays the UNet (its forward, config and dtype unchanged) and the UNet's parameter names stay what a
UNet-only run writes (`conv_in.weight`, ...): its checkpoints, EMA files and exports keep their keys, and the
encoders add `text_encoder.*` / `text_encoder_2.*` next to them. The trainer still encodes captions through
`PromptEncoder` (the same module objects), outside the UNet's forward: autograd carries the loss's gradient
into the encoders, and ZeRO-2's gradient hooks (registered on every parameter of the optimizer's groups)
reduce it like the UNet's.

AdamWSR gets one param group per component: [unet, clip_l, clip_g] in that order. ZeRO-2 flattens and
partitions each group on its own, so every rank holds 1/N of each group's gradients, masters and moments
(each group padded to a multiple of N), and the full weights of all of them.

Each encoder's learning rate follows the UNet's warm-up and schedule, scaled: lr_k(step) = lr(step) * r_k,
r_k = text_encoders.<k>.lr / optimizer.lr, or lr_ratio. Past stop_at_step its group is frozen: AdamWSR
skips it (weights and moments stay bit for bit; the optimizer state is kept, in ZeRO-2's flat partitions
allocated once), and its parameters stop requiring grad, so backward stops at the encoder. The rule is a
function of the step, so it holds again after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ztsnr_ds.models import FrozenParts
from ztsnr_ds.optim import AdamWSR

if TYPE_CHECKING:
    from ztsnr_ds.config import OptimizerConfig

ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
"""Config name -> child name in the UNet module (= FrozenParts attribute = diffusers folder)."""
UNET_GROUP = "unet"
"""The name `set_lr` gives the group without one: the UNet's, first."""


@dataclass
class EncoderConfig:
    """One trained encoder's optimizer settings."""

    lr: float | None = None
    """Peak learning rate (it follows trainer.warmup_steps and lr_schedule); None: lr_ratio x optimizer.lr."""
    lr_ratio: float = 1.0
    """This encoder's peak lr as a fraction of optimizer.lr when lr is not set."""
    weight_decay: float | None = None
    """AdamW decoupled weight decay; None: optimizer.weight_decay."""
    stop_at_step: int = 0
    """Train in the first N optimizer steps only, frozen afterwards (optimizer state kept); 0: never stop."""

    def check(self, key: str) -> None:
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"text_encoders.{key}.{name} = {value} must be >= 0")
        if self.lr_ratio < 0:
            raise ValueError(f"text_encoders.{key}.lr_ratio = {self.lr_ratio} must be >= 0")
        if self.stop_at_step < 0:
            raise ValueError(f"text_encoders.{key}.stop_at_step = {self.stop_at_step} must be >= 0")


@dataclass
class TextEncodersConfig:
    train: list[str] = field(default_factory=list)
    """Encoders trained with the UNet: clip_l, clip_g (none by default); needs data.cache_text: false."""
    gradient_checkpointing: bool = True
    """Recompute the trained encoders' activations in backward (model.gradient_checkpointing: the UNet's)."""
    clip_l: EncoderConfig = field(default_factory=EncoderConfig)
    """CLIP ViT-L's learning rate, weight decay and stop step."""
    clip_g: EncoderConfig = field(default_factory=EncoderConfig)
    """OpenCLIP ViT-bigG's learning rate, weight decay and stop step."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.train if k not in ENCODERS]
        if unknown or len(set(self.train)) != len(self.train):
            raise ValueError(f"text_encoders.train = {self.train}: list each of {', '.join(ENCODERS)} "
                             "at most once")
        for key in ENCODERS:
            getattr(self, key).check(key)


class TextTraining:
    """The trained encoders of a run: made trainable here, attached to the UNet with one param group each
    by `optimizer`, their learning rates and the stop rule set every step by `set_lr`. No encoder trained:
    the UNet's one group, exactly the optimizer of a UNet-only run."""

    def __init__(self, cfg: TextEncodersConfig, parts: FrozenParts) -> None:
        self.cfg, self.lr = cfg, 0.0
        self.modules = {key: getattr(parts, ENCODERS[key]) for key in cfg.train}
        for module in self.modules.values():
            module.requires_grad_(True).train()  # train(): CLIP's checkpointing acts in training mode only
            if cfg.gradient_checkpointing:
                module.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5's name

    def ratio(self, key: str) -> float:
        """r_k: the encoder's peak lr over the UNet's."""
        spec = getattr(self.cfg, key)
        if spec.lr is None:
            return spec.lr_ratio
        return spec.lr / self.lr if self.lr else 0.0

    def optimizer(self, unet: torch.nn.Module, opt: OptimizerConfig, seed: int, rank: int) -> AdamWSR:
        """AdamWSR over [unet, then each trained encoder], one group each; attaches the encoders as UNet
        children first, in the UNet's dtype (bf16 in pure bf16, fp32 masters otherwise)."""
        self.lr = opt.lr
        return AdamWSR(self.param_groups(unet, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas),
                       eps=opt.eps, weight_decay=opt.weight_decay, kahan=opt.kahan, seed=seed, rank=rank,
                       fused=opt.fused)

    def param_groups(self, unet: torch.nn.Module, weight_decay: float) -> list[dict]:
        """The param groups of `optimizer`: the UNet's, then each trained encoder's (its weight decay)."""
        groups = [{"params": list(unet.parameters())}]  # no name: a UNet-only run's optimizer state as before
        dtype = next(unet.parameters()).dtype
        for key, module in self.modules.items():
            unet.add_module(ENCODERS[key], module.to(dtype))
            spec = getattr(self.cfg, key)
            decay = weight_decay if spec.weight_decay is None else spec.weight_decay
            groups.append({"params": list(module.parameters()), "name": key, "weight_decay": decay})
        return groups

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
        """Learning rates of the step after `step` done: `lr` for the UNet, lr * r_k for encoder k, which is
        frozen (AdamWSR skips it; no grad) once `step` >= its stop_at_step."""
        for group in optimizer.param_groups:
            key = group.get("name", UNET_GROUP)
            if key == UNET_GROUP:
                group["lr"] = lr
                continue
            stop = getattr(self.cfg, key).stop_at_step
            group["frozen"] = bool(stop) and step >= stop
            group["lr"] = 0.0 if group["frozen"] else lr * self.ratio(key)
            self.modules[key].requires_grad_(not group["frozen"])  # frozen: backward stops before it


def trained_encoder_names(config: dict) -> list[str]:
    """Child names (text_encoder, text_encoder_2) of the encoders a run's resolved config trains."""
    return [ENCODERS[k] for k in config.get("text_encoders", {}).get("train", [])]


def split_encoders(state: dict[str, torch.Tensor], names: list[str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A trained module's state dict -> (the UNet's, {child name: that encoder's}), prefixes removed."""
    encoders: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    unet = {}
    for key, value in state.items():
        child, _, rest = key.partition(".")
        if child in encoders:
            encoders[child][rest] = value
        else:
            unet[key] = value
    return unet, encoders


def load_encoders(parts: FrozenParts, encoders: dict[str, dict[str, torch.Tensor]]) -> FrozenParts:
    """`parts` with the trained encoders' weights loaded into its text encoders (strict: every key)."""
    for name, state in encoders.items():
        module = getattr(parts, name)
        dtype = next(module.parameters()).dtype
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return parts


def encoder_metadata(config: dict, step: int) -> dict[str, str]:
    """ztsnr_ds.text_encoders.* export metadata: the trained encoders, their peak lr and steps trained;
    {} for a run that trained none (its exports read as before)."""
    section = config.get("text_encoders", {})
    train = section.get("train", [])
    if not train:
        return {}
    meta = {"ztsnr_ds.text_encoders.trained": ",".join(train)}
    optimizer = config.get("optimizer", {})
    for key in train:
        spec = section[key]
        lr = spec["lr"] if spec.get("lr") is not None else spec["lr_ratio"] * optimizer.get("lr", 0.0)
        stop = spec.get("stop_at_step", 0)
        meta[f"ztsnr_ds.text_encoders.{key}.lr"] = str(float(lr))
        meta[f"ztsnr_ds.text_encoders.{key}.steps"] = str(min(step, stop) if stop else step)
    return meta
