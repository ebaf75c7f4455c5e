"""Data-dependent teleportation of a two-layer block U σ(V x) (Zhao, Ganev, Walters, Yu, Dehmamy, ICLR 2023,
Theorem 4.1): for an invertible activation σ and a batch X with σ(VX) square and invertible, every invertible g
gives

    V ↦ g V,        U ↦ U σ(V X) σ(g V X)⁻¹,

which leaves U σ(V X) — the block's output on X, hence the loss on X — unchanged. For a batch smaller than the
hidden width (σ(gVX) is h×n, n < h) we use U ↦ U + U (σ(VX) − σ(gVX)) σ(gVX)⁺: it keeps the batch's outputs the
same way (σ(gVX)⁺σ(gVX) = I needs full column rank: checked), is the identity at g = I, and equals the theorem's
map when n = h. (U σ(VX) σ(gVX)⁺ with n < h is not the identity at g = I: it projects U onto the n directions
the batch spans, which in our trials slowed training down by itself.) A batch larger than the width is refused.

The action depends on X: on other inputs the function does change (reported, not a guarantee). A bias c of V
moves with V (V and c are one matrix [V c] acting on [x; 1]). The loss check's bound is
:func:`~symtools.numeric.teleport.loss_bound` times the condition number of σ(gVX), which the pseudo-inverse
multiplies round-off by.

The group element is g = exp(M), M ∈ gl(h), found by Adam ascent of ‖∇L‖² on M (``torch.linalg.matrix_exp``).
Whether σ is invertible is decided symbolically (:func:`invertible`): its derivative must be positive on every
piece; ReLU is not (a zero piece), LeakyReLU and tanh are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import sympy as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from symtools.errors import SymtoolsError
from symtools.numeric.teleport import TeleportError, loss_bound

_Z = sp.Symbol("z", real=True)
#: The largest relative loss bound a two-layer teleport may be certified with (see teleport_two_layer).
CERTIFIABLE = 1e-3


def activation_expr(module: nn.Module) -> sp.Expr | None:
    """The activation as a SymPy function of z, or None when it is not one we can read."""
    if isinstance(module, nn.LeakyReLU):
        return sp.Piecewise((_Z, _Z >= 0), (sp.nsimplify(module.negative_slope) * _Z, True))
    if isinstance(module, nn.ReLU):
        return sp.Piecewise((_Z, _Z >= 0), (0, True))
    if isinstance(module, nn.Tanh):
        return sp.tanh(_Z)
    if isinstance(module, nn.Identity):
        return _Z
    return None


def invertible(module: nn.Module) -> tuple[bool, str]:
    """(σ strictly increasing on ℝ, why): its derivative is positive on every piece (SymPy)."""
    expr = activation_expr(module)
    if expr is None:
        return False, f"{type(module).__name__} is not an activation symtools can read symbolically"
    d = sp.diff(expr, _Z)
    pieces = [p for p, _ in d.args] if isinstance(d, sp.Piecewise) else [d]
    for p in pieces:
        if not sp.simplify(p.rewrite(sp.exp)).is_positive:
            return False, f"σ' = {sp.sstr(d)} is not positive everywhere, so σ is not invertible"
    return True, f"σ' = {sp.sstr(d)} > 0"


@dataclass
class TwoLayerResult:
    pair: tuple[str, str]
    batch: int
    hidden: int
    history: list[float]
    chosen_step: int
    loss_before: float
    loss_after: float
    loss_change_rel: float
    loss_bound_rel: float
    grad_norm_before: float
    grad_norm_after: float
    function_change_rel: float | None
    condition: float
    invertible: str

    def to_dict(self) -> dict:
        return asdict(self)


def _pair(model: nn.Sequential, pair: tuple[str, str] | None) -> tuple[int, int]:
    names = list(model._modules)
    linear = [i for i, n in enumerate(names) if isinstance(model._modules[n], nn.Linear)]
    if pair is None:
        if len(linear) < 2:
            raise SymtoolsError("the model needs two Linear layers for a two-layer teleport")
        return linear[-2], linear[-1]
    try:
        iv, iu = names.index(pair[0]), names.index(pair[1])
    except ValueError:
        raise SymtoolsError(f"layers {pair} not in the model (it has {', '.join(names)})") from None
    return iv, iu


def teleport_two_layer(model: nn.Sequential, batch: tuple[Tensor, Tensor], *, pair: tuple[str, str] | None = None,
                       steps: int = 10, lr: float = 0.01, held_out: Tensor | None = None,
                       loss_fn: Callable = F.cross_entropy) -> TwoLayerResult:
    """Teleport the pair (V, U) of an ``nn.Sequential`` MLP in place (module docstring). The modules between
    V and U must be one invertible activation; raises :class:`TeleportError` (model untouched) otherwise or
    when the loss on the batch moved beyond round-off."""
    iv, iu = _pair(model, pair)
    names = list(model._modules)
    between = [model._modules[n] for n in names[iv + 1:iu]]
    if len(between) != 1:
        raise TeleportError(f"between {names[iv]} and {names[iu]} there must be exactly one activation "
                            f"(found {len(between)} modules)")
    ok, why = invertible(between[0])
    if not ok:
        raise TeleportError(f"Theorem 4.1 needs an invertible activation: {why}")
    V, U, act = model._modules[names[iv]], model._modules[names[iu]], between[0]
    x, y = batch
    with torch.no_grad():
        h = nn.Sequential(*[model._modules[n] for n in names[:iv]])(x) if iv else x
    n, hidden = h.shape[0], V.out_features
    if n > hidden:
        raise TeleportError(f"the batch ({n}) must not exceed the hidden width ({hidden}): σ(gVX) needs full "
                            f"column rank for U σ(VX) to be kept")
    wide = torch.float64
    Va = torch.cat([V.weight.detach().to(wide), (V.bias.detach().to(wide) if V.bias is not None else
                                                 torch.zeros(hidden, dtype=wide)).unsqueeze(1)], 1)
    Xa = torch.cat([h.to(wide), torch.ones(n, 1, dtype=wide)], 1).T
    Z = Va @ Xa
    base = {k: p.detach() for k, p in model.named_parameters()}
    kv, ku = names[iv], names[iu]

    def moved(M: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        g = torch.linalg.matrix_exp(M)
        S = act(g @ Z)
        U0 = U.weight.detach().to(wide)
        Up = U0 + U0 @ (act(Z) - S) @ torch.linalg.pinv(S)  # = U σ(Z) S⁻¹ when S is square (the theorem)
        Vp = g @ Va
        out = dict(base)
        out[f"{kv}.weight"] = Vp[:, :-1].to(V.weight.dtype)
        if V.bias is not None:
            out[f"{kv}.bias"] = Vp[:, -1].to(V.bias.dtype)
        out[f"{ku}.weight"] = Up.to(U.weight.dtype)
        return out, S

    def evaluate(params, create_graph):
        params = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        loss = loss_fn(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        return loss, sum((g.to(wide) ** 2).sum() for g in grads if g is not None)

    M = torch.zeros(hidden, hidden, dtype=wide, requires_grad=True)
    opt = torch.optim.Adam([M], lr=lr, maximize=True)
    history, iterates, conditions = [], [], []
    for i in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        params, S = moved(M)
        _, gg = evaluate(params, create_graph=True)
        history.append(gg.item())
        iterates.append(M.detach().clone())
        sv = torch.linalg.svdvals(S.detach())
        conditions.append(float(sv[0] / sv[-1].clamp_min(1e-300)))
        if i == steps or not math.isfinite(history[-1]):
            break
        gg.backward()
        opt.step()
        with torch.no_grad():
            M.clamp_(-steps * lr, steps * lr)
    # the pseudo-inverse amplifies round-off by the condition number of σ(gVX): only iterates whose loss
    # bound (round-off bound × condition number) stays ≤ CERTIFIABLE (the detection limit: a loss change
    # below it is not told from round-off) can be certified
    unit = loss_bound(V.weight.dtype)
    usable = [i for i in range(len(history)) if unit * max(1.0, conditions[i]) <= CERTIFIABLE]
    if not usable:
        raise TeleportError(f"teleport refused, the model is unchanged: σ(VX) has condition number "
                            f"{conditions[0]:.3g}, so in {V.weight.dtype} a kept loss cannot be told from a "
                            f"broken one (bound {unit * conditions[0]:.2g} > {CERTIFIABLE:g}); use float64 or a "
                            f"smaller batch")
    best = max(usable, key=lambda i: history[i])
    with torch.no_grad():
        new, _ = moved(iterates[best])
    l0, gg0 = evaluate(base, False)
    l1, gg1 = evaluate(new, False)
    rel = abs(l1.item() - l0.item()) / max(abs(l0.item()), 1e-300)
    condition = conditions[best]
    bound = unit * max(1.0, condition)
    if not rel <= bound:
        raise TeleportError(f"teleport refused, the model is unchanged: the loss on the batch changed by {rel:.3g} "
                            f"of itself (bound {bound:.2g}; condition number of σ(gVX): {condition:.3g})")
    change = None
    if held_out is not None:
        with torch.no_grad():
            o0 = functional_call(model, base, (held_out,))
            o1 = functional_call(model, new, (held_out,))
        change = float((o1 - o0).abs().max() / o0.abs().max().clamp_min(1e-300))
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(new[k])
    return TwoLayerResult((kv, ku), n, hidden, history, best, l0.item(), l1.item(), rel, bound,
                          math.sqrt(gg0.item()), math.sqrt(gg1.item()), change, condition, why)
