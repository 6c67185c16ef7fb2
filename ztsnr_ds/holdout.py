"""Held-out validation loss: images kept out of training by a seeded hash of their key, and their v-loss
at fixed noise levels with fixed noise, so curves compare across runs, resumes and world sizes.

Which images: the n smallest values of splitmix64(key_hash XOR splitmix64(seed)) over the cache's rows
(key_hash = BLAKE2b-8 of the image key, data/index.py). A function of the keys and the seed only: every
rank, every world size and every resume picks the same images, and reordering the rows (a rebuilt cache)
does not change which keys are picked. n is a count, or round(fraction * rows).

What is measured: each held-out image x0 at the K = 8 table indices i_k = round(k * 999 / 7)
(the quantiles k / 7 of training's i ~ Uniform{0..999}: 0, 143, ..., 856, 999, so the lowest level and
the terminal sigma_max are both in), sigma_k = the image's resolution-scaled table[i_k] as in training,
eps_k drawn from a generator seeded by (seed, key_hash), the caption as cached (no dropout, no shuffle;
the first of several lines, a template's fields joined: data/caption_control.py canonical_caption).
Per level: the mean over the held-out images of the unweighted v-MSE, mean((F - v)^2). Total: the mean
over images and levels of the training loss formula w(sigma) * tag_weight * v-MSE (VObjective.loss):
a fixed probe, not an estimate of the training loss (sigma_max counts 1/8 here, 1/1000 in training).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ztsnr_ds.data.cache import LatentCache
from ztsnr_ds.data.caption_control import canonical_caption
from ztsnr_ds.device import to_device
from ztsnr_ds.objective import VObjective, add_noise, append_dims, c_in, v_target
from ztsnr_ds.schedule import NUM_TRAIN_TIMESTEPS, NoiseSchedule
from ztsnr_ds.text import PromptEncoder

LEVELS = 8
LEVEL_INDICES = tuple(round(k * (NUM_TRAIN_TIMESTEPS - 1) / (LEVELS - 1)) for k in range(LEVELS))
"""Table indices of the evaluated noise levels: quantiles k / (K - 1) of the uniform training index."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014), elementwise, wrapping uint64 arithmetic: a bijection
    that turns nearby inputs into unrelated outputs. Shape: (N,) uint64 -> (N,) uint64."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_count(holdout: float, rows: int) -> int:
    """Images to hold out: `holdout` itself if >= 1 (a count), round(holdout * rows) if in (0, 1), 0 if 0.
    Raises ValueError naming validation.holdout if that leaves no image out or none to train on."""
    n = int(holdout) if holdout >= 1 else round(holdout * rows)
    if holdout and n == 0:
        raise ValueError(f"validation.holdout = {holdout:g} of {rows} cached images holds out none; "
                         "give a count (>= 1) or a larger fraction")
    if n >= rows and rows:
        raise ValueError(f"validation.holdout = {holdout:g} holds out {n} of the {rows} cached images, "
                         "leaving none to train on; hold out fewer")
    return n


def holdout_ids(key_hash: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Row ids of the `count` rows with the smallest splitmix64(key_hash ^ splitmix64(seed)), ascending.

    O(N) in numpy (one mix, one argpartition), no per-row Python objects.
    Shape: (N,) uint64 -> (count,) int64.
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    salt = splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    mixed = splitmix64(np.asarray(key_hash, dtype=np.uint64) ^ salt)  # (N,)
    chosen = np.argpartition(mixed, count - 1)[:count] if count < len(mixed) else np.arange(len(mixed))
    return np.sort(chosen).astype(np.int64)


def training_buckets(buckets: dict[str, np.ndarray], held: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    """The buckets (ids in [0, rows)) without the held-out ids, by one boolean mask over the rows: O(N);
    buckets left empty are dropped."""
    if not len(held):
        return buckets
    keep = np.ones(rows, dtype=bool)
    keep[held] = False
    out = {key: ids[keep[ids]] for key, ids in buckets.items()}
    return {key: ids for key, ids in out.items() if len(ids)}


def noise_generator(seed: int, key_hash: int) -> torch.Generator:
    """The CPU generator of one held-out image's noise: seeded by (seed, key hash) only, so the noise is
    the same on every rank, world size and run."""
    digest = hashlib.sha256(f"holdout:{seed}:{key_hash}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class HoldoutLoss:
    """The held-out v-loss of a UNet (see the module docstring); `evaluate` is collective.

    Rank r of W evaluates ids[r::W], each image alone in one forward of its K levels (buckets differ);
    every value lands in a (2, n, K) table that one all-reduce sums. A row is written by one rank and is
    zero on the others, and x + 0 is exact, so the table -- and every reported number -- is bitwise the
    same on any world size for the same weights (on devices that compute the same forward bitwise).
    """

    def __init__(self, ids: np.ndarray, cache: LatentCache, schedule: NoiseSchedule, objective: VObjective,
                 prompts: PromptEncoder, seed: int, rank: int, world_size: int, device: torch.device) -> None:
        self.ids, self.cache, self.schedule, self.objective = ids, cache, schedule, objective
        self.prompts = prompts
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.levels = torch.tensor(LEVEL_INDICES)
        self.names = [f"v_mse/t{i:03d}" for i in LEVEL_INDICES]

    def bucket(self, i: int) -> str:
        """Bucket key "HxW" of cache row i."""
        index = self.cache.index
        return index.bucket_keys[int(index.columns["bucket"][i])]

    def image_losses(self, unet: torch.nn.Module, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """v-MSE and training-weighted loss of cache row i at the K levels. Shape: 2 x (K,) float32."""
        batch = self.cache.batch([i])
        x0 = batch["latents"].float()  # (1, 4, h/8, w/8)
        k = len(self.levels)
        sigma = self.schedule.scaled_table(*self.cache.height_width(self.bucket(i)))[self.levels].float()
        gen = noise_generator(self.seed, int(self.cache.key_hash[i]))
        noise = torch.randn((k, *x0.shape[1:]), generator=gen)  # (K, 4, h/8, w/8), on the CPU as in training
        x0, noise, sigma, t, weight, time_ids = to_device(
            self.device, x0.expand(k, -1, -1, -1), noise, sigma, self.schedule.timestep(sigma),
            batch["weight"].expand(k), batch["time_ids"].expand(k, -1))
        if "embeds" in batch:  # one image: its own chunks, no padding, no mask
            embeds, pooled = to_device(self.device, batch["embeds"], batch["pooled"])
        else:
            embeds, pooled, _ = self.prompts.encode([canonical_caption(c) for c in batch["captions"]])
        dtype = next(unet.parameters()).dtype
        model_in = (c_in(append_dims(sigma, x0.ndim)) * add_noise(x0, noise, sigma)).to(dtype)
        v_pred = unet(model_in, t, encoder_hidden_states=embeds.expand(k, -1, -1).to(dtype),
                      added_cond_kwargs={"text_embeds": pooled.expand(k, -1).to(dtype),
                                         "time_ids": time_ids}).sample.float()  # (K, 4, h/8, w/8)
        mse = (v_pred - v_target(x0, noise, sigma)).pow(2).flatten(1).mean(1)
        return mse, self.objective.loss(v_pred, x0, noise, sigma, weight)

    @torch.no_grad()
    def evaluate(self, unet: torch.nn.Module) -> dict[str, float]:
        """{"loss": weighted total, "v_mse/t<index>": per-level v-MSE}; collective (every rank calls it).

        Runs in eval mode under no_grad and draws from no global RNG, so training afterwards is unchanged.
        """
        table = torch.zeros(2, len(self.ids), len(self.levels), device=self.device)  # (2, n, K)
        training = unet.training
        unet.eval()
        try:
            for j in range(self.rank, len(self.ids), self.world_size):
                table[0, j], table[1, j] = self.image_losses(unet, int(self.ids[j]))
        finally:
            unet.train(training)
        torch.distributed.all_reduce(table)  # sum: each row comes from one rank, zeros from the others
        means = table.double().mean(1)  # (2, K) over images
        values = torch.cat([means[1].mean()[None], means[0]]).tolist()  # host sync, once per evaluation
        return dict(zip(["loss", *self.names], values, strict=True))
