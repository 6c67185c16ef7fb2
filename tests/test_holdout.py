"""Held-out validation loss: which images (a seeded hash of the key), their exclusion from training, and
the loss itself against a hand computation, across eval cadence, resume and world size."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ztsnr_ds.config import ConfigError, parse
from ztsnr_ds.data.sampler import BucketBatchSampler
from ztsnr_ds.holdout import LEVEL_INDICES, holdout_count, holdout_ids, splitmix64, training_buckets

MASK = 2**64 - 1
ROOT = Path(__file__).resolve().parents[1]


def splitmix64_reference(x: int) -> int:
    """SplitMix64's finaliser on Python ints (Steele, Lea & Flood 2014; Vigna's splitmix64.c)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def random_hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64)


# ----------------------------------------------------------------------------- which images


def test_holdout_ids_are_the_smallest_seeded_mixes():
    hashes = random_hashes(1000)
    for seed in (0, 7):
        salt = splitmix64_reference(seed)
        mixed = [splitmix64_reference(int(h) ^ salt) for h in hashes]
        expected = sorted(sorted(range(len(hashes)), key=mixed.__getitem__)[:37])
        assert holdout_ids(hashes, 37, seed).tolist() == expected
    assert splitmix64(np.array([0, 1, MASK], dtype=np.uint64)).tolist() == [
        splitmix64_reference(v) for v in (0, 1, MASK)]


def test_holdout_ids_follow_the_keys_not_the_rows_and_change_with_the_seed():
    hashes = random_hashes(5000)
    ids = holdout_ids(hashes, 50, seed=3)
    assert np.array_equal(ids, holdout_ids(hashes.copy(), 50, seed=3))  # stable across calls
    order = np.random.default_rng(1).permutation(len(hashes))  # the same keys in another row order
    assert set(hashes[order][holdout_ids(hashes[order], 50, 3)].tolist()) == set(hashes[ids].tolist())
    overlap = len(np.intersect1d(ids, holdout_ids(hashes, 50, seed=4)))
    assert overlap < 5  # independent draws overlap by 50 * 50 / 5000 = 0.5 on average
    assert len(holdout_ids(hashes, 0, 3)) == 0 and len(holdout_ids(hashes, 5000, 3)) == 5000


@pytest.mark.parametrize("holdout, rows, count", [(0, 10, 0), (3, 10, 3), (0.25, 100, 25), (0.5, 3, 2)])
def test_holdout_count(holdout, rows, count):
    assert holdout_count(holdout, rows) == count


@pytest.mark.parametrize("holdout, rows, match", [(10, 10, "leaving none"), (0.001, 100, "holds out none")])
def test_holdout_count_refuses(holdout, rows, match):
    with pytest.raises(ValueError, match=rf"validation\.holdout = {holdout} .*{match}"):
        holdout_count(holdout, rows)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_held_out_ids_are_in_no_epoch_and_the_rest_in_every_epoch(world_size):
    rng = np.random.default_rng(0)
    n = 301
    bucket_of = rng.integers(0, 5, size=n)
    buckets = {f"{64 * (b + 1)}x64": np.flatnonzero(bucket_of == b) for b in range(5)}
    buckets["64x512"] = np.array([7])  # a bucket whose only image is held out disappears
    bucket_of[7] = 5
    held = holdout_ids(random_hashes(n), 30, seed=0)
    held = np.union1d(held, [7])
    train = training_buckets(buckets, held, n)
    assert "64x512" not in train
    samplers = [BucketBatchSampler(train, 4, world_size, r, seed=0) for r in range(world_size)]
    expected = np.setdiff1d(np.arange(n), held)
    for epoch in range(3):
        seen = [i for s in samplers for _ in range(len(s)) for i in next(s)[1]]
        assert sorted(seen) == expected.tolist(), epoch  # each training id once, no held-out id


# ----------------------------------------------------------------------------- config checks


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    """The demo config on the tiny model and a 16-image cache; 5 images held out, evaluated every step."""
    trainer = {"micro_batch": 2, "max_steps": 3, "save_every": 1, "keep_last": 3, "log_every": 1,
               "warmup_steps": 1}
    return make_run_config("holdout", 16, trainer, {"every": 0, "holdout": 5, "loss_every": 1})


@pytest.mark.parametrize("args, match", [
    (["--validation.holdout", "2.5"], r"validation\.holdout = 2\.5: a count"),
    (["--validation.holdout", "-1"], r"validation\.holdout = -1"),
    (["--validation.holdout", "0"], r"validation\.loss_every = 1 has no images"),
    (["--validation.loss_every", "0"], r"validation\.holdout = 5 needs validation\.loss_every"),
    (["--validation.holdout", "16"], r"validation\.holdout = 16 holds out 16 of the 16"),
])
def test_bad_holdout_settings_fail_before_training(run_config, args, match):
    with pytest.raises(ConfigError, match=match):
        parse(["--config", str(run_config), *args])


# ----------------------------------------------------------------------------- the loss in training


def make_trainer(run_config: Path, output_dir: Path, *overrides: str):
    from ztsnr_ds.engine import init_distributed
    from ztsnr_ds.trainer import Trainer

    cfg, config_dict = parse(["--config", str(run_config), "--trainer.output_dir", str(output_dir),
                              "--deepspeed_config", str(ROOT / "ds_configs" / "zero2_bf16.json"), *overrides])
    return Trainer(cfg, config_dict, init_distributed())


def records(output_dir: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """metrics.jsonl split into training losses by step and held-out records by step."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in lines if "loss" in r},
            {r["step"]: r for r in lines if "holdout/loss" in r})


@pytest.fixture(scope="module")
def runs(run_config, tmp_path_factory) -> dict:
    """every: evaluated at every step of 3, with an EMA (decay 0.5) evaluated too. sparse: no EMA, evaluated
    only at the start and the end (loss_every 1000), 2 steps, then resumed to 3. Both hold out the same 5
    images."""
    every_dir, sparse_dir = tmp_path_factory.mktemp("every"), tmp_path_factory.mktemp("sparse")
    every, trained = make_trainer(run_config, every_dir, "--ema.enabled", "true", "--ema.decay", "0.5"), []
    forward_loss = every.forward_loss

    def record(batch: dict, bucket: str, ids: list[int]):  # the ids trained on, not those evaluated
        trained.append(list(ids))
        return forward_loss(batch, bucket, ids)

    every.forward_loss = record
    every.train()
    sparse = ("--validation.loss_every", "1000")
    make_trainer(run_config, sparse_dir, *sparse, "--trainer.max_steps", "2").train()
    resumed = make_trainer(run_config, sparse_dir, *sparse)
    resumed.train()
    return {"every": every, "trained": trained, "every_dir": every_dir, "sparse_dir": sparse_dir,
            "resumed": resumed}


def test_evaluation_leaves_training_unchanged_and_resume_keeps_the_holdout(runs):
    """Training losses bitwise equal with evaluation at every step or only at the start and end, across
    a resume; the held-out numbers of the same weights (steps 2 and 3) bitwise equal too. The "every" run
    also swaps its EMA in and out for each evaluation: training goes on from the same weights."""
    every_losses, every_held = records(runs["every_dir"])
    sparse_losses, sparse_held = records(runs["sparse_dir"])
    assert sorted(every_held) == [0, 1, 2, 3] and sorted(sparse_held) == [0, 2, 3]
    assert every_losses == sparse_losses and sorted(every_losses) == [1, 2, 3]
    for step in (0, 2, 3):
        assert {k: v for k, v in every_held[step].items() if not k.startswith("ema_")} == sparse_held[step]
    assert np.array_equal(runs["resumed"].holdout.ids, runs["every"].holdout.ids)
    assert len(runs["every"].holdout.ids) == 5
    held = set(runs["every"].holdout.ids.tolist())
    trained = {i for batch in runs["trained"] for i in batch}
    assert trained and not trained & held
    assert every_held[3]["holdout/loss"] < every_held[0]["holdout/loss"]  # lr 1e-3: it learns in 3 steps


def reference_losses(trainer) -> dict[str, float]:
    """The held-out numbers recomputed from their definition (ztsnr_ds/holdout.py docstring) with
    plain formulas: sigma levels, noise seeding, v target, Min-SNR weight with terminal weight 1."""
    from ztsnr_ds.schedule import ztsnr_sigmas

    cfg, cache, unet = trainer.cfg, trainer.cache, trainer.engine.module
    dtype = next(unet.parameters()).dtype  # the run's: bf16, or fp32 with ds_configs/zero2_fp32.json
    table = ztsnr_sigmas("terminal", 20000.0)
    mse_rows, weighted_rows = [], []
    unet.eval()
    for i in trainer.holdout.ids.tolist():
        batch = cache.batch([i])
        x0 = batch["latents"].float().expand(8, -1, -1, -1)  # (K, 4, h, w)
        scale = math.sqrt(x0.shape[2] * 8 * x0.shape[3] * 8 / cfg.noise.base_area)
        sigma = torch.tensor([20000.0 if k == 999 else float(table[k]) * scale for k in LEVEL_INDICES])
        digest = hashlib.sha256(f"holdout:{cfg.validation.holdout_seed}:{int(cache.key_hash[i])}".encode())
        gen = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        embeds, pooled, _ = trainer.prompts.encode(batch["captions"])  # the caption as cached, unchanged
        with torch.no_grad():
            out = unet(((x0 + s * eps) / (s**2 + 1).sqrt()).to(dtype), trainer.schedule.timestep(sigma),
                       encoder_hidden_states=embeds.expand(8, -1, -1).to(dtype),
                       added_cond_kwargs={"text_embeds": pooled.expand(8, -1).to(dtype),
                                          "time_ids": batch["time_ids"].expand(8, -1)}).sample.float()
        v = (eps - s * x0) / (s**2 + 1).sqrt()
        mse = ((out - v) ** 2).mean(dim=(1, 2, 3))
        snr = sigma**-2
        weight = torch.where(sigma >= 19800, 1.0, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
        mse_rows.append(mse)
        weighted_rows.append(mse * weight * batch["weight"])
    unet.train()
    mse, weighted = torch.stack(mse_rows).double(), torch.stack(weighted_rows).double()  # (n, K)
    return {"holdout/loss": float(weighted.mean())} | {
        f"holdout/v_mse/t{k:03d}": float(m) for k, m in zip(LEVEL_INDICES, mse.mean(0))}


def test_ema_held_out_loss(runs):
    """The EMA's held-out loss: at step 0 the EMA is the weights (the same numbers), later its own."""
    _, held = records(runs["every_dir"])
    assert held[0]["ema_holdout/loss"] == held[0]["holdout/loss"]
    assert all(held[s]["ema_holdout/loss"] != held[s]["holdout/loss"] for s in (1, 2, 3))
    assert {k.removeprefix("ema_") for k in held[3] if k.startswith("ema_")} == {
        k for k in held[3] if k.startswith("holdout/")}


def test_held_out_loss_matches_its_formula(runs):
    trainer = runs["every"]
    expected = reference_losses(trainer)
    logged = {k: v for k, v in records(runs["every_dir"])[1][3].items() if not k.startswith("ema_")}
    assert sorted(logged) == sorted(["step", *expected])
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
    assert trainer.holdout_metrics() == {k: v for k, v in logged.items() if k != "step"}  # evaluate repeats
    assert list(trainer.holdout.levels.tolist()) == [0, 143, 285, 428, 571, 714, 856, 999]


# ----------------------------------------------------------------------------- world size


def evaluate_on_rank(rank: int, world_size: int, port: int, config: str, weights: str, out: str) -> None:
    """One rank of a gloo world: the held-out loss of `weights`, built as the Trainer builds it."""
    from ztsnr_ds.data.cache import LatentCache
    from ztsnr_ds.holdout import HoldoutLoss
    from ztsnr_ds.models import load_frozen, load_unet
    from ztsnr_ds.objective import VObjective
    from ztsnr_ds.schedule import NoiseSchedule
    from ztsnr_ds.text import PromptEncoder

    torch.set_num_threads(1)  # as the in-process run (conftest): the same CPU kernels, the same sums
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    cfg, _ = parse(["--config", config, "--trainer.output_dir", str(Path(out).parent / "run")])
    cache = LatentCache(cfg.data.cache_dir)
    seed = cfg.validation.holdout_seed
    ids = holdout_ids(cache.key_hash, holdout_count(cfg.validation.holdout, len(cache)), seed)
    state = torch.load(weights)
    unet = load_unet(cfg.model.pretrained, dtype=next(iter(state.values())).dtype)  # the trainer's dtype
    unet.load_state_dict(state)
    prompts = PromptEncoder.from_parts(load_frozen(cfg.model.pretrained))
    loss = HoldoutLoss(ids, cache, NoiseSchedule("terminal", 20000.0, cfg.noise.base_area),
                       VObjective("min_snr", 5.0, 1.0, 20000.0), prompts, seed, rank, world_size,
                       torch.device("cpu"))
    values = loss.evaluate(unet)
    if rank == 0:
        Path(out).write_text(json.dumps(values))
    torch.distributed.destroy_process_group()


def test_two_ranks_report_the_same_numbers_as_one_bitwise(runs, run_config, tmp_path):
    """The trained weights evaluated by 2 gloo ranks (rank 0 takes images 0, 2, 4; rank 1 images 1, 3)
    give the 1-rank trainer's numbers bit for bit: each image's forward has the same inputs and shapes
    on any world size, and the all-reduce adds zeros to every value (exact)."""
    from tests.test_distributed import free_port

    trainer = runs["every"]
    weights, out = tmp_path / "weights.pt", tmp_path / "out.json"
    torch.save(trainer.engine.module.state_dict(), weights)
    args = (2, free_port(), str(run_config), str(weights), str(out))
    torch.multiprocessing.spawn(evaluate_on_rank, args=args, nprocs=2)
    two = json.loads(out.read_text())
    one = {k.removeprefix("holdout/"): v for k, v in records(runs["every_dir"])[1][3].items()
           if k.startswith("holdout/")}
    assert two == one


def test_resume_with_other_held_out_images_is_refused(runs, run_config):
    for change in (["--validation.holdout", "4"], ["--validation.holdout_seed", "1"]):
        with pytest.raises(ConfigError, match=r"validation\.holdout: .*step00000003 was trained holding out"):
            parse(["--config", str(run_config), "--trainer.output_dir", str(runs["every_dir"]), *change])


def test_cached_text_embeddings_give_the_live_encoding_numbers(runs, run_config, tmp_path, tiny_sdxl):
    """The same images cached with their text embeddings (bf16, from fp32 encoders) score as with the
    captions encoded live by the trainer's bf16 encoders, to bf16 rounding of the embeddings."""
    import yaml

    from ztsnr_ds.data.buckets import BucketConfig
    from ztsnr_ds.data.cache import CacheConfig, LatentCache
    from ztsnr_ds.data.cache_build import build_cache
    from ztsnr_ds.holdout import HoldoutLoss
    from ztsnr_ds.models import load_frozen

    trainer = runs["every"]
    data = yaml.safe_load(run_config.read_text())["data"] | {"cache_text": True, "cache_dir": str(tmp_path)}
    build_cache(CacheConfig(**data | {"buckets": BucketConfig(**data["buckets"])}),
                load_frozen(tiny_sdxl, dtype=torch.float32), progress=False)
    cache = LatentCache(tmp_path)
    assert cache.cache_text and np.array_equal(cache.key_hash, trainer.cache.key_hash)
    held = trainer.holdout
    cached = HoldoutLoss(held.ids, cache, held.schedule, held.objective, held.prompts, held.seed, 0, 1,
                         held.device).evaluate(trainer.engine.module)
    live = held.evaluate(trainer.engine.module)
    assert cached.keys() == live.keys()
    for key, value in live.items():
        assert cached[key] == pytest.approx(value, rel=5e-3), key  # measured 9e-4 at most
