"""AdamW with bf16 stochastic rounding (optional Kahan compensation): one elementwise function, run on
bounded chunks eagerly or compiled by torch.compile into one fused kernel.

Update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", Alg. 2; Kingma & Ba, Alg. 1):
    m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
    p = p - lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd p)
computed in fp32. fp32 tensors are updated exactly, in place. bf16 tensors (param and both moments) are
written back with stochastic rounding (SR):
    bits = float32_bits(x) + u,  u ~ uniform_int[0, 2^16);  bf16 = high 16 bits of bits,
so E[SR(x)] = x (Gupta et al., "Deep Learning with Limited Numerical Precision", 2015; Zamirai et al.,
"Revisiting BFloat16 Training", 2020). Updates below half a bf16 ulp (2^-9..2^-8 |p|) then still move
the weights on average, where round-to-nearest drops them. Round-to-nearest-even is the same
add-and-truncate with u = 0x7FFF + (lowest kept bit), so every bf16 value is produced by integer ops
whose result the compiled kernel cannot change (inductor keeps bf16 casts of intermediates in fp32).

Randomness is counter-based: element i of a tensor gets h = lowbias32(i), keyed by a 64-bit key (hash:
C. Wellons, hash-prospector, https://nullprogram.com/blog/2018/07/31/; the key is added to the counter
and xored in mid-hash), key = splitmix64 chain over (seed, rank, step, group index, position in group).
Its three 16-bit noises: lo16(h) rounds the param, hi16(h) exp_avg, lo16(h) ^ hi16(h) exp_avg_sq. Each
is uniform and any two are independent (any two of them determine h's two halves). The noise is a pure
function of those numbers, so the optimizer's whole RNG state is the per-param step count (in `state`)
plus the seed (saved in state_dict()): a resumed run takes bitwise the same rounding decisions, and the
result depends neither on chunk_size nor on whether the step ran eagerly or compiled (tests pin both).
Why not a torch.Generator: it cannot live inside a fused kernel, and on CPU its int32 random_ alone
costs ~5 ns per element (serial mt19937), twice a whole torch.optim.AdamW fp32 step (BENCHMARKS.md).

Eager vs fused: eagerly, the update is ~40 torch ops per chunk, each a pass over chunk-sized temporaries
(the chunk bounds temporary memory: ~12 fp32/int32 buffers of chunk_size elements). torch.compile turns
the same function into one kernel that reads g, p, m, v once and writes p, m, v once (14 B/element for
bf16), with no temporaries: C++/OpenMP on CPU, Triton on CUDA.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ztsnr_ds.device import to_device

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
BF16_KEEP = -(1 << 16)  # int32 0xFFFF0000: the fp32 bits that survive as a bf16
EAGER_CHUNK = 1 << 18  # fastest of 2^16..2^20 eagerly in launch/bench.py optim
FUSED_CHUNK = 1 << 26  # no temporaries when fused; chunks only keep int32 counters and launches bounded
FUSED_OPTIONS = {  # inductor's eager-numerics options for the fused kernel (see fused_adamw_chunk)
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
    "emulate_precision_casts": True,
}


def splitmix64(z: int) -> int:
    """One splitmix64 output for state z (Steele, Lea & Flood, OOPSLA 2014; Vigna's reference constants)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def rounding_key(*ints: int) -> int:
    """64-bit key from a tuple of ints (e.g. seed, rank, step, group, position) via a splitmix64 chain."""
    h = 0
    for v in ints:
        h = splitmix64(h ^ (v & MASK64))
    return h


def _int32(v: int) -> int:
    """The int32 whose bits are the uint32 v (torch int32 ops take signed scalars)."""
    v &= MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def counter_key(key: int, offset: int) -> tuple[int, int]:
    """(base, key_hi) as int32s for the noise of elements offset, offset+1, ...: the low 32 bits of the
    key plus the offset are added to the counter, the rest (key high bits ^ offset high bits) is xored
    in mid-hash, so counters wrap at 2^32 elements without repeating a stream."""
    return _int32(key + offset), _int32((key >> 32) ^ (offset >> 32))


def _xorshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x ^ (x >>> shift), logical shift: torch's >> on int32 is arithmetic, so the sign fill is masked off."""
    return x ^ ((x >> shift) & (MASK32 >> shift))


def lowbias32(x: torch.Tensor, key_hi: int | torch.Tensor = 0) -> torch.Tensor:
    """lowbias32(x) elementwise on int32 tensors read as uint32 (Wellons, hash-prospector):
    x ^= x>>16; x *= 0x7feb352d; x ^= key_hi; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16.

    The multiplies are int32 ones, which wrap mod 2^32 (two's complement; tests pin the result to a
    Python-int reference): torch's uint32 mul is not vectorised, >10x slower.
    """
    x = _xorshift(x, 16) * 0x7FEB352D
    x = _xorshift(x ^ key_hi, 15) * _int32(0x846CA68B)
    return _xorshift(x, 16)


def counter_hash(n: int, base: int | torch.Tensor, key_hi: int | torch.Tensor, device: torch.device):
    """h[i] = lowbias32(base + i) keyed by key_hi, i < n (int32): the noise bits of n consecutive elements."""
    return lowbias32(torch.arange(n, dtype=torch.int32, device=device) + base, key_hi)


def round_to_bf16(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """x (fp32) -> bf16 by add-and-truncate: SR with 16-bit noise in [0, 2^16), or round-to-nearest-even
    (noise = 0x7FFF + lowest kept bit) when noise is None. The fp32 -> bf16 cast at the end is exact.

    A NaN is passed through: adding noise to its bits could carry into the exponent or the sign and turn it
    into inf or -0.0 (0x7FFFFFFF + 1 is 0x80000000), hiding a divergence. +-inf stays inf (its low bits
    are zero, so the noise never carries)."""
    bits = x.view(torch.int32)
    if noise is None:
        noise = ((bits >> 16) & 1) + 0x7FFF
    rounded = ((bits + noise) & BF16_KEEP).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def copy_stochastic_(dst: torch.Tensor, src: torch.Tensor, key: int, chunk_size: int = EAGER_CHUNK):
    """dst (bf16) <- SR(src), noise for element i: lo16 of the counter hash of i under rounding_key(key).

    Chunked: temporary memory is a few buffers of chunk_size 4-byte elements, whatever the size of src.
    """
    key = rounding_key(key)
    flat_dst, flat_src = dst.view(-1), src.reshape(-1)
    for lo in range(0, flat_src.numel(), chunk_size):
        x = flat_src[lo : lo + chunk_size].float()
        noise = counter_hash(x.numel(), *counter_key(key, lo), x.device) & 0xFFFF
        flat_dst[lo : lo + chunk_size] = round_to_bf16(x, noise)
    return dst


def stochastic_round_to_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    """SR(x) as a new bf16 tensor; a pure function of (x, key). E[SR(x)] = x elementwise."""
    return copy_stochastic_(torch.empty(x.shape, dtype=torch.bfloat16, device=x.device), x, key)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt, so that eager and compiled steps agree bitwise. Compiled kernels use
    the hardware sqrt (correctly rounded; Triton's sqrt_rn on CUDA), but eager torch.sqrt on CPU goes
    through MKL's VML, 1 ulp off for ~15% of inputs: eagerly on CPU the root is taken in float64
    (correctly rounded after the cast back: 53 >= 2 * 24 + 2 bits)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.sqrt(x.double()).float()


def adamw_coefficients(group: dict[str, Any], step: int) -> list[float]:
    """[1-b1, b2, 1-b2, step_size, eps_hat, decay] for step t, bias corrections folded in (Kingma & Ba,
    end of sec. 2): m_hat / (sqrt(v_hat) + eps) = step_size / lr * m / (sqrt(v) + eps_hat),
    step_size = lr sqrt(1-b2^t) / (1-b1^t), eps_hat = eps sqrt(1-b2^t), decay = 1 - lr wd."""
    beta1, beta2 = group["betas"]
    bc1, bc2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
    lr = group["lr"]
    step_size, eps_hat, decay = lr * bc2_sqrt / bc1, group["eps"] * bc2_sqrt, 1 - lr * group["weight_decay"]
    return [1 - beta1, beta2, 1 - beta2, step_size, eps_hat, decay]


def adamw_fp32(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New (p, m, v) in fp32 (coef: adamw_coefficients as an fp32 tensor):
    m' = m + (1-b1)(g - m);  v' = b2 v + (1-b2) g^2;  p' = decay p - step_size m' / (sqrt(v') + eps_hat)."""
    one_minus_b1, b2, one_minus_b2, step_size, eps_hat, decay = coef.unbind()
    g32, m32 = g.float(), m.float()
    m32 = m32 + (g32 - m32) * one_minus_b1
    v32 = v.float() * b2 + g32 * g32 * one_minus_b2
    return p.float() * decay - step_size * m32 / (sqrt_rn(v32) + eps_hat), m32, v32


def adamw_chunk_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    comp: torch.Tensor | None,
    coef: torch.Tensor,
    keys: torch.Tensor | None,
) -> None:
    """One AdamW step of a 1-D chunk (adamw_fp32), written back in place into p, m, v (and comp).

    coef: fp32 tensor of adamw_coefficients; keys: int32 [base, key_hi] of counter_key (None: round to
    nearest). bf16 results are rounded as in the module docstring; fp32 ones are stored exactly. comp
    (Kahan, bf16 params only): what rounding lost last step, added back before this rounding, then
    replaced by what this rounding loses. Tensors and 0-dim scalars only, so that one compiled graph
    serves every step, lr and chunk length.
    """
    p32, m32, v32 = adamw_fp32(p, g, m, v, coef)
    if comp is not None:
        p32 = p32 + comp.float()
    if p.dtype == torch.float32:
        new_p, new_m, new_v = p32, m32, v32
    else:
        h = None if keys is None else counter_hash(p.numel(), keys[0], keys[1], p.device)
        new_p = round_to_bf16(p32, None if h is None else h & 0xFFFF)
        new_m = round_to_bf16(m32, None if h is None else (h >> 16) & 0xFFFF)
        new_v = round_to_bf16(v32, None if h is None else (h ^ (h >> 16)) & 0xFFFF)
    if comp is not None:
        comp.copy_(p32 - new_p.float())
    p.copy_(new_p)
    m.copy_(new_m)
    v.copy_(new_v)


def _on(device: torch.device, values: list[float] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Per-step scalars as a tensor on the param's device: tensors, not Python numbers, so that the
    compiled kernel is not specialised (and recompiled) on every new lr or key. Pinned on CUDA: a copy
    from pageable memory would sync the host at every chunk."""
    return to_device(device, torch.tensor(values, dtype=dtype))[0]


@functools.cache
def fused_adamw_chunk() -> Callable[..., None]:
    """adamw_chunk_ compiled into one kernel; dynamic shapes, so chunk lengths do not recompile.
    Inductor's eager-numerics options keep Triton's fp32 arithmetic as eager's: IEEE division (Triton's
    `/` is approximate), no multiply-add contraction (emulate_precision_casts turns off Triton's
    fp fusion) and no flush of denormal moments to zero."""
    logging.getLogger(__name__).info("AdamWSR: the first step compiles the fused kernel (cached on disk)")
    return torch.compile(adamw_chunk_, dynamic=True, fullgraph=True, options=FUSED_OPTIONS)


class AdamWSR(torch.optim.Optimizer):
    """AdamW for fp32 or bf16 params: fp32 arithmetic; bf16 param and moments written with SR.

    State per param, under torch's names so DeepSpeed can copy and pad it: step (int), exp_avg and
    exp_avg_sq in the param's dtype, and for bf16 params with kahan=True kahan_comp (bf16): what rounding
    the param lost last step, added back before the next rounding (Kahan summation in fp32 arithmetic).
    State bytes per param: 4 for bf16 (6 with Kahan), 8 for fp32.
    Under DeepSpeed ZeRO-2 the optimizer sees one flat tensor per rank: bf16 with
    bf16_master_weights_and_grads, fp32 masters otherwise; grads of another dtype are cast per chunk.

    kahan, stochastic_rounding (False: round to nearest, the baseline SR is measured against) are
    per-group options. seed and rank key the rounding noise (module docstring); seed is saved by
    state_dict(), rank is the caller's (each ZeRO rank loads its own optimizer file).
    fused: the torch.compile'd kernel (Triton on CUDA; on CPU a C++ compiler, ~20 s the first time,
    seconds once inductor's disk cache is warm) or, False, the eager chunks: bitwise the same results.
    None (default) falls back to eager, with one warning, where the kernel cannot be built; True raises.
    chunk_size: elements per chunk (default EAGER_CHUNK eagerly, FUSED_CHUNK fused).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        kahan: bool = False,
        stochastic_rounding: bool = True,
        seed: int = 0,
        rank: int = 0,
        fused: bool | None = None,
        chunk_size: int | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if chunk_size is not None and not 1 <= chunk_size <= 1 << 31:
            raise ValueError(f"chunk_size must lie in [1, 2^31] (int32 counters), got {chunk_size}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            kahan=kahan,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self.seed, self.rank, self.fused, self.chunk_size = seed, rank, fused, chunk_size

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every param with a grad; params whose grad is None are skipped, and so are groups
        marked "frozen" (a text encoder past its stop step, text_training.py: weights and moments kept)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for position, p in enumerate([] if group.get("frozen") else group["params"]):
                if p.grad is not None:
                    self._update(p, group, position)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus a stable group_index for the noise key: DeepSpeed's ZeRO steps one group at a
        time with param_groups = [that group], so positions in param_groups cannot tell groups apart."""
        param_group.setdefault("group_index", len(self.param_groups))
        super().add_param_group(param_group)

    def _update(self, p: torch.Tensor, group: dict[str, Any], position: int) -> None:
        state = self._state_for(p, group)
        step = int(state["step"]) + 1  # int(): DeepSpeed's universal checkpoint may store a tensor
        state["step"] = step
        sr = group["stochastic_rounding"] and p.dtype == torch.bfloat16
        key = rounding_key(self.seed, self.rank, step, group["group_index"], position) if sr else None
        # detach(): the same memory without autograd metadata (a param whose grad has another dtype
        # would otherwise stop dynamo from tracing its views)
        p_, m_, v_ = (t.detach().view(-1) for t in (p, state["exp_avg"], state["exp_avg_sq"]))
        comp = state["kahan_comp"].view(-1) if "kahan_comp" in state else None
        grad = p.grad.reshape(-1)
        coef = _on(p.device, adamw_coefficients(group, step), torch.float32)

        def chunk(lo: int, size: int) -> tuple:
            """adamw_chunk_'s arguments for elements lo .. lo + size."""
            part = slice(lo, lo + size)
            keys = None if key is None else _on(p.device, counter_key(key, lo), torch.int32)
            return p_[part], grad[part], m_[part], v_[part], None if comp is None else comp[part], coef, keys

        done = 0
        if self.fused is not False:
            done = self._run_fused(chunk, self.chunk_size or FUSED_CHUNK, p.numel())
        size = self.chunk_size or EAGER_CHUNK
        for lo in range(done, p.numel(), size):
            adamw_chunk_(*chunk(lo, size))

    def _run_fused(self, chunk: Callable[[int, int], tuple], size: int, numel: int) -> int:
        """Run the compiled kernel over all chunks; returns the elements done: numel, or 0 when the kernel
        cannot be built (on its first call, before any write) and fused was left to the default, after
        one warning, so that the caller runs the eager chunks at their own size. fused=True raises."""
        kernel = fused_adamw_chunk()
        try:
            kernel(*chunk(0, size))
        except Exception as error:  # torch.compile's backend errors share no narrower base class
            if self.fused:
                raise
            warnings.warn(f"AdamWSR: the fused kernel failed to compile ({type(error).__name__}: {error}); "
                          "running the eager chunks instead (same results, slower). Pass fused=False to "
                          "silence this.", stacklevel=3)
            self.fused = False
            return 0
        for lo in range(size, numel, size):
            kernel(*chunk(lo, size))
        return numel

    def _state_for(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The param's state, created on first use (zeros, contiguous, in the param's dtype)."""
        if p.grad.is_sparse:
            raise ValueError("AdamWSR does not support sparse gradients")
        state = self.state[p]
        if not state:
            if p.dtype not in (torch.float32, torch.bfloat16) or not p.is_contiguous():
                raise ValueError(f"AdamWSR needs contiguous float32 or bfloat16 params, got {p.dtype}")
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        if group["kahan"] and p.dtype == torch.bfloat16 and "kahan_comp" not in state:
            state["kahan_comp"] = torch.zeros_like(p)
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus the rounding seed; the rest of the RNG state is each param's step."""
        return {**super().state_dict(), "rounding_seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.seed = int(state_dict.pop("rounding_seed", self.seed))
        super().load_state_dict(state_dict)
