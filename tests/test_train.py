"""End to end on CPU through the real DeepSpeed engine: tiny SDXL folder -> cache -> training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ztsnr_ds import checkpoint
from ztsnr_ds.config import ConfigError, build_parser, parse
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.trainer import READY_LINE, StopTraining, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    """A demo-style YAML pointing at the tiny model and a 16-image cache."""
    trainer = {"micro_batch": 2, "max_steps": 4, "save_every": 2, "log_every": 1, "warmup_steps": 1}
    return make_run_config("train", 16, trainer, {"every": 0, "steps": 3, "height": 64, "width": 64})


def make_trainer(run_config: Path, output_dir: Path, *overrides: str) -> Trainer:
    argv = ["--config", str(run_config), "--trainer.output_dir", str(output_dir), *overrides]
    cfg, config_dict = parse(argv)
    return Trainer(cfg, config_dict, init_distributed())


def losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


EMA_BF16 = ("--ema.enabled", "true", "--ema.decay", "0.9", "--ema.dtype", "bf16")  # SR: seeded rounding


def test_resumed_run_repeats_the_uninterrupted_one_bitwise(run_config, tmp_path):
    straight = make_trainer(run_config, tmp_path / "a", "--trainer.max_steps", "4", *EMA_BF16)
    straight.train()
    first_half = make_trainer(run_config, tmp_path / "b", "--trainer.max_steps", "2", *EMA_BF16)
    first_half.train()
    second_half = make_trainer(run_config, tmp_path / "b", "--trainer.max_steps", "4", *EMA_BF16)
    second_half.train()
    assert second_half.ema.updates == straight.ema.updates == 4
    for name, slices in straight.ema.state.items():  # the EMA (bf16, stochastically rounded) too
        assert all(torch.equal(a, b) for a, b in zip(slices, second_half.ema.state[name])), name
    assert second_half.step == 4
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b  # bitwise: same floats, printed by json with full precision
    assert all(torch.isfinite(torch.tensor(list(a.values()))))
    for p, q in zip(straight.engine.module.parameters(), second_half.engine.module.parameters()):
        assert torch.equal(p, q)
    # keep_last = 2 of the demo config: tags 2 and 4 remain, each complete.
    tags = checkpoint.complete_tags(tmp_path / "b" / "checkpoints")
    assert [t.name for t in tags] == ["step00000002", "step00000004"]
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step00000004"
    state = checkpoint.read_state(tags[-1])
    assert state["step"] == 4 and state["config"]["noise"]["ztsnr"] == "terminal"
    summary = json.loads((tmp_path / "a" / "sampler_summary.json").read_text())  # start-up bucket report
    assert (summary["images"], summary["used_per_epoch"], summary["unused"]) == (16, 16, 0)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    planned = straight.sampler.plan(0).offsets  # 1 rank: step k is micro-batch k
    assert [r["samples_per_step"] for r in records] == [int(n) for n in planned[1:5] - planned[:4]]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0]  # DeepSpeed's count, logged every step here


def test_validation_grid_is_written(run_config, tmp_path):
    """A grid of the trained weights and, with the EMA on, one of the EMA swapped into the module; the
    module is back to the trained weights afterwards, bit for bit."""
    trainer = make_trainer(run_config, tmp_path, "--trainer.max_steps", "1", "--validation.every", "1",
                           "--ema.enabled", "true", "--ema.decay", "0.5")
    trainer.train()
    from PIL import Image

    grids = []
    for name in ("step00000001.png", "step00000001_ema.png"):
        with Image.open(tmp_path / "samples" / name) as img:  # two 64x64 prompts side by side
            assert img.size[0] == 128 and img.size[1] > 64  # each prompt in a band under its image
            assert json.loads(img.text["prompts"]) == trainer.cfg.validation.prompts
            assert len(set(img.getdata())) > 1
            grids.append(list(img.getdata()))
    assert grids[0] != grids[1]  # the EMA (half the initial weights) draws other images
    trained = [p.detach().clone() for p in trainer.engine.module.parameters()]
    (master,) = trainer.ema.masters
    with trainer.ema.swapped_in():
        swapped = torch.cat([p.detach().flatten() for p in trainer.engine.module.parameters()])
        (ema_slice,) = trainer.ema.state["ema"]
        assert torch.equal(swapped, ema_slice[:swapped.numel()].to(swapped.dtype))
    assert all(torch.equal(p, q) for p, q in zip(trained, trainer.engine.module.parameters()))
    assert torch.equal(master[:swapped.numel()], torch.cat([p.flatten() for p in trained]).to(master.dtype))


def _nan_on(trainer: Trainer, calls: set[int]) -> None:
    """Make the latent batches of the given call numbers NaN (a poisoned shard)."""
    real_batch, count = trainer.cache.batch, [0]

    def batch(ids):
        out = real_batch(ids)
        count[0] += 1
        if count[0] in calls:
            out["latents"] = torch.full_like(out["latents"], float("nan"))
        return out

    trainer.cache.batch = batch


def test_nonfinite_batch_is_skipped_and_counted(run_config, tmp_path):
    trainer = make_trainer(run_config, tmp_path, "--trainer.max_steps", "2")
    _nan_on(trainer, {2})
    trainer.train()
    assert trainer.step == 2 and trainer.nonfinite_total == 1
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert all(v == v for v in losses(tmp_path).values())


def test_too_many_nonfinite_stops_and_keeps_last_checkpoint(run_config, tmp_path):
    make_trainer(run_config, tmp_path, "--trainer.max_steps", "2").train()
    trainer = make_trainer(run_config, tmp_path, "--trainer.max_steps", "4", "--trainer.max_nonfinite", "3")
    _nan_on(trainer, set(range(1, 100)))
    with pytest.raises(StopTraining, match="3 non-finite losses in a row"):
        trainer.train()
    assert [t.name for t in checkpoint.complete_tags(tmp_path / "checkpoints")] == ["step00000002"]


def test_incomplete_checkpoint_is_ignored(run_config, tmp_path):
    make_trainer(run_config, tmp_path, "--trainer.max_steps", "2").train()
    (tmp_path / "checkpoints" / "step00000003").mkdir()  # killed mid-save: no ztsnr_state.json
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        tag = checkpoint.find_resume_tag(tmp_path, "auto")
    assert tag.name == "step00000002"


@pytest.mark.parametrize("args, key", [
    (["--trainer.max_steps", "ten"], "trainer.max_steps"),
    (["--trainer.max_stepz", "10"], "trainer.max_stepz"),
    (["--noise.ztsnr", "infinite"], "noise.ztsnr"),
    (["--loss.weighting", "snr"], "loss.weighting"),
    (["--data.cache_dir", "/nonexistent/cache"], "data.cache_dir"),
    (["--model.pretrained", "/nonexistent/sdxl"], "model.pretrained"),
    (["--model.attention", "flash3"], "model.attention"),
    (["--model.compile", "max"], "model.compile"),
    (["--trainer.resume_data", "later"], "trainer.resume_data"),
    (["--data.source", "null", "--data.sources", '[{"path": "a", "repeats": -1}]'],
     "data.sources[0].repeats"),
    (["--data.sources", '[{"path": "a"}]'], "data.sources"),
    (["--captions.tag_dropout", "1.5"], "captions.tag_dropout"),
    (["--data.cache_text", "true", "--captions.tag_dropout", "0.1"], "data.cache_text = true .* captions"),
    (["--data.source", "null", "--data.sources", '[{"path": "a", "name": "", "captions": {"dropout": 0.5}}]'],
     "data.sources[0].captions.dropout cannot be set per source"),
    (["--captions.max_chunks", "9"], "captions.max_chunks"),
    (["--captions.max_chunks", "0"], "captions.max_chunks"),
    (["--model.attention", "flash"], "captions.max_chunks"),  # flash cannot apply the padding mask
])
def test_config_errors_name_the_key(run_config, args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace(r"\.*", ".*")):
        parse(["--config", str(run_config), *args])


def test_print_config_shows_max_chunks(run_config, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", str(run_config), "--print_config"])
    assert "max_chunks: 3" in capsys.readouterr().out


def test_sigterm_saves_and_exits_cleanly(run_config, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(run_config),
                             "--trainer.output_dir", str(tmp_path), "--trainer.max_steps", "100000",
                             "--trainer.save_every", "100000"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the signal goes in once the trainer says it is in its loop, not by a clock
        lines.append(line)
        if READY_LINE in line:
            break
    assert READY_LINE in "".join(lines), "".join(lines)[-3000:]
    metrics = tmp_path / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    tags = checkpoint.complete_tags(tmp_path / "checkpoints")
    assert len(tags) == 1
    assert checkpoint.read_state(tags[0])["step"] == max(losses(tmp_path))
