"""Numerical rank with a stated gap criterion, and the orthogonal complement it leaves.

Every matrix here has rows that are vectors in parameter (or phase) space, each divided by its *scale*: its own
norm for a gradient, the size of the terms it was computed from for a bracket (a bracket that is zero up to
round-off then has a residual of round-off size, not of size one). Singular values are therefore relative to
1, and round-off sits near 1e-16·(a few hundred).

**The criterion.** Sort the singular values s_1 ≥ … ≥ s_n, raise those below ε (float64 unit round-off,
2.2e-16: the floor) to ε, put s_0 = 1 (the rows' scale) in front and s_(n+1) = ε behind. The rank is the cut r ∈ {0 … n} with the largest
ratio s_r / s_(r+1); that ratio is *the gap*. The rank is accepted only when the gap is at least ``min_gap``
(default :data:`MIN_GAP`); otherwise :class:`RankUnclear` is raised with the singular values around the cut.
The second-largest ratio is reported too (``runner_up``): a clear decision has one gap far above every other.

A rank decided in stages (the level-0 fields, then each bracket level) projects each new batch of rows on the
complement left by the previous stages and decides the *increment* with the same criterion; the gap of the
whole computation is the smallest stage gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from symtools.errors import SymtoolsError

EPS = torch.finfo(torch.float64).eps
#: Default minimal gap. Dropped singular values of scaled rows are round-off, ~1e-15…1e-14; on the 48
#: benchmark nets (docs/benchmarks.md) the smallest stage gap was 1.6e8–2.7e9 across runs (a depth-4 linear
#: net with bias) and typically 1e11–1e14. 1e6 leaves two or more orders of margin under the smallest gap seen while
#: refusing spectra that decay without a break (a geometric spectrum has ratios ~3).
MIN_GAP = 1e6
#: Subspace-iteration steps of the large-D path (complement_from_gram).
ITERATIONS = 5


class RankUnclear(SymtoolsError):
    """No cut separates the singular values by ``min_gap``: the rank is not decided (and not guessed)."""


@dataclass
class RankDecision:
    rank: int
    gap: float                 # s_r / s_(r+1) at the chosen cut (s_0 = 1, s_(n+1) = ε)
    runner_up: float           # the second-largest ratio
    kept_min: float            # s_r (1.0 when r = 0)
    dropped_max: float         # s_(r+1) (ε when nothing is dropped)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "gap": self.gap, "runner_up": self.runner_up, "kept_min": self.kept_min,
                "dropped_max": self.dropped_max}


def decide_rank(s: Tensor, min_gap: float = MIN_GAP, what: str = "matrix") -> RankDecision:
    """The rank of a matrix with singular values ``s`` (any order) by the largest-gap criterion (module doc)."""
    s = torch.sort(s.detach().to(torch.float64).cpu(), descending=True).values
    ext = torch.cat([torch.ones(1, dtype=torch.float64), s, torch.full((1,), EPS, dtype=torch.float64)])
    ext = ext.clamp_min(EPS)  # values below the round-off floor are the floor (no "gap" between two noises)
    ratios = ext[:-1] / ext[1:]
    order = torch.argsort(ratios, descending=True)
    r = int(order[0])
    gap = float(ratios[r])
    runner = float(ratios[order[1]]) if len(order) > 1 else 1.0
    dec = RankDecision(r, gap, runner, float(ext[r]), float(ext[r + 1]))
    if not gap >= min_gap:
        lo, hi = max(r - 2, 0), min(r + 3, len(ext))
        around = ", ".join(f"{float(v):.3g}" for v in ext[lo:hi])
        raise RankUnclear(f"no clear gap in the singular values of the {what}: the largest ratio is {gap:.3g} "
                          f"(needed {min_gap:.3g}) at rank {r}; values around it (1 = row scale, {EPS:.2g} = "
                          f"round-off floor): {around}")
    return dec


def complement_dense(a: Tensor, min_gap: float = MIN_GAP, what: str = "matrix") -> tuple[RankDecision, Tensor]:
    """Rank of ``a`` (n × D, scaled rows) and an orthonormal basis (D × (D − rank)) of its rows' complement."""
    d = a.shape[1]
    if a.shape[0] == 0:
        return decide_rank(torch.zeros(0), min_gap, what), torch.eye(d, dtype=a.dtype)
    if a.shape[0] > 2 * d:  # tall: the R of a QR has the same singular values and right vectors, and is small
        a = torch.linalg.qr(a, mode="r").R
    _, s, vh = torch.linalg.svd(a, full_matrices=a.shape[0] < d)  # tall: Vh is already D × D
    dec = decide_rank(s, min_gap, what)
    return dec, vh[dec.rank:].T.contiguous()


def complement_from_gram(gram: Tensor, apply_rows, min_gap: float = MIN_GAP, what: str = "matrix",
                         block: int = 64, progress=None) -> tuple[RankDecision, Tensor]:
    """The same for a large D, from the Gram matrix G = AᵀA (D × D) without an O(D³) eigendecomposition.

    G + μI (μ = 1e-10·λ_max) is factored by Cholesky; subspace iteration with (G + μI)⁻¹ on a block of
    ``block`` vectors converges to the bottom of the spectrum (null directions by a factor μ/λ per step).
    The singular values of the block's Ritz vectors are then measured on A itself (``apply_rows(Z)`` = A·Z),
    not on G, so that round-off is not squared; the cut and gap follow :func:`decide_rank` on these values
    (s_0 = 1 is not used: the cut must fall inside the block, which is doubled until it does).

    Limits: the null directions converge fast (their gain per step is λ/μ ≥ 1e5 for singular values ≥ 3e-3 of
    the scaled rows), the other Ritz vectors of the block do not, and ‖A z‖ for them is an upper bound of the
    singular value: the gap reported on this path can be overestimated (the dense path's is exact).
    """
    d = gram.shape[0]
    v = torch.randn(d, dtype=gram.dtype, generator=torch.Generator().manual_seed(1))
    for _ in range(30):  # λ_max by power iteration (an estimate is enough for the shift)
        w = gram @ v
        v = w / w.norm()
    lam_max = float(v @ (gram @ v))
    mu = 1e-11 * lam_max  # above the round-off of G (~D·ε·λ_max), far below its genuine small eigenvalues
    shifted = gram.clone()
    shifted.diagonal().add_(mu)
    chol = torch.linalg.cholesky(shifted)
    del shifted
    gen = torch.Generator().manual_seed(2)
    q = torch.zeros(d, 0, dtype=gram.dtype)
    while True:
        p = min(block, d)
        q = torch.linalg.qr(torch.cat([q, torch.randn(d, p - q.shape[1], dtype=gram.dtype, generator=gen)], 1)).Q
        for _ in range(ITERATIONS):  # null directions gain a factor ≥ λ/μ per step over the others
            q = torch.linalg.qr(torch.cholesky_solve(q, chol)).Q
        theta, y = torch.linalg.eigh(q.T @ (gram @ q))
        z = q @ y                                    # Ritz vectors, ascending Ritz values
        s = torch.linalg.vector_norm(apply_rows(z), dim=0)  # ‖A z_i‖: singular values measured on A
        sd = torch.sort(s, descending=True)
        if float(sd.values[0]) > 1e-8 or p == d:       # the block reaches past the null directions
            ext = torch.cat([sd.values, torch.full((1,), EPS, dtype=s.dtype)]).clamp_min(EPS)
            ratios = ext[:-1] / ext[1:]
            order = torch.argsort(ratios, descending=True)
            cut = int(order[0])                       # values 0..cut kept, the rest are null directions
            gap = float(ratios[cut])
            runner = float(ratios[order[1]]) if len(order) > 1 else 1.0
            if not gap >= min_gap:
                raise RankUnclear(f"no clear gap at the bottom of the spectrum of the {what}: largest ratio "
                                  f"{gap:.3g} (needed {min_gap:.3g}); values "
                                  + ", ".join(f"{float(x):.3g}" for x in ext[max(cut - 2, 0):cut + 3]))
            null = torch.linalg.qr(z[:, sd.indices[cut + 1:]]).Q
            dec = RankDecision(d - null.shape[1], gap, runner, float(ext[cut]), float(ext[cut + 1]))
            return dec, null
        if progress:
            progress(f"  every vector of the block of {p} is a null direction: doubling it")
        block *= 2
        q = z


@dataclass
class Complement:
    """An orthonormal basis ``basis`` (D × k) of the complement of everything accepted so far, with the
    rank accepted so far and the smallest stage gap."""

    basis: Tensor
    rank: int
    gap: float = math.inf
    stages: list | None = None

    def add(self, rows: Tensor, min_gap: float = MIN_GAP, what: str = "batch") -> RankDecision:
        """Add scaled ``rows`` (b × D): the increment is the rank of their projection on the complement."""
        if self.stages is None:
            self.stages = []
        k = self.basis.shape[1]
        if k == 0 or rows.shape[0] == 0:
            dec = RankDecision(0, math.inf, 1.0, 1.0, 0.0)
            self.stages.append((what, dec))
            return dec
        proj = rows @ self.basis                      # b × k
        if proj.shape[0] > 2 * k:                     # tall: same singular values and right vectors as its R
            proj = torch.linalg.qr(proj, mode="r").R
        _, s, vh = torch.linalg.svd(proj, full_matrices=proj.shape[0] < k)  # Vh is k × k either way
        dec = decide_rank(s, min_gap, what)
        if dec.rank:
            self.basis = self.basis @ vh[dec.rank:].T
            self.rank += dec.rank
        self.gap = min(self.gap, dec.gap)
        self.stages.append((what, dec))
        return dec
