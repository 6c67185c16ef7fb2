"""trainer.init_from (ztsnr_ds/init_from.py): a NEW run from another run's checkpoint, through the real
DeepSpeed engine on the tiny SDXL. The optimizer and EMA state the source saved are what step 1 of the new
run starts from, bit for bit; step, LR schedule and epoch restart; the lineage reaches checkpoints and
exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ztsnr_ds import checkpoint
from ztsnr_ds.config import ConfigError, parse
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.export import checkpoint_settings, export_metadata
from ztsnr_ds.trainer import Trainer, lr_at

EMA = ("--ema.enabled", "true", "--ema.decay", "0.9", "--ema.dtype", "bf16")


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    trainer = {"micro_batch": 2, "max_steps": 2, "save_every": 2, "log_every": 1, "warmup_steps": 3}
    return make_run_config("init_from", 8, trainer, {"every": 0})


def make_trainer(run_config: Path, output_dir: Path, *overrides: str) -> Trainer:
    cfg, config_dict = parse(["--config", str(run_config), "--trainer.output_dir", str(output_dir),
                              "--optimizer.fused", "false", *EMA, *overrides])
    return Trainer(cfg, config_dict, init_distributed())


def optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """AdamWSR's state (moments, t) of each flat param, in param-group order."""
    out = []
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            state = trainer.optimizer.state.get(p, {})
            out += [torch.as_tensor(state[k]).clone() for k in sorted(state)]
    return out


def at_first_step(trainer: Trainer) -> dict:
    """Optimizer, EMA and weights as step 1 of `trainer` begins (recorded from inside train())."""
    seen, step = {}, trainer.train_step

    def record(batches):
        if not seen:
            seen.update(step=trainer.step, skipped=trainer.engine.skipped_steps,
                        opt=optimizer_tensors(trainer),
                        ema={k: [t.clone() for t in v] for k, v in trainer.ema.state.items()},
                        updates=trainer.ema.updates, lr=trainer.optimizer.param_groups[0]["lr"],
                        weights=[p.detach().clone() for p in trainer.engine.module.parameters()])
        return step(batches)

    trainer.train_step = record
    trainer.train()
    return seen


@pytest.fixture(scope="module")
def source(run_config, tmp_path_factory) -> tuple[Path, Trainer]:
    out = tmp_path_factory.mktemp("source") / "a"
    trainer = make_trainer(run_config, out)
    trainer.train()
    return out, trainer


def test_new_run_starts_from_saved_optimizer_and_ema_bitwise(run_config, source, tmp_path, capsys):
    src_dir, src = source
    run = make_trainer(run_config, tmp_path / "b", "--trainer.init_from", str(src_dir),
                       "--trainer.max_steps", "1")
    seen = at_first_step(run)
    assert seen["step"] == 0 and seen["skipped"] == 0
    want = optimizer_tensors(src)
    assert len(seen["opt"]) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(seen["opt"], want))
    assert seen["updates"] == src.ema.updates == 2
    for name, slices in src.ema.state.items():
        assert all(torch.equal(a, b) for a, b in zip(slices, seen["ema"][name])), name
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], src.engine.module.parameters()))
    assert seen["lr"] == lr_at(0, run.cfg.trainer, run.cfg.optimizer.lr)  # the warmup starts again
    tag = checkpoint.complete_tags(tmp_path / "b" / "checkpoints")[-1]
    assert tag.name == "step00000001"
    lineage = [{"run": str(src_dir), "tag": "step00000002", "step": 2, "weights": "all"}]
    assert checkpoint.read_state(tag)["config"]["lineage"] == lineage
    assert json.loads(export_metadata(checkpoint_settings(tag))["ztsnr_ds.lineage"]) == lineage
    # a restart of the new run resumes its own tag (and says so) and keeps the lineage
    capsys.readouterr()
    _, config_dict = parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path / "b"),
                            "--trainer.init_from", str(src_dir), "--trainer.max_steps", "2", *EMA])
    assert config_dict["lineage"] == lineage
    assert "not applied, the run resumes its own checkpoint" in capsys.readouterr().err


def test_weights_only_starts_fresh_moments_and_ema(run_config, source, tmp_path):
    src_dir, src = source
    run = make_trainer(run_config, tmp_path / "c", "--trainer.init_from", str(src_dir / "checkpoints"),
                       "--trainer.init_weights_only", "true", "--trainer.max_steps", "1")
    seen = at_first_step(run)
    assert seen["opt"] == [] and seen["updates"] == 0  # AdamWSR creates zero moments at this step
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], src.engine.module.parameters()))
    masters = [g["params"][0] for g in src.optimizer.param_groups]
    assert all(torch.equal(e, m.to(e.dtype)) for e, m in zip(seen["ema"]["ema"], masters))
    assert checkpoint.read_state(tmp_path / "c" / "checkpoints" / "step00000001")["config"]["lineage"][0][
        "weights"] == "weights_only"


def test_bad_init_from_names_the_key(run_config, source, tmp_path):
    src_dir, _ = source
    for value, out in ((str(tmp_path / "missing"), tmp_path / "d"), (str(src_dir), src_dir)):
        with pytest.raises(ConfigError, match="trainer.init_from"):
            parse(["--config", str(run_config), "--trainer.output_dir", str(out),
                   "--trainer.init_from", value, *EMA])
