"""AdamW with bf16 stochastic rounding (optional Kahan compensation), chunked fp32 arithmetic.

Update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", Alg. 2; Kingma & Ba, Alg. 1):
    m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
    p = p - lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd p)
computed in fp32 on chunks of `chunk_size` elements. fp32 tensors are updated exactly, in place.
bf16 tensors (param and both moments) are written back with stochastic rounding (SR):
    bits = float32_bits(x) + u,  u ~ uniform_int[0, 2^16);  bf16 = high 16 bits of bits,
so E[SR(x)] = x (Gupta et al., "Deep Learning with Limited Numerical Precision", 2015; Zamirai et al.,
"Revisiting BFloat16 Training", 2020). Updates below half a bf16 ulp (2^-9..2^-8 |p|) then still move
the weights on average, where round-to-nearest drops them.

Randomness is counter-based: element i of a tensor gets h = lowbias32(i), keyed by a 64-bit key (hash:
C. Wellons, hash-prospector, https://nullprogram.com/blog/2018/07/31/; the key is added to the counter
and xored in mid-hash), key = splitmix64 chain over (seed, rank, step, group index, position in group).
Its three 16-bit noises: lo16(h) rounds the param, hi16(h) exp_avg, lo16(h) ^ hi16(h) exp_avg_sq. Each
is uniform and any two are independent (any two of them determine h's two halves). The noise is a pure
function of those numbers, so the optimizer's whole RNG state is the per-param step count (in `state`)
plus the seed (saved in state_dict()): a resumed run takes bitwise the same rounding decisions, and the
result does not depend on chunk_size. Why not a torch.Generator: on CPU its int32 random_ costs ~5 ns
per element (serial mt19937), twice a whole torch.optim.AdamW fp32 step (BENCHMARKS.md, "optim"); the
hash is 15 vectorised int32 passes over the chunk for all three noises (~1.5 ns per element).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
BF16_KEEP = -(1 << 16)  # int32 0xFFFF0000: the fp32 bits that survive as a bf16
DEFAULT_CHUNK = 1 << 18  # 1 MiB per fp32 buffer: fastest of 2^17..2^20 in launch/bench.py optim
LO16 = 0xFFFF


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
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.cache
def _const(value: int, device: torch.device) -> torch.Tensor:
    """A cached 0-dim int32 tensor: torch wraps a Python int operand into a new tensor on every call
    (a few us each, ~15 times per chunk; measured ~15% of a step)."""
    return torch.tensor(value, dtype=torch.int32, device=device)


def _xorshift_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    """x ^= x >>> shift (logical: torch's >> on int32 is arithmetic, so the sign fill is masked off)."""
    torch.bitwise_right_shift(x, _const(shift, x.device), out=tmp)
    tmp.bitwise_and_(_const(MASK32 >> shift, x.device))
    return x.bitwise_xor_(tmp)


def lowbias32_(x: torch.Tensor, tmp: torch.Tensor, key_hi: int = 0) -> torch.Tensor:
    """x <- lowbias32(x) elementwise in place on int32 tensors read as uint32 (tmp: scratch, same shape).

    lowbias32 (Wellons, hash-prospector): x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b;
    x ^= x>>16. key_hi is xored in after the first multiply (0: the plain hash), so two keys never give
    shifted copies of one noise stream. The multiplies are int32 ones, which wrap mod 2^32 (two's complement;
    tests pin the result to a Python-int reference): torch's uint32 mul is not vectorised, >10x slower.
    """
    _xorshift_(x, 16, tmp).mul_(_const(0x7FEB352D, x.device))
    if key_hi:
        x.bitwise_xor_(_int32(key_hi))
    _xorshift_(x, 15, tmp).mul_(_const(_int32(0x846CA68B), x.device))
    return _xorshift_(x, 16, tmp)


def hash_counters_(out: torch.Tensor, iota: torch.Tensor, key: int, offset: int, tmp: torch.Tensor):
    """out[i] <- keyed lowbias32 of counter offset + i (i < len(out)): the noise of element offset + i.

    The low 32 bits of the 64-bit key are added to the counter, the high 32 bits xored in mid-hash.
    Counters wrap at 2^32 elements; the high part of the offset goes into the xored key instead.
    On return tmp holds hi16(out) (the hash's last shift), free noise for a second tensor.
    """
    torch.add(iota, _int32((key + offset) & MASK32), out=out)  # int32 add wraps mod 2^32
    return lowbias32_(out, tmp, ((key >> 32) ^ (offset >> 32)) & MASK32)


def round_into_(dst: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> None:
    """dst <- round(x): SR with 16-bit noise in [0, 2^16) (int32), or round-to-nearest if noise is None.

    Clobbers x (fp32). A no-op when dst is x itself (an fp32 tensor updated in place).
    """
    if dst.data_ptr() == x.data_ptr():
        return
    if noise is not None:
        bits = x.view(torch.int32).add_(noise)
        bits.bitwise_and_(_const(BF16_KEEP, x.device))  # high 16 bits now hold SR(x), low are 0
    dst.copy_(x)


class _Workspace:
    """Chunk-sized fp32/int32 scratch reused by every chunk (this bounds the temporary memory)."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self._bufs:
            if name == "iota":
                self._bufs[name] = torch.arange(self.size, dtype=torch.int32, device=self.device)
            else:
                self._bufs[name] = torch.empty(self.size, dtype=dtype, device=self.device)
        buf = self._bufs[name]
        return buf if n == self.size else buf[:n]

    def hash(self, key: int, offset: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, hi16(h)) for elements offset..offset+n, h = keyed lowbias32 (hash_counters_)."""
        h, tmp = self.take("h", n, torch.int32), self.take("t", n, torch.int32)
        return hash_counters_(h, self.take("iota", n), key, offset, tmp), tmp

    def load(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """An fp32 view of src: src itself when already fp32 (updated in place), else a cast copy."""
        return src if src.dtype == torch.float32 else self.take(name, src.numel()).copy_(src)


def copy_stochastic_(dst: torch.Tensor, src: torch.Tensor, key: int, chunk_size: int = DEFAULT_CHUNK):
    """dst (bf16) <- SR(src), noise for element i: keyed lowbias32 of i, key = rounding_key(key); returns dst.

    Chunked: temporary memory is 4 buffers of chunk_size 4-byte elements, whatever the size of src.
    """
    key = rounding_key(key)
    flat_dst, flat_src = dst.view(-1), src.reshape(-1)
    size = max(1, min(chunk_size, flat_src.numel()))
    work = _Workspace(size, src.device)
    for lo in range(0, flat_src.numel(), size):
        x = work.take("x", min(size, flat_src.numel() - lo)).copy_(flat_src[lo : lo + size])
        noise = work.hash(key, lo, x.numel())[0].bitwise_and_(_const(LO16, x.device))
        round_into_(flat_dst[lo : lo + size], x, noise)
    return dst


def stochastic_round_to_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    """SR(x) as a new bf16 tensor; a pure function of (x, key). E[SR(x)] = x elementwise."""
    return copy_stochastic_(torch.empty(x.shape, dtype=torch.bfloat16, device=x.device), x, key)


class _Coefficients:
    """Per-step scalars of the update, with the bias corrections folded in (Kingma & Ba, end of sec. 2):
    m_hat / (sqrt(v_hat) + eps) = step_size / lr * m / (sqrt(v) + eps_hat),
    step_size = lr sqrt(1-b2^t) / (1-b1^t), eps_hat = eps sqrt(1-b2^t)."""

    def __init__(self, group: dict[str, Any], step: int):
        self.beta1, self.beta2 = group["betas"]
        bc1, bc2_sqrt = 1 - self.beta1**step, math.sqrt(1 - self.beta2**step)
        self.step_size = group["lr"] * bc2_sqrt / bc1
        self.eps_hat = group["eps"] * bc2_sqrt
        self.decay = 1 - group["lr"] * group["weight_decay"]


def _adamw_math(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, p: torch.Tensor, denom: torch.Tensor, c: _Coefficients
) -> None:
    """The fp32 AdamW update of one chunk, in place on m, v, p (denom: scratch)."""
    m.lerp_(g, 1 - c.beta1)
    v.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
    torch.sqrt(v, out=denom).add_(c.eps_hat)
    if c.decay != 1:
        p.mul_(c.decay)
    p.addcdiv_(m, denom, value=-c.step_size)


def _round_state_(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    p32: torch.Tensor,
    m32: torch.Tensor,
    v32: torch.Tensor,
    key: int | None,
    offset: int,
    work: _Workspace,
) -> None:
    """Write the fp32 results back: SR with the three noises of the module docstring, or round to
    nearest when key is None (fp32 targets: nothing to do, they were updated in place)."""
    if key is None:
        for dst, x in ((p, p32), (m, m32), (v, v32)):
            round_into_(dst, x, None)
        return
    h, hi = work.hash(key, offset, p.numel())
    round_into_(m, m32, hi)
    round_into_(p, p32, h.bitwise_and_(_const(LO16, h.device)))
    round_into_(v, v32, hi.bitwise_xor_(h))  # both halves already < 2^16: no mask needed


def _adamw_chunk(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    comp: torch.Tensor | None,
    c: _Coefficients,
    key: int | None,
    offset: int,
    work: _Workspace,
) -> None:
    """Update one chunk: fp32 tensors in place, the others through fp32 copies written back rounded."""
    m32, v32, p32 = work.load("m", m), work.load("v", v), work.load("p", p)
    denom = work.take("d", p.numel())
    _adamw_math(work.load("g", g), m32, v32, p32, denom, c)
    if comp is not None:  # Kahan: add back what rounding lost last step, keep the sum to see this loss
        exact = denom.copy_(p32.add_(denom.copy_(comp)))
    _round_state_(p, m, v, p32, m32, v32, key, offset, work)
    if comp is not None:
        comp.copy_(exact.sub_(p))


class AdamWSR(torch.optim.Optimizer):
    """AdamW for fp32 or bf16 params: fp32 chunk arithmetic; bf16 param and moments written with SR.

    State per param, under torch's names so DeepSpeed can copy and pad it: step (int), exp_avg and
    exp_avg_sq in the param's dtype, and for bf16 params with kahan=True kahan_comp (bf16): what rounding
    the param lost last step, added back before the next rounding (Kahan summation in fp32 arithmetic).
    State bytes per param: 4 for bf16 (6 with Kahan), 8 for fp32. Scratch is at most 8 buffers of
    chunk_size 4-byte elements (8 MiB at the default 2^18), kept between steps.
    Under DeepSpeed ZeRO-2 the optimizer sees one flat tensor per rank: bf16 with
    bf16_master_weights_and_grads, fp32 masters otherwise; grads of another dtype are cast per chunk.

    kahan, stochastic_rounding (False: round to nearest, the baseline SR is measured against) are
    per-group options. seed and rank key the rounding noise (module docstring); seed is saved by
    state_dict(), rank is the caller's (each ZeRO rank loads its own optimizer file).
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
        chunk_size: int = DEFAULT_CHUNK,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            kahan=kahan,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self.seed, self.rank, self.chunk_size = seed, rank, chunk_size
        self._workspaces: dict[torch.device, _Workspace] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every param with a grad; params whose grad is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for position, p in enumerate(group["params"]):
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
        flat = [t.view(-1) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
        comp = state["kahan_comp"].view(-1) if "kahan_comp" in state else None
        grad, coef = p.grad.reshape(-1), _Coefficients(group, step)
        work = self._workspace(p.device, p.numel())
        size = work.size
        for lo in range(0, p.numel(), size):
            part = slice(lo, lo + size)
            pp, mm, vv = (t[part] for t in flat)
            _adamw_chunk(pp, grad[part], mm, vv, None if comp is None else comp[part], coef, key, lo, work)

    def _workspace(self, device: torch.device, numel: int) -> _Workspace:
        """Scratch for min(chunk_size, numel) elements, kept between steps and grown on demand: fresh
        buffers cost first-touch page faults, about 3 ns/element on the benchmark VM."""
        need = max(1, min(self.chunk_size, numel))
        if device not in self._workspaces or self._workspaces[device].size < need:
            self._workspaces[device] = _Workspace(need, device)
        return self._workspaces[device]

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
