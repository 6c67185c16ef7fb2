"""Metric sinks (TensorBoard, Weights & Biases, console) and image grids; rank 0 only.

The trainer hands scalars and images to one `MetricLogger`; which sinks exist is
decided once, here. Loss by sigma band shows whether the terminal (pure-noise) band
and the low-noise bands train, which a single mean loss hides.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Upper edges of the sigma bands for the loss breakdown (the last band is sigma_max itself).
SIGMA_BAND_EDGES = (0.5, 2.0, 10.0, 100.0)
SIGMA_BAND_NAMES = ("lt0.5", "0.5-2", "2-10", "10-100", "ge100")
LABELLED_ROW = 6  # labelled grids of up to this many images are one row
LABEL_LINES, LINE_PX = 4, 12  # a label's most lines under its image, and their pitch (PIL's default font)


def sigma_band(sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Band index 0..4 per sample; edges: SIGMA_BAND_EDGES on sigma's device. Shape: (B,) -> (B,) int64."""
    return torch.bucketize(sigma.float(), edges)


class BandMeter:
    """Accumulates per-sample losses by sigma band on the device; read once per log interval."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(SIGMA_BAND_NAMES), dtype=torch.float64, device=device)
        self.counts = torch.zeros_like(self.sums)
        self.edges = torch.tensor(SIGMA_BAND_EDGES, device=device)  # once: each copy would sync the host

    def add(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        band = sigma_band(sigma, self.edges)
        self.sums.index_add_(0, band, loss.detach().double())
        self.counts.index_add_(0, band, torch.ones_like(loss, dtype=torch.float64))

    def read_and_reset(self) -> dict[str, float]:
        sums, counts = self.sums.tolist(), self.counts.tolist()  # host sync, once per log
        self.sums.zero_()
        self.counts.zero_()
        return {f"loss_band/{n}": s / c for n, s, c in zip(SIGMA_BAND_NAMES, sums, counts) if c}


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """Tile decoded images in [-1, 1] into one PIL image. Shape: (N, 3, H, W)."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img.permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(grid)


class MetricLogger:
    """TensorBoard by default, W&B when asked; a no-op on ranks other than 0."""

    def __init__(self, output_dir: Path, config: dict, enabled: bool, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "ztsnr_ds", wandb_mode: str = "offline") -> None:
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb:
            import wandb as wandb_lib

            self.wandb = wandb_lib.init(project=wandb_project, mode=wandb_mode, config=config,
                                        dir=str(output_dir), name=Path(output_dir).name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, key: str, image: Image.Image, step: int, caption: str = "") -> None:
        if self.tb is not None:
            self.tb.add_image(key, np.asarray(image), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wandb_lib

            self.wandb.log({key: wandb_lib.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int | None = None) -> Image.Image:
    """image_grid with each cell's label (its prompt) wrapped in a white band under it. Shape: (N, 3, H, W).

    Without ``columns``: one row for up to LABELLED_ROW images (no blank cell), else a near-square grid.
    """
    n, _, h, w = images.shape
    columns = columns or (n if n <= LABELLED_ROW else math.ceil(math.sqrt(n)))
    font = ImageFont.load_default()
    chars = max(8, w // 6)  # the default bitmap font is ~6 px per character
    wrapped = [textwrap.wrap(label, chars)[:LABEL_LINES] or [""] for label in labels]
    band = LINE_PX * max(len(lines) for lines in wrapped) + 4
    tiles = image_grid(images, columns)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * (h + band)), "white")
    draw = ImageDraw.Draw(grid)
    for i, lines in enumerate(wrapped):
        r, c = divmod(i, columns)
        grid.paste(tiles.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)), (c * w, r * (h + band)))
        draw.multiline_text((c * w + 2, r * (h + band) + h + 2), "\n".join(lines), fill="black", font=font,
                            spacing=LINE_PX - 10)
    return grid
