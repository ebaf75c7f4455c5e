"""Verify every symmetry identity of a model on one batch: gradients per group, Hessians per family.

For each family (translation, scale, rescale, …) with generated code ``M`` and groups k bound to tensors:

- gradient identity, all groups at once: r_k = ⟨g, v_k⟩ (one generated call per slot and tensor, reduced
  per group), relative to the size of its terms Σ|g·v_k|. Scale groups feeding a BatchNorm (or LayerNorm)
  are corrected by the exact ε term: r_k + 2ε_c ∂L/∂ε_c (the uncorrected r_k is reported as the ε-induced
  breaking).
- Hessian identity, the whole family with ONE HVP: the identity H v_k + K_k g = 0 is linear in the group, so
  with random signs s_k = ±1, R = H(Σ s_k v_k) + Σ s_k K_k g (+ the ε term) must vanish. Its size is
  judged against ‖H u‖·‖V‖ + ‖Σ s_k K_k g‖ with u a random unit vector (the reference HVP: what the terms
  would be without cancellation).
- when a family fails, the failing groups are located by adaptive group testing: a failing set of groups is
  split in halves and each half tested with one HVP, so f failures among N groups cost O(f·log N) HVPs
  (at most 2·f·⌈log2 N⌉ + 2 with the first test and one last HVP of the family without the located
  groups, which confirms that nothing else fails and gives the clean layers their own residuals). When the
  gradient identity already fails for more than ``MAX_LOCATED`` groups (a dense failure: eval-mode BN, weight
  decay, MSE on logits), those are listed per layer from the gradient check and only the remaining groups are
  tested (one HVP, bisected only if they fail too).

Tolerances come from the dtype and a measured round-off floor: the gradient recomputed on the batch in
permuted order (the loss is invariant to the order of samples, so any difference is round-off, amplified
where the computation is ill-conditioned). The tolerance is ``SAFETY × max(floor, ε_mach)``: the largest
change of a group's residual (over all groups) for the gradient identities, the whole gradient vector's change for the Hessian
identities. The
calibration is first order (no HVP), so a model with three families costs 4 HVPs in all: the reference
‖H u‖ and one per family.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric import groupops
from symtools.numeric.precision import ieee_float32
from symtools.numeric.second_order import SecondOrder

SAFETY = 100.0  # tolerance = SAFETY × measured round-off floor (never below SAFETY × ε_mach)
MAX_LOCATED = 32  # stop group testing after this many failing groups
CALIBRATION_SAMPLES = 4  # samples of the float64 reference that calibrates a float32 check (vector inputs)
CALIBRATION_IMAGES = 2  # the same for image inputs: BatchNorm's statistics already span N·H·W values


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


@dataclass
class FamilyResult:
    family: str
    groups: int
    gradient: dict
    hessian: dict
    epsilon: dict | None
    layers: list[LayerResult]

    @property
    def passed(self) -> bool:
        return bool(self.gradient["pass"] and self.hessian["pass"])


@dataclass
class CheckReport:
    passed: bool
    families: dict[str, FamilyResult]
    tolerance: dict
    settings: dict
    hvps: dict
    loss: float

    def to_dict(self) -> dict:
        fams = {}
        for name, f in self.families.items():
            d = asdict(f)
            d["pass"] = f.passed
            fams[name] = d
        return {"pass": self.passed, "families": fams, "tolerance": self.tolerance, "settings": self.settings,
                "hvps": self.hvps, "loss": self.loss}


HOW = {
    "permutation": "tolerance = safety × max(measured round-off floor, machine epsilon); the floor is the relative "
                   "change of the same quantity when the batch is evaluated in permuted order: the largest over "
                   "all groups for the gradient identities, and that of the whole gradient vector for the "
                   "Hessian identities (an HVP is the gradient of ⟨g, v⟩)",
    "float64": "tolerance = safety × max(measured round-off floor, machine epsilon), per layer (gradient "
               "identities) and per family (Hessian identities); the floor is the difference between the same "
               "residuals computed in this dtype and in float64 on the first samples of the batch (a genuine "
               "breaking appears in both and cancels); 'gradient' and 'hessian' are the largest tolerances, "
               "each layer's and family's own is in its result",
}


def _mse_one_hot(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of ``outputs`` (N, C) against the one-hot encoding of class indices ``targets``."""
    return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))


def _norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in d.values()))


def _restrict(d: Mapping[str, Tensor], names) -> dict:
    return {k: d[k] for k in names if k in d}


class _Family:
    """The groups of one family and the per-group weights used to combine them."""

    def __init__(self, name: str, group_sets: list[GroupSet], module, model: nn.Module):
        self.name, self.sets, self.module = name, group_sets, module
        eps = {n: float(m.eps) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, nn.LayerNorm))}
        self.eps_of = [(gs.epsilon_of, eps.get(gs.epsilon_of)) if gs.epsilon_of else None for gs in group_sets]

    @property
    def count(self) -> int:
        return sum(gs.count for gs in self.sets)

    def eps_weights(self, weights: Sequence[Tensor], device) -> dict[str, Tensor]:
        """w with ⟨∂L/∂ε, w⟩ = Σ_k s_k·2ε_c ∂L/∂ε_c for the scale groups that feed a BatchNorm."""
        out: dict[str, Tensor] = {}
        for info, w in zip(self.eps_of, weights):
            if info is None:
                continue
            bn, eps = info
            term = 2.0 * eps * w.to(torch.float64)
            out[bn] = out[bn] + term if bn in out else term
        return out

    def residual(self, so: SecondOrder, params, grads, weights, dtype) -> tuple[dict, dict, dict]:
        """(R, H V, K g) for the weighted combination of this family's groups (one HVP)."""
        direction = groupops.combine(self.module, "generator", self.sets, weights, params)
        ew = {k: v.to(dtype) for k, v in self.eps_weights(weights, next(iter(params.values())).device).items()}
        resid = so.hvp(direction, ew or None)
        # K g after the HVP and added tensor by tensor: fewer parameter-sized tensors alive at the peak
        coupling = groupops.combine(self.module, "hessian_coupling", self.sets, weights, params, grads)
        for k, c in coupling.items():
            resid[k] = resid[k] + c
        return resid, direction, coupling


@ieee_float32()
def check(model: nn.Module, inputs: Tensor, targets: Tensor, symmetries: SymmetryMap, *,
          loss="cross_entropy", bn: str = "batch", weight_decay: float = 0.0, dtype: torch.dtype | None = None,
          seed: int = 0, locate: bool = True, modules: Mapping[str, object] | None = None,
          progress=None, calibration: str | None = None) -> CheckReport:
    """Check the gradient and Hessian identities of every group in ``symmetries`` on one batch.

    ``model`` is not modified (a copy is converted when ``dtype`` differs). ``modules`` maps a family name to
    its generated code when it is not a built-in (e.g. a module from ``symtools derive --torch``).
    Random signs and the reference direction come from a private ``torch.Generator(seed)``.
    ``calibration``: how the round-off floors are measured — ``"permutation"`` (the batch in another order;
    the default in float64) or ``"float64"`` (the same residuals against a float64 copy on the first
    :data:`CALIBRATION_SAMPLES` samples; the default in lower precisions, whose permuted-batch floor is
    loose: on VGG-16-BN in float32 it is ~1e-3, while genuine residuals sit at ~1e-7).
    On CUDA the whole check runs with TensorFloat-32 off (:func:`symtools.numeric.precision.ieee_float32`), so a
    float32 check measures float32, not TF32's 10-bit mantissa; the caller's flags are restored afterwards.
    """
    say = progress or (lambda msg: None)
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    dtype = next(model.parameters()).dtype
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    if loss == "mse" and not targets.is_floating_point():
        loss = _mse_one_hot  # class indices: MSE of the logits against one-hot targets ("MSE on logits")
    elif loss == "mse" and targets.dtype != dtype:
        targets = targets.to(dtype)
    machine_eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(seed)

    families: dict[str, FamilyResult] = {}
    by_family: dict[str, list[GroupSet]] = {}
    for gs in symmetries.group_sets:
        by_family.setdefault(gs.family, []).append(gs)
    fam_objs = {}
    batch_norms = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    for name, sets in by_family.items():
        module = (modules or {}).get(name) or groupops.family_module(name)
        fam_objs[name] = _Family(name, sets, module, model)
        if bn != "batch":  # BatchNorm's ε law is a law of batch statistics; running statistics do not scale
            fam_objs[name].eps_of = [None if info is None or info[0] in batch_norms else info
                                     for info in fam_objs[name].eps_of]

    biases = _forced_zero_biases(fam_objs, model)
    if calibration is None:
        calibration = "permutation" if dtype == torch.float64 else "float64"
    if calibration not in ("permutation", "float64"):
        raise ValueError(f"calibration must be 'permutation' or 'float64', not {calibration!r}")
    calib_hvps = 0
    if calibration == "permutation":
        # Round-off floor: the same batch in another order, first order only (no graph kept, no HVP). Of its
        # gradient only the per-group residuals and the gradient itself (for the vector-level floor) are kept.
        say("round-off floor (permuted batch, gradient only)")
        perm = torch.randperm(inputs.shape[0], generator=gen).to(inputs.device)
        if inputs.shape[0] > 1 and bool((perm.cpu() == torch.arange(inputs.shape[0])).all()):
            perm = torch.roll(perm, 1)
        so_perm = SecondOrder(model, inputs[perm], targets[perm], loss=loss, bn=bn, weight_decay=weight_decay,
                              create_graph=False, bias_term_sizes=biases)
        params = {k: p.detach() for k, p in so_perm.params.items()}
        grads_perm = so_perm.grad
        del so_perm
        r_perm = [groupops.gradient_terms(fam.module, gs, params, grads_perm)[0]
                  for fam in fam_objs.values() for gs in fam.sets]
    else:
        # Round-off floors of this precision, measured against float64 on the first few samples
        say(f"round-off floors ({str(dtype).replace('torch.', '')} against float64 on "
            f"{_calibration_samples(inputs)} samples)")
        set_floor, fam_floor, calib_hvps = _precision_floors(model, inputs, targets, fam_objs, biases, loss=loss, bn=bn,
                                                             weight_decay=weight_decay, dtype=dtype, gen=gen)

    say("gradient and first-order graph")
    so = SecondOrder(model, inputs, targets, loss=loss, bn=bn, weight_decay=weight_decay, bias_term_sizes=biases)
    params = {k: p.detach() for k, p in so.params.items()}
    grads = so.grad
    eps_grads = so.grad_eps
    g_norm = _norm(grads)
    sets = [(fam, gs) for fam in fam_objs.values() for gs in fam.sets]
    if calibration == "permutation":
        # Hessian floor: the relative change of the whole gradient vector under the permutation. An HVP is the
        # gradient of ⟨g, v⟩, computed by the same kernels one order up; measured on VGG-16-BN (docs/checker.md)
        # the permuted-batch change of H u is the same size as that of g (float32: 1.1e-3 vs 1.5e-3).
        floor_h = math.sqrt(sum(float((grads[k] - grads_perm.pop(k)).to(torch.float64).pow(2).sum())
                                for k in list(grads_perm))) / max(g_norm, 1e-300)
        del grads_perm
    say("reference HVP (size of H)")
    u = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in params.items()}
    un = _norm(u)
    u = {k: v / un for k, v in u.items()}
    hu = so.hvp(u)
    del u
    hu_norm = _norm(hu)
    del hu

    g_rms = g_norm / math.sqrt(max(1, sum(g.numel() for g in grads.values())))
    if calibration == "permutation":
        # gradient floor: the largest change of a group's relative residual under the permutation, over all
        # groups of all families. Per-layer and per-family floors were tried and are unsafe (the CLI test on
        # VGG-11-BN fails with either): a group's round-off has a part common to both orders (e.g. a bias
        # feeding BatchNorm, whose gradient is pure round-off), so within a layer or a family the change under
        # permutation can be below the residual itself; over all groups the largest change bounds every
        # residual with margin (300 random networks in tests/test_checker.py).
        floor_g = 0.0
        for (fam, gs), rp in zip(sets, r_perm):
            r, s = groupops.gradient_terms(fam.module, gs, params, grads, g_rms, so.term_sizes)
            if gs.count:
                floor_g = max(floor_g, float(((r - rp).abs() / s.clamp_min(1e-300)).max()))
        tol_sets = {id(gs): SAFETY * max(floor_g, machine_eps) for _, gs in sets}
        tol_fams = {name: SAFETY * max(floor_h, machine_eps) for name in fam_objs}
    else:
        # against a float64 reference the floors are those of each layer and family themselves: no common
        # part cancels (the reference is exact to ~1e-16), so nothing needs pooling across layers
        # a set whose groups had no terms on the calibration samples takes its family's largest floor
        fam_max = {fam.name: max((set_floor[id(gs)] or 0.0 for gs in fam.sets), default=0.0)
                   for fam in fam_objs.values()}
        set_floor = {id(gs): fam_max[fam.name] if set_floor[id(gs)] is None else set_floor[id(gs)] for fam, gs in sets}
        floor_g, floor_h = max(set_floor.values(), default=0.0), max(fam_floor.values(), default=0.0)
        tol_sets = {id(gs): SAFETY * max(set_floor[id(gs)], machine_eps) for _, gs in sets}
        tol_fams = {name: SAFETY * max(f, machine_eps) for name, f in fam_floor.items()}
    tol_g = max(tol_sets.values(), default=SAFETY * machine_eps)
    tol_h = max(tol_fams.values(), default=SAFETY * machine_eps)

    for name, fam in fam_objs.items():
        say(f"{name}: {fam.count} groups")
        families[name] = _check_family(fam, so, params, grads, eps_grads, hu_norm, tol_sets, tol_fams[name], gen,
                                       locate, dtype, g_rms)

    report = CheckReport(
        passed=all(f.passed for f in families.values()),
        families=families,
        tolerance={
            "dtype": str(dtype).replace("torch.", ""),
            "machine_epsilon": machine_eps,
            "safety_factor": SAFETY,
            "gradient_roundoff_floor": floor_g,
            "hessian_roundoff_floor": floor_h,
            "gradient": tol_g,
            "hessian": tol_h,
            # a relative gradient residual is ≤ 1 by construction (|Σ g·v| ≤ Σ|g·v|): with a tolerance ≥ 1 the
            # gradient identities cannot fail, and the check says so instead of reporting a PASS it cannot earn
            "gradient_resolved": tol_g < 1.0,
            "unresolved_layers": sorted({gs.layer for _, gs in sets if tol_sets[id(gs)] >= 1.0}),
            "calibration": calibration,
            "how": HOW[calibration],
        },
        settings={"loss": loss_name, "bn": bn, "weight_decay": weight_decay, "batch": int(inputs.shape[0]),
                  "seed": seed, "calibration_samples": (_calibration_samples(inputs) if calibration == "float64"
                                                        else None)},
        hvps={"verification": sum(f.hessian["hvps"] for f in families.values()),
              "reference": 1, "calibration": calib_hvps, "per_group_naive": sum(f.groups for f in families.values())},
        loss=float(so.loss),
    )
    return report


def _corrected(fam: _Family, gs: GroupSet, eps_info, params, grads, eps_grads, g_rms, sizes=None):
    """Per group of ``gs``: (⟨g, v⟩ with the exact ε term added where the group feeds a norm, its scale,
    the raw ε breaking relative to the scale or None). ``sizes``: :attr:`SecondOrder.term_sizes`."""
    r, s = groupops.gradient_terms(fam.module, gs, params, grads, g_rms, sizes)
    raw = None
    if eps_info is not None:
        bn, eps = eps_info
        raw = r.abs() / s.clamp_min(1e-300)  # the breaking, before correction
        r = r + 2.0 * eps * eps_grads[bn].to(torch.float64)  # ⟨g_A, θ_A⟩ = −2ε ∂L/∂ε
    return r, s, raw


def _forced_zero_biases(fam_objs: dict, model: nn.Module) -> list[str]:
    """Bias parameters forming groups of one element each (e.g. the translation of a bias feeding BatchNorm):
    the identity forces their gradient to vanish, so what is computed is round-off of a sum over the batch
    and positions, and its scale is the size of those terms (:attr:`SecondOrder.term_sizes`) — not the
    gradient, and not the permuted-batch change, which misses the round-off common to both orders."""
    params = dict(model.named_parameters())
    out = {}
    for fam in fam_objs.values():
        for gs in fam.sets:
            if groupops.elements_per_group(gs, params) == 1:
                out.update((ts.param, None) for tensors in gs.slots.values() for ts in tensors
                           if ts.param.rpartition(".")[2] == "bias")
    return list(out)


def _calibration_samples(inputs: Tensor) -> int:
    """Samples of the float64 calibration: fewer for images of ≥ 8×8 pixels, whose BatchNorm statistics span
    N·H·W values (and whose float64 HVPs are the calibration's cost: ~4 s per sample on VGG-16-BN, 2 cores)."""
    images = inputs.dim() > 2 and inputs[0, 0].numel() >= 64
    return min(CALIBRATION_IMAGES if images else CALIBRATION_SAMPLES, int(inputs.shape[0]))


def _precision_floors(model: nn.Module, inputs: Tensor, targets: Tensor, fam_objs: dict, biases, *, loss, bn: str,
                      weight_decay: float, dtype: torch.dtype, gen: torch.Generator):
    """Round-off floors of a low-precision check, measured against float64 on the first samples.

    The same residuals — per-group gradient residuals (ε-corrected) and each family's Hessian residual
    R = H V + ∂θ(ε term) + K g for one set of random signs — are computed on the first
    :data:`CALIBRATION_SAMPLES` samples twice: in ``dtype`` and in float64 (a float64 copy of the model). The
    float64 values are exact to ~1e-16, so their difference is the round-off of ``dtype`` in these very
    quantities; a genuine breaking appears in both and cancels. (:data:`CALIBRATION_IMAGES` samples for
    image inputs. One reference HVP, in ``dtype``, sizes H for both.) Returns (per group set: the largest
    |r_dtype − r_64| / s over its groups; per family: ‖R_dtype − R_64‖ / scale; the HVPs used).
    """
    n = _calibration_samples(inputs)
    x, y = inputs[:n], targets[:n]
    signs = {name: [(torch.randint(0, 2, (gs.count,), generator=gen) * 2 - 1).to(torch.float64)
                    for gs in fam.sets] for name, fam in fam_objs.items()}
    u_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    runs = []
    for dt in (dtype, torch.float64):
        m = model if dt == dtype else copy.deepcopy(model).to(torch.float64)
        xx = x.to(dt) if x.is_floating_point() else x
        yy = y.to(dt) if y.is_floating_point() else y
        so = SecondOrder(m, xx, yy, loss=loss, bn=bn, weight_decay=weight_decay, bias_term_sizes=biases)
        params = {k: p.detach() for k, p in so.params.items()}
        grads, eps_grads = so.grad, so.grad_eps
        g_rms = _norm(grads) / math.sqrt(max(1, sum(g.numel() for g in grads.values())))
        sets = {id(gs): _corrected(fam, gs, info, params, grads, eps_grads, g_rms, so.term_sizes)[:2]
                for fam in fam_objs.values() for gs, info in zip(fam.sets, fam.eps_of)}
        if dt == dtype:  # the size of H, for the scale of the relative floors (the float64 run reuses it)
            ug = torch.Generator().manual_seed(u_seed)
            u = {k: torch.randn(p.shape, generator=ug, dtype=p.dtype).to(p.device) for k, p in params.items()}
            un = _norm(u)
            hu_norm = _norm(so.hvp({k: v / un for k, v in u.items()}))
            del u
        fams = {}
        for name, fam in fam_objs.items():
            w = [t.to(next(iter(params.values())).device) for t in signs[name]]
            resid, direction, coupling = fam.residual(so, params, grads, w, dt)
            scale = hu_norm * _norm(direction) + _norm(coupling)
            fams[name] = ({k: v.detach().to(torch.float64) for k, v in resid.items()}, scale)
        runs.append((sets, fams, so.hvps))
        del so, params, grads
    (sets_lo, fams_lo, hvps_lo), (sets_64, fams_64, hvps_64) = runs
    set_floor = {}
    for key, (r, s) in sets_lo.items():
        r64 = sets_64[key][0]
        d = (r - r64).abs() / s.clamp_min(1e-300)
        # None: no group of the set had terms on these samples (e.g. units dead on them), nothing measured
        set_floor[key] = float(torch.where(s > 0, d, torch.zeros_like(d)).max()) if bool((s > 0).any()) else None
    fam_floor = {}
    for name, (resid, scale) in fams_lo.items():
        r64 = fams_64[name][0]
        diff = math.sqrt(sum(float((resid[k] - r64[k]).pow(2).sum()) for k in resid))
        fam_floor[name] = diff / scale if scale > 0 else 0.0
    return set_floor, fam_floor, hvps_lo + hvps_64


def _check_family(fam: _Family, so, params, grads, eps_grads, hu_norm, tol_sets, tol_h, gen, locate, dtype, g_rms):
    device = next(iter(params.values())).device
    layers: list[LayerResult] = []
    worst_g, worst_raw_eps, n_failing_g = 0.0, None, 0
    grad_failing: list[tuple[int, int]] = []  # (set, index) of every group failing the gradient identity
    tol_g = max((tol_sets[id(gs)] for gs in fam.sets), default=0.0)
    all_pass_g = True
    for gs, eps_info in zip(fam.sets, fam.eps_of):
        tol_layer = tol_sets[id(gs)]
        r, s, raw = _corrected(fam, gs, eps_info, params, grads, eps_grads, g_rms, so.term_sizes)
        eps_rel = None
        if raw is not None:
            eps_rel = float(raw.max()) if raw.numel() else 0.0
            worst_raw_eps = max(worst_raw_eps or 0.0, eps_rel)
        rel = (r.abs() / s.clamp_min(1e-300))
        rel = torch.where(s > 0, rel, torch.zeros_like(rel))
        gmax = float(rel.max()) if rel.numel() else 0.0
        worst_g = max(worst_g, gmax)
        failing = torch.nonzero(rel > tol_layer).flatten().tolist()
        all_pass_g &= not failing
        n_failing_g += len(failing)
        grad_failing += [(len(layers), j) for j in failing]
        layers.append(LayerResult(gs.layer, fam.name, gs.count, gmax, float("nan"), eps_rel, failing[:MAX_LOCATED],
                                  tol_layer))

    weights = [(torch.randint(0, 2, (gs.count,), generator=gen) * 2 - 1).to(torch.float64).to(device)
               for gs in fam.sets]
    hvps_before = so.hvps
    resid, direction, coupling = fam.residual(so, params, grads, weights, dtype)
    scale = hu_norm * _norm(direction) + _norm(coupling)
    h_rel = _norm(resid) / scale if scale > 0 else 0.0
    for lr, gs in zip(layers, fam.sets):
        names = gs.params()
        sc = hu_norm * _norm(_restrict(direction, names)) + _norm(_restrict(coupling, names))
        lr.hessian_rel = _norm(_restrict(resid, names)) / sc if sc > 0 else 0.0
    h_pass = h_rel <= tol_h
    located: list[dict] = []
    rest_rel, excluded = None, []
    if not h_pass and locate:
        rest_result = None
        if len(grad_failing) > MAX_LOCATED:
            # Dense failure: the gradient identity already names more failing groups than group testing would
            # list (its cost grows ~2 HVPs per listed group). Test the family without them (one HVP) and locate
            # only Hessian failures among the groups that pass the gradient identity.
            excluded = grad_failing
            rest_result = _relative(fam, so, params, grads, _without(weights, excluded), hu_norm, dtype)
            if rest_result[0] > tol_h:
                skip = set(excluded)
                others = [(i, j) for i, gs in enumerate(fam.sets) for j in range(gs.count) if (i, j) not in skip]
                located = _locate(fam, so, params, grads, weights, hu_norm, tol_h, dtype, others)
                rest_result = None
        else:
            located = _locate(fam, so, params, grads, weights, hu_norm, tol_h, dtype)
        for item in located:
            lr = layers[item["set"]]
            if item["index"] not in lr.failing and len(lr.failing) < MAX_LOCATED:
                lr.failing.append(item["index"])
        if rest_result is None:
            # One more HVP: the family without the located (and excluded) groups. It confirms that the rest
            # passes (all failures found) and gives exact per-layer numbers for the clean layers, which the
            # family's residual above mixes with the H v of failing groups elsewhere (H v_k is not confined
            # to group k).
            rest = _without(weights, excluded + [(item["set"], item["index"]) for item in located])
            rest_result = _relative(fam, so, params, grads, rest, hu_norm, dtype)
        rest_rel, resid_r, direction_r, coupling_r = rest_result
        for lr, gs in zip(layers, fam.sets):
            if not lr.failing:
                names = gs.params()
                sc = hu_norm * _norm(_restrict(direction_r, names)) + _norm(_restrict(coupling_r, names))
                lr.hessian_rel = _norm(_restrict(resid_r, names)) / sc if sc > 0 else 0.0
    eps_summary = None
    if worst_raw_eps is not None:
        eps_summary = {"max_rel_breaking": worst_raw_eps,
                       "explained": "⟨g_A, θ_A⟩ = −2ε ∂L/∂ε_A for scale groups feeding BatchNorm or LayerNorm; "
                                    "residuals above are after adding this exact term"}
    return FamilyResult(
        family=fam.name, groups=fam.count,
        gradient={"max_rel_residual": worst_g, "pass": all_pass_g, "tolerance": tol_g,
                  "failing_groups": n_failing_g},
        hessian={"rel_residual": h_rel, "hvps": so.hvps - hvps_before, "pass": bool(h_pass), "tolerance": tol_h,
                 "located": [{"layer": fam.sets[i["set"]].layer, "set": i["set"], "group": i["index"]}
                             for i in located],
                 "rest_rel_residual": rest_rel, "not_located": len(excluded)},
        epsilon=eps_summary, layers=layers)


def _without(weights: Sequence[Tensor], members) -> list[Tensor]:
    """The per-set weights with the groups ``members`` ((set, index) pairs) set to 0."""
    out = [w.clone() for w in weights]
    for i, j in members:
        out[i][j] = 0.0
    return out


def _relative(fam: _Family, so, params, grads, weights, hu_norm, dtype):
    """(relative residual, R, V, K g) of the Hessian identity for one weighted combination (one HVP)."""
    resid, direction, coupling = fam.residual(so, params, grads, weights, dtype)
    scale = hu_norm * _norm(direction) + _norm(coupling)
    return (_norm(resid) / scale if scale > 0 else 0.0), resid, direction, coupling


def _locate(fam: _Family, so, params, grads, weights, hu_norm, tol_h, dtype, members=None) -> list[dict]:
    """Adaptive group testing: split failing sets of groups in halves until single failing groups remain.

    ``members`` ((set, index) pairs; default: the whole family) must be known to fail as a whole.
    """
    if members is None:
        members = [(i, j) for i, gs in enumerate(fam.sets) for j in range(gs.count)]
    found: list[dict] = []

    def test(subset) -> bool:
        w = [torch.zeros_like(x) for x in weights]
        for i, j in subset:
            w[i][j] = weights[i][j]
        return _relative(fam, so, params, grads, w, hu_norm, dtype)[0] > tol_h

    stack = [members]
    first = True
    while stack and len(found) < MAX_LOCATED:
        subset = stack.pop()
        if not first and not test(subset):
            continue
        first = False  # the whole family is already known to fail
        if len(subset) == 1:
            found.append({"set": subset[0][0], "index": subset[0][1]})
            continue
        half = len(subset) // 2
        stack += [subset[half:], subset[:half]]
    return found
