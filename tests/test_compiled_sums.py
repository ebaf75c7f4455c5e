"""The compiled reducer: generated C sums of monomials over rows and columns of each tensor, one pass each.

Tolerances: the kernels multiply float32 numbers in double (exact) and add in double, like the float64
reference they are compared with; only the order of the additions differs, so they agree to ~1e-16 of the sum
of absolute values. 1e-13 leaves room for long sums. Each test has a control that must miss by far more.
"""

from __future__ import annotations

import math

import pytest
import torch

from symtools.codegen.emit_c import kernel_arguments, sums_kernel
from symtools.errors import SymtoolsError
from symtools.numeric import native
from symtools.numeric.compiled_sums import CompiledSums, layout_of
from symtools.numeric.flat import Monomial

pytestmark = pytest.mark.skipif(not native.available(), reason="no working C compiler")

THETA2, THETA_G, G2 = Monomial((2, 0, 0, 0, 0)), Monomial((1, 1, 0, 0, 0)), Monomial((0, 2, 0, 0, 0))
ABS_THETA, B_G, D2 = Monomial((1, 0, 0, 0, 0), True), Monomial((0, 1, 1, 0, 0)), Monomial((0, 0, 0, 2, 0))
MONOMIALS = [THETA2, THETA_G, G2, ABS_THETA, B_G, D2]


def _value(m: Monomial, src: dict[str, torch.Tensor]) -> torch.Tensor:
    """The monomial elementwise in float64, from θ, g, b and d = θ − θ_prev (the reference)."""
    x = {"theta": src["theta"], "g": src["g"], "b": src["b"], "d": src["theta"] - src["theta_prev"], "u": None}
    out = torch.ones_like(x["theta"], dtype=torch.float64)
    for name, k in zip(("theta", "g", "b", "d", "u"), m.exponents):
        for _ in range(k):
            out = out * x[name].double()
    return out.abs() if m.absolute else out


def _reference(memberships, sources, width: int, axis_override=None, absolute=False) -> torch.Tensor:
    """R by plain float64 torch: every membership's groups summed directly (``absolute``: Σ|monomial|)."""
    R = torch.zeros(len(MONOMIALS), width, dtype=torch.float64)
    for param, axis, shape, first, mons in memberships:
        src = {k: v[param] for k, v in sources.items()}
        for j in mons:
            val = _value(MONOMIALS[j], src)
            val = val.abs() if absolute else val
            val = val.reshape(shape) if shape is not None else val
            ax = axis if axis_override is None else axis_override
            rows = val.reshape(1, -1) if ax is None else val.movedim(ax, 0).reshape(val.shape[ax], -1)
            per_group = rows.sum(1)
            R[j, first:first + per_group.numel()] += per_group
    return R


def _sources(shapes: dict[str, tuple], dtype, seed=0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {k: {} for k in ("theta", "g", "b", "theta_prev")}
    for name, shape in shapes.items():
        theta = torch.randn(shape, generator=g, dtype=dtype)
        out["theta"][name] = theta
        out["g"][name] = 1e-2 * torch.randn(shape, generator=g, dtype=dtype)
        out["b"][name] = torch.randn(shape, generator=g, dtype=dtype)
        out["theta_prev"][name] = theta + 1e-3 * torch.randn(shape, generator=g, dtype=dtype)
    return out


SHAPES = {"conv": (7, 5, 3, 3), "lin": (6, 9), "bias": (7,), "cube": (3, 4, 5)}
# (parameter, axis, view shape, first column, monomials): a conv weight's rows (scale) and columns (rescale,
# 7 rows: not a multiple of the 4-row blocks), a linear weight both ways, a bias in three families (two of them
# reading the same sums), a whole tensor as one group, and a middle axis of a 3-D tensor (pre = 3, post = 5)
MEMBERSHIPS = [("conv", 0, None, 0, (0, 1, 2, 4)), ("conv", 1, None, 10, (0, 1, 2, 5)),
               ("lin", 0, None, 20, (0, 1, 2)), ("lin", 1, None, 30, (0, 2, 3)),
               ("bias", 0, None, 40, (0, 1, 2)), ("bias", 0, None, 50, (3,)), ("bias", None, None, 60, (3, 1)),
               ("bias", 0, None, 53, (0, 3)),
               ("cube", 1, None, 70, (0, 5, 4))]
WIDTH = 80


def _live(sources):
    return {"": sources["theta"], "g_": sources["g"], "b_": sources["b"], "p_": sources["theta_prev"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_sums_match_a_direct_float64_reduction(dtype, threads):
    sources = _sources(SHAPES, dtype)
    params = sources["theta"]
    sums = CompiledSums(MONOMIALS, MEMBERSHIPS, params, WIDTH)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        R = sums(_live(sources)).clone()
    finally:
        torch.set_num_threads(old)
    assert sums.extra_src is not None  # some sums have two places
    ref = _reference(MEMBERSHIPS, sources, WIDTH)
    size = _reference(MEMBERSHIPS, sources, WIDTH, absolute=True)  # what each sum added up
    assert float(((R - ref).abs() / size.clamp_min(1e-300)).max()) <= 1e-13
    assert float(ref.abs().max()) > 0
    # negative controls, through the same comparison: the conv weight's scale groups one column off, and its
    # rescale groups read along the wrong axis (the reference's), both miss by far
    shifted = [("conv", 0, None, 1, (0, 1, 2, 4))] + MEMBERSHIPS[1:]
    R_wrong = CompiledSums(MONOMIALS, shifted, params, WIDTH)(_live(sources))
    assert float(((R_wrong - ref).abs() / size.clamp_min(1e-300)).max()) > 1e-3
    wrong_axis = _reference(MEMBERSHIPS, sources, WIDTH) - _reference(MEMBERSHIPS[1:2], sources, WIDTH) \
        + _reference(MEMBERSHIPS[1:2], sources, WIDTH, axis_override=0)
    assert float(((R - wrong_axis).abs() / size.clamp_min(1e-300)).max()) > 1e-3


def test_kernels_copy_theta_while_they_read_it():
    sources = _sources(SHAPES, torch.float32, seed=3)
    params = sources["theta"]
    target = {n: torch.full_like(t, math.nan) for n, t in params.items()}
    sums = CompiledSums(MONOMIALS, MEMBERSHIPS, params, WIDTH, copies=list(params))
    assert sums.copied == set(params)
    live = _live(sources)
    sums({**live, "p_": target})
    for n in params:
        assert torch.equal(target[n], params[n])
    # a tensor no kernel reads is not claimed as copied (the caller copies it)
    partial = CompiledSums(MONOMIALS, MEMBERSHIPS[:2], params, WIDTH, copies=list(params))
    assert partial.copied == {"conv"}


def test_displacement_is_formed_in_double():
    """d = θ − θ_prev in double: for float32 numbers of different exponents the float32 difference rounds."""
    theta = {"w": torch.tensor([[1.0 + 2.0**-23, 3.0]], dtype=torch.float32)}
    prev = {"w": torch.tensor([[2.0**-30, 1.0]], dtype=torch.float32)}
    sums = CompiledSums([D2], [("w", 0, None, 0, (0,))], theta, 2)
    R = sums({"": theta, "p_": prev})
    exact = sum((float(a) - float(b)) ** 2 for a, b in zip(theta["w"].flatten(), prev["w"].flatten()))
    assert abs(float(R[0, 0]) - exact) <= 1e-15 * exact  # double round-off (a fused multiply-add may round once)
    rounded = float(((theta["w"] - prev["w"]).double() ** 2).sum())
    assert abs(rounded - exact) > 1e-10 * exact  # control: the float32 difference loses the 2⁻³⁰


def test_layout_and_arguments():
    assert layout_of(None, (4, 5)) == (1, 1, 20)
    assert layout_of(1, (7, 5, 3, 3)) == (7, 5, 9)
    assert kernel_arguments([((0, 0, 0, 2, 0), False)]) == ("theta", "theta_prev")
    assert kernel_arguments([((0, 2, 0, 0, 0), False)], copy=True) == ("theta", "g")
    with pytest.raises(ValueError):
        kernel_arguments([((0, 0, 0, 0, 1), False)])
    text = sums_kernel("k", [((1, 0, 0, 0, 0), True)], {"theta": "float32"}, rows=True, cols=False)
    assert "fabs(theta_0)" in text and "int k(" in text


def test_default_and_clear_errors_without_a_compiler(monkeypatch):
    from symtools.numeric import monitor_plan

    assert monitor_plan.default_reducer(torch.device("cpu")) == "compiled"
    assert monitor_plan.default_reducer(torch.device("meta")) == "flat"
    monkeypatch.setattr(native, "_PROBE", {})
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert not native.available()
    assert "no C compiler" in native.unavailable_reason()
    assert monitor_plan.default_reducer(torch.device("cpu")) == "sites"
    from symtools.nn.graph import find_symmetries
    from symtools.nn.small import cnn
    from symtools.numeric.monitor_plan import FusedPlan, Site

    model = cnn(3, [4], 3, 8, norm="batch")
    sites = [Site(i, gs, gs.family) for i, gs in enumerate(find_symmetries(model, torch.randn(1, 3, 8, 8)).group_sets)]
    with pytest.raises(SymtoolsError, match="C compiler"):
        FusedPlan(sites, {}, dict(model.named_parameters()), "compiled")


def test_wrong_dtype_is_refused():
    params = {"w": torch.randn(3, 4, dtype=torch.float32)}
    sums = CompiledSums([THETA_G], [("w", 0, None, 0, (0,))], params, 3)
    with pytest.raises(SymtoolsError, match="one dtype"):
        sums({"": params, "g_": {"w": torch.randn(3, 4, dtype=torch.float64)}})


def test_plainer_flags_are_used_and_said_when_the_best_ones_fail(monkeypatch):
    """A library that builds only without OpenMP and -march=native still runs (same sums), with a warning."""
    monkeypatch.setattr(native, "FLAG_SETS", (("-O3", "-fno-such-flag-symtools"),) + native.FLAG_SETS[-1:])
    source = "int symtools_plain(int x) { return 2 * x; }\n"
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_FLAGS", {})
    with pytest.warns(UserWarning, match="built with -O3 only"):
        lib = native.load(source)
    assert lib.symtools_plain(21) == 42
    assert native.describe().endswith(" -O3")
