"""Optional patch-GAN term of the VAE decoder fine-tune, off by default (gan.weight 0).

The SD autoencoders (Rombach et al. 2022, CompVis `LPIPSWithDiscriminator`) add a pix2pix patch
discriminator (Isola et al. 2017) with hinge losses from step 50001 on:

    D:  L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))      (real x, decoded x_hat)
    G:  L_G = -mean D(x_hat), added to the decoder's loss with weight gan.weight

Here the weight is fixed: LDM's adaptive weight (ratio of the two terms' gradient norms at the decoder's
last layer) needs per-term gradients that ZeRO-2 partitions away. The discriminator is small (2.8 M
parameters at width 64) and replicated: every rank holds it whole, its gradients are averaged with one
all-reduce, and its torch AdamW steps identically everywhere; rank 0 saves it (weights and moments) with
the checkpoint, so a resume repeats itself. GroupNorm instead of pix2pix's BatchNorm: no running
statistics that would differ per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GAN_FILE = "gan.safetensors"


@dataclass
class GANConfig:
    weight: float = 0.0
    """Weight of the generator's hinge term -D(x_hat) in the decoder's loss; 0: no GAN (the default)."""
    start_step: int = 50001
    """Optimizer step from which the discriminator trains and its term counts (SD's autoencoders: 50001)."""
    lr: float = 1e-4
    """Discriminator learning rate (torch AdamW, betas 0.5 and 0.9 as LDM)."""
    width: int = 64
    """Channels of the discriminator's first layer (pix2pix: 64), doubled per layer up to 8x."""
    layers: int = 3
    """Stride-2 layers (pix2pix n_layers 3: 70 x 70 pixel patches)."""

    def __post_init__(self) -> None:
        if self.weight < 0 or self.lr <= 0 or self.width < 1 or self.layers < 1 or self.start_step < 0:
            raise ValueError(f"gan = {self}: weight >= 0, lr > 0, width >= 1, layers >= 1, start_step >= 0")


class PatchDiscriminator(torch.nn.Module):
    """pix2pix NLayerDiscriminator with GroupNorm: a logit per overlapping patch.

    Shape: (B, 3, H, W) in [-1, 1] -> (B, 1, ~H/2^layers, ~W/2^layers)."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[torch.nn.Module] = [torch.nn.Conv2d(3, width, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        channels = width
        for n in range(1, layers + 1):
            out = width * min(2**n, 8)
            blocks += [torch.nn.Conv2d(channels, out, 4, 2 if n < layers else 1, 1, bias=False),
                       torch.nn.GroupNorm(min(32, out), out), torch.nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(torch.nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss per sample. Shape: logits (B, 1, h, w) x2 -> (B,)."""
    return 0.5 * (torch.relu(1 - real).flatten(1).mean(1) + torch.relu(1 + fake).flatten(1).mean(1))


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) hinge term per sample. Shape: (B, 1, h, w) -> (B,)."""
    return -fake.flatten(1).mean(1)


class PatchGAN:
    """The replicated discriminator, its optimizer, and its files."""

    def __init__(self, cfg: GANConfig, device: torch.device, seed: int) -> None:
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # the same initial D on every rank, global stream untouched
            torch.manual_seed(seed)
            self.net = PatchDiscriminator(cfg.width, cfg.layers)
        self.net.to(device)
        self.params = list(self.net.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)

    def active(self, step: int) -> bool:
        return self.cfg.weight > 0 and step >= self.cfg.start_step

    def generator_term(self, rec: torch.Tensor) -> torch.Tensor:
        """-D(x_hat) per sample (B,); D's weights take no gradient from the decoder's backward."""
        self.net.requires_grad_(False)
        return hinge_g(self.net(rec.float()))

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One discriminator step on a micro-batch; gradients averaged over ranks. Returns L_D (B,)."""
        self.net.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=False)
        loss = hinge_d(self.net(real.float()), self.net(fake.detach().float()))
        loss.mean().backward()
        flat = torch.cat([p.grad.flatten() for p in self.params])  # one collective for all of D
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
            p.grad.copy_(g.view_as(p))
        self.optimizer.step()
        return loss.detach()

    def state(self) -> dict[str, torch.Tensor]:
        """Weights ("net/<name>") and AdamW state ("opt/<i>/<key>") as tensors for safetensors."""
        out = {f"net/{k}": v for k, v in self.net.state_dict().items()}
        for i, p in enumerate(self.params):
            out |= {f"opt/{i}/{k}": torch.as_tensor(v) for k, v in self.optimizer.state.get(p, {}).items()}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
        for i, p in enumerate(self.params):
            state = {k.split("/")[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt/{i}/")}
            if state:
                state["step"] = state["step"].cpu()  # torch keeps AdamW's step on the CPU
                self.optimizer.state[p] = state
