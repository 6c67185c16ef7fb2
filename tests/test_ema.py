"""EMA math and post-hoc EMA: closed forms against brute-force recursions, and a reconstruction against a
power EMA tracked directly in the same (real DeepSpeed, CPU) run.

The sharded EMA against an fp64 EMA of every step's gathered weights, and across world sizes, is in
test_distributed.py (it rides on those runs); bitwise resume and the EMA validation grid in test_train.py.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode

from ztsnr_ds import checkpoint, ema, posthoc, preflight
from ztsnr_ds.config import ConfigError, parse
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.models import load_unet
from ztsnr_ds.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def recursion_profile(decays: list[float]) -> np.ndarray:
    """Weight of each update's weights in an EMA run with these per-update decays, by brute force:
    the EMA of one-hot 'weights' (update tau = unit vector tau), the initial weights left out."""
    n = len(decays)
    e = np.zeros(n + 1)
    e[0] = 1.0  # the initial weights
    for tau, d in enumerate(decays, start=1):
        e = d * e
        e[tau] += 1 - d
    return e


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_power_gamma_matches_edm2(sigma_rel, gamma):
    """EDM2 sec. 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; the inverse closes the loop."""
    assert ema.power_gamma(sigma_rel) == pytest.approx(gamma, abs=0.005)
    assert ema.power_sigma_rel(ema.power_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_ema_profile_is_the_closed_form():
    """The recursion with decay (1 - 1/t)^(g+1) weighs update tau by (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)
    and the initial weights by 0: what posthoc.contributions computes."""
    gamma, t = ema.power_gamma(0.1), 50
    brute = recursion_profile([ema.power_decay(k, gamma) for k in range(1, t + 1)])
    assert brute[0] == 0.0
    np.testing.assert_allclose(brute[1:], posthoc.contributions(gamma, t), rtol=1e-10, atol=1e-300)
    assert ema.ema_decay(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema.ema_decay(10**6, 0.999, warmup=True) == 0.999


def test_solve_against_explicit_profiles():
    """The coefficients and residual from the cumulative-sum inner products equal a least-squares fit of the
    explicit profile vectors divided by its sum (EDM2); a target equal to a snapshot gets that one alone."""
    sigma_rels, steps, horizon = (0.05, 0.10), range(10, 101, 10), 100
    snaps = [(t, ema.power_gamma(s)) for t in steps for s in sigma_rels]

    def profile(t: int, gamma: float) -> np.ndarray:
        w = np.zeros(horizon)
        w[:t] = recursion_profile([ema.power_decay(k, gamma) for k in range(1, t + 1)])[1:]
        return w

    basis = np.stack([profile(*p) for p in snaps], axis=1)
    target = (horizon, ema.power_gamma(0.07))
    solution = posthoc.solve(snaps, target)
    fit = basis @ solution.coefficients
    want = profile(*target)
    x_ref = np.linalg.lstsq(basis, want, rcond=None)[0]
    x_ref /= x_ref.sum()
    best = np.linalg.norm(basis @ x_ref - want)
    assert solution.coefficients.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.linalg.norm(fit - want) == pytest.approx(best, rel=1e-3, abs=1e-12)
    assert solution.residual == pytest.approx(np.linalg.norm(fit - want) / np.linalg.norm(want), rel=1e-3,
                                              abs=1e-9)
    assert solution.residual < 0.05
    exact = posthoc.solve(snaps, snaps[7])
    np.testing.assert_allclose(exact.coefficients, np.eye(len(snaps))[7], atol=1e-6)
    assert exact.residual < 1e-6


def shipped_cadence() -> tuple[int, int, list[float]]:
    """(max_steps, snapshot_every, sigma_rels) of configs/sdxl_ztsnr.yaml (EMAConfig defaults where unset)."""
    config = yaml.safe_load((ROOT / "configs" / "sdxl_ztsnr.yaml").read_text())
    section = config["ema"]
    assert section.get("every", 1) == 1  # one EMA update per step: updates = step
    default = ema.EMAConfig()
    return (config["trainer"]["max_steps"], section.get("snapshot_every", default.snapshot_every),
            section.get("sigma_rels", default.sigma_rels))


def shipped_snapshots() -> list[tuple[int, float]]:
    steps, every, sigma_rels = shipped_cadence()
    return [(t, ema.power_gamma(s)) for t in range(every, steps + 1, every) for s in sigma_rels]


def test_posthoc_coefficients_sum_to_one_at_the_shipped_cadence():
    """Every profile sums to 1 over the updates, so the rebuilt weights are scaled by sum(x): it must be 1
    (unnormalised least squares gave 0.957 at sigma_rel 0.25 with these snapshots)."""
    snaps = shipped_snapshots()
    horizon = max(t for t, _ in snaps)
    for sigma_rel in np.linspace(0.07, 0.25, 10):
        solution = posthoc.solve(snaps, (horizon, ema.power_gamma(sigma_rel)))
        assert abs(solution.coefficients.sum() - 1.0) < 1e-6, (sigma_rel, solution.coefficients.sum())
        assert solution.residual < 0.15


@pytest.mark.parametrize("start", [0.0, 1.0], ids=["far_from_start", "fine_tune"])
@pytest.mark.parametrize("sigma_rel", [0.15, 0.20])
def test_posthoc_weights_of_a_simulated_run(start, sigma_rel):
    """Weights theta_tau = start + a random walk of step 1e-2/sqrt(T) at the shipped cadence; snapshots and
    the target EMA are the explicit profile sums sum_tau w(tau) theta_tau (profiles: the closed form tested
    above against the recursion). The rebuilt EMA must lie within 10% of how far the true EMA is from the
    last weights, both from a random init (start 0) and in a fine-tune (start 1, a 1% move), where a
    coefficient sum off 1 scales the whole pretrained weight (measured before normalising: 2.4x at 0.20)."""
    snaps = shipped_snapshots()
    horizon = max(t for t, _ in snaps)
    rng = np.random.default_rng(0)
    theta = start + np.cumsum(rng.standard_normal((horizon, 4)), axis=0) * 1e-2 / np.sqrt(horizon)

    def ema_of(t: int, gamma: float) -> np.ndarray:
        return posthoc.contributions(gamma, t) @ theta[:t]

    target = (horizon, ema.power_gamma(sigma_rel))
    solution = posthoc.solve(snaps, target)
    rebuilt = sum(x * ema_of(*p) for x, p in zip(solution.coefficients, snaps))
    truth = ema_of(*target)
    error, moved = np.linalg.norm(rebuilt - truth), np.linalg.norm(truth - theta[-1])
    assert error < 0.1 * moved, (error / moved, solution.coefficients.sum())


@pytest.fixture(scope="module")
def posthoc_run(make_run_config, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """24 steps tracking power EMAs of sigma_rel 0.05, 0.10 and (for comparison) 0.07, snapshots every 4;
    also returns the flat weights theta_tau of every update, recorded as the EMA reads them."""
    trainer_cfg = {"micro_batch": 2, "max_steps": 24, "save_every": 24, "log_every": 8, "warmup_steps": 2}
    config = make_run_config("posthoc", 16, trainer_cfg, {"every": 0})
    out = tmp_path_factory.mktemp("posthoc_run")
    cfg, config_dict = parse(["--config", str(config), "--trainer.output_dir", str(out),
                              "--ema.enabled", "true", "--ema.posthoc", "true", "--ema.snapshot_every", "4",
                              "--ema.snapshot_dtype", "fp32", "--ema.sigma_rels", "[0.05, 0.10, 0.07]"])
    trainer = Trainer(cfg, config_dict, init_distributed())
    weights, update = [], trainer.ema.update

    def record_and_update() -> None:
        (master,) = trainer.ema.masters
        weights.append(master.detach().double().clone())
        update()

    trainer.ema.update = record_and_update
    trainer.train()
    return out, weights


def test_posthoc_rebuilds_a_tracked_power_ema(posthoc_run, tmp_path, capsys):
    """sigma_rel 0.07 rebuilt from the 0.05 and 0.10 snapshots, against the 0.07 EMA tracked in the run.

    Checked against the recorded weights of every update: the rebuilt weights are sum_tau f(tau) theta_tau
    for the fitted profile f = sum_i x_i w_i (brute-force profiles), the tracked EMA is sum_tau w_r(tau)
    theta_tau, so their distance is bounded by Cauchy-Schwarz, ||f - w_r||_2 sqrt(sum_tau ||theta_tau -
    c||^2) + ||c|| |sum_tau (f - w_r)(tau)|, c = the tracked EMA. Measured: 6 snapshots x 2 widths over 24
    updates fit the profile to a residual of 1.7%, and the weights land within 3.9% of how far the
    tracked EMA moved from the start: the method is exact in the span of the snapshot profiles, and
    coarse snapshots leave that much of the target profile outside it.
    """
    out, thetas = posthoc_run
    snapshots = posthoc.find_snapshots(out)
    assert [s.step for s in snapshots] == list(range(4, 25, 4)) and len(thetas) == 24
    rebuilt, solution = posthoc.reconstruct(snapshots, 0.07, sources=[0.05, 0.10])
    layout = snapshots[-1].layout
    names = [name for name, _ in layout.groups[0]]

    def flat(state: dict) -> torch.Tensor:
        return torch.cat([state[k].flatten().double() for k in names])

    theta = torch.stack(thetas)[:, :layout.numel(0)]  # (24, n): update tau's weights, padding cut

    def profile(t: int, gamma: float) -> torch.Tensor:
        w = torch.zeros(24, dtype=torch.float64)
        w[:t] = torch.from_numpy(recursion_profile([ema.power_decay(k, gamma) for k in range(1, t + 1)])[1:])
        return w

    terms = [(s.updates, ema.power_gamma(r)) for s in snapshots for r in (0.05, 0.10)]
    fit = sum(float(x) * profile(*p) for x, p in zip(solution.coefficients, terms))
    want = profile(24, ema.power_gamma(0.07))
    direct = flat(ema.read_named(snapshots[-1].folder, ema.track_name(0.07)))
    scale = theta.abs().max()
    torch.testing.assert_close(direct, want @ theta, rtol=0, atol=1e-5 * scale)  # the tracked EMA
    torch.testing.assert_close(flat(rebuilt), fit @ theta, rtol=0, atol=1e-4 * scale)  # linear in x
    delta = fit - want
    bound = delta.norm() * (theta - direct).norm() + direct.norm() * delta.sum().abs()
    error, moved = (flat(rebuilt) - direct).norm(), (direct - theta[0]).norm()
    assert 0 < solution.residual < 0.05 and error <= bound * 1.001 + 1e-5 * scale
    assert float(error / moved) < 0.1, float(error / moved)
    # the 0.05 track alone cannot make 0.07: the fit is worse
    assert posthoc.reconstruct(snapshots, 0.07, sources=[0.05])[1].residual > solution.residual
    # the CLI writes a UNet file that load_unet (sample.py's loader) reads back
    cli = runpy.run_path(str(ROOT / "launch" / "posthoc_ema.py"))["main"]
    path = tmp_path / "ema_007.safetensors"
    assert cli(["--run", str(out), "--sigma-rel", "0.07", "--out", str(path), "--dtype", "fp32",
                "--from-sigma-rels", "0.05", "0.10"]) == 0
    printed = capsys.readouterr().out
    assert f"residual {solution.residual:.2e}, sum(x) 1.000000 (least squares {solution.mass:.6f})" in printed
    unet = load_unet(path, dtype=torch.float32)
    assert all(torch.equal(v, rebuilt[k]) for k, v in unet.state_dict().items())
    assert cli(["--run", str(tmp_path), "--sigma-rel", "0.07", "--out", str(path)]) == 2


def test_bad_ema_config_names_the_key(make_run_config, tmp_path):
    config = make_run_config("ema_bad", 4, {"max_steps": 1}, {"every": 0})
    for args, key in ((["--ema.decay", "1.5"], "ema.decay"), (["--ema.posthoc", "true"], "ema.posthoc"),
                      (["--ema.enabled", "true", "--ema.dtype", "fp16"], "ema.dtype")):
        with pytest.raises(ConfigError, match=key):
            parse(["--config", str(config), "--trainer.output_dir", str(tmp_path), *args])


def test_overwrite_moves_the_abandoned_branchs_snapshots_aside(tmp_path):
    """Resuming an older tag (or resume none) with trainer.overwrite moves the newer tags aside, and the
    post-hoc snapshots of the same abandoned steps with them; without overwrite preflight refuses both."""
    out = tmp_path / "run"
    for step in (2, 4):
        (out / "checkpoints" / checkpoint.tag_for(step)).mkdir(parents=True)
        (out / "checkpoints" / checkpoint.tag_for(step) / checkpoint.STATE_FILE).write_text("{}")
    for step in (1, 2, 3, 4):
        (out / ema.SNAPSHOT_DIR / f"step{step:08d}").mkdir(parents=True)
    older = str(out / "checkpoints" / checkpoint.tag_for(2))
    with pytest.raises(ValueError, match="ema_snapshots/step00000003"):
        preflight.check_resume(out, older, overwrite=False)
    foreign = checkpoint.foreign_tags(out, older) + checkpoint.foreign_snapshots(out, older)
    assert [f"{p.parent.name}/{p.name}" for p in foreign] == [
        "checkpoints/step00000004", "ema_snapshots/step00000003", "ema_snapshots/step00000004"]
    dest = checkpoint.move_aside(out, foreign)
    assert sorted(p.name for p in (out / ema.SNAPSHOT_DIR).iterdir()) == ["step00000001", "step00000002"]
    assert sorted(p.name for p in (dest / ema.SNAPSHOT_DIR).iterdir()) == ["step00000003", "step00000004"]
    assert checkpoint.foreign_snapshots(out, "auto") == []
    # resume none: every snapshot belongs to the old run, even where no tag was saved yet
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ValueError, match="ema_snapshots/step00000001"):
        preflight.check_resume(out, "none", overwrite=False)
    assert len(checkpoint.foreign_snapshots(out, "none")) == 2


class _Float32Sizes(TorchFunctionMode):
    """The largest fp32 tensor any torch function returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.largest = max(self.largest, out.numel())
        return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ema_update_works_in_bounded_chunks(dtype, monkeypatch):
    """With bf16 masters (pure bf16 DeepSpeed) no update makes an fp32 copy of the whole partition: every
    fp32 temporary is at most ema.CHUNK elements, for fp32 and bf16 tracks; fp32 results equal an
    unchunked lerp bit for bit."""
    monkeypatch.setattr(ema, "CHUNK", 100)
    tracker = ema.ShardedEMA.__new__(ema.ShardedEMA)  # no engine needed for the update itself
    tracker.cfg, tracker.rank, tracker.seed = ema.EMAConfig(enabled=True, decay=0.9, dtype=dtype), 0, 0
    tracker.masters = [torch.randn(1050, generator=torch.Generator().manual_seed(0)).bfloat16()]
    tracker.tracks = {ema.MAIN_TRACK: {"kind": "ema", "decay": 0.9, "warmup": False}}
    tracker.dtype = ema.DTYPES[dtype]
    tracker.reset()
    tracker.masters[0].mul_(2)
    expected = tracker.state[ema.MAIN_TRACK][0].float().lerp(tracker.masters[0].float(), 0.1)
    with _Float32Sizes() as sizes:
        tracker.update()
    assert 0 < sizes.largest <= 100
    (result,) = tracker.state[ema.MAIN_TRACK]
    if dtype == "fp32":
        assert torch.equal(result, expected)
    else:  # stochastic rounding: within one bf16 ulp
        assert ((result.float() - expected).abs() <= expected.abs() * 2**-7).all()
