"""The real DeepSpeed engine on CPU (gloo) with AdamWSR as its client optimizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from ztsnr_ds.engine import build_ds_config, init_distributed, initialize, is_pure_bf16
from ztsnr_ds.optim import AdamWSR

ROOT = Path(__file__).resolve().parents[1]
PURE = ROOT / "ds_configs" / "zero2_bf16.json"
FP32_MASTER = ROOT / "ds_configs" / "zero2_bf16_fp32master.json"
FP32 = ROOT / "ds_configs" / "zero2_fp32.json"


@pytest.fixture(scope="module", autouse=True)
def dist():
    return init_distributed()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))


def make_engine(config_path: Path, micro: int = 4, accum: int = 1, lr: float = 1e-2, seed: int = 0,
                fused: bool = False):
    model = make_model(seed)
    opt = AdamWSR(model.parameters(), lr=lr, weight_decay=0.0, seed=seed, fused=fused)
    return initialize(model, opt, build_ds_config(config_path, micro, accum, world_size=1)), opt


def regression_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, torch.sin(x[:, :4] * 2)


def step(engine, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = (engine(x.to(next(engine.module.parameters()).dtype)).float() - y).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def test_batch_settings_come_from_training_config(tmp_path):
    config = build_ds_config(PURE, micro_batch=3, grad_accum=2, world_size=4)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (3, 2, 24)
    assert is_pure_bf16(config) and not is_pure_bf16(build_ds_config(FP32_MASTER, 1, 1, 1))
    bad = json.loads(PURE.read_text()) | {"train_micro_batch_size_per_gpu": 8}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu = 8 .* value 3"):
        build_ds_config(tmp_path / "bad.json", micro_batch=3, grad_accum=1, world_size=1)


@pytest.mark.parametrize("config_path, dtype", [(PURE, torch.bfloat16), (FP32_MASTER, torch.float32)])
def test_client_optimizer_sees_flat_partitions(config_path, dtype):
    engine, opt = make_engine(config_path)
    n_params = sum(p.numel() for p in engine.module.parameters())
    x, y = regression_batch(4)
    step(engine, x, y)
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0].numel() == n_params  # one flat partition (world of one)
    assert params[0].dtype == dtype
    moments = [t for t in opt.state[params[0]].values() if torch.is_tensor(t) and t.numel() == n_params]
    assert moments and all(t.dtype == dtype for t in moments)


def test_a_few_steps_reduce_the_loss():
    engine, _ = make_engine(PURE, lr=3e-3)
    x, y = regression_batch(64)
    losses = []
    for i in range(40):
        sl = slice((i % 16) * 4, (i % 16) * 4 + 4)
        losses.append(step(engine, x[sl], y[sl]))
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_fused_step_inside_the_engine_equals_the_eager_step():
    """The compiled kernel on DeepSpeed's flat bf16 partition: bitwise the eager run's weights and moments."""
    torch._dynamo.reset()  # a fresh compile: no earlier test's graphs count towards dynamo's recompile limit
    x, y = regression_batch(4)
    runs = [make_engine(PURE, fused=fused) for fused in (False, True)]
    for engine, _ in runs:
        for _ in range(3):
            step(engine, x, y)
    (eager, eager_opt), (fused, fused_opt) = runs
    for a, b in zip(eager.module.parameters(), fused.module.parameters(), strict=True):
        assert torch.equal(a, b)
    flat = [group["params"][0] for opt in (eager_opt, fused_opt) for group in opt.param_groups]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(eager_opt.state[flat[0]][key], fused_opt.state[flat[1]][key])


def test_zero_checkpoint_reads_back_equal_to_live_weights(tmp_path):
    engine, _ = make_engine(PURE)
    x, y = regression_batch(4)
    for _ in range(3):
        step(engine, x, y)
    engine.save_checkpoint(str(tmp_path), tag="step00000003")
    restored = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="step00000003")
    live = engine.module.state_dict()
    assert restored.keys() == live.keys()
    for key, value in live.items():
        assert torch.equal(restored[key].to(value.dtype), value), key


def test_gradient_accumulation_equals_larger_batch():
    """k micro-batches accumulate to the mean gradient of one k-times-larger batch.

    Adam is scale invariant, so the weights alone cannot tell a sum from a mean: the
    global grad norm (before clipping) checks the scale, the weights check the direction.
    """
    x, y = regression_batch(8)
    lr = 1e-2
    big, _ = make_engine(FP32_MASTER, micro=8, accum=1, lr=lr)
    small, _ = make_engine(FP32_MASTER, micro=4, accum=2, lr=lr)
    before = [p.detach().float().clone() for p in big.module.parameters()]
    step(big, x, y)
    step(small, x[:4], y[:4])
    step(small, x[4:], y[4:])
    norm_big, norm_small = float(big.get_global_grad_norm()), float(small.get_global_grad_norm())
    assert norm_big > 0 and abs(norm_big - norm_small) <= 0.02 * norm_big
    diffs = torch.cat([(pb.float() - ps.float()).flatten()
                       for pb, ps in zip(big.module.parameters(), small.module.parameters())])
    moved = torch.cat([(pb.float() - p0).flatten() for p0, pb in zip(before, big.module.parameters())])
    assert moved.abs().mean() > 0.5 * lr  # the step really moved the weights
    # Same update up to bf16 rounding of grads and weights: at most 1% of elements disagree by > lr/4.
    assert (diffs.abs() > lr / 4).float().mean() < 0.01


def test_gradient_accumulation_runs_in_fp32_and_the_weights_stay_bf16():
    assert "data_types" not in build_ds_config(PURE, 4, 1, world_size=1)
    engine, opt = make_engine(PURE, micro=4, accum=2)
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32  # DeepSpeed's own field
    x, y = regression_batch(8)
    step(engine, x[:4], y[:4])
    step(engine, x[4:], y[4:])
    assert engine.global_steps == 1 and opt.param_groups[0]["params"][0].dtype == torch.bfloat16
    assert torch.isfinite(torch.tensor(float(engine.get_global_grad_norm())))


@pytest.mark.parametrize("config_path, bad", [(PURE, math.inf), (FP32, math.inf), (FP32, math.nan)],
                         ids=["bf16_inf", "fp32_inf", "fp32_nan"])
def test_an_inf_gradient_with_a_finite_loss_is_skipped_and_counted(config_path, bad):
    """DeepSpeed's ZeRO-2 step skips a step whose gradient norm is not finite and counts it in
    engine.skipped_steps, which the trainer logs and subtracts from the LR schedule's step: with bf16
    through check_grad_overflow, in fp32 (no bf16 section) through the gradient norm's own check (one
    bad element is enough). preflight refuses the settings that turn both off."""
    engine, _ = make_engine(config_path)
    x, y = regression_batch(4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    first = next(engine.module.parameters())

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = bad
        return grad
    hook = first.register_hook(poison)  # the loss itself stays finite
    assert torch.isfinite(torch.tensor(step(engine, x, y)))
    hook.remove()
    assert engine.skipped_steps == 1
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, engine.module.parameters()))
    step(engine, x, y)
    assert engine.skipped_steps == 1
    assert not torch.equal(before[0], first.detach())
