"""Check the identities of matrix families (attention heads, linear pairs) bound to a model, all groups at once.

A matrix family (``symtools.symbolic.library.MATRIX``: attention_qk, attention_vo, gl_linear_pair,
rotation_pair) acts on its slots θ_s by an h×h group element; its generated module
(``symtools.codegen.generated.<family>``) gives, for batched slot matrices ``(groups, rows, cols)``:

    gradient_identity(θ, g) = M_g    with Σ_s ⟨g_s, v_s(X)⟩ = ⟨M_g, X⟩ for every algebra element X,
    charge(θ) = Q                    with Q_X = ⟨Q, X⟩ conserved under gradient flow (when HAS_CHARGE).

The groups of one :class:`~symtools.nn.groups.MatrixGroupSet` are gathered as batched slot matrices
(:mod:`symtools.numeric.matrix_slots`), so every quantity below is one batched matrix product per set, with
no loop over heads. Per group, with E_1 … E_r a basis of the group's Lie algebra (``algebra``: a given basis
of a subalgebra, e.g. the commutant of rotary rotations; None: all of gl_h, r = h², or all of so_h,
r = h(h−1)/2):

- gradient identity: c_k = ⟨M_g(θ, g), E_k⟩ = 0 for every k (gl: every entry of M_g; so: its antisymmetric
  part M_ij − M_ji; a basis: the coefficients ⟨M_g, B_k⟩).
- Hessian identity H v(X) + K_X g = 0 for every X in the algebra, projected on random directions u (one HVP
  H u for all groups of all sets): ρ_k = ⟨Hu, v(E_k)⟩ + ⟨u, K_{E_k} g⟩. Both terms are the gradient identity
  again, because the action is linear in θ: ⟨Hu, v(E)⟩ = ⟨M_g(θ, Hu), E⟩ (M_g is linear in g) and
  ⟨u, K_E g⟩ = ⟨A_E u, g⟩ = ⟨M_g(u, g), E⟩ (K_E g = A_Eᵀ g with v(E) = A_E θ), so
  ρ = M_g(θ, Hu) + M_g(u, g) projected on the algebra — the derivative of the gradient identity along u,
  exactly as for the elementwise families (docs/checker.md § 3). The generated ``hessian_identity_residual``
  gives the same ⟨u, K_E g⟩ (``tests/test_matrix_checks.py`` compares them).

Each coefficient is judged against its own round-off bound, with the conventions of
:mod:`symtools.numeric.checker`: bound = SAFETY · u · T_k, u the unit round-off of the check's dtype, and T_k
the magnitudes of the terms c_k sums: the same bilinear formula on absolute values, slot by slot,
|M|(|θ|, |g| + A) (A: the round-off scale of the gradient entries from
:class:`~symtools.numeric.roundoff.TermMagnitudes`, or the RMS gradient entry where a parameter has none,
marked ``bound: "gradient-sized"``), then |E_k|-weighted. For ρ: |M|(|θ|, |Hu| + A^H) + |M|(|u|, |g| + A).
The products are formed in float64 from the check-dtype tensors (exact products, float64 sums), so the
round-off judged is that of g and Hu. Verdicts as in the checker: ratio = |c| / bound ≤ 1 passes; above 1
fails in float64; below float64 a ratio in (1, GRAY] is inconclusive and only a ratio above GRAY fails.
A group's ratio is its largest over the algebra's coefficients (and over the directions).

Charges (:func:`matrix_charges`): Q per group projected on the algebra. Q_X changes along the flow by
−⟨M_g, X + Xᵀ⟩ (for the library's actions, whose adjoint A_Xᵀ is A_{Xᵀ}), so a component ⟨Q, B_k⟩ is
conserved when B_k + B_kᵀ lies in the algebra, and identically zero when B_k is antisymmetric: with rotary
embeddings only the pair scalings E_ii + E_jj carry a charge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn

from symtools.errors import SymtoolsError
from symtools.nn.groups import MatrixGroupSet
from symtools.numeric.checker import (
    DIRECTIONS,
    MAX_LOCATED,
    CheckReport,
    FamilyResult,
    LayerResult,
    _direction_scales,
    _FirstOrder,
    _in_check_dtype,
    _norm,
    _Precision,
    classify,
    identity_summaries,
)
from symtools.numeric.matrix_slots import SlotLayout, slot_layout
from symtools.numeric.precision import ieee_float32
from symtools.numeric.second_order import SecondOrder

ACC = torch.float64

__all__ = [
    "MatrixCharges",
    "MatrixCheck",
    "MatrixFamilyResult",
    "MatrixLayerResult",
    "add_to_report",
    "algebra_dimension",
    "check_matrix_sets",
    "hessian_coefficients",
    "identity_coefficients",
    "matrix_charges",
]


@dataclass
class MatrixLayerResult(LayerResult):
    """A :class:`LayerResult` for one matrix group set; ``dimension``: the Lie algebra's dimension per group."""

    dimension: int = 0
    algebra: str = ""
    slot_shapes: dict | None = None


@dataclass
class MatrixFamilyResult(FamilyResult):
    """A :class:`FamilyResult` of a matrix family; ``dimension``: Lie algebra dimension summed over its groups
    (the number of scalar gradient identities checked)."""

    dimension: int = 0
    kind: str = "matrix"


class MatrixCheck(dict):
    """``{family: MatrixFamilyResult}`` and :attr:`hvps`, the Hessian-vector products the check made."""

    hvps: int = 0


# -- the algebra of a set


class _Projection:
    """Coefficients of h×h matrices on a set's Lie algebra and their term magnitudes (float64)."""

    def __init__(self, layout: SlotLayout, device: torch.device):
        self.h = layout.h
        self.basis = None if layout.basis is None else layout.basis.to(device)
        self.kind = "basis" if self.basis is not None else layout.module.ALGEBRA
        if self.kind == "so":
            self.iu = torch.triu_indices(self.h, self.h, 1, device=device)

    @property
    def dimension(self) -> int:
        if self.basis is not None:
            return int(self.basis.shape[0])
        return self.h * self.h if self.kind == "gl" else self.h * (self.h - 1) // 2

    def describe(self) -> str:
        if self.basis is not None:
            return f"subalgebra of gl({self.h}), dimension {self.dimension} (given basis)"
        return f"{self.kind}({self.h})"

    def coefficients(self, m: Tensor) -> Tensor:
        """(G, h, h) → (G, r): ⟨m, E_k⟩."""
        if self.basis is not None:
            return torch.einsum("gab,kab->gk", m, self.basis)
        if self.kind == "gl":
            return m.reshape(m.shape[0], -1)
        d = m - m.mT
        return d[:, self.iu[0], self.iu[1]]

    def magnitudes(self, t: Tensor) -> Tensor:
        """(G, h, h) non-negative → (G, r): Σ |E_k| ∘ t."""
        if self.basis is not None:
            return torch.einsum("gab,kab->gk", t, self.basis.abs())
        if self.kind == "gl":
            return t.reshape(t.shape[0], -1)
        s = t + t.mT
        return s[:, self.iu[0], self.iu[1]]


def algebra_dimension(layout: SlotLayout) -> int:
    """Dimension of a set's Lie algebra (per group)."""
    return _Projection(layout, torch.device("cpu")).dimension


def _abs_bilinear(fn, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
    """Σ over slot pairs (t, s) of |fn(a only in slot t, b only in slot s)|: the magnitudes of the terms of a
    bilinear generated function (``gradient_identity``) on non-negative arguments. (Two terms of one slot pair
    with opposite signs would partly cancel here; none of the library's families has such a pair.)"""
    total = None
    zero_a = [torch.zeros_like(x) for x in a]
    zero_b = [torch.zeros_like(x) for x in b]
    for t in range(len(a)):
        for s in range(len(b)):
            args_a = [a[i] if i == t else zero_a[i] for i in range(len(a))]
            args_b = [b[i] if i == s else zero_b[i] for i in range(len(b))]
            part = fn(*args_a, *args_b).abs()
            total = part if total is None else total + part
    return total


def _rel(c: Tensor, terms: Tensor) -> Tensor:
    """Per group: max_k |c_k| / T_k (0 where both vanish, huge where only the terms do)."""
    r = torch.where(terms > 0, c.abs() / terms.clamp_min(1e-300), c.abs() * 1e300)
    r = torch.nan_to_num(r, nan=math.inf)  # a non-finite residual or term (nan weights, overflow) fails
    return r.amax(dim=1) if r.shape[1] else torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)


def identity_coefficients(layout: SlotLayout, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> Tensor:
    """The gradient identity of every group on its algebra, ``(groups, r)``: ⟨M_g(θ, g), E_k⟩ (float64)."""
    theta = tuple(x.to(ACC) for x in layout.assemble_tuple(params))
    g = tuple(x.to(ACC) for x in layout.assemble_tuple(grads))
    return _Projection(layout, theta[0].device).coefficients(layout.module.gradient_identity(*theta, *g))


def hessian_coefficients(layout: SlotLayout, params: Mapping[str, Tensor], grads: Mapping[str, Tensor],
                         direction: Mapping[str, Tensor], hvp: Mapping[str, Tensor]) -> Tensor:
    """The Hessian identity of every group projected on ``direction`` u, on its algebra, ``(groups, r)``:
    ρ_k = ⟨Hu, v(E_k)⟩ + ⟨u, K_{E_k} g⟩ = ⟨M_g(θ, Hu) + M_g(u, g), E_k⟩ (``hvp`` = H u; float64)."""
    gi = layout.module.gradient_identity
    f64 = lambda d: tuple(x.to(ACC) for x in layout.assemble_tuple(d))
    theta, g, u, hu = f64(params), f64(grads), f64(direction), f64(hvp)
    return _Projection(layout, theta[0].device).coefficients(gi(*theta, *hu) + gi(*u, *g))


class _SetTest:
    """The gradient and Hessian tests of one set: relative residuals per group (|c| / terms, largest over the
    algebra's coefficients and the directions)."""

    def __init__(self, layout: SlotLayout, first: _FirstOrder):
        self.layout = layout
        self.module = layout.module
        device = next(iter(first.params.values())).device
        self.proj = _Projection(layout, device)
        f64 = lambda d: tuple(x.to(ACC) for x in layout.assemble_tuple(d))
        self.theta = f64(first.params)
        self.grads = f64(first.grads)
        self.covered = all(n in first.mags for n in layout.params)
        self.a = f64(first.mags) if self.covered else tuple(torch.full_like(t, first.g_rms) for t in self.grads)
        gi = self.module.gradient_identity
        m = gi(*self.theta, *self.grads)
        abs_theta = tuple(t.abs() for t in self.theta)
        terms = _abs_bilinear(gi, abs_theta, tuple(g.abs() + a for g, a in zip(self.grads, self.a)))
        self.grad_rel = _rel(self.proj.coefficients(m), self.proj.magnitudes(terms))
        self.hess_rel: Tensor | None = None
        self._abs_theta = abs_theta

    def direction(self, u: Mapping[str, Tensor], hv: Mapping[str, Tensor], a_h: Mapping[str, Tensor],
                  hv_rms: float) -> None:
        """ρ = M_g(θ, Hu) + M_g(u, g) on the algebra, against its terms; folded into :attr:`hess_rel`."""
        lay, gi = self.layout, self.module.gradient_identity
        uu = tuple(x.to(ACC) for x in lay.assemble_tuple(u))
        hu = tuple(x.to(ACC) for x in lay.assemble_tuple(hv))
        covered = self.covered and all(n in a_h for n in lay.params)
        ah = (tuple(x.to(ACC) for x in lay.assemble_tuple(a_h)) if covered
              else tuple(torch.full_like(t, hv_rms) for t in hu))
        rho = gi(*self.theta, *hu) + gi(*uu, *self.grads)
        abs_u = tuple(x.abs() for x in uu)
        terms = (_abs_bilinear(gi, self._abs_theta, tuple(h.abs() + a for h, a in zip(hu, ah)))
                 + _abs_bilinear(gi, abs_u, tuple(g.abs() + a for g, a in zip(self.grads, self.a))))
        rel = _rel(self.proj.coefficients(rho), self.proj.magnitudes(terms))
        self.hess_rel = rel if self.hess_rel is None else torch.maximum(self.hess_rel, rel)


@ieee_float32()
def check_matrix_sets(model: nn.Module, inputs: Tensor, targets: Tensor, matrix_sets: Iterable[MatrixGroupSet], *,
                      loss="cross_entropy", bn: str = "batch", weight_decay: float = 0.0,
                      dtype: torch.dtype | None = None, seed: int = 0, directions: int = DIRECTIONS,
                      modules: Mapping[str, ModuleType] | None = None, per_group: bool = False,
                      progress=None) -> MatrixCheck:
    """Check the gradient and Hessian identities of every group of ``matrix_sets`` on one batch.

    Returns ``{family: MatrixFamilyResult}`` (one layer result per set; verdicts as in
    :func:`symtools.numeric.checker.check`) with the number of HVPs in ``.hvps``: ``directions`` in all,
    whatever the number of groups and sets. The model is not modified (a copy is converted when ``dtype``
    differs); every set is validated against its parameters before anything is computed (SymtoolsError).
    ``modules``: generated code of families that are not built in. ``loss``, ``bn``, ``weight_decay``, ``seed``,
    ``per_group``: as in :func:`~symtools.numeric.checker.check` (the same ``seed`` draws the same directions).
    """
    say = progress or (lambda msg: None)
    sets = list(matrix_sets)
    out = MatrixCheck()
    if not sets:
        return out
    model, inputs, targets, loss = _in_check_dtype(model, inputs, targets, loss, dtype)
    precision = _Precision.of(next(model.parameters()).dtype)
    shapes = dict(model.named_parameters())
    layouts = [slot_layout(ms, shapes, modules) for ms in sets]
    say(f"matrix families: gradient of {sum(ms.count for ms in sets)} groups in {len(sets)} sets")
    so = SecondOrder(model, inputs, targets, loss=loss, bn=bn, weight_decay=weight_decay, magnitudes=True)
    try:
        first = _FirstOrder.of(so)
        tests = [_SetTest(lay, first) for lay in layouts]
        used = {n for lay in layouts for n in lay.params}
        gen = torch.Generator().manual_seed(seed)
        scale = _direction_scales(first.params, first.n_el)
        for d in range(directions):
            say(f"matrix families: HVP {d + 1}/{directions} along a random direction (every group at once)")
            u = {k: (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale[k]).to(p.device, p.dtype)
                 for k, p in first.params.items()}
            hv, _, a_h, _ = so.tangent_hvp(u)
            a_h = _with_tangent_floor(so, a_h, used)
            hv = {k: v.detach() for k, v in hv.items()}
            hv_rms = _norm(hv) / math.sqrt(first.n_el)
            for t in tests:
                t.direction(u, hv, a_h, hv_rms)
        out.hvps = so.hvps
    finally:
        so.release()
    by_family: dict[str, list[_SetTest]] = {}
    for t in tests:
        by_family.setdefault(t.layout.matrix_set.family, []).append(t)
    for name, fam_tests in by_family.items():
        out[name] = _family_result(name, fam_tests, precision, directions, per_group)
    return out


def _with_tangent_floor(so: SecondOrder, a_h: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
    """A^H of the Linear parameters in ``names``, at least the terms of their own HVP entries.

    :class:`~symtools.numeric.roundoff.TermMagnitudes` gives a layer whose output reaches the loss through no
    recognised consumer (the attention projections: their outputs meet in the score and value products) the
    magnitudes |∂L/∂z| in the first-order sweep but zeros in the tangent one, so the HVP entries of W_Q, W_K
    would be judged by their own size alone (measured: residual/terms ≈ 1.3·u, a ratio of 0.3–0.4 on trained
    attention, in float32 and float64 alike). The floor is the same formula as a Linear site's, with the
    tangent ∂_u(∂L/∂z) recorded by the HVP's hooks: √n·(Σ |∂_u ∂L/∂z| ⊗ |x| + Σ |∂L/∂z| ⊗ |ẋ|) for the
    weight, √n·Σ |∂_u ∂L/∂z| for the bias (n: positions summed per entry); the larger of the two is used."""
    out = dict(a_h)
    floor: dict[str, Tensor] = {}
    for site in (so.magnitudes.sites if so.magnitudes is not None else []):
        wname, bname = f"{site.name}.weight", f"{site.name}.bias"
        if not isinstance(site.module, nn.Linear) or site.dz_dot is None or not ({wname, bname} & names):
            continue
        width = site.dz_dot.shape[-1]
        dzd = site.dz_dot.abs().reshape(-1, width)
        x = site.x.detach()
        aw = dzd.T @ x.abs().reshape(-1, x.shape[-1])
        if site.x_dot is not None and site.dz is not None:
            aw = aw + site.dz.abs().reshape(-1, width).T @ site.x_dot.abs().reshape(-1, x.shape[-1])
        n = math.sqrt(dzd.shape[0])
        for name, val in ((wname, aw * n), (bname, dzd.sum(0) * n)):
            if name in names:
                floor[name] = floor[name] + val if name in floor else val
    for name, val in floor.items():
        if name in out and out[name].shape == val.shape:
            out[name] = torch.maximum(out[name], val)
    return out


def _family_result(name: str, tests: list[_SetTest], precision: _Precision, directions: int,
                   per_group: bool) -> MatrixFamilyResult:
    bound_rel, gray = precision.bound_rel, precision.gray
    layers, located = [], []
    counts = {"g_fail": 0, "g_inc": 0, "h_fail": 0, "h_inc": 0}
    worst = {"g_rel": 0.0, "g_ratio": 0.0, "h_rel": 0.0, "h_ratio": 0.0}
    mx = (lambda t: float(t.max()) if t.numel() else 0.0)
    for i, t in enumerate(tests):
        g_rel = t.grad_rel
        h_rel = t.hess_rel if t.hess_rel is not None else torch.zeros_like(g_rel)
        g_ratio, h_ratio = g_rel / bound_rel, h_rel / bound_rel
        failing, inconclusive, h_fail = classify(g_ratio, h_ratio, gray, counts)
        ms = t.layout.matrix_set
        for j in torch.nonzero(h_fail).flatten().tolist()[:MAX_LOCATED]:
            located.append({"layer": ms.layer, "set": i, "group": j})
        worst["g_rel"], worst["g_ratio"] = max(worst["g_rel"], mx(g_rel)), max(worst["g_ratio"], mx(g_ratio))
        worst["h_rel"], worst["h_ratio"] = max(worst["h_rel"], mx(h_rel)), max(worst["h_ratio"], mx(h_ratio))
        layers.append(MatrixLayerResult(
            ms.layer, name, ms.count, mx(g_rel), mx(h_rel), None, failing, bound_rel, inconclusive, mx(g_ratio),
            mx(h_ratio), "terms" if t.covered else "gradient-sized",
            g_ratio.tolist() if per_group else None, h_ratio.tolist() if per_group else None,
            dimension=t.proj.dimension, algebra=t.proj.describe(),
            slot_shapes={s: list(v) for s, v in t.layout.shapes.items()}))
    return MatrixFamilyResult(
        family=name, groups=sum(t.layout.count for t in tests),
        **identity_summaries(worst, counts, bound_rel, directions, located),
        epsilon=None, layers=layers,
        dimension=sum(t.layout.count * t.proj.dimension for t in tests))


def add_to_report(report: CheckReport, results: MatrixCheck) -> CheckReport:
    """Merge a :func:`check_matrix_sets` result into a checker report: the families (verdict, JSON, table) and
    the HVPs (``hvps["verification"]`` and ``hvps["matrix"]``; ``per_group_naive`` counts one HVP per algebra
    basis element of every group)."""
    for name, fam in results.items():
        if name in report.families:
            raise SymtoolsError(f"family {name!r} is bound both elementwise and as a matrix family")
        report.families[name] = fam
    if results:
        report.hvps["verification"] = report.hvps.get("verification", 0) + results.hvps
        report.hvps["matrix"] = results.hvps
        report.hvps["per_group_naive"] = report.hvps.get("per_group_naive", 0) + sum(f.dimension
                                                                                     for f in results.values())
    return report


# -- charges


@dataclass
class MatrixCharges:
    """The charges of the groups of one matrix set (float64).

    ``values``: with the family's whole algebra, Q per group ``(G, h, h)`` (the generated charge; the
    library's are symmetric, QᵀQ-type differences, so Q is its own symmetric part and every entry is
    conserved); with a basis, ``(G, r)`` the components ⟨Q, B_k⟩. ``conserved`` (basis only, ``(r,)``): the
    component is conserved under gradient flow (B_k + B_kᵀ in the algebra); ``trivial``: identically zero
    (B_k antisymmetric). ``scale``: the magnitudes of the terms of ``values`` (Σ over slots |Q_s(|θ_s|)|),
    the round-off scale of a comparison. ``has_charge`` False: no charge (``reason``, e.g. rotations).
    """

    family: str
    layer: str
    count: int
    algebra: str
    has_charge: bool
    reason: str | None
    values: Tensor | None = None
    scale: Tensor | None = None
    conserved: Tensor | None = None
    trivial: Tensor | None = None

    def describe(self) -> dict:
        """JSON-ready summary: the values per group as nested lists and the component masks."""
        tl = (lambda t: None if t is None else t.tolist())
        return {"family": self.family, "layer": self.layer, "groups": self.count, "algebra": self.algebra,
                "has_charge": self.has_charge, "reason": self.reason, "values": tl(self.values),
                "scale_max": None if self.scale is None else float(self.scale.max()) if self.scale.numel() else 0.0,
                "conserved": tl(self.conserved), "trivial": tl(self.trivial)}


def matrix_charges(params: Mapping[str, Tensor], matrix_set: MatrixGroupSet, *,
                   modules: Mapping[str, ModuleType] | None = None) -> MatrixCharges:
    """The generated charge of every group of ``matrix_set`` (see :class:`MatrixCharges`), from ``params``
    (name → tensor, any float dtype; computed in float64 on their device)."""
    layout = slot_layout(matrix_set, params, modules)
    module = layout.module
    device = next(iter(params[n] for n in layout.params)).device
    proj = _Projection(layout, device)
    base = MatrixCharges(matrix_set.family, matrix_set.layer, matrix_set.count, proj.describe(), False, None)
    if not getattr(module, "HAS_CHARGE", False) or not hasattr(module, "charge"):
        base.reason = getattr(module, "NO_CHARGE_REASON", None) or "the derivation found no charge"
        return base
    theta = tuple(x.detach().to(ACC) for x in layout.assemble_tuple(params))
    q = module.charge(*theta)
    zeros = [torch.zeros_like(t) for t in theta]
    scale = sum(module.charge(*[theta[i].abs() if i == s else zeros[i] for i in range(len(theta))]).abs()
                for s in range(len(theta)))
    base.has_charge = True
    if proj.basis is None:
        base.values, base.scale = q, scale
        return base
    base.values, base.scale = proj.coefficients(q), proj.magnitudes(scale)
    if _adjoint_is_transpose(module, layout):
        b = layout.basis
        sym = b + b.mT
        flat = b.reshape(b.shape[0], -1)
        coef = torch.linalg.lstsq(flat.T, sym.reshape(b.shape[0], -1).T).solution
        miss = (flat.T @ coef - sym.reshape(b.shape[0], -1).T).norm(dim=0)
        size = sym.reshape(b.shape[0], -1).norm(dim=1)
        base.trivial = size <= 1e-12 * float(b.abs().max())
        base.conserved = base.trivial | (miss <= 1e-9 * size)
    return base


def _adjoint_is_transpose(module: ModuleType, layout: SlotLayout) -> bool:
    """Whether A_Xᵀ = A_{Xᵀ} for the family's linear action (v(X) = A_X θ): K_X θ (the generated coupling with
    θ in place of g) against v(Xᵀ) at one random θ and X (a polynomial identity: one generic point decides)."""
    gen = torch.Generator().manual_seed(12)
    theta = [torch.randn((1,) + tuple(s), generator=gen, dtype=ACC) for s in layout.shapes.values()]
    x = torch.randn(layout.h, layout.h, generator=gen, dtype=ACC)
    coupling = module.hessian_identity_residual(x, *theta, *theta, lambda v: tuple(torch.zeros_like(t) for t in v))
    gen_t = module.generator(x.mT, *theta)
    return all(torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max() + 1)) for a, b in zip(coupling, gen_t))
