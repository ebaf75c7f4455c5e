"""Verify every symmetry identity of a model on one batch, each group against its own round-off bound.

For each family (translation, scale, rescale, …) with generated code ``M`` and groups k bound to tensors:

- gradient identity, per group: r_k = ⟨g, v_k⟩ (one generated call per slot and tensor, reduced per group).
  Groups that feed a BatchNorm or LayerNorm get the exact ε term added, r_k − c·ε ∂L/∂ε_k (c = −2k for a
  path of degree k, derived by the engine); the uncorrected r_k is reported as the ε-induced breaking.
- Hessian identity, per group, projected on random directions u: ρ_k = ⟨Hu, v_k⟩ + ⟨u, K_k g⟩ (+ the
  derivative of the ε term along u, from the same HVP). ⟨u, H v_k + K_k g⟩ is the derivative of r_k along
  u, so ONE HVP tests the Hessian identity of every group of every family at once, each group on its own
  (no dilution among thousands of groups, no group testing). ``directions`` HVPs in all (default 2): a
  broken identity has a vector residual R_k ≠ 0, and ⟨u, R_k⟩ is Gaussian with standard deviation ‖R_k‖
  for Gaussian u, so each direction misses a breaking ten times above the bound with probability ≤ 8 %
  (two: ≤ 0.6 %).

Every tested quantity is judged against a round-off bound computed from the magnitudes of the terms it sums
(:mod:`symtools.numeric.roundoff`): |r_k| ≤ SAFETY·u·T_k with u the unit round-off of the dtype and T_k the
sum of the absolute terms from the operation where the symmetry cancels (normalisation, softmax, next layer)
down to the parameters; the same for ρ_k with the terms of the HVP. The bound scales with the actual terms
of this batch and these weights (a saturated softmax, a BatchNorm channel with a large mean), is computed
from this machine's values but not from its rounding, and needs no calibration run. The detection limit is
the bound itself: a breaking is seen when its residual exceeds SAFETY·u times the terms' size
(docs/checker.md states the measured limit on VGG-16-BN).

Verdicts per group: ratio = |residual| / bound ≤ 1 passes; above 1 fails in float64; in lower precisions a
ratio in (1, GRAY] is "inconclusive at this precision" (rerun with --dtype float64) and only a ratio above
GRAY fails. A check with no groups says so instead of passing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric import groupops
from symtools.numeric.groupops import ACC, group_view
from symtools.numeric.precision import ieee_float32
from symtools.numeric.roundoff import _mse_tangent, _mse_terms
from symtools.numeric.second_order import SecondOrder, rms_epsilon

SAFETY = 4.0  # bound = SAFETY × unit round-off × term magnitudes (each × √(terms summed); docs/checker.md)
GRAY = 10.0  # below float64, ratios in (1, GRAY] are inconclusive rather than failing
DIRECTIONS = 2  # random directions of the per-group Hessian test (one HVP each)
MAX_LOCATED = 32  # groups failing the Hessian test listed per layer under `hessian.located` (layers list all)

VERDICTS = ("pass", "fail", "inconclusive", "no_groups")


@dataclass
class LayerResult:
    layer: str
    family: str
    groups: int
    gradient_max_rel: float
    hessian_rel: float
    epsilon_max_rel: float | None = None
    failing: list[int] = field(default_factory=list)
    gradient_tolerance: float = float("nan")
    inconclusive: list[int] = field(default_factory=list)
    gradient_max_ratio: float = 0.0
    hessian_max_ratio: float = 0.0
    bound: str = "terms"  # "terms": round-off bound from term magnitudes; "gradient-sized": fallback
    gradient_ratios: list[float] | None = None  # per group, with check(..., per_group=True)
    hessian_ratios: list[float] | None = None


@dataclass
class FamilyResult:
    family: str
    groups: int
    gradient: dict
    hessian: dict
    epsilon: dict | None
    layers: list[LayerResult]

    @property
    def verdict(self) -> str:
        if self.gradient["failing_groups"] or self.hessian["failing_groups"]:
            return "fail"
        if self.gradient["inconclusive_groups"] or self.hessian["inconclusive_groups"]:
            return "inconclusive"
        return "pass"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


@dataclass
class CheckReport:
    families: dict[str, FamilyResult]
    tolerance: dict
    settings: dict
    hvps: dict
    loss: float

    @property
    def verdict(self) -> str:
        """"pass", "fail" (some group fails), "inconclusive" (none fails, some cannot be decided at this
        precision) or "no_groups" (nothing was checked)."""
        if not self.families:
            return "no_groups"
        verdicts = {f.verdict for f in self.families.values()}
        return next(v for v in ("fail", "inconclusive", "pass") if v in verdicts)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict:
        fams = {}
        for name, f in self.families.items():
            d = asdict(f)
            d["pass"] = f.passed
            d["verdict"] = f.verdict
            fams[name] = d
        return {"pass": self.passed, "verdict": self.verdict, "families": fams, "tolerance": self.tolerance,
                "settings": self.settings, "hvps": self.hvps, "loss": self.loss}


HOW = ("each group's residual against its own round-off bound: safety × unit round-off × the magnitudes of the "
       "terms the residual sums, from the operation where the symmetry cancels (normalisation, softmax, next "
       "layer) down to the parameters (symtools.numeric.roundoff); ratio = |residual| / bound. Gradient "
       "identities ⟨g, v_k⟩ per group; Hessian identities per group projected on random directions u, "
       "⟨Hu, v_k⟩ + ⟨u, K_k g⟩, one HVP per direction for all families")


def _mse_one_hot(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of ``outputs`` (N, C) against the one-hot encoding of class indices ``targets``."""
    return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))


_mse_one_hot.term_magnitudes = (_mse_terms, _mse_tangent)


def _norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in d.values()))


class _Family:
    """The groups of one family, their generated code and the ε law of each group set."""

    def __init__(self, name: str, group_sets: list[GroupSet], module, model: nn.Module, bn: str):
        self.name, self.sets, self.module = name, group_sets, module
        norms = dict(model.named_modules())
        self.eps_of = []
        for gs in group_sets:
            names = (gs.epsilon_of,) if isinstance(gs.epsilon_of, str) else tuple(gs.epsilon_of or ())
            found = [(n, norms.get(n)) for n in names]
            # BatchNorm's ε law is a law of batch statistics; running statistics do not scale
            if not names or any(m is None or (isinstance(m, _BatchNorm) and bn != "batch") for _, m in found):
                self.eps_of.append(None)
            else:  # (norm names, their ε, −c) with ⟨g_A, θ_A⟩ = c·Σ_n ε_n·∂L/∂ε_n (c = −2k, derived by the engine)
                dtype = next(model.parameters()).dtype
                eps = tuple(float(m.eps) if rms_epsilon(m, dtype) is None else rms_epsilon(m, dtype)
                            for _, m in found)
                self.eps_of.append((names, eps, -float(gs.epsilon_factor)))

    @property
    def count(self) -> int:
        return sum(gs.count for gs in self.sets)


def _weighted_sum(module, kind: str, gs: GroupSet, params, grads, weight: Mapping[str, Tensor],
                  absolute: bool = False) -> Tensor:
    """Per group: Σ kind(θ, grads)·weight (or Σ |kind|·|weight|) over the group's elements."""
    return _reductions(module, kind, gs, params, grads, [(weight, absolute)])[0]


def _reductions(module, kind: str, gs: GroupSet, params, grads, specs) -> list[Tensor]:
    """Per group, for each ``(weight, absolute)`` of ``specs``: Σ kind·weight, or Σ |kind|·|weight|, from ONE
    evaluation of the generated function per tensor (products in the tensors' dtype, sums in float64; the
    product's own rounding, u·|kind·weight|, is inside every bound's terms)."""
    outs = [torch.zeros(gs.count, dtype=ACC, device=_device(params)) for _ in specs]
    for _, ts, val in groupops.evaluate(module, kind, gs, params, grads):
        magnitude = None
        for out, (weight, absolute) in zip(outs, specs):
            if ts.param not in weight:
                continue
            w = group_view(weight[ts.param], ts)
            if absolute:
                magnitude = val.abs() if magnitude is None else magnitude
                prod = magnitude * w.abs()
            else:
                prod = val * w
            out += prod.sum(dim=1, dtype=ACC)
    return outs


def _device(params) -> torch.device:
    return next(iter(params.values())).device


def _covered(gs: GroupSet, mags: Mapping[str, Tensor]) -> bool:
    return all(ts.param in mags for tensors in gs.slots.values() for ts in tensors)


@ieee_float32()
def check(model: nn.Module, inputs: Tensor, targets: Tensor, symmetries: SymmetryMap, *,
          loss="cross_entropy", bn: str = "batch", weight_decay: float = 0.0, dtype: torch.dtype | None = None,
          seed: int = 0, locate: bool = True, modules: Mapping[str, object] | None = None,
          progress=None, directions: int = DIRECTIONS, per_group: bool = False) -> CheckReport:
    """Check the gradient and Hessian identities of every group in ``symmetries`` on one batch.

    ``model`` is not modified (a copy is converted when ``dtype`` differs). ``modules`` maps a family name to
    its generated code when it is not a built-in (e.g. a module from ``symtools derive --torch``).
    The random directions come from a private ``torch.Generator(seed)``. ``locate`` is accepted for
    compatibility: every group is tested on its own, so failing groups are always located.
    ``per_group``: every group's ratios in the layer results (``gradient_ratios``, ``hessian_ratios``).
    On CUDA the whole check runs with TensorFloat-32 off (:func:`symtools.numeric.precision.ieee_float32`), so a
    float32 check measures float32, not TF32's 10-bit mantissa; the caller's flags are restored afterwards.
    """
    say = progress or (lambda msg: None)
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    model, inputs, targets, loss = _in_check_dtype(model, inputs, targets, loss, dtype)
    precision = _Precision.of(next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    fams = _families(symmetries, modules, model, bn)
    say("gradient, first-order graph and term magnitudes")
    so = SecondOrder(model, inputs, targets, loss=loss, bn=bn, weight_decay=weight_decay, magnitudes=True)
    try:
        first = _FirstOrder.of(so)
        grad_res = _gradient_tests(fams, first)
        hess = _hessian_tests(fams, so, first, precision.bound_rel, directions, gen, say)
    finally:
        so.release()  # the graph and the hooks that close over it
    families = {name: _family_result(fam, grad_res, hess.ratio, hess.rel, precision.bound_rel, precision.gray,
                                     first.mags, directions, per_group) for name, fam in fams.items()}
    report = CheckReport(
        families=families,
        tolerance=precision.describe(),
        settings={"loss": loss_name, "bn": bn, "weight_decay": weight_decay, "batch": int(inputs.shape[0]),
                  "seed": seed, "directions": directions},
        hvps={"verification": so.hvps, "reference": 0, "calibration": 0,
              "per_group_naive": sum(f.groups for f in families.values())},
        loss=float(so.loss),
    )
    if getattr(symmetries, "matrix_sets", None):  # attention heads, linear pairs: symtools.numeric.matrix_checks
        from symtools.numeric.matrix_checks import add_to_report, check_matrix_sets

        add_to_report(report, check_matrix_sets(model, inputs, targets, symmetries.matrix_sets, loss=loss, bn=bn,
                                                weight_decay=weight_decay, seed=seed, directions=directions,
                                                modules=modules, per_group=per_group, progress=progress))
    return report


def _in_check_dtype(model: nn.Module, inputs: Tensor, targets: Tensor, loss, dtype: torch.dtype | None):
    """``(model, inputs, targets, loss)`` ready for the check: a converted copy of the model (and floating inputs)
    when ``dtype`` differs from the model's; for ``"mse"``, class indices become the one-hot MSE loss and
    floating targets take the model's dtype."""
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    dtype = next(model.parameters()).dtype
    if loss == "mse" and not targets.is_floating_point():
        loss = _mse_one_hot  # class indices: MSE of the logits against one-hot targets ("MSE on logits")
    elif loss == "mse" and targets.dtype != dtype:
        targets = targets.to(dtype)
    return model, inputs, targets, loss


@dataclass
class _Precision:
    """The scale of round-off in the check's dtype: the unit round-off u, the relative bound SAFETY·u, and the
    gray zone (ratios in (1, gray] are inconclusive; 1 in float64, where there is none)."""

    dtype: torch.dtype
    unit: float
    bound_rel: float
    gray: float

    @classmethod
    def of(cls, dtype: torch.dtype) -> "_Precision":
        unit = torch.finfo(dtype).eps / 2
        return cls(dtype, unit, SAFETY * unit, 1.0 if dtype == torch.float64 else GRAY)

    def describe(self) -> dict:
        """The report's ``tolerance``."""
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "unit_roundoff": self.unit,
            "safety_factor": SAFETY,
            "relative": self.bound_rel,
            "gradient": self.bound_rel,
            "hessian": self.bound_rel,
            "gray_zone": self.gray,
            "detection_limit": f"a breaking is detected when its residual exceeds {self.bound_rel:.1e} × the size of "
                               f"the terms the identity sums (ratio > {self.gray:g} for a FAIL)",
            "how": HOW,
        }


def _families(symmetries: SymmetryMap, modules: Mapping[str, object] | None, model: nn.Module,
              bn: str) -> dict[str, _Family]:
    """The group sets by family, in order of first appearance, each with its generated code (``modules`` first,
    then the built-in library) and its ε laws."""
    by_family: dict[str, list[GroupSet]] = {}
    for gs in symmetries.group_sets:
        by_family.setdefault(gs.family, []).append(gs)
    return {name: _Family(name, sets, (modules or {}).get(name) or groupops.family_module(name), model, bn)
            for name, sets in by_family.items()}


@dataclass
class _FirstOrder:
    """What the first-order pass hands on: detached parameters, the gradient and the ε gradients, the term
    magnitudes of both, the number of parameter entries and the RMS gradient entry."""

    params: dict[str, Tensor]
    grads: dict[str, Tensor]
    eps_grads: dict[str, Tensor]
    mags: dict[str, Tensor]
    eps_mags: dict[str, Tensor]
    n_el: int
    g_rms: float

    @classmethod
    def of(cls, so: SecondOrder) -> "_FirstOrder":
        params = {k: p.detach() for k, p in so.params.items()}
        grads, eps_grads = so.grad, so.grad_eps
        mags, eps_mags = so.term_magnitudes()
        n_el = max(1, sum(g.numel() for g in grads.values()))
        return cls(params, grads, eps_grads, mags, eps_mags, n_el, _norm(grads) / math.sqrt(n_el))


def _gradient_tests(fams: Mapping[str, _Family], first: _FirstOrder) -> dict[int, tuple]:
    """The gradient identity of every group set: ``{id(gs): (residual, terms, uncorrected residual or None)}``."""
    grad_res = {}
    for fam in fams.values():
        for gs, info in zip(fam.sets, fam.eps_of):
            grad_res[id(gs)] = _gradient_test(fam, gs, info, first.params, first.grads, first.eps_grads, first.mags,
                                              first.eps_mags, first.g_rms)
    return grad_res


class _HessianMaxima:
    """Per group set (by ``id``), the largest ratio (|ρ| / bound) and relative residual (|ρ| / terms) per group
    over the directions tested so far (None before the first)."""

    def __init__(self, fams: Mapping[str, _Family]):
        self.ratio: dict[int, Tensor | None] = {id(gs): None for fam in fams.values() for gs in fam.sets}
        self.rel: dict[int, Tensor | None] = dict(self.ratio)

    def add(self, gs: GroupSet, ratio: Tensor, rel: Tensor) -> None:
        key = id(gs)
        self.ratio[key] = ratio if self.ratio[key] is None else torch.maximum(self.ratio[key], ratio)
        self.rel[key] = rel if self.rel[key] is None else torch.maximum(self.rel[key], rel)


def _hessian_tests(fams: Mapping[str, _Family], so: SecondOrder, first: _FirstOrder, bound_rel: float,
                   directions: int, gen: torch.Generator, say) -> _HessianMaxima:
    """The Hessian identity of every group along ``directions`` random directions, all families per HVP."""
    scale = _direction_scales(first.params, first.n_el)
    maxima = _HessianMaxima(fams)
    for d in range(directions if fams else 0):
        say(f"HVP {d + 1}/{directions}: Hessian identities of every group along a random direction")
        # drawn in float64 whatever the dtype: a float32 check tests the same directions as a float64 one
        u = {k: (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale[k]).to(p.device, p.dtype)
             for k, p in first.params.items()}
        _test_direction(fams, so, first, u, bound_rel, maxima)
    return maxima


def _direction_scales(params: Mapping[str, Tensor], n_el: int) -> dict[str, float]:
    """How far each tensor's entries move along a direction: that tensor's RMS (every layer by a comparable
    relative amount); a tensor that is all zeros (biases at initialisation) by the RMS of all parameters, so
    its groups are tested too."""
    rms = {k: float(p.detach().to(ACC).pow(2).mean().sqrt()) for k, p in params.items()}
    overall = math.sqrt(sum(r * r * params[k].numel() for k, r in rms.items()) / n_el) or 1.0
    return {k: r if r > 0 else overall for k, r in rms.items()}


def _test_direction(fams: Mapping[str, _Family], so: SecondOrder, first: _FirstOrder, u: dict[str, Tensor],
                    bound_rel: float, maxima: _HessianMaxima) -> None:
    """One HVP along ``u``; every group's residual ρ against its terms, folded into ``maxima``."""
    hv, h_eps, mags_h, eps_mags_h = so.tangent_hvp(u)
    hv = {k: v.detach() for k, v in hv.items()}
    hv_rms = _norm(hv) / math.sqrt(first.n_el)
    for fam in fams.values():
        for gs, info in zip(fam.sets, fam.eps_of):
            rho, terms = _hessian_residual(fam, gs, info, first.params, first.grads, hv, h_eps, u, first.mags, mags_h,
                                           eps_mags_h, hv_rms)
            ratio = rho.abs() / (bound_rel * terms).clamp_min(1e-300)
            rel = rho.abs() / terms.clamp_min(1e-300)
            maxima.add(gs, ratio, rel)


def _ones(gs: GroupSet, params) -> dict[str, Tensor]:
    return {ts.param: torch.ones_like(params[ts.param]) for t in gs.slots.values() for ts in t}


def _gradient_residual(fam: _Family, gs: GroupSet, eps_info, params, grads, eps_grads):
    """Per group: (⟨g, v⟩ with the exact ε term removed where the group feeds a norm, the uncorrected ⟨g, v⟩
    or None)."""
    r = _weighted_sum(fam.module, "generator", gs, params, None, grads)
    return _epsilon_corrected(r, gs, eps_info, eps_grads)


def _epsilon_term(gs: GroupSet, eps_info, per_norm: Mapping[str, Tensor], absolute: bool = False) -> Tensor | None:
    """c·Σ_n ε_n·X_n per group (|c|·Σ ε_n·X_n when ``absolute``) for the norms of ``eps_info`` present in
    ``per_norm``; None when none is."""
    names, eps, factor = eps_info
    total = None
    for name, e in zip(names, eps):
        if name in per_norm:
            term = (abs(factor) if absolute else factor) * e * per_norm[name].to(ACC).reshape(-1)
            total = term if total is None else total + term
    return None if total is None else total.expand(gs.count)


def _epsilon_corrected(r: Tensor, gs: GroupSet, eps_info, eps_grads):
    if eps_info is None:
        return r, None
    return r + _epsilon_term(gs, eps_info, eps_grads), r  # ⟨g_A, θ_A⟩ = c·Σ ε·∂L/∂ε


def _gradient_test(fam: _Family, gs: GroupSet, eps_info, params, grads, eps_grads, mags, eps_mags, g_rms):
    """Per group: (residual r, its terms T, the uncorrected residual or None). T = Σ|g·v| + Σ|v|·A (+ |c|ε·E
    for the ε term); a gradient-sized fallback Σ|g·v| + g_rms·Σ|v| for groups touching parameters without
    term magnitudes."""
    covered = _covered(gs, mags)
    r, terms, extra = _reductions(fam.module, "generator", gs, params, None,
                                  [(grads, False), (grads, True), (mags if covered else _ones(gs, params), True)])
    terms = terms + (extra if covered else g_rms * extra)
    r, raw = _epsilon_corrected(r, gs, eps_info, eps_grads)
    extra_eps = None if eps_info is None else _epsilon_term(gs, eps_info, eps_mags, absolute=True)
    if extra_eps is not None:
        terms = terms + extra_eps
    return r, terms, raw


def _hessian_residual(fam: _Family, gs: GroupSet, eps_info, params, grads, hv, h_eps, u, mags, mags_h,
                      eps_mags_h, hv_rms) -> tuple[Tensor, Tensor]:
    """Per group: (ρ = ⟨Hu, v⟩ + ⟨u, K g⟩ (+ the ε term's derivative), its terms T^H = Σ|Hu·v| + Σ|v|·A^H +
    Σ|u·K g| + Σ|u|·|K A| (+ |c|ε·E^H); a gradient-sized fallback without term magnitudes)."""
    covered = _covered(gs, mags) and _covered(gs, mags_h)
    rho, terms, extra = _reductions(fam.module, "generator", gs, params, None,
                                    [(hv, False), (hv, True), (mags_h if covered else _ones(gs, params), True)])
    terms = terms + (extra if covered else hv_rms * extra)
    k_rho, k_terms = _reductions(fam.module, "hessian_coupling", gs, params, grads, [(u, False), (u, True)])
    rho, terms = rho + k_rho, terms + k_terms
    if covered:  # K applied to the gradient's own round-off scale
        terms = terms + _weighted_sum(fam.module, "hessian_coupling", gs, params, mags, u, absolute=True)
    if eps_info is not None:
        d_rho = _epsilon_term(gs, eps_info, h_eps)
        if d_rho is not None:
            rho = rho + d_rho
        d_terms = _epsilon_term(gs, eps_info, eps_mags_h, absolute=True)
        if d_terms is not None:
            terms = terms + d_terms
    return rho, terms


def identity_summaries(worst: Mapping[str, float], counts: Mapping[str, int], bound_rel: float, directions: int,
                       located: list) -> dict[str, dict]:
    """The ``gradient`` and ``hessian`` entries of a family's result from its worst ratios and its counts."""
    return {
        "gradient": {"max_rel_residual": worst["g_rel"], "max_ratio": worst["g_ratio"],
                     "pass": counts["g_fail"] == 0 and counts["g_inc"] == 0, "tolerance": bound_rel,
                     "failing_groups": counts["g_fail"], "inconclusive_groups": counts["g_inc"]},
        "hessian": {"rel_residual": worst["h_rel"], "max_ratio": worst["h_ratio"], "hvps": directions,
                    "pass": counts["h_fail"] == 0 and counts["h_inc"] == 0, "tolerance": bound_rel,
                    "failing_groups": counts["h_fail"], "inconclusive_groups": counts["h_inc"],
                    "located": located, "directions": directions},
    }


def classify(g_ratio: Tensor, h_ratio: Tensor, gray: float, counts: dict[str, int]) -> tuple[list, list, Tensor]:
    """Per group of one set: (failing indices, inconclusive indices, Hessian-failing mask) from the gradient and
    Hessian ratios residual/bound (FAIL above ``gray``, inconclusive in (1, gray]); adds to ``counts``."""
    g_fail, h_fail = g_ratio > gray, h_ratio > gray
    g_inc, h_inc = (g_ratio > 1) & ~g_fail, (h_ratio > 1) & ~h_fail
    failing = torch.nonzero(g_fail | h_fail).flatten().tolist()
    inconclusive = torch.nonzero((g_inc | h_inc) & ~(g_fail | h_fail)).flatten().tolist()
    counts["g_fail"] += int(g_fail.sum())
    counts["g_inc"] += int(g_inc.sum())
    counts["h_fail"] += int(h_fail.sum())
    counts["h_inc"] += int(h_inc.sum())
    return failing, inconclusive, h_fail


def _family_result(fam: _Family, grad_res, hess_ratio, hess_rel, bound_rel, gray, mags, directions,
                   per_group: bool = False) -> FamilyResult:
    layers: list[LayerResult] = []
    counts = {"g_fail": 0, "g_inc": 0, "h_fail": 0, "h_inc": 0}
    worst = {"g_rel": 0.0, "g_ratio": 0.0, "h_rel": 0.0, "h_ratio": 0.0}
    worst_eps = None
    located = []
    for gs in fam.sets:
        r, terms, raw = grad_res[id(gs)]
        g_rel = torch.where(terms > 0, r.abs() / terms.clamp_min(1e-300), torch.zeros_like(r))
        # a NaN or infinite residual or bound (NaN weights, an overflow) is a FAIL, never a quiet 0
        g_rel = torch.where(torch.isfinite(r) & torch.isfinite(terms), g_rel, torch.full_like(g_rel, math.inf))
        g_ratio = g_rel / bound_rel
        h_ratio = hess_ratio[id(gs)] if hess_ratio[id(gs)] is not None else torch.zeros_like(r)
        h_rel = hess_rel[id(gs)] if hess_rel[id(gs)] is not None else torch.zeros_like(r)
        h_ratio, h_rel = (torch.nan_to_num(t, nan=math.inf) for t in (h_ratio, h_rel))
        eps_rel = None
        if raw is not None:
            eps_rel = float((raw.abs() / terms.clamp_min(1e-300)).max()) if raw.numel() else 0.0
            worst_eps = max(worst_eps or 0.0, eps_rel)
        failing, inconclusive, h_fail = classify(g_ratio, h_ratio, gray, counts)
        for j in torch.nonzero(h_fail).flatten().tolist()[:MAX_LOCATED]:
            located.append({"layer": gs.layer, "set": fam.sets.index(gs), "group": j})
        mx = (lambda t: float(t.max()) if t.numel() else 0.0)
        worst["g_rel"], worst["g_ratio"] = max(worst["g_rel"], mx(g_rel)), max(worst["g_ratio"], mx(g_ratio))
        worst["h_rel"], worst["h_ratio"] = max(worst["h_rel"], mx(h_rel)), max(worst["h_ratio"], mx(h_ratio))
        layers.append(LayerResult(gs.layer, fam.name, gs.count, mx(g_rel), mx(h_rel), eps_rel, failing,
                                  bound_rel, inconclusive, mx(g_ratio), mx(h_ratio),
                                  "terms" if _covered(gs, mags) else "gradient-sized",
                                  g_ratio.tolist() if per_group else None, h_ratio.tolist() if per_group else None))
    eps_summary = None
    if worst_eps is not None:
        eps_summary = {"max_rel_breaking": worst_eps,
                       "explained": "⟨g_A, θ_A⟩ = c·ε·∂L/∂ε_A (c = −2k for a path of degree k) for scale groups "
                                    "feeding BatchNorm or LayerNorm; residuals above are after adding this exact term"}
    return FamilyResult(
        family=fam.name, groups=fam.count,
        **identity_summaries(worst, counts, bound_rel, directions, located),
        epsilon=eps_summary, layers=layers)
