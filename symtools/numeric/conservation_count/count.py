"""Count the independent conservation laws of gradient flow (or heavy-ball flow) of a torch model at θ.

The algorithm (docs/commands/laws.md has the math):

1. Level 0: the fields X_(x,j)(θ) = ∇_θ f_j(θ; x) for N random inputs (Gaussian directions, radii spread
   over e^±3), as the rows of the Jacobian J (one
   per-input ``jacrev``), each scaled to norm 1. Their rank r_0 (:mod:`.rank`: largest-gap criterion) and an
   orthonormal basis of the complement.
2. Screening (the saturation check in the inputs): S further inputs (default 100,000, Gaussian directions with
   radii over e^±4, their own generator) are screened by forward-mode JVPs of the outputs along a few random
   combinations of the complement basis and a few random directions (:func:`_screen_ratios`): an estimate of
   ‖J_x C‖/‖J_x‖, the part of an input's fields outside the span so far. Inputs above :data:`SCREEN_TOL` are
   checked with their exact Jacobian rows and added to level 0 (the largest first, :data:`SCREEN_ADD` at a
   time); the screen is repeated until a pass over all S inputs finds nothing, then run on perturbations of
   the inputs it added (their neighbourhoods, :data:`LOCAL`). Every input it adds generates brackets too.
3. Level k ≥ 1: random right-normed brackets [X_α1, [X_α2, … X_α(k+1)]] of fields with random constant
   coefficients (their values span the level-k values with probability 1), in batches of (complement size + 2);
   each batch's projection on the current complement decides the increment. A level that adds nothing ends
   the iteration: at a generic θ the rank is locally constant, so a distribution that is stable under one more
   bracket level is involutive, and the generated Lie algebra has been reached (Frobenius).
4. laws = dimension − rank.
5. The library's charges (graph walk + generated charge densities): each gradient ∇Q_i must be orthogonal to
   every sampled field value (|cos| ≤ :data:`ORTHO_TOL`) and lie in the final complement; the number of
   functionally independent ones is the rank of their Jacobian (same gap criterion). ``laws − explained`` is
   what no declared symmetry explains, located by the parameter tensors that carry it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from symtools.errors import SymtoolsError

from .charges import LibraryCharges, library_charges
from .fields import FlatModel, momentum_field, nested_bracket_value
from .rank import (
    MIN_GAP,
    Complement,
    RankDecision,
    RankUnclear,
    complement_dense,
    complement_from_gram,
    decide_rank,
)

#: |cos(∇Q, field value)| allowed for a conserved charge. Both vectors carry round-off ~1e-15 relative to
#: their terms (float64 forward/backward/JVP passes); 1e-9 leaves a wide margin, while a quantity that is not
#: conserved has cosines of order 1e-3 … 1 (the negative controls in tests/test_conservation_count.py).
ORTHO_TOL = 1e-9
#: Up to this dimension the rank is decided by a dense SVD; above it, from the Gram matrix (rank.py).
DENSE_LIMIT = 3000
FLOWS = ("gradient", "momentum")
#: Brackets in the first batch of a level (see count_laws); 3 rather than 1 for margin against a degenerate draw.
PROBE = 3
#: Screened inputs (default of ``screen``). Deep, narrow ReLU nets have activation regions met by ~1e-3…1e-4
#: of the inputs; 100,000 meets each such region ~10…100 times (measured on the benchmark families: the
#: regions the level-0 inputs missed were found on 9…444 of 100,000 screened inputs).
SCREEN = 100_000
#: Radii of the screened inputs: log-uniform in e^±SCREEN_RADIUS (wider than the level-0 inputs' e^±3).
SCREEN_RADIUS = 4.0
#: Estimated ‖J_j C‖/‖J_j‖ above which an input's field row j is taken to leave the span (C: complement
#: basis, J_j: the row ∇_θ f_j(θ; x)). Measured on the 48 benchmark nets (4.8 million screened inputs): the
#: estimate for rows in the span (round-off) is ≤ 2e-12; the exact ratio of rows from regions level 0 had
#: missed is ≥ 2.4e-4 (≥ 1.3e-5 in every run seen). 1e-9 (= ORTHO_TOL, the charges' orthogonality tolerance)
#: sits ≥ 2.7 orders of magnitude from both. The estimate (a ratio of two χ²₂ norms) is off by more than a
#: factor 30 with probability ~1e-3 per row, and every flagged input is re-checked with its exact Jacobian
#: rows before it is added (so a round-off row estimated too high costs time, not correctness).
SCREEN_TOL = 1e-9
#: Random directions of the screening JVPs: SKETCH combinations C·g of the complement columns (g ~ N(0, I):
#: E|J_j C g|² = ‖J_j C‖²) and SCALE Gaussian directions in parameter space (E|J_j g|² = ‖J_j‖²).
SKETCH, SCALE = 2, 2
#: Flagged inputs added per step (the largest estimated ratios first); the steps allowed in all.
SCREEN_ADD, SCREEN_STEPS = 16, 40
#: Neighbourhoods of the inputs the screen added: LOCAL perturbations x + σ·(‖x‖/√n)·ξ (ξ ~ N(0, I)) per
#: scale σ of LOCAL_SCALES, around at most LOCAL_SEEDS of them, for at most LOCAL_ROUNDS rounds (each round
#: around the inputs the previous one added). Measured on the two benchmark nets whose rarest regions are met
#: by ~1e-5 of the inputs (9-8-8-2-8, 6-7-7-2-9), 4 seeds each: 0–3 laws fewer at ~5% of the screen's cost.
LOCAL, LOCAL_SCALES, LOCAL_SEEDS, LOCAL_ROUNDS = 64, (0.3, 0.1, 0.03, 0.01), 64, 4
#: Screened inputs per JVP batch.
SCREEN_CHUNK = 16384
#: Offset of the screening generator's seed from ``seed`` (its inputs are independent of the level-0 ones and
#: of any other sampler, e.g. the benchmark's closed form, seeded 123).
SCREEN_SEED = 1_000_003
#: Nets of at most SMALL_NET parameters get at least SMALL_NET_INPUTS inputs at level 0 (cheap there: a
#: Jacobian and a QR). Deep, narrow ReLU nets have units active on ~1e-3 of the inputs; with ~200 inputs the
#: saturation check passed while the rank was still short (measured: mlp 4-7-3-4, 13 laws at 214 inputs,
#: 10 = the closed form from 4,000 on).
SMALL_NET, SMALL_NET_INPUTS = 500, 4096
#: BRACKET_INPUTS_NOTE: bracket generators X_α use the first ⌈8·D/m⌉ + 128 level-0 inputs (or all, if fewer)
#: and every input the screen added: their cost grows with the inputs, and the bracket values are checked
#: against the complement of ALL inputs' fields.


class InputsNotSaturated(SymtoolsError):
    """The screen still finds inputs whose fields leave the span after :data:`SCREEN_STEPS` steps."""


@dataclass
class LawCount:
    flow: str
    parameters: int
    dimension: int                      # D for gradient flow, 2D (θ, v) for heavy ball
    rank: int
    laws: int
    level_ranks: list[int]              # cumulative rank after level 0, 1, …
    levels: int                         # bracket levels that added rank (0: the fields alone)
    levels_checked: int                 # the last level computed (it added nothing)
    gap: float                          # smallest stage gap
    stages: list[dict]
    inputs: int                         # level-0 inputs drawn
    screened: int                       # inputs screened (0: screening off)
    screen_added: int                   # screened inputs added to level 0
    screen_passes: int                  # full passes of the screen (the last one found nothing)
    screen_max_below: float             # largest estimated ratio under SCREEN_TOL seen (round-off level)
    seconds: float
    gamma: float | None = None
    complement: Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("flow", "parameters", "dimension", "rank", "laws", "level_ranks",
                                             "levels", "levels_checked", "gap", "inputs", "screened", "screen_added",
                                             "screen_passes", "screen_max_below")}
        out["seconds"] = round(self.seconds, 4)
        if self.gamma is not None:
            out["gamma"] = self.gamma
        out["stages"] = self.stages
        return out


def _inputs(count: int, shape: tuple[int, ...], gen: torch.Generator, radius: float = 3.0) -> Tensor:
    """Random inputs: Gaussian directions with radii spread over e^±radius (a log-uniform factor per input). The
    spread reaches the activation regions that biases cut far from or close to the origin, which N(0, 1)
    inputs rarely visit (measured on deep, narrow ReLU nets: fewer spurious laws for the same count)."""
    x = torch.randn((count,) + tuple(shape), dtype=torch.float64, generator=gen)
    radii = torch.empty((count,) + (1,) * len(shape), dtype=torch.float64).uniform_(-radius, radius, generator=gen).exp()
    return x * radii


def _scaled(rows: Tensor, scales: Tensor) -> Tensor:
    keep = scales > 0
    return rows[keep] / scales[keep, None]


def _decompose(a: Tensor, min_gap: float, what: str, progress) -> tuple[RankDecision, Tensor]:
    if a.shape[1] <= DENSE_LIMIT or a.shape[0] < a.shape[1] // 2:
        return complement_dense(a, min_gap, what)
    if progress:
        progress(f"  {what}: {a.shape[0]} × {a.shape[1]}: Gram matrix, shifted Cholesky, subspace iteration")
    gram = a.T @ a  # (scipy's syrk, half the flops, measured 4× slower than torch's product here)
    return complement_from_gram(gram, lambda z: a @ z, min_gap, what, block=256, progress=progress)


def _stage(what: str, dec: RankDecision, rows: int, seconds: float) -> dict:
    return {"stage": what, "rows": rows, **dec.as_dict(), "seconds": round(seconds, 4)}


def _field_rows(flat: FlatModel, x: Tensor, flow: str) -> Tensor:
    """The scaled level-0 rows of the inputs ``x`` ((0, row) on the phase space for heavy ball)."""
    jx = flat.jacobian(flat.theta0, x)
    rows = _scaled(jx, jx.norm(dim=1))
    return torch.cat([torch.zeros_like(rows), rows], dim=1) if flow == "momentum" else rows


def _level0(flat: FlatModel, x_main: Tensor, flow: str, v0: Tensor, gamma: float, min_gap: float,
            say) -> tuple[Complement, list[dict], list[Tensor]]:
    """Level 0: the fields at θ on the inputs ``x_main``."""
    d = flat.dim
    t0 = time.perf_counter()
    say(f"level 0: Jacobian of {len(x_main)} inputs' outputs over {d} parameters")
    a0 = _field_rows(flat, x_main, flow)
    if flow == "momentum":
        drift = torch.cat([v0, -gamma * v0])
        a0 = torch.cat([(drift / drift.norm())[None], a0])
    dec, basis = _decompose(a0, min_gap, "level 0", say)
    comp = Complement(basis, dec.rank, dec.gap, [])
    say(f"level 0: rank {dec.rank} (gap {dec.gap:.2g})")
    return comp, [_stage("level 0", dec, a0.shape[0], time.perf_counter() - t0)], [a0]


def _screen_ratios(flat: FlatModel, basis: Tensor, xs: Tensor, gen: torch.Generator) -> Tensor:
    """Per input of ``xs``, an estimate of max_j ‖J_j C‖/‖J_j‖ (J_j = ∇_θ f_j(θ; x), C = ``basis`` restricted to
    θ): forward-mode JVPs of all outputs along SKETCH columns C·g and SCALE Gaussian directions."""
    d = flat.dim
    c = basis[-d:]  # heavy ball: the rows (0, J_j) only see the v-part of the complement
    z = torch.cat([c @ torch.randn(c.shape[1], SKETCH, dtype=torch.float64, generator=gen),
                   torch.randn(d, SCALE, dtype=torch.float64, generator=gen)], dim=1)
    out = []
    for i in range(0, len(xs), SCREEN_CHUNK):
        xi = xs[i:i + SCREEN_CHUNK]
        t = flat.jvp_rows(flat.theta0, xi, z).view(len(xi), -1, SKETCH + SCALE)  # (n, m, q)
        p2 = t[..., :SKETCH].pow(2).mean(-1)
        s2 = t[..., SKETCH:].pow(2).mean(-1)
        r = torch.where(s2 > 0, (p2 / s2.clamp_min(1e-300)).sqrt(), torch.zeros_like(p2))
        out.append(r.max(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _screen_set(flat: FlatModel, comp: Complement, xs: Tensor, flow: str, gen: torch.Generator, min_gap: float,
                say, st: dict) -> Tensor:
    """Screen the inputs ``xs`` against the complement until a full pass finds nothing; add (to ``comp``) the
    inputs whose exact fields leave the span. Returns the added inputs; counts go to ``st``."""
    n = len(xs)
    idx_all = torch.arange(n)
    excluded = torch.zeros(n, dtype=torch.bool)  # added, or flagged by the estimate but not by the exact rows
    pool, full, added = idx_all, True, []
    st["screened"] += n
    while comp.basis.shape[1] > 0:
        r = _screen_ratios(flat, comp.basis, xs[pool], gen)
        hit = (r > SCREEN_TOL) & ~excluded[pool]
        if full:
            st["passes"] += 1
            rest = r[~excluded[pool] & ~hit]
            st["max_below"] = max(st["max_below"], float(rest.max()) if len(rest) else 0.0)
        if not hit.any():
            if full:
                break
            pool, full = idx_all, True  # the flagged subset is exhausted: confirm on every input
            continue
        st["steps"] += 1
        if st["steps"] > SCREEN_STEPS:
            raise InputsNotSaturated(
                f"the screen still finds inputs whose fields leave the span after {SCREEN_STEPS} steps "
                f"({st['added']} inputs added, rank {st['rank0']} -> {comp.rank}); give more level-0 inputs "
                f"(--inputs)")
        cand, rc = pool[hit], r[hit]
        st["flagged_min"] = min(st["flagged_min"], float(rc.min()))
        pick = cand[torch.argsort(rc, descending=True)[:SCREEN_ADD]]
        jx = flat.jacobian(flat.theta0, xs[pick])
        norms = jx.norm(dim=1)
        rows = torch.where(norms[:, None] > 0, jx / norms.clamp_min(1e-300)[:, None], torch.zeros_like(jx))
        if flow == "momentum":
            rows = torch.cat([torch.zeros_like(rows), rows], dim=1)
        exact = (rows @ comp.basis).norm(dim=1).view(len(pick), -1).max(dim=1).values  # exact, per input
        excluded[pick] = True
        new = exact > SCREEN_TOL
        st["false_flags"] += int((~new).sum())
        if new.any():
            before = comp.rank
            rows = rows.view(len(pick), -1, rows.shape[1])[new].reshape(-1, rows.shape[1])
            rows = rows[norms.view(len(pick), -1)[new].reshape(-1) > 0]
            dec = comp.add(rows, min_gap, "screened inputs")
            st["gap"] = min(st["gap"], dec.gap)
            st["exact_min"] = min(st["exact_min"], float(exact[new].min()))
            if dec.rank == 0:
                raise RankUnclear(f"screened inputs have fields outside the span by up to "
                                  f"{float(exact.max()):.2g} (relative), above the screening threshold "
                                  f"{SCREEN_TOL:g}, but the rank criterion adds nothing for them (rank {before})")
            added.append(pick[new])
            st["added"] += int(new.sum())
            st["rows"].append(rows)
            say(f"screen: {int(new.sum())} input(s) added, rank {before} -> {comp.rank}")
        pool, full = cand[~excluded[cand]], False
        if len(pool) == 0:
            pool, full = idx_all, True
    return xs[torch.cat(added)] if added else xs[:0]


def _screen(flat: FlatModel, comp: Complement, xs: Tensor, flow: str, gen: torch.Generator, min_gap: float,
            say) -> tuple[Tensor, list[Tensor], dict]:
    """Screen ``xs`` (:func:`_screen_set`), then the neighbourhoods of the inputs it added (module docstring,
    step 2). Returns (the added inputs, their scaled rows, statistics)."""
    t0 = time.perf_counter()
    st = {"screened": 0, "passes": 0, "steps": 0, "added": 0, "false_flags": 0, "local_rounds": 0,
          "max_below": 0.0, "flagged_min": math.inf, "exact_min": math.inf, "gap": math.inf,
          "rank0": comp.rank, "rows": []}
    found = _screen_set(flat, comp, xs, flow, gen, min_gap, say, st)
    added = [found]
    while len(found) and st["local_rounds"] < LOCAL_ROUNDS and comp.basis.shape[1] > 0:
        # an input that revealed new fields often borders other rarely visited regions: screen around it
        st["local_rounds"] += 1
        seeds = found[:LOCAL_SEEDS]
        scale = seeds.flatten(1).norm(dim=1).view((-1,) + (1,) * (seeds.dim() - 1)) / math.sqrt(seeds[0].numel())
        local = torch.cat([seeds + sigma * scale * torch.randn((LOCAL,) + tuple(seeds.shape), dtype=torch.float64,
                                                                  generator=gen)
                           for sigma in LOCAL_SCALES]).reshape((-1,) + tuple(seeds.shape[1:]))
        found = _screen_set(flat, comp, local, flow, gen, min_gap, say, st)
        added.append(found)
    stats = {"stage": f"screen of {st['screened']} inputs", "rank": comp.rank - st["rank0"],
             "gap": st["gap"] if st["gap"] < math.inf else None,
             **{k: st[k] for k in ("screened", "added", "passes", "steps", "false_flags", "local_rounds")},
             "max_below": st["max_below"],
             "flagged_min": st["flagged_min"] if st["flagged_min"] < math.inf else None,
             "exact_min": st["exact_min"] if st["exact_min"] < math.inf else None,
             "seconds": round(time.perf_counter() - t0, 4)}
    return torch.cat(added), st["rows"], stats


def count_laws(model: torch.nn.Module, input_shape: tuple[int, ...], *, flow: str = "gradient",
               inputs: int | None = None, screen: int | None = None, loss: str = "any", gamma: float = 1.0,
               seed: int = 0, min_gap: float = MIN_GAP, max_levels: int = 6, batch_cap: int = 128,
               progress: Callable[[str], None] | None = None, flat: FlatModel | None = None) -> LawCount:
    """The number of independent conservation laws of ``flow`` for ``model`` at its current parameters.

    ``input_shape``: one input without the batch axis. ``inputs``: N random level-0 inputs (:func:`_inputs`;
    default ⌈8·D/m⌉ + 64, m the number of outputs, at least 4096 up to 500 parameters; ⌈1.2·D/m⌉ + 64 above
    :data:`DENSE_LIMIT`); ``screen``: inputs screened for fields outside the level-0 span (default
    :data:`SCREEN`; 0: no screening, the level-0 inputs are then taken as saturating, unchecked).
    ``loss``: ``"any"`` (fields ∇f_j: every loss of the outputs) or ``"cross_entropy"`` (fields of the centered
    logits: softmax only sees differences). ``flow``: ``"gradient"`` or ``"momentum"`` (heavy ball, friction
    ``gamma``, at a random velocity). Raises :class:`~.rank.RankUnclear` or :class:`InputsNotSaturated`
    instead of returning an undecided count.
    """
    if flow not in FLOWS:
        raise SymtoolsError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
    if loss not in ("any", "cross_entropy"):
        raise SymtoolsError(f"unknown loss {loss!r}; choose any or cross_entropy")
    start = time.perf_counter()
    flat = flat or FlatModel(model, centered=loss == "cross_entropy")
    gen = torch.Generator().manual_seed(seed)
    d = flat.dim
    theta = flat.theta0
    with torch.no_grad():
        m = flat.outputs(theta, torch.zeros((1,) + tuple(input_shape), dtype=torch.float64)).shape[1]
    base = math.ceil((8.0 if d <= DENSE_LIMIT else 1.2) * d / m) + 64
    n = inputs if inputs is not None else (max(base, SMALL_NET_INPUTS) if d <= SMALL_NET else base)
    s_count = SCREEN if screen is None else screen
    if n < 1 or s_count < 0:
        raise SymtoolsError(f"need at least one input (got {n}) and no negative screen (got {s_count})")
    nb = min(n, base + 64)  # inputs of the bracket generators (see BRACKET_INPUTS_NOTE)
    say = progress or (lambda _msg: None)
    v0 = torch.randn(d, dtype=torch.float64, generator=gen) * float(theta.std())
    if flow == "momentum":
        point, dim = torch.cat([theta, v0]), 2 * d
    else:
        point, dim = theta, d
    x = _inputs(n, input_shape, gen)
    comp, stages, sampled = _level0(flat, x, flow, v0, gamma, min_gap, say)
    screen_stats = {"screened": 0, "added": 0, "passes": 0, "max_below": 0.0}
    if s_count:
        sgen = torch.Generator().manual_seed(seed + SCREEN_SEED)
        xs = _inputs(s_count, input_shape, sgen, SCREEN_RADIUS)
        say(f"screen: {s_count} inputs against the complement of {comp.basis.shape[1]} directions")
        x_add, rows_add, screen_stats = _screen(flat, comp, xs, flow, sgen, min_gap, say)
        stages.append(screen_stats)
        sampled.extend(rows_add)
        x_br = torch.cat([x[:nb], x_add])  # the added inputs' fields generate brackets too
    else:
        x_br = x[:nb]

    # bracket levels
    level_ranks = [comp.rank]
    levels, checked = 0, 0
    nm = (len(x_br), m)
    for k in range(1, max_levels + 1):
        t0, added, batches, rows_k = time.perf_counter(), 0, 0, 0
        while comp.basis.shape[1] > 0:
            # b generic samples of the level's values have rank min(b, dim) (mod the accepted span), so a batch
            # that adds fewer than b directions has exhausted the level. First a probe of PROBE brackets, then
            # batches doubling in size (at most complement + 2): the samples drawn stay ≤ 2·added + PROBE + 2.
            b = PROBE if batches == 0 else min(2 * b, comp.basis.shape[1] + 2, batch_cap)
            alphas = torch.randn((b, k + 1) + nm, dtype=torch.float64, generator=gen)
            coefs = torch.randn(b, k + 1, dtype=torch.float64, generator=gen)
            say(f"level {k}: {b} random brackets of depth {k} (complement {comp.basis.shape[1]})")
            rows, scales = _brackets(flat, x_br, point, alphas, coefs, flow, gamma)
            rows = _scaled(rows, scales)
            dec_k = comp.add(rows, min_gap, f"level {k}")
            sampled.append(rows)
            rows_k += rows.shape[0]
            added += dec_k.rank
            batches += 1
            if dec_k.rank < rows.shape[0]:
                break
        if batches:
            stages.append({**_stage(f"level {k}", dec_k, rows_k, time.perf_counter() - t0), "added": added,
                           "batches": batches})
        level_ranks.append(comp.rank)
        checked = k
        if added == 0:
            break
        levels = k
        if k == max_levels:
            raise SymtoolsError(f"the rank still grew at bracket level {k} ({comp.rank} of {dim}); raise "
                                f"--max-levels to go on")
    out = LawCount(flow, d, dim, comp.rank, dim - comp.rank, level_ranks, levels, checked,
                   min(s["gap"] for s in stages if s.get("gap") is not None), stages, n, screen_stats["screened"],
                   screen_stats["added"], screen_stats["passes"], screen_stats["max_below"], time.perf_counter() - start,
                   gamma if flow == "momentum" else None, comp.basis)
    out._sampled = sampled  # the scaled field values, for the charge checks
    return out


def _brackets(flat: FlatModel, x: Tensor, point: Tensor, alphas: Tensor, coefs: Tensor, flow: str,
              gamma: float) -> tuple[Tensor, Tensor]:
    """Values and scales of random right-normed brackets, one per row of ``alphas`` (b, k+1, N, m).

    A plain loop: on these small nets ``vmap`` over the nested JVPs was 3–10× slower (measured)."""
    vals, scales = [], []
    for al, cs in zip(alphas, coefs):
        if flow == "momentum":
            fields = [momentum_field(flat, x, al[i], cs[i], gamma) for i in range(al.shape[0])]
        else:
            fields = [flat.field(x, al[i]) for i in range(al.shape[0])]
        v, sc = nested_bracket_value(fields, point)
        vals.append(v)
        scales.append(sc)
    return torch.stack(vals), torch.stack(scales)


@dataclass
class ChargeComparison:
    charges: int
    explained_by_charges: int
    unexplained: int
    max_cosine: float                     # max |cos(∇Q_i, sampled field value)|
    max_outside: float                    # max ‖∇Q_i − P∇Q_i‖/‖∇Q_i‖, P the projector on the law complement
    not_conserved: list[str]
    families: dict[str, dict]
    unexplained_location: dict[str, float]
    decision: dict | None
    blocked: list[dict]
    skipped: list[str]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare_with_charges(count: LawCount, flat: FlatModel, input_shape: tuple[int, ...], loss: str = "any",
                         min_gap: float = MIN_GAP) -> ChargeComparison:
    """Which of ``count.laws`` the library's charges explain (module docstring, step 5)."""
    example = torch.zeros((1,) + tuple(input_shape), dtype=torch.float64)
    lib: LibraryCharges = library_charges(flat, example, "mse" if loss == "any" else "cross_entropy")
    c = lib.gradients
    d = flat.dim
    if count.flow == "momentum":  # a θ-only function on the phase space: gradient (∇Q, 0)
        c = torch.cat([c, torch.zeros_like(c)], dim=1)
    norms = c.norm(dim=1)
    nz = norms > 0
    ch = torch.zeros_like(c)
    ch[nz] = c[nz] / norms[nz, None]
    cos = torch.zeros(len(c), dtype=torch.float64)
    for rows in getattr(count, "_sampled", []):
        if len(c) and len(rows):
            cos = torch.maximum(cos, (ch @ rows.T).abs().max(dim=1).values)
    basis = count.complement
    outside = (ch - (ch @ basis) @ basis.T).norm(dim=1) if len(c) else torch.zeros(0)
    ok = (cos <= ORTHO_TOL) & nz
    not_conserved = [f"{f} at {layer} #{i}" for (f, layer, i), good in zip(lib.labels, ok.tolist()) if not good]
    fam: dict[str, dict] = {}
    for (f, layer, _), good in zip(lib.labels, ok.tolist()):
        entry = fam.setdefault(f, {"charges": 0, "conserved": 0})
        entry["charges"] += 1
        entry["conserved"] += int(good)
    decision, explained, location = None, 0, {}
    kept = ch[ok]
    if len(kept):
        _, s, vh = torch.linalg.svd(kept, full_matrices=False)
        dec = decide_rank(s, min_gap, "library charges' Jacobian")
        decision, explained = dec.as_dict(), dec.rank
        span = vh[:explained].T
        for f in fam:
            sel = torch.tensor([lab[0] == f for lab, good in zip(lib.labels, ok.tolist()) if good])
            if sel.any():
                fam[f]["independent"] = decide_rank(torch.linalg.svdvals(kept[sel]), min_gap, f"{f} charges").rank
    else:
        span = torch.zeros(basis.shape[0], 0, dtype=torch.float64)
    unexplained = count.laws - explained
    if unexplained > 0 and basis.shape[1]:
        rest = basis - span @ (span.T @ basis)
        u, s, _ = torch.linalg.svd(rest, full_matrices=False)
        u = u[:, s > 0.5]  # directions of the law complement orthogonal to every charge gradient (s ≈ 1)
        for name, sl in flat.slices().items():
            mass = float((u[sl] ** 2).sum()) + (float((u[d + sl.start:d + sl.stop] ** 2).sum())
                                                if count.flow == "momentum" else 0.0)
            if mass > 1e-6:
                location[name if count.flow == "gradient" else f"{name} (θ and v)"] = round(mass, 3)
    return ChargeComparison(len(c), explained, unexplained, float(cos.max()) if len(cos) else 0.0,
                            float(outside.max()) if len(outside) else 0.0, not_conserved, fam, location, decision,
                            [{"node": b.node, "reason": b.reason} for b in lib.found.blocked], lib.skipped)
