"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
VGG16 variant, written here because the `lpips` package imports torchvision (a CUDA torch with it).

    d(x, y) = sum_l mean_hw( sum_c w_lc (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )
f_l: VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, normalised over channels per pixel;
inputs in [-1, 1] shifted and scaled as lpips' ScalingLayer does. w_l: the learned linear layers
(lpips' weights/v0.1/vgg.pth), or all ones (lpips' `lpips=False` baseline) without that file.

Weights are read from local files the user names, never downloaded:
- backbone: torchvision's VGG16 state dict (`features.<i>.weight/bias`, e.g. vgg16-397923af.pth from a
  torch hub cache) as .pth or .safetensors; the module keeps torchvision's layer indices, so keys match.
- linear: lpips' vgg.pth (`lin<k>.model.1.weight`, shape (1, C, 1, 1)).
"random" instead of a backbone path builds a seeded random VGG: for tests and smoke runs only (a random
network still ranks pixel changes, but it is not the perceptual metric the papers report).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)  # convolutions per stage; a 2x2 max pool between stages
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)
RANDOM = "random"
NORM_EPS = 1e-10  # lpips normalize_tensor


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a .pth/.pt file (weights only: a file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


class LPIPS(torch.nn.Module):
    """Frozen perceptual distance, per sample. Shape: (B, 3, H, W) x2 in [-1, 1] -> (B,)."""

    def __init__(self, backbone: str = RANDOM, linear: str | None = None,
                 widths: tuple[int, ...] = VGG16_WIDTHS, seed: int = 0) -> None:
        super().__init__()
        layers, self.taps, channels = [], [], 3
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global stream alone
            torch.manual_seed(seed)
            for stage, (width, convs) in enumerate(zip(widths, VGG16_CONVS)):
                if stage:
                    layers.append(torch.nn.MaxPool2d(2, 2))
                for _ in range(convs):
                    layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
                    channels = width
                self.taps.append(len(layers) - 1)  # the stage's last ReLU: relu1_2, relu2_2, relu3_3, ...
        self.features = torch.nn.Sequential(*layers)  # torchvision vgg16.features indices
        self.lin = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(w)) for w in widths])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self._load(backbone, linear)
        self.requires_grad_(False).eval()

    def _load(self, backbone: str, linear: str | None) -> None:
        if backbone == RANDOM:
            warnings.warn("perceptual.backbone = random: LPIPS with a random VGG (tests, smoke runs); name "
                          "torchvision's vgg16 weights file for the real metric", stacklevel=3)
        else:
            state = {k.removeprefix("features."): v for k, v in read_tensors(backbone).items()
                     if k.startswith("features.")}
            self.features.load_state_dict(state, strict=True)
        if linear is not None:
            state = read_tensors(linear)
            for k, weight in enumerate(self.lin):
                weight.data.copy_(state[f"lin{k}.model.1.weight"].flatten())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = (torch.cat([x, y]).to(self.shift.dtype) - self.shift) / self.scale  # one pass: (2B, 3, H, W)
        total = h.new_zeros(n)
        taps = iter(zip(self.taps, self.lin))
        tap, weight = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i != tap:
                continue
            f = h / (h.square().sum(1, keepdim=True).sqrt() + NORM_EPS)  # unit length over channels
            diff = (f[:n] - f[n:]).square()  # (B, C, h, w)
            total = total + (diff * weight.view(1, -1, 1, 1)).sum(1).flatten(1).mean(1)
            tap, weight = next(taps, (None, None))
            if tap is None:
                break
        return total


def check_files(backbone: str, linear: str | None, key: str = "perceptual") -> None:
    """Fail before a model loads when a named weights file is missing; the message names the key."""
    if backbone != RANDOM and not Path(backbone).is_file():
        raise ValueError(f"{key}.backbone = {backbone}: no such file; name torchvision's VGG16 weights "
                         "(vgg16-397923af.pth, in ~/.cache/torch/hub/checkpoints once torchvision fetched "
                         f"it) or {RANDOM!r} for a smoke run")
    if linear is not None and not Path(linear).is_file():
        raise ValueError(f"{key}.linear = {linear}: no such file; name lpips' weights/v0.1/vgg.pth, or null "
                         "for unit channel weights")
