"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3 and App. C): an EMA of any width, rebuilt after training
from snapshots of two power-function EMAs.

An EMA is a weighted sum of the weights theta_tau after each update tau. The power-function EMA with
exponent gamma (decay (1 - 1/t)^(gamma+1) at update t, ema.py) gives, after t updates, exactly

    w_t(tau) = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),   tau = 1..t      (telescoping product)

which sums to 1. Snapshots i (update t_i, exponent gamma_i) hold sum_tau w_i(tau) theta_tau; a target
profile w_r (any gamma_r, any t_r) is approximated by sum_i x_i w_i in least squares over tau,

    A x = b,   A_ij = <w_i, w_j>,   b_i = <w_i, w_r>,

and the same x combines the snapshots' weights. EDM2 solves it for the continuous profiles; here the inner
products are the exact sums over the discrete updates (cumulative sums per pair of exponents, O(T)), so a
target equal to a snapshot is reproduced exactly and early, coarse updates are counted as they happened.
Every profile sums to 1 over tau, so the combined profile sums to sum_i x_i: the least-squares x is then
divided by its sum (EDM2's `solve_posthoc_coefficients`, X / sum(X)). Without it every rebuilt weight,
pretrained part included, is scaled by sum(x) (0.957 at sigma_rel 0.25 from EDM2's two widths), an error
that dwarfs the EMA's own move in a fine-tune. The residual ||sum_i x_i w_i - w_r|| / ||w_r|| (of the
normalised x) says how well the snapshots cover the target; `mass` is the sum before normalising.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ztsnr_ds import integrity
from ztsnr_ds.ema import (
    LAYOUT_FILE,
    SNAPSHOT_DIR,
    EMAError,
    Layout,
    power_gamma,
    rank_file,
    read_flat,
    read_layout,
)

CHUNK = 1 << 24  # elements combined at a time: memory is O(chunk x snapshots) plus the output


def contributions(gamma: float, horizon: int) -> np.ndarray:
    """g(tau) / T^(gamma+1) = (tau/T)^(gamma+1) (1 - (1 - 1/tau)^(gamma+1)), tau = 1..T (float64).

    The factored form avoids the cancellation of tau^(gamma+1) - (tau-1)^(gamma+1) at large tau.
    """
    tau = np.arange(1, horizon + 1, dtype=np.float64)
    tail = np.ones_like(tau)
    tail[1:] = -np.expm1((gamma + 1) * np.log1p(-1.0 / tau[1:]))
    return (tau / horizon) ** (gamma + 1) * tail


@dataclass(frozen=True)
class Solution:
    coefficients: np.ndarray  # x_i, one per snapshot, summing to 1
    residual: float  # ||sum x_i w_i - w_r|| / ||w_r||
    mass: float  # sum of the least-squares x before it was normalised to 1


def solve(snapshots: list[tuple[int, float]], target: tuple[int, float]) -> Solution:
    """Least-squares coefficients of the snapshots' profiles for the target profile.

    snapshots, target: (updates t, gamma). Profiles w_i(tau) = G_gamma(tau) * (T / t_i)^(gamma_i+1) for
    tau <= t_i, with G from `contributions` at horizon T = the largest t; rows are scaled to unit norm
    before solving (early snapshots are tiny next to late ones); x is then divided by its sum.
    """
    horizon = max(t for t, _ in [*snapshots, target])
    points = [*snapshots, target]
    gammas = sorted({g for _, g in points})
    base = {g: contributions(g, horizon) for g in gammas}
    cumulative = {(a, b): np.cumsum(base[a] * base[b]) for a in gammas for b in gammas if a <= b}

    def inner(p: tuple[int, float], q: tuple[int, float]) -> float:
        (tp, gp), (tq, gq) = p, q
        pair = (gp, gq) if gp <= gq else (gq, gp)
        scale = (horizon / tp) ** (gp + 1) * (horizon / tq) ** (gq + 1)
        return float(cumulative[pair][min(tp, tq) - 1] * scale)

    gram = np.array([[inner(p, q) for q in points] for p in points])
    norm = np.sqrt(np.diag(gram))
    unit = gram / np.outer(norm, norm)
    a, b = unit[:-1, :-1], unit[:-1, -1]
    x_unit = np.linalg.lstsq(a, b, rcond=1e-12)[0]
    mass = float((x_unit * norm[-1] / norm[:-1]).sum())
    x_unit = x_unit / mass  # sum_i x_i = 1: the combined profile weighs the updates with total 1
    residual = math.sqrt(max(0.0, 1.0 - 2.0 * x_unit @ b + x_unit @ a @ x_unit))
    return Solution(x_unit * norm[-1] / norm[:-1], residual, mass)


@dataclass(frozen=True)
class Snapshot:
    folder: Path
    step: int
    updates: int
    layout: Layout
    tracks: dict[str, dict]  # track name -> {"kind": "power", "sigma_rel", "gamma"}


def find_snapshots(run_dir: Path) -> list[Snapshot]:
    """The complete snapshots of a run (ema.json written, every rank file matching its sha256), by step;
    a folder without ema.json (cut short by a kill or a full disk) is skipped with a warning."""
    root = Path(run_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        raise EMAError(f"{run_dir} has no {SNAPSHOT_DIR}/: train with ema.enabled and ema.posthoc: true "
                       "(snapshots every ema.snapshot_every steps)")
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / LAYOUT_FILE).is_file():
            found.append(checked_snapshot(folder))
        else:
            warnings.warn(f"skipping {folder}: no {LAYOUT_FILE} (a snapshot cut short); delete it",
                          stacklevel=2)
    if not found:
        raise EMAError(f"{root} holds no complete snapshot (a run killed before its first one?)")
    return found


def checked_snapshot(folder: Path) -> Snapshot:
    """One snapshot folder: its sealed ema.json with step and sha256s, the step its folder's name, every
    rank file matching; EMAError naming the file and the fix otherwise."""
    layout, meta = read_layout(folder)
    fix = f"delete {folder} to rebuild without it"
    try:
        step, updates, sums = int(meta["step"]), int(meta["updates"]), dict(meta["sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise EMAError(f"{folder / LAYOUT_FILE} lacks a valid {err} (not a snapshot's ema.json); "
                       f"{fix}") from None
    if folder.name != f"step{step:08d}":
        raise EMAError(f"{folder / LAYOUT_FILE} records step {step}, but its folder is {folder.name} (moved "
                       f"or swapped snapshots); rename it step{step:08d}, or {fix}")
    for r in range(layout.world_size):
        path = rank_file(folder, r)
        if not path.is_file() or integrity.sha256(path) != sums.get(path.name):
            raise EMAError(f"{path} is missing or does not match its sha256 in {folder / LAYOUT_FILE}; {fix}")
    return Snapshot(folder, step, updates, layout, meta["tracks"])


def reconstruct(snapshots: list[Snapshot], sigma_rel: float,
                sources: list[float] | None = None) -> tuple[dict[str, torch.Tensor], Solution]:
    """fp32 weights of the power EMA with `sigma_rel` at the last snapshot's update count, combined from
    the snapshots' tracks (those with sigma_rel in `sources`, default all).

    Works per chunk of the flat groups, whatever each snapshot's world size; parameters come out by name.
    """
    layout = snapshots[-1].layout
    for s in snapshots:
        if not s.layout.same_parameters(layout):
            raise EMAError(f"{s.folder} lists other parameters than {snapshots[-1].folder}: snapshots of "
                           "another model share this folder; move them away")
    terms = [(s, name, spec) for s in snapshots for name, spec in s.tracks.items()
             if sources is None or any(math.isclose(spec["sigma_rel"], r) for r in sources)]
    if not terms:
        raise EMAError(f"no snapshot track has sigma_rel in {sources}; tracked: "
                       f"{sorted({spec['sigma_rel'] for s in snapshots for spec in s.tracks.values()})}")
    target = (snapshots[-1].updates, power_gamma(sigma_rel))
    solution = solve([(s.updates, spec["gamma"]) for s, _, spec in terms], target)
    state = {}
    for g in range(len(layout.groups)):
        flat = torch.empty(layout.numel(g), dtype=torch.float32)
        for lo in range(0, flat.numel(), CHUNK):
            hi = min(lo + CHUNK, flat.numel())
            acc = torch.zeros(hi - lo, dtype=torch.float64)
            for x, (s, name, _) in zip(solution.coefficients, terms):
                acc += float(x) * read_flat(s.folder, s.layout, name, g, lo, hi).double()
            flat[lo:hi] = acc
        state |= {name: flat[start:stop].view(shape).clone() for name, shape, start, stop in layout.spans(g)}
    return state, solution

