"""Matrix families bound to a model (symtools.numeric.matrix_slots, symtools.numeric.matrix_checks): the
attention heads of a small causal self-attention model, checked all groups at once.

The model (:class:`TinyAttention`, float64): token embedding → separate q/k/v/o ``nn.Linear`` projections
(with or without biases; H query heads, K key/value heads, head size dh, grouped-query attention: query head
i reads key/value head i // (H/K)), optional rotate-half rotary embeddings, causal softmax attention, a
residual add, an optional ReLU MLP, a final Linear to the logits, cross-entropy against random next-token
classes. The sets are bound by hand as in the binding's documentation: one attention_qk group per key/value
head j (W_Q = its query heads stacked as rows, each weight block transposed with its bias row; W_K = key head j
+ bias row), one attention_vo group per j (W_V = value head j + bias row; W_O = the output projection's column
blocks of those query heads side by side); with RoPE the QK algebra is the commutant of the rotations.

What is asserted, and why:

* positive: every bound group passes, in float64 (largest ratio residual/bound measured 0.037 on these
  models; 0.093 over 300 random configurations in float64 and 0.076 in float32; ≤ 0.023 on a d=16 model
  trained to loss 0.02, docs/checker.md "Matrix families"), with exactly ``directions`` HVPs whatever the
  number of groups; a hypothesis property over random configurations (heads, kv heads, head size, bias, RoPE,
  MLP) asserts every ratio ≤ 1.
* negative controls, each failing exactly the groups the math says are broken (ratios 1e12–1e14, i.e. O(1e-3
  –1) relative residuals against a 1e-15 bound) and passing every other group of the same model:

  ==========================================  =================================================================
  broken on purpose                           fails (and why)
  ==========================================  =================================================================
  tanh on the queries of head 0 only          QK group 0 (head 0's key/value group): tanh(x W_Q G) ≠ tanh(x W_Q)G;
                                              QK group 1 and every VO group pass
  RoPE bound with the whole gl algebra         every QK group: G must commute with the rotations R_m; the commutant
                                              basis (scaled rotations of each pair) passes on the same model
  position-dependent key bias after RoPE      QK group 0 (the bias is on key head 0): the score gains
  (kv head 0)                                 x_m W_Q R_m p_nᵀ, which depends on the key position n, and W_Q → W_Q G
                                              changes it. A constant key bias after RoPE gives x_m W_Q R_m bᵀ, the
                                              same for every key: the softmax over keys removes it, so it passes
                                              (the bias's gradient is exactly zero)
  GQA heads bound as independent groups        every group: the identity holds for the sum over the query heads
                                              sharing a key/value head, not for each head
  ==========================================  =================================================================

* the Hessian coefficient ρ is the derivative of the gradient identity along u (central differences, broken
  model), ⟨u, K_E g⟩ from the generated ``hessian_identity_residual`` equals the bilinear form the check uses,
  and the scatter of the generator v(E) used as an HVP direction satisfies H v(E) + K_E g = 0.
* charges: plain gradient descent with lr η changes the attention charges by O(η²) (×100 from η = 1e-4 to
  1e-3) and the query norm by O(η) (×10); measured ratio Δcharge/Δnorm after 3 steps at η = 1e-3: 2.4e-4 (QK),
  7.1e-4 (VO); one step changes Q by exactly η²·Q(g).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from symtools.audit.charges import matrix_group_charges
from symtools.audit.report import render_table as render_audit
from symtools.cli.check import render_table
from symtools.errors import SymtoolsError
from symtools.nn.groups import MatrixGroupSet, MatrixPiece, SymmetryMap
from symtools.numeric.checker import check
from symtools.numeric.matrix_checks import (
    MatrixFamilyResult,
    check_matrix_sets,
    hessian_coefficients,
    identity_coefficients,
    matrix_charges,
)
from symtools.numeric.matrix_slots import (
    attention_matrix_sets,
    rotate_half_commutant,
    slot_layout,
)
from symtools.numeric.second_order import SecondOrder

pytestmark = pytest.mark.usefixtures("one_thread")

D, VOCAB, CLASSES, T, BATCH = 8, 11, 5, 6, 3


class TinyAttention(nn.Module):
    """Causal self-attention with GQA (see the module docstring); ``tanh_q0``, ``key_bias_after_rope``
    ("position" or "constant", on key head 0) are the negative controls."""

    def __init__(self, heads=4, kv_heads=2, dh=4, bias=True, rope=False, mlp=True, tanh_q0=False,
                 key_bias_after_rope=None, d=D):
        super().__init__()
        self.h, self.kv, self.dh, self.rope, self.tanh_q0 = heads, kv_heads, dh, rope, tanh_q0
        self.embed = nn.Embedding(VOCAB, d)
        self.q = nn.Linear(d, heads * dh, bias=bias)
        self.k = nn.Linear(d, kv_heads * dh, bias=bias)
        self.v = nn.Linear(d, kv_heads * dh, bias=bias)
        self.o = nn.Linear(heads * dh, d, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)) if mlp else None
        self.out = nn.Linear(d, CLASSES)
        self.key_bias = None
        if key_bias_after_rope == "position":
            self.key_bias = nn.Parameter(torch.randn(T, dh))
        elif key_bias_after_rope == "constant":
            self.key_bias = nn.Parameter(torch.randn(1, dh))

    def _rotary(self, t):
        half = self.dh // 2
        freq = 10.0 ** (-torch.arange(half, dtype=t.dtype) / half)  # distinct frequencies 1, 10^(-1/half), …
        ang = torch.arange(t.shape[-2], dtype=t.dtype)[:, None] * freq[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin  # rotate-half: pairs (i, i + half)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.dh).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.dh).transpose(1, 2)
        if self.tanh_q0:
            q = torch.cat([torch.tanh(q[:, :1]), q[:, 1:]], 1)
        if self.rope:
            q, k = self._rotary(q), self._rotary(k)
        if self.key_bias is not None:
            k = torch.cat([k[:, :1] + self.key_bias[:n] if self.key_bias.shape[0] > 1 else k[:, :1] + self.key_bias,
                           k[:, 1:]], 1)
        r = self.h // self.kv
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        s = (q @ k.mT / math.sqrt(self.dh)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        x = x + self.o((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, -1))
        if self.mlp is not None:
            x = x + self.mlp(x)
        return self.out(x).reshape(b * n, -1)


def build(seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyAttention(**kw).double()
        tokens = torch.randint(0, VOCAB, (BATCH, T))
        targets = torch.randint(0, CLASSES, (BATCH * T,))
    return model, tokens, targets


def sets_for(model: TinyAttention, qk_algebra="auto"):
    bias = model.q.bias is not None
    algebra = (rotate_half_commutant(model.dh) if model.rope else None) if qk_algebra == "auto" else qk_algebra
    return list(attention_matrix_sets("attn", "q", "k", "v", "o", heads=model.h, kv_heads=model.kv,
                                      head_dim=model.dh, bias=bias, qk_algebra=algebra))


def failing(res, family):
    return {(lr.layer, j) for lr in res[family].layers for j in lr.failing}


# -- the binding


def test_binding_helper_is_the_documented_hand_binding():
    """attention_matrix_sets writes, for H=4, K=2, dh=4 with biases, exactly the binding of the documentation."""
    dh = 4

    def q_head(i):
        return (MatrixPiece("q.weight", rows=(i * dh, (i + 1) * dh), transpose=True),
                MatrixPiece("q.bias", cols=(i * dh, (i + 1) * dh)))

    def kv_head(name, j):
        return (MatrixPiece(f"{name}.weight", rows=(j * dh, (j + 1) * dh), transpose=True),
                MatrixPiece(f"{name}.bias", cols=(j * dh, (j + 1) * dh)))

    qk = MatrixGroupSet("attention_qk", "attn", (
        {"W_Q": q_head(0) + q_head(1), "W_K": kv_head("k", 0)},
        {"W_Q": q_head(2) + q_head(3), "W_K": kv_head("k", 1)}), {"W_Q": "rows", "W_K": "rows"})
    vo = MatrixGroupSet("attention_vo", "attn", tuple(
        {"W_V": kv_head("v", j), "W_O": tuple(MatrixPiece("o.weight", cols=(i * dh, (i + 1) * dh), transpose=True)
                                            for i in (2 * j, 2 * j + 1))} for j in range(2)),
        {"W_V": "rows", "W_O": "cols"})
    got_qk, got_vo = attention_matrix_sets("attn", "q", "k", "v", "o", heads=4, kv_heads=2, head_dim=4)
    assert (got_qk.groups, got_qk.stack, got_qk.algebra) == (qk.groups, qk.stack, None)
    assert (got_vo.groups, got_vo.stack) == (vo.groups, vo.stack)


def test_assemble_gathers_the_pieces_and_scatter_is_its_adjoint():
    model, _, _ = build()
    params = {k: p.detach() for k, p in model.named_parameters()}
    qk, vo = sets_for(model)
    lay = slot_layout(qk, params)
    slots = lay.assemble(params)
    assert lay.shapes == {"W_Q": (2 * (D + 1), 4), "W_K": (D + 1, 4)} and lay.h == 4 and lay.count == 2
    wq, bq = params["q.weight"], params["q.bias"]
    expected = torch.cat([wq[8:12].T, bq[8:12][None], wq[12:16].T, bq[12:16][None]])  # group 1: heads 2, 3
    assert torch.equal(slots["W_Q"][1], expected)
    lay_vo = slot_layout(vo, params)
    assert torch.equal(lay_vo.assemble(params)["W_O"][0], torch.cat([params["o.weight"][:, :4].T,
                                                                      params["o.weight"][:, 4:8].T], 1))
    # adjoint: <assemble(p), S> = <p, scatter(S)>, and autograd through assemble gives scatter
    gen = torch.Generator().manual_seed(1)
    s = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in slots.items()}
    back = lay.scatter(s, like=params)
    lhs = sum((slots[k] * s[k]).sum() for k in s)
    rhs = sum((params[n] * back[n]).sum() for n in back)
    assert float(abs(lhs - rhs)) <= 1e-12 * float(abs(lhs))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = sum((t * s[k]).sum() for k, t in lay.assemble(leaves).items())
    grads = torch.autograd.grad(total, [leaves[n] for n in lay.params])
    for n, g in zip(lay.params, grads):
        assert torch.allclose(g, back[n], rtol=0, atol=1e-14)
    assert set(back) == {"q.weight", "q.bias", "k.weight", "k.bias"}


def _set(groups, stack=None, family="attention_qk", algebra=None):
    return MatrixGroupSet(family, "attn", tuple(groups), stack or {"W_Q": "rows", "W_K": "rows"}, algebra)


W = lambda name, i, **kw: MatrixPiece(f"{name}.weight", rows=(4 * i, 4 * i + 4), transpose=True, **kw)


@pytest.mark.parametrize("bad, message", [
    (_set([{"W_Q": (MatrixPiece("qq.weight"),), "W_K": (W("k", 0),)}]), "no parameter 'qq.weight'"),
    (_set([{"W_Q": (W("q", 4),), "W_K": (W("k", 0),)}]), "rows (16, 20) do not fit"),
    (_set([{"W_Q": (W("q", 0), MatrixPiece("q.bias", cols=(0, 3))), "W_K": (W("k", 0),)}]),
     "same number of columns"),
    (_set([{"W_Q": (W("q", 0),), "W_K": (W("k", 0),)},
           {"W_Q": (W("q", 1), MatrixPiece("q.bias", cols=(4, 8))), "W_K": (W("k", 1),)}]), "same piece shapes"),
    (_set([{"W_V": (W("v", 0),), "W_K": (W("k", 0),)}]), "has slots ['W_Q', 'W_K']"),
    (_set([{"W_Q": (W("q", 0),), "W_K": (W("k", 0),)}], stack={"W_Q": "rows", "W_K": "down"}), "'rows' or 'cols'"),
    (_set([{"W_Q": (W("q", 0),), "W_K": (MatrixPiece("k.weight", rows=(0, 2), transpose=True),)}]),
     "do not fit attention_qk's action"),
    (_set([{"W_Q": (W("q", 0),), "W_K": (W("k", 0),)}], algebra=torch.zeros(2, 3, 3)), "(r, 4, 4) basis"),
    (_set([{"W_Q": (W("q", 0),), "W_K": (W("k", 0),)}], algebra=torch.eye(4).expand(2, 4, 4)), "linearly dependent"),
    (_set([{"U": (W("q", 0),), "V": (MatrixPiece("k.weight", rows=(0, 4)),)}], family="rotation_pair",
          stack={"U": "rows", "V": "rows"}, algebra=rotate_half_commutant(4)), "must be antisymmetric"),
    (_set([{"x": (W("q", 0),)}], family="translation", stack={"x": "rows"}), "not a matrix family"),
])
def test_bindings_are_validated_with_clear_errors(bad, message):
    model, x, y = build()
    with pytest.raises(SymtoolsError, match=None) as info:
        check_matrix_sets(model, x, y, [bad])
    assert message in str(info.value)


# -- verdicts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("mlp", [True, False])
def test_every_attention_group_passes(bias, rope, mlp):
    model, x, y = build(bias=bias, rope=rope, mlp=mlp)
    sets = sets_for(model)
    res = check_matrix_sets(model, x, y, sets, per_group=True)
    assert res.hvps == 2  # one HVP per direction for all groups of all sets
    assert set(res) == {"attention_qk", "attention_vo"}
    for name, fam in res.items():
        assert isinstance(fam, MatrixFamilyResult) and fam.verdict == "pass", (name, fam.gradient, fam.hessian)
        assert fam.gradient["max_ratio"] <= 0.5 and fam.hessian["max_ratio"] <= 0.5  # measured ≤ 0.04
        assert fam.layers[0].bound == "terms" and len(fam.layers[0].gradient_ratios) == 2
    assert res["attention_qk"].dimension == 2 * (4 if rope else 16)  # commutant of 2 rotary pairs: 4; gl(4): 16
    assert res["attention_vo"].dimension == 2 * 16


def test_tanh_on_one_query_head_fails_only_its_kv_group():
    model, x, y = build(tanh_q0=True)
    res = check_matrix_sets(model, x, y, sets_for(model))
    assert failing(res, "attention_qk") == {("attn", 0)}
    lr = res["attention_qk"].layers[0]
    assert res["attention_qk"].gradient["max_ratio"] > 1e6 and res["attention_qk"].hessian["max_ratio"] > 1e6
    assert res["attention_qk"].hessian["located"] == [{"layer": "attn", "set": 0, "group": 0}]
    assert lr.inconclusive == []
    assert res["attention_vo"].verdict == "pass"


def test_rope_breaks_gl_but_not_its_commutant():
    model, x, y = build(rope=True)
    full = check_matrix_sets(model, x, y, sets_for(model, qk_algebra=None)[:1])
    assert failing(full, "attention_qk") == {("attn", 0), ("attn", 1)}
    assert full["attention_qk"].gradient["max_ratio"] > 1e6
    sub = check_matrix_sets(model, x, y, sets_for(model)[:1])
    assert sub["attention_qk"].verdict == "pass"


def test_key_bias_after_rope_breaks_qk_only_when_it_depends_on_the_key_position():
    model, x, y = build(rope=True, key_bias_after_rope="position")
    res = check_matrix_sets(model, x, y, sets_for(model))
    assert failing(res, "attention_qk") == {("attn", 0)} and res["attention_vo"].verdict == "pass"
    model, x, y = build(rope=True, key_bias_after_rope="constant")
    res = check_matrix_sets(model, x, y, sets_for(model))
    assert res["attention_qk"].verdict == "pass" and res["attention_vo"].verdict == "pass"
    g = torch.autograd.grad(F.cross_entropy(model(x), y), model.key_bias)[0]
    assert float(g.abs().max()) <= 1e-15  # the softmax over keys removes a bias common to all keys


def test_gqa_heads_bound_as_independent_groups_fail():
    model, x, y = build(heads=4, kv_heads=2)
    per_head = [attention_matrix_sets(f"head{i}", "q", "k", "v", "o", heads=1, kv_heads=1, head_dim=4)
                for i in range(4)]
    # query head i with key/value head i // 2 as if it were alone: rewrite the row/column ranges
    wrong = []
    for fam in (0, 1):
        groups = []
        for i in range(4):
            g = per_head[i][fam].groups[0]
            shift = {"W_Q": i, "W_O": i, "W_K": i // 2, "W_V": i // 2}
            groups.append({s: tuple(MatrixPiece(p.param, rows=None if p.rows is None else
                                                (p.rows[0] + 4 * shift[s], p.rows[1] + 4 * shift[s]),
                                                cols=None if p.cols is None else
                                                (p.cols[0] + 4 * shift[s], p.cols[1] + 4 * shift[s]),
                                                transpose=p.transpose) for p in pieces)
                           for s, pieces in g.items()})
        ms = per_head[0][fam]
        wrong.append(MatrixGroupSet(ms.family, "attn", tuple(groups), ms.stack))
    res = check_matrix_sets(model, x, y, wrong)
    assert failing(res, "attention_qk") == {("attn", i) for i in range(4)}
    assert failing(res, "attention_vo") == {("attn", i) for i in range(4)}
    assert check_matrix_sets(model, x, y, sets_for(model))["attention_qk"].verdict == "pass"


def test_float32_passes_and_a_breaking_still_fails():
    model, x, y = build(rope=True)
    res = check_matrix_sets(model, x, y, sets_for(model), dtype=torch.float32)
    assert all(f.verdict == "pass" for f in res.values())
    assert next(model.parameters()).dtype == torch.float64  # a converted copy was checked
    model, x, y = build(tanh_q0=True)
    res = check_matrix_sets(model, x, y, sets_for(model), dtype=torch.float32)
    assert failing(res, "attention_qk") == {("attn", 0)} and res["attention_qk"].gradient["max_ratio"] > 1e3


def test_non_finite_weights_fail():
    model, x, y = build()
    with torch.no_grad():
        model.q.weight[0, 0] = float("nan")
    res = check_matrix_sets(model, x, y, sets_for(model))
    assert res["attention_qk"].verdict == "fail"


def test_linear_pairs_gl_and_its_rotation_subgroup():
    """gl_linear_pair (U ↦ U G⁻¹, V ↦ G V with the bias as V's last column) and rotation_pair (so_h: the
    antisymmetric part of M_g) on Linear → Identity → Linear pass; with a LeakyReLU in between both fail."""
    def pair_sets():
        groups = ({"U": (MatrixPiece("2.weight"),),
                   "V": (MatrixPiece("0.weight"), MatrixPiece("0.bias", transpose=True))},)
        return [MatrixGroupSet(f, "pair", groups, {"U": "cols", "V": "cols"})
                for f in ("gl_linear_pair", "rotation_pair")]

    for act, verdict in ((nn.Identity(), "pass"), (nn.LeakyReLU(0.1), "fail")):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 4), act, nn.Linear(4, 3)).double()
            x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
        res = check_matrix_sets(model, x, y, pair_sets())
        assert {f.verdict for f in res.values()} == {verdict}, {n: f.gradient for n, f in res.items()}
        assert res["gl_linear_pair"].dimension == 16 and res["rotation_pair"].dimension == 6
        assert res["rotation_pair"].layers[0].algebra == "so(4)"


# -- the Hessian test's algebra


def _loss_grad(model, x, y, params):
    so = SecondOrder(model, x, y, params=params, create_graph=False)
    return so.grad


def test_hessian_coefficients_are_the_derivative_of_the_gradient_identity():
    """ρ = ⟨Hu, v(E)⟩ + ⟨u, K_E g⟩ against central differences of ⟨M_g, E⟩ along u, on the broken model (where
    both are O(1)); ⟨u, K_E g⟩ from the generated hessian_identity_residual (hvp returning zeros) equals the
    bilinear form M_g(u, g) the check uses."""
    model, x, y = build(tanh_q0=True)
    qk = sets_for(model)[0]
    params = {k: p.detach() for k, p in model.named_parameters()}
    lay = slot_layout(qk, params)
    gen = torch.Generator().manual_seed(3)
    u = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) * float(p.pow(2).mean().sqrt())
         for k, p in params.items()}
    so = SecondOrder(model, x, y)
    g, hu = so.grad, {k: v.detach() for k, v in so.hvp(u).items()}
    rho = hessian_coefficients(lay, params, g, u, hu)
    t = 1e-4
    plus = {k: p + t * u[k] for k, p in params.items()}
    minus = {k: p - t * u[k] for k, p in params.items()}
    fd = (identity_coefficients(lay, plus, _loss_grad(model, x, y, plus))
          - identity_coefficients(lay, minus, _loss_grad(model, x, y, minus))) / (2 * t)
    assert float(rho.abs().max()) > 1e-3
    assert float((rho - fd).abs().max()) <= 1e-6 * float(rho.abs().max())  # O(t²) truncation: 1.7e-8 measured
    # ⟨u, K_E g⟩ for E = E_01 and E_23 from the generated code
    theta, gg, uu = (lay.assemble_tuple(d) for d in (params, g, u))
    zeros = lambda v: tuple(torch.zeros_like(a) for a in v)
    for i, j in ((0, 1), (2, 3)):
        e = torch.zeros(4, 4, dtype=torch.float64)
        e[i, j] = 1.0
        k_g = lay.module.hessian_identity_residual(e, *theta, *gg, zeros)
        direct = sum((a * b).sum(dim=(1, 2)) for a, b in zip(uu, k_g))
        bilinear = lay.module.gradient_identity(*uu, *gg)[:, i, j]
        assert torch.allclose(direct, bilinear, rtol=1e-12, atol=1e-18)


def test_scattered_generator_satisfies_the_generated_hessian_identity():
    """The scatter of v(E) is an HVP direction: H v(E) + K_E g = 0 per slot (generated
    hessian_identity_residual, hvp = scatter → HVP → assemble) on a clean model, not on the broken one."""
    def residual(model, x, y):
        params = {k: p.detach() for k, p in model.named_parameters()}
        lay = slot_layout(sets_for(model)[0], params)
        so = SecondOrder(model, x, y)
        theta, g = lay.assemble_tuple(params), lay.assemble_tuple(so.grad)

        def hvp(vs):
            hv = so.hvp(lay.scatter(dict(zip(lay.slots, vs)), like=params))
            return lay.assemble_tuple({k: v.detach() for k, v in hv.items()})

        e = torch.zeros(4, 4, dtype=torch.float64)
        e[0, 1], e[2, 2] = 1.0, 0.5
        res = lay.module.hessian_identity_residual(e, *theta, *g, hvp)
        size = max(float(t.abs().max()) for t in hvp(lay.module.generator(e, *theta)))
        return max(float(r.abs().max()) for r in res) / size

    assert residual(*build()) <= 1e-12
    assert residual(*build(tanh_q0=True)) >= 1e-3


# -- the checker's report


def test_check_reports_matrix_families_in_verdict_json_and_table():
    model, x, y = build(rope=True)
    report = check(model, x, y, SymmetryMap(matrix_sets=sets_for(model)))
    assert report.verdict == "pass" and set(report.families) == {"attention_qk", "attention_vo"}
    assert report.hvps["matrix"] == 2 and report.hvps["verification"] == 2
    out = report.to_dict()
    fam = out["families"]["attention_qk"]
    assert fam["dimension"] == 8 and fam["kind"] == "matrix" and fam["verdict"] == "pass"
    assert fam["layers"][0]["algebra"].startswith("subalgebra of gl(4), dimension 4")
    json.dumps(out, default=float)
    out.update(model="tiny-attention", parameters=sum(p.numel() for p in model.parameters()), seconds=0.1, blocked=[])
    table = render_table(out)
    assert "attention_qk" in table and "Lie algebra dimension 8" in table and "PASS" in table.splitlines()[-1]
    broken, x, y = build(tanh_q0=True)
    report = check(broken, x, y, SymmetryMap(matrix_sets=sets_for(broken)))
    assert report.verdict == "fail" and report.families["attention_vo"].verdict == "pass"


# -- charges


def _gd(model, x, y, lr, steps):
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * g


def _charge_changes(rope: bool, lr: float):
    model, x, y = build(rope=rope)
    qk, vo = sets_for(model)
    full_qk = sets_for(model, qk_algebra=None)[0]

    def measure():
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        c = matrix_charges(p, qk)
        conserved = c.values if c.conserved is None else c.values[:, c.conserved & ~c.trivial]
        q_norm = slot_layout(qk, p).assemble(p)["W_Q"].pow(2).sum((1, 2))  # not conserved: d/dt = −2⟨W_Q, g_Q⟩
        return conserved, matrix_charges(p, vo).values, matrix_charges(p, full_qk).values, q_norm

    before = measure()
    _gd(model, x, y, lr, steps=3)
    return [float((a - b).abs().max()) for a, b in zip(measure(), before)]


def test_attention_charges_change_at_second_order_in_the_learning_rate():
    """3 steps of plain GD. Measured (float64): at lr 1e-3, Δcharge / Δ|W_Q|² = 2.4e-4 (QK) and 7.1e-4 (VO);
    lr 1e-4 → 1e-3 multiplies Δcharge by 100.0 and Δ|W_Q|² by 10.0. With RoPE the commutant components
    change by 1.8e-9 while the full gl charge (not conserved: G must commute with the rotations) changes by
    2.2e-5, like the norm."""
    small, large = _charge_changes(False, 1e-4), _charge_changes(False, 1e-3)
    dqk, dvo, _, dnorm = large
    assert dqk / dnorm < 1e-3 and dvo / dnorm < 3e-3
    assert 90 < dqk / small[0] < 110 and 90 < dvo / small[1] < 110  # O(lr²)
    assert 9 < dnorm / small[3] < 11  # O(lr)
    dqk, _, dfull, dnorm = _charge_changes(True, 1e-3)
    assert dqk / dnorm < 1e-3 and dfull / dnorm > 0.1


def test_one_step_changes_the_charge_by_exactly_lr_squared_times_the_charge_of_the_gradient():
    """Q(θ − ηg) = Q(θ) − η(M_g + M_gᵀ) + η² Q(g), and M_g = 0: ΔQ = η² Q(g) to round-off, which is that of
    the two charges subtracted (≤ 64·u·Σ|θ|² bounds it; measured 1.9e-16 for η²Q(g) ~ 1.8e-7)."""
    model, x, y = build()
    qk, vo = sets_for(model)
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = dict(zip(p0, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
    lr = 1e-2
    p1 = {k: v - lr * g[k] for k, v in p0.items()}
    for ms in (qk, vo):
        before = matrix_charges(p0, ms)
        dq = matrix_charges(p1, ms).values - before.values
        law = lr * lr * matrix_charges(g, ms).values
        tol = 64 * 2.0 ** -53 * float(before.scale.max())
        assert float((dq - law).abs().max()) <= tol and float(law.abs().max()) >= 1e5 * tol


def test_charges_on_a_subalgebra_and_without_a_charge():
    model, _, _ = build(rope=True)
    params = {k: p.detach() for k, p in model.named_parameters()}
    c = matrix_charges(params, sets_for(model)[0])
    assert c.values.shape == (2, 4) and c.has_charge
    assert c.conserved.tolist() == [True] * 4 and c.trivial.tolist() == [False, True, False, True]
    assert float(c.values[:, 1::2].abs().max()) <= 1e-12 * float(c.scale.max())  # rotations: no charge
    rot = MatrixGroupSet("rotation_pair", "mlp", ({"U": (MatrixPiece("mlp.2.weight", cols=(0, 4)),),
                                                   "V": (MatrixPiece("mlp.0.weight", rows=(0, 4)),)},),
                         {"U": "cols", "V": "rows"})
    r = matrix_charges(params, rot)
    assert not r.has_charge and "antisymmetric" in r.reason and r.values is None
    entries = matrix_group_charges(sets_for(model) + [rot], params)
    assert entries[0]["charge"]["count"] == 2 * 2 and entries[1]["charge"]["count"] == 2 * 16
    text = render_audit({"matrix_charges": entries})
    assert "matrix charge attention_qk attn (2 groups, subalgebra" in text and "rotation_pair" in text
    json.dumps(entries)


# -- property


@given(kv=st.integers(1, 2), share=st.integers(1, 3), dh=st.sampled_from([2, 4]), bias=st.booleans(),
       rope=st.booleans(), mlp=st.booleans(), seed=st.integers(0, 2**16))
def test_property_every_bound_group_passes(kv, share, dh, bias, rope, mlp, seed):
    model, x, y = build(seed, heads=kv * share, kv_heads=kv, dh=dh, bias=bias, rope=rope, mlp=mlp, d=6)
    res = check_matrix_sets(model, x, y, sets_for(model), seed=seed)
    for name, fam in res.items():
        assert fam.verdict == "pass", (name, fam.gradient, fam.hessian)
        assert fam.gradient["max_ratio"] <= 1 and fam.hessian["max_ratio"] <= 1
