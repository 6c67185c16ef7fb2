"""AdamWSR and bf16 stochastic rounding: bit formula, unbiasedness, torch AdamW parity, SR vs RTN, resume."""

from __future__ import annotations

import io
import struct

import pytest
import torch

from ztsnr_ds.optim import (
    FUSED_OPTIONS,
    AdamWSR,
    copy_stochastic_,
    lowbias32,
    round_to_bf16,
    rounding_key,
    splitmix64,
    stochastic_round_to_bf16,
)

ULP_AT_1 = 2.0**-7  # bf16 spacing in [1, 2)


def lowbias32_reference(x: int, key_hi: int = 0) -> int:
    """Wellons' lowbias32 in plain Python ints (independent of the torch int32 tricks), key xored mid-way."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = ((x * 0x7FEB352D) & 0xFFFFFFFF) ^ key_hi
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sr_reference(x: float, noise: int) -> float:
    """SR by the spec: bits = float32_bits(x) + noise, keep the high 16 bits."""
    bits = (struct.unpack("<I", struct.pack("<f", x))[0] + noise) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def test_hashes_match_references():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # first output of splitmix64 seeded with 0
    xs = torch.tensor([0, 1, 2, 12345, -1, 2**31 - 1, -(2**31), 0x7FEB352D], dtype=torch.int32)
    for key_hi in (0, 0x9E3779B9):
        got = lowbias32(xs, key_hi)
        assert [v & 0xFFFFFFFF for v in got.tolist()] == [lowbias32_reference(v, key_hi) for v in xs.tolist()]
    assert rounding_key(1, 2, 3) != rounding_key(1, 3, 2)


def test_sr_follows_bit_formula_and_ignores_chunking():
    x = torch.randn(1000) * torch.logspace(-3, 3, 1000)
    key = 12345
    out = stochastic_round_to_bf16(x, key)
    assert out.dtype == torch.bfloat16
    k = rounding_key(key)
    noise = [lowbias32_reference((k & 0xFFFFFFFF) + i, k >> 32) & 0xFFFF for i in range(1000)]
    expected = [sr_reference(v, r) for v, r in zip(x.tolist(), noise, strict=True)]
    assert out.float().tolist() == expected
    chunked = copy_stochastic_(torch.empty(1000, dtype=torch.bfloat16), x, key, chunk_size=97)
    assert torch.equal(chunked, out)


@pytest.mark.parametrize("value", [1 + 0.3 * ULP_AT_1, -(1 + 0.7 * ULP_AT_1), 3.14159e-3])
def test_sr_is_unbiased(value):
    n = 200_000
    x = torch.full((n,), value)
    true = x[0].double()  # the fp32 value being rounded
    rounded = stochastic_round_to_bf16(x, key=7).double()
    neighbours = rounded.unique()
    assert len(neighbours) == 2 and neighbours[0] < true < neighbours[1]
    frac = (true - neighbours[0]) / (neighbours[1] - neighbours[0])
    standard_error = (neighbours[1] - neighbours[0]) * torch.sqrt(frac * (1 - frac) / n)
    assert abs(rounded.mean() - true) < 3 * standard_error
    assert abs(x[0].bfloat16().double() - true) > 30 * standard_error  # round-to-nearest is visibly biased


def test_small_updates_accumulate_with_sr_not_round_to_nearest():
    """Issue check: a bf16 weight at 1.0 receiving 2,000 updates of 1e-4 grows by ~0.2 with SR, 0 with RTN."""
    sr = torch.ones(1000, dtype=torch.bfloat16)
    rtn = sr.clone()
    for i in range(2000):
        sr = stochastic_round_to_bf16(sr.float() + 1e-4, key=i)
        rtn = (rtn.float() + 1e-4).bfloat16()
    assert abs(sr.float().mean().item() - 1.2) < 0.01
    assert torch.all(rtn == 1.0)


@pytest.mark.parametrize("stochastic_rounding", [True, False])
def test_optimizer_small_constant_updates(stochastic_rounding):
    """The same through AdamWSR: a constant grad makes each Adam step exactly lr = 1e-4."""
    w = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = AdamWSR([w], lr=1e-4, weight_decay=0.0, stochastic_rounding=stochastic_rounding)
    w.grad = torch.full_like(w, -1.0)
    for _ in range(2000):
        opt.step()
    if stochastic_rounding:
        assert abs(w.float().mean().item() - 1.2) < 0.01
    else:
        assert torch.all(w == 1.0)


def test_bf16_step_rounds_param_and_moments_stochastically():
    """One bf16 step equals the fp32 step (same arithmetic) rounded to a bf16 neighbour, up with
    probability equal to the position between the neighbours, for the param and both moments."""
    gen = torch.Generator().manual_seed(4)
    p16 = torch.nn.Parameter(torch.randn(100_000, generator=gen).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    p16.grad = torch.randn(100_000, generator=gen).bfloat16()
    p32.grad_dtype = None
    p32.grad = p16.grad.clone()
    ours, exact = AdamWSR([p16], lr=1e-2, chunk_size=4096), AdamWSR([p32], lr=1e-2)
    ours.step()
    exact.step()
    pairs = {"param": (p16, p32)}
    pairs |= {k: (ours.state[p16][k], exact.state[p32][k]) for k in ("exp_avg", "exp_avg_sq")}
    residuals = {}
    for name, (rounded, x) in pairs.items():
        toward_zero = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)  # the two bf16 neighbours of x
        away = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
        assert torch.all((rounded.float() == toward_zero) | (rounded.float() == away)), name
        frac = ((x - toward_zero) / (away - toward_zero)).double()
        up = (rounded.float() == away).double()
        low_half = (frac > 0) & (frac < 0.5)  # round-to-nearest would never round these away from zero
        error = (up - frac)[low_half]
        assert abs(error.mean()) < 4 * 0.5 / error.numel() ** 0.5, name
        assert up[low_half].mean() > 0.2, name
        residuals[name] = up - frac
    # the three noises of an element are pairwise independent: rounding residuals are uncorrelated
    for a, b in (("param", "exp_avg"), ("param", "exp_avg_sq"), ("exp_avg", "exp_avg_sq")):
        corr = torch.corrcoef(torch.stack([residuals[a], residuals[b]]))[0, 1]
        assert abs(corr) < 4 / 100_000**0.5, (a, b, corr)


def _groups(params, lr=(1e-2, 3e-3), wd=(0.05, 0.2)):
    return [{"params": [p], "lr": a, "weight_decay": b} for p, a, b in zip(params, lr, wd, strict=True)]


def test_fp32_matches_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.randn(1000, requires_grad=True), torch.randn(37, 5, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = AdamWSR(_groups(ours), betas=(0.8, 0.99), eps=1e-6, chunk_size=64)
    ref_opt = torch.optim.AdamW(_groups(ref), betas=(0.8, 0.99), eps=1e-6)
    for _ in range(8):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], atol=1e-7, rtol=1e-6
        )


def _regression_losses(make_opt, dtype: torch.dtype, steps: int = 300) -> torch.Tensor:
    """Loss curve of fitting W (weights in [1, 2), so lr 1e-3 < half a bf16 ulp) to a nearby target."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    w0 = (1 + torch.rand(32, 16, generator=gen)).bfloat16().float()
    y = x @ (w0 + 0.1 * torch.randn(32, 16, generator=gen))
    w = torch.nn.Parameter(w0.to(dtype))
    opt = make_opt([w])
    losses = []
    for _ in range(steps):
        loss = (x @ w.float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_bf16_sr_tracks_fp32_loss_curve_and_rtn_does_not():
    def gap(curve):
        """Mean distance to the fp32 AdamW loss curve, in units of the initial loss."""
        return ((curve - reference).abs().mean() / reference[0]).item()

    def bf16_gap(**options):
        curve = _regression_losses(lambda p: AdamWSR(p, lr=1e-3, weight_decay=0.0, **options), torch.bfloat16)
        return gap(curve)

    reference = _regression_losses(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0), torch.float32)
    rtn = bf16_gap(stochastic_rounding=False)
    gaps = {
        "sr": bf16_gap(),
        "kahan": bf16_gap(kahan=True),
        "kahan_rtn": bf16_gap(kahan=True, stochastic_rounding=False),
    }
    assert reference[-1] < 0.05 * reference[0]  # the fp32 run really learns
    assert rtn > 0.5  # round-to-nearest drops every update: the loss stays put
    for name, value in gaps.items():  # measured: sr 0.008-0.019 over seeds 0-5, kahan 0.0015, rtn 0.79
        assert value < 0.05 * rtn, (name, value, rtn)


def _bf16_run(steps: int, opt_kwargs: dict, resume_at: int | None = None, seed: int = 0):
    """A few steps on a bf16 and an fp32 param (two groups); optionally save/restore mid-run.

    Returns (params, optimizer). Grads come from their own generator, so they repeat across runs.
    """
    gen = torch.Generator().manual_seed(1)
    params = [
        torch.nn.Parameter(torch.randn(300, 7, generator=gen).bfloat16()),
        torch.nn.Parameter(torch.randn(50, generator=gen)),
    ]
    opt = AdamWSR(_groups(params), seed=seed, **opt_kwargs)
    for step in range(steps):
        if step == resume_at:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer)
            params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
            opt = AdamWSR(_groups(params), seed=seed + 999, **opt_kwargs)  # the saved seed must win
            opt.load_state_dict(saved["opt"])
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return params, opt


def _assert_runs_equal(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key, value in oa.state[x].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob.state[y][key])), key


@pytest.mark.parametrize("kahan", [False, True])
def test_runs_are_bitwise_reproducible_and_resume_exactly(kahan):
    full = _bf16_run(6, {"kahan": kahan})
    _assert_runs_equal(full, _bf16_run(6, {"kahan": kahan}))
    _assert_runs_equal(full, _bf16_run(6, {"kahan": kahan}, resume_at=3))
    other_seed = _bf16_run(6, {"kahan": kahan}, seed=5)
    assert not torch.equal(full[0][0], other_seed[0][0])
    assert full[1].state[full[0][0]]["step"] == 6
    assert ("kahan_comp" in full[1].state[full[0][0]]) == kahan
    assert "kahan_comp" not in full[1].state[full[0][1]]  # fp32 params are exact: nothing to compensate


def test_chunk_size_does_not_change_the_result():
    _assert_runs_equal(_bf16_run(3, {"chunk_size": 1 << 20}), _bf16_run(3, {"chunk_size": 97}))


def _f32(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rounding_keeps_nan_nan_and_inf_inf(compiled):
    """NaN payloads at the top of the mantissa would carry into the exponent (0x7F800001 + noise -> inf)
    or wrap into the sign (0x7FFFFFFF + noise -> -0.0); both roundings must keep them NaN, and inf inf,
    eagerly and as the fused kernel compiles them (same inductor options)."""
    torch._dynamo.reset()
    rounding = torch.compile(round_to_bf16, dynamic=True, options=FUSED_OPTIONS) if compiled else \
        round_to_bf16
    nans = _f32([0x7FFFFFFF, 0x7F800001, 0xFFFFFFFF, 0xFF800001, 0x7FC00000, 0x7FBFFFFF])
    infs = _f32([0x7F800000, 0xFF800000, 0x7F800000, 0xFF800000, 0x7F800000, 0xFF800000])
    for noise in (None, torch.full((6,), 0xFFFF, dtype=torch.int32), torch.full((6,), 1, dtype=torch.int32)):
        assert torch.isnan(rounding(nans, noise)).all()
        assert torch.equal(rounding(infs, noise), infs.to(torch.bfloat16))
    assert torch.isnan(stochastic_round_to_bf16(nans, 7)).all()
    assert torch.equal(stochastic_round_to_bf16(infs, 7), infs.to(torch.bfloat16))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_nan_gradient_gives_nan_params_not_inf_or_zero(fused):
    """A NaN in the update must surface as NaN in the bf16 param and moments, on both paths."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p.grad = torch.full((64,), 0.5, dtype=torch.bfloat16)
    p.grad[::7] = float("nan")
    AdamWSR([p], lr=1e-2, fused=fused).step()
    bad = torch.zeros(64, dtype=torch.bool)
    bad[::7] = True
    assert torch.isnan(p.detach()[bad]).all() and torch.isfinite(p.detach()[~bad]).all()


FUSED_CASES = {"sr": {}, "kahan": {"kahan": True}, "rtn": {"kahan": True, "stochastic_rounding": False}}


@pytest.mark.parametrize("options", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_fused_kernel_equals_eager_chunks(options):
    """The torch.compile'd kernel (C++ here) takes bitwise the eager decisions: params, moments, Kahan
    buffers, over steps and odd chunk lengths, bf16 and fp32 groups."""
    torch._dynamo.reset()  # a fresh compile: no earlier test's graphs count towards dynamo's recompile limit
    eager = _bf16_run(4, {**options, "fused": False, "chunk_size": 97})
    _assert_runs_equal(eager, _bf16_run(4, {**options, "fused": True}))


def test_without_a_compiler_the_default_warns_and_runs_eagerly():
    """No C++ compiler for inductor: fused=None warns once and gives the eager result; fused=True raises."""
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",), "fx_graph_cache": False})
    torch._dynamo.reset()
    with no_compiler, pytest.warns(UserWarning, match="fused kernel failed to compile.*no-such-c"):
        fallback = _bf16_run(3, {})
    assert fallback[1].fused is False
    _assert_runs_equal(fallback, _bf16_run(3, {"fused": False}))
    torch._dynamo.reset()
    with no_compiler, pytest.raises(Exception, match="no-such-c"):
        _bf16_run(1, {"fused": True})
    torch._dynamo.reset()


def test_replaced_grads_and_state_tensors_are_used():
    """DeepSpeed assigns p.grad anew each step and may replace state tensors (checkpoint load)."""

    def run(replace: bool):
        gen = torch.Generator().manual_seed(2)
        flat = torch.nn.Parameter(torch.randn(5000, generator=gen).bfloat16())
        opt = AdamWSR([flat], lr=1e-2, chunk_size=1024)
        for _ in range(4):
            flat.grad = torch.randn(5000, generator=gen).bfloat16()
            opt.step()
            if replace:
                state = opt.state[flat]
                state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        return flat

    assert torch.equal(run(False), run(True))


def test_groups_stepped_one_at_a_time_as_deepspeed_does():
    """ZeRO-2 steps group k with param_groups = [group k]: same result, and each group its own noise."""

    def run(one_at_a_time: bool):
        flats = [torch.nn.Parameter(torch.ones(2000, dtype=torch.bfloat16)) for _ in range(2)]
        opt = AdamWSR([{"params": [flats[0]]}, {"params": [flats[1]]}], lr=1e-3)
        for _ in range(3):
            for flat in flats:
                flat.grad = torch.full_like(flat, -1.0)
            if one_at_a_time:
                groups = opt.param_groups
                for group in groups:
                    opt.param_groups = [group]
                    opt.step()
                opt.param_groups = groups
            else:
                opt.step()
        return flats

    plain, split = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, split, strict=True))
    assert not torch.equal(plain[0], plain[1])  # same values and grads, different rounding noise


def test_params_without_grad_are_skipped():
    used, unused = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    opt = AdamWSR([used, unused], lr=0.1)
    used.grad = torch.ones(10)
    opt.step()
    assert torch.all(unused == 1.0) and unused not in opt.state
    assert torch.all(used < 1.0) and opt.state[used]["step"] == 1


def test_grad_dtype_may_differ_from_param_dtype():
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(4000, generator=gen)
    # fp32 param, bf16 grad: exactly torch AdamW on the grad cast to fp32
    p32 = torch.nn.Parameter(torch.randn(4000, generator=gen))
    ref = torch.nn.Parameter(p32.detach().clone())
    p32.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless this is cleared
    p32.grad, ref.grad = grad.bfloat16(), grad.bfloat16().float()
    AdamWSR([p32], lr=1e-2, chunk_size=1000).step()
    torch.optim.AdamW([ref], lr=1e-2).step()
    torch.testing.assert_close(p32, ref, atol=1e-6, rtol=0)
    # bf16 param, fp32 grad: the fp32 AdamW result, stochastically rounded to a bf16 neighbour
    p16 = torch.nn.Parameter(p32.detach().bfloat16())
    exact = torch.nn.Parameter(p16.detach().float())
    p16.grad_dtype = None
    p16.grad, exact.grad = grad.clone(), grad.clone()
    AdamWSR([p16], lr=1e-2, chunk_size=1000).step()
    torch.optim.AdamW([exact], lr=1e-2).step()
    spacing = exact.detach().bfloat16().float().abs() * 2.0**-7  # >= the bf16 spacing around exact
    assert torch.all((p16.float() - exact).abs() <= spacing)
    assert p16.grad.dtype == torch.float32


def test_closure_and_state_size():
    w = torch.nn.Parameter(torch.full((64,), 2.0, dtype=torch.bfloat16))
    opt = AdamWSR([w], lr=0.1, kahan=True)

    def closure():
        opt.zero_grad()
        loss = w.float().pow(2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 256.0
    assert torch.all(w < 2.0)
    state_bytes = sum(t.nbytes for t in opt.state[w].values() if torch.is_tensor(t))
    assert state_bytes == 6 * w.numel()  # bf16 exp_avg, exp_avg_sq, kahan_comp


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="betas"):
        AdamWSR([torch.nn.Parameter(torch.ones(1))], betas=(0.9, 1.0))
    half = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    half.grad = torch.ones(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        AdamWSR([half]).step()
