"""Optimizer update rules, declared as SymPy expressions on ONE element of a parameter tensor.

Every torch optimizer below updates each element alike, from that element's value θ, its gradient g and its
own optimizer state; a rule is therefore a handful of expressions in the template symbols ``theta``, ``g``
and the state symbols (``b`` the momentum buffer, ``m``/``s`` Adam's moments). The laws module applies a
rule to every slot of a symmetry by renaming the templates to the slot's symbols.

What torch 2.13 does (``torch/optim/sgd.py::_single_tensor_sgd``, ``adam.py::_single_tensor_adam``):

SGD, weight decay λ (coupled), momentum μ, dampening τ, learning rate η::

    d = g + λθ
    first step (no buffer yet):  b = d                      (no dampening on the first step)
    later steps:                 b = μ b + (1 − τ) d
    nesterov:                    d ← d + μ b                 (with the new b)
    otherwise (μ ≠ 0):           d ← b
    θ ← θ − η d

Adam (coupled weight decay, ``torch.optim.Adam``) and AdamW (decoupled, ``torch.optim.AdamW``), step k ≥ 1::

    AdamW: θ ← (1 − ηλ) θ;  d = g          Adam: d = g + λθ
    m ← β₁ m + (1 − β₁) d;   s ← β₂ s + (1 − β₂) d²
    θ ← θ − η · (m / (1 − β₁ᵏ)) / (√(s / (1 − β₂ᵏ)) + ε)

The hyper-parameters carry the paper's letters where it has them (η, λ; the paper writes β for momentum and
α for dampening, we write μ and τ to keep α for the group parameter); :data:`PYTHON_NAMES` maps each to the
keyword torch uses, which is how the emitted code names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from symtools.errors import SymtoolsError

# -- hyper-parameters -----------------------------------------------------------------------------------
ETA = sp.Symbol("eta", positive=True)              # learning rate (lr)
LAMBDA = sp.Symbol("lambda", nonnegative=True)     # weight decay
MU = sp.Symbol("mu", nonnegative=True)             # momentum (the paper's β)
TAU = sp.Symbol("tau", nonnegative=True)           # dampening (the paper's α)
BETA1 = sp.Symbol("beta_1", positive=True)         # Adam's β₁
BETA2 = sp.Symbol("beta_2", positive=True)         # Adam's β₂
EPS = sp.Symbol("epsilon", positive=True)          # Adam's ε
STEP = sp.Symbol("k", positive=True, integer=True)  # Adam's step count (1 on the first step)

#: SymPy symbol → the torch keyword (and the argument name in emitted code).
PYTHON_NAMES: dict[sp.Symbol, str] = {ETA: "lr", LAMBDA: "weight_decay", MU: "momentum", TAU: "dampening",
                                      BETA1: "beta1", BETA2: "beta2", EPS: "eps", STEP: "step"}

# -- per-element templates --------------------------------------------------------------------------------
THETA = sp.Symbol("theta", real=True)   # the element's value before the step
GRAD = sp.Symbol("g", real=True)        # its (minibatch) loss gradient, before weight decay
BUF = sp.Symbol("b", real=True)         # momentum buffer before the step
M1ST = sp.Symbol("m", real=True)        # Adam first moment before the step
M2ND = sp.Symbol("s", nonnegative=True)  # Adam second moment before the step

#: state name → (template symbol, prefix of its per-slot symbol: buffer of slot x is ``b_x``).
STATE_SYMBOLS: dict[str, tuple[sp.Symbol, str]] = {"b": (BUF, "b_"), "m": (M1ST, "m_"), "s": (M2ND, "s_")}


def state_symbol(kind: str, slot: str) -> sp.Symbol:
    """The per-slot symbol of optimizer state ``kind`` (e.g. ``b_x`` for the buffer of slot x)."""
    template, prefix = STATE_SYMBOLS[kind]
    return sp.Symbol(prefix + slot, **template.assumptions0)


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer step on one element: θ' and the new optimizer state, as SymPy expressions.

    ``theta`` is θ' in the templates THETA, GRAD, the state templates and the hyper-parameters; ``state``
    maps each state kind (``"b"``, ``"m"``, ``"s"``) to its new value. ``first`` marks the rule torch applies
    on the first step (when the state does not exist yet); ``preconditioned`` marks per-coordinate scaling of
    the gradient (Adam), which is what breaks the symmetry laws at first order.
    """

    name: str
    theta: sp.Expr
    state: dict[str, sp.Expr]
    hyper: tuple[sp.Symbol, ...]
    first: bool = False
    preconditioned: bool = False
    text: str = ""

    def on_slot(self, slot: str, theta: sp.Expr | None = None, grad: sp.Expr | None = None) -> tuple[sp.Expr, dict[str, sp.Expr]]:
        """(θ'_slot, new state of the slot), the templates renamed to the slot's symbols."""
        from symtools.symbolic.forms import grad_symbol

        rep = {THETA: sp.Symbol(slot, real=True) if theta is None else theta,
               GRAD: grad_symbol(slot) if grad is None else grad}
        rep.update({STATE_SYMBOLS[k][0]: state_symbol(k, slot) for k in STATE_SYMBOLS})
        return self.theta.xreplace(rep), {k: e.xreplace(rep) for k, e in self.state.items()}


def _sgd_rules() -> dict[str, UpdateRule]:
    d = GRAD + LAMBDA * THETA  # torch: grad = grad.add(param, alpha=weight_decay)
    later_b = MU * BUF + (1 - TAU) * d  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    sgd_text = "d = g + λθ; θ' = θ − η·d"
    return {
        "sgd": UpdateRule("sgd", THETA - ETA * d, {}, (ETA, LAMBDA), text=sgd_text),
        "momentum/first": UpdateRule("momentum", THETA - ETA * d, {"b": d}, (ETA, LAMBDA, MU), first=True,
                                     text="d = g + λθ; b' = d (torch's first step: no dampening); θ' = θ − η·b'"),
        "momentum": UpdateRule("momentum", THETA - ETA * later_b, {"b": later_b}, (ETA, LAMBDA, MU, TAU),
                               text="d = g + λθ; b' = μ·b + (1 − τ)·d; θ' = θ − η·b'"),
        "nesterov/first": UpdateRule("nesterov", THETA - ETA * (d + MU * d), {"b": d}, (ETA, LAMBDA, MU), first=True,
                                     text="d = g + λθ; b' = d; θ' = θ − η·(d + μ·b')"),
        "nesterov": UpdateRule("nesterov", THETA - ETA * (d + MU * later_b), {"b": later_b}, (ETA, LAMBDA, MU, TAU),
                               text="d = g + λθ; b' = μ·b + (1 − τ)·d; θ' = θ − η·(d + μ·b')"),
    }


def _adam_rules() -> dict[str, UpdateRule]:
    out = {}
    for name, decoupled in (("adam", False), ("adamw", True)):
        d = GRAD if decoupled else GRAD + LAMBDA * THETA
        start = (1 - ETA * LAMBDA) * THETA if decoupled else THETA
        m = BETA1 * M1ST + (1 - BETA1) * d
        s = BETA2 * M2ND + (1 - BETA2) * d**2
        u = (m / (1 - BETA1**STEP)) / (sp.sqrt(s / (1 - BETA2**STEP)) + EPS)
        text = (("θ ← (1 − ηλ)θ; d = g" if decoupled else "d = g + λθ")
                + "; m' = β₁m + (1 − β₁)d; s' = β₂s + (1 − β₂)d²; θ' = θ − η·(m'/(1 − β₁ᵏ))/(√(s'/(1 − β₂ᵏ)) + ε)")
        out[name] = UpdateRule(name, start - ETA * u, {"m": m, "s": s}, (ETA, LAMBDA, BETA1, BETA2, EPS, STEP),
                               preconditioned=True, text=text)
    return out


RULES: dict[str, UpdateRule] = {**_sgd_rules(), **_adam_rules()}

#: optimizer name → (rule of the first step, rule of every later step)
OPTIMIZERS: dict[str, tuple[UpdateRule, UpdateRule]] = {
    "sgd": (RULES["sgd"], RULES["sgd"]),
    "momentum": (RULES["momentum/first"], RULES["momentum"]),
    "nesterov": (RULES["nesterov/first"], RULES["nesterov"]),
    "adam": (RULES["adam"], RULES["adam"]),
    "adamw": (RULES["adamw"], RULES["adamw"]),
}


def optimizer(name: str) -> tuple[UpdateRule, UpdateRule]:
    """(first-step rule, later-step rule) of a named optimizer."""
    if name not in OPTIMIZERS:
        raise SymtoolsError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def torch_kwargs(name: str, lr: float, weight_decay: float, momentum: float = 0.0, dampening: float = 0.0) -> dict:
    """Keyword arguments of the torch optimizer that runs rule ``name`` (for tests and examples)."""
    if name == "sgd":
        return {"lr": lr, "weight_decay": weight_decay}
    if name in ("momentum", "nesterov"):
        return {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "dampening": dampening,
                "nesterov": name == "nesterov"}
    if name in ("adam", "adamw"):
        return {"lr": lr, "weight_decay": weight_decay}
    raise SymtoolsError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
