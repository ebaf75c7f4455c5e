"""Optimizer declarations: each torch optimizer's update rule as SymPy on ONE element, and how code finds it.

This module is the single source of what symtools knows about an optimizer. A declaration
(:class:`OptimizerDecl`, collected in :data:`DECLARATIONS`) gives

* the update rule on one element (:class:`UpdateRule`: θ' and the new optimizer state as SymPy expressions in
  the templates ``theta``, ``g``, the state symbols and the hyper-parameters; the laws module applies it to
  every slot of a symmetry by renaming the templates to the slot's symbols);
* the torch class it runs on (by name: this module imports no torch), the conditions on a param group that
  select it (:class:`Cond`), the constant keyword arguments the class needs for it (``flags``);
* the torch optimizer-state entry of each state symbol (``b`` → ``momentum_buffer`` …) — the param-group entry
  of each hyper-parameter is :data:`GROUP_ENTRIES`;
* which derivation gives its law (``law_kind``; only ``"preconditioned"`` laws do not close), a title.

The torch side (:mod:`symtools.numeric.optimizer_laws`) reads these declarations to map a live optimizer or a
saved state dict to a law; the CLI's choices, the emitted law modules and the audit come from them too.
Adding an optimizer = one :class:`OptimizerDecl` here (and a :class:`TorchClass` if its torch class is new),
then ``python -m symtools.codegen.regenerate``.

What torch 2.13 does (``torch/optim/sgd.py::_single_tensor_sgd``, ``adam.py::_single_tensor_adam``,
``rmsprop.py::_single_tensor_rmsprop``, ``adagrad.py::_single_tensor_adagrad``):

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

RMSprop (``centered=False``, ``momentum=0`` only; torch calls ρ ``alpha``; ``square_avg`` starts at 0)::

    d = g + λθ;   s ← ρ s + (1 − ρ) d²;   θ ← θ − η · d / (√s + ε)

Adagrad (``lr_decay=0`` only; ``sum`` starts at ``initial_accumulator_value``, any value ≥ 0)::

    d = g + λθ;   s ← s + d²;   θ ← θ − η · d / (√s + ε)

The hyper-parameters carry the paper's letters where it has them (η, λ; the paper writes β for momentum and
α for dampening, we write μ and τ to keep α for the group parameter, and ρ for RMSprop's smoothing constant);
:data:`PYTHON_NAMES` maps each to the keyword torch uses, which is how the emitted code names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import sympy as sp

from symtools.errors import SymtoolsError

# -- hyper-parameters -----------------------------------------------------------------------------------
ETA = sp.Symbol("eta", positive=True)              # learning rate (lr)
LAMBDA = sp.Symbol("lambda", nonnegative=True)     # weight decay
MU = sp.Symbol("mu", nonnegative=True)             # momentum (the paper's β)
TAU = sp.Symbol("tau", nonnegative=True)           # dampening (the paper's α)
BETA1 = sp.Symbol("beta_1", positive=True)         # Adam's β₁
BETA2 = sp.Symbol("beta_2", positive=True)         # Adam's β₂
EPS = sp.Symbol("epsilon", positive=True)          # ε of Adam, RMSprop, Adagrad
STEP = sp.Symbol("k", positive=True, integer=True)  # Adam's step count (1 on the first step)
RHO = sp.Symbol("rho", positive=True)              # RMSprop's smoothing constant (torch: alpha)

#: SymPy symbol → the torch keyword (and the argument name in emitted code).
PYTHON_NAMES: dict[sp.Symbol, str] = {ETA: "lr", LAMBDA: "weight_decay", MU: "momentum", TAU: "dampening",
                                      BETA1: "beta1", BETA2: "beta2", EPS: "eps", STEP: "step", RHO: "alpha"}

#: SymPy symbol → where torch keeps its value in a param group: (entry, index into it or None). The step count
#: k is not a param-group entry: torch keeps it per tensor in the optimizer state (entry ``step``).
GROUP_ENTRIES: dict[sp.Symbol, tuple[str, int | None]] = {
    **{s: (n, None) for s, n in PYTHON_NAMES.items() if s is not STEP}, BETA1: ("betas", 0), BETA2: ("betas", 1)}

# -- per-element templates --------------------------------------------------------------------------------
THETA = sp.Symbol("theta", real=True)   # the element's value before the step
GRAD = sp.Symbol("g", real=True)        # its (minibatch) loss gradient, before weight decay
BUF = sp.Symbol("b", real=True)         # momentum buffer before the step
M1ST = sp.Symbol("m", real=True)        # Adam first moment before the step
M2ND = sp.Symbol("s", nonnegative=True)  # a second-moment accumulator before the step (Adam, RMSprop, Adagrad)

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
    the gradient (Adam), which is what breaks the symmetry laws at first order. ``decay`` is the factor of θ
    outside the update direction: θ' = decay·θ − η·u defines the applied direction u (1 − ηλ for AdamW's
    decoupled weight decay, 1 where the decay is inside u).
    """

    name: str
    theta: sp.Expr
    state: dict[str, sp.Expr]
    hyper: tuple[sp.Symbol, ...]
    first: bool = False
    preconditioned: bool = False
    text: str = ""
    decay: sp.Expr = sp.S.One

    def on_slot(self, slot: str, theta: sp.Expr | None = None, grad: sp.Expr | None = None) -> tuple[sp.Expr, dict[str, sp.Expr]]:
        """(θ'_slot, new state of the slot), the templates renamed to the slot's symbols."""
        from symtools.symbolic.forms import grad_symbol

        rep = {THETA: sp.Symbol(slot, real=True) if theta is None else theta,
               GRAD: grad_symbol(slot) if grad is None else grad}
        rep.update({STATE_SYMBOLS[k][0]: state_symbol(k, slot) for k in STATE_SYMBOLS})
        return self.theta.xreplace(rep), {k: e.xreplace(rep) for k, e in self.state.items()}


# -- how torch spells it ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchClass:
    """A ``torch.optim`` class, by name.

    ``defaults``: the constructor defaults of the param-group entries the selection reads (used when a saved
    group lacks the entry, e.g. a checkpoint of an older torch). ``signature``: param-group entries of which
    any one identifies a saved state dict of this class when its class name is unknown (first match in
    declaration order; AdamW has none: its groups are Adam's with ``decoupled_weight_decay=True``).
    """

    name: str
    defaults: Mapping[str, object]
    signature: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cond:
    """One condition on a param group entry: ``test`` is ``"zero"``, ``"positive"``, ``"true"`` or ``"false"``."""

    key: str
    test: str

    def holds(self, value) -> bool:
        if self.test == "zero":
            return float(value or 0) == 0
        if self.test == "positive":
            return float(value or 0) > 0
        if self.test == "true":
            return bool(value)
        if self.test == "false":
            return not bool(value)
        raise ValueError(f"unknown test {self.test!r}")

    def describe(self) -> str:
        """What the condition asks for, as torch would be called: ``momentum=0``, ``nesterov=True`` …"""
        return {"zero": f"{self.key}=0", "positive": f"{self.key}>0", "true": f"{self.key}=True",
                "false": f"{self.key}=False"}[self.test]


NOT_MAXIMIZED = Cond("maximize", "false")

#: law kinds: "taylor" (stateless rule, linear in g: terminating Taylor form, closes), "momentum" (a buffer:
#: closed bilinear recurrences), "preconditioned" (per-coordinate scaling: the Taylor form in the applied
#: update, which does not close; the breaking term is measured).
LAW_KINDS = ("taylor", "momentum", "preconditioned")


@dataclass(frozen=True)
class OptimizerDecl:
    """Everything code needs about one optimizer law (see the module docstring).

    ``torch_class``: the ``torch.optim`` class that runs it (and that ``symtools train`` builds); ``also_on``:
    other classes whose param groups may select it. ``select``: conditions a param group of those classes
    must meet (all of them). ``state``: state symbol kind → torch optimizer-state entry. ``flags``: constant
    keyword arguments of the torch class for this law. ``label``: the law in a sentence ("plain SGD").
    """

    name: str
    torch_class: str
    select: tuple[Cond, ...]
    first: UpdateRule
    rule: UpdateRule
    state: dict[str, str]
    law_kind: str
    call: str
    label: str
    flags: dict[str, object] = field(default_factory=dict)
    also_on: tuple[str, ...] = ()

    @property
    def closes(self) -> bool:
        """Whether the law closes (every drive has a theoretical value); False for preconditioned updates."""
        return self.law_kind != "preconditioned"

    @property
    def classes(self) -> tuple[str, ...]:
        return (self.torch_class,) + self.also_on

    @property
    def hyper(self) -> tuple[sp.Symbol, ...]:
        """The hyper-parameters of its rules (first step and later ones), in order of appearance."""
        return tuple(dict.fromkeys(self.first.hyper + self.rule.hyper))

    @property
    def python_names(self) -> tuple[str, ...]:
        return tuple(PYTHON_NAMES[s] for s in self.hyper)

    @property
    def title(self) -> str:
        """The torch call it stands for, and for a non-closing law what that means (module titles)."""
        return self.call if self.closes else f"{self.call} — the law does not close; the breaking term is measured"


# -- the rules ---------------------------------------------------------------------------------------------


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
        decay = (1 - ETA * LAMBDA) if decoupled else sp.Integer(1)
        m = BETA1 * M1ST + (1 - BETA1) * d
        s = BETA2 * M2ND + (1 - BETA2) * d**2
        u = (m / (1 - BETA1**STEP)) / (sp.sqrt(s / (1 - BETA2**STEP)) + EPS)
        text = (("θ ← (1 − ηλ)θ; d = g" if decoupled else "d = g + λθ")
                + "; m' = β₁m + (1 − β₁)d; s' = β₂s + (1 − β₂)d²; θ' = θ − η·(m'/(1 − β₁ᵏ))/(√(s'/(1 − β₂ᵏ)) + ε)")
        out[name] = UpdateRule(name, decay * THETA - ETA * u, {"m": m, "s": s},
                               (ETA, LAMBDA, BETA1, BETA2, EPS, STEP), preconditioned=True, text=text, decay=decay)
    return out


def _rmsprop_rule() -> UpdateRule:
    d = GRAD + LAMBDA * THETA                 # grad = grad.add(param, alpha=weight_decay)
    s = RHO * M2ND + (1 - RHO) * d**2         # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    return UpdateRule("rmsprop", THETA - ETA * d / (sp.sqrt(s) + EPS), {"s": s}, (ETA, LAMBDA, RHO, EPS),
                      preconditioned=True,    # avg = square_avg.sqrt().add_(eps); param.addcdiv_(grad, avg, value=-lr)
                      text="d = g + λθ; s' = ρs + (1 − ρ)d²; θ' = θ − η·d/(√s' + ε)")


def _adagrad_rule() -> UpdateRule:
    d = GRAD + LAMBDA * THETA                 # grad = grad.add(param, alpha=weight_decay)
    s = M2ND + d**2                           # state_sum.addcmul_(grad, grad, value=1)
    return UpdateRule("adagrad", THETA - ETA * d / (sp.sqrt(s) + EPS), {"s": s}, (ETA, LAMBDA, EPS),
                      preconditioned=True,    # std = state_sum.sqrt().add_(eps); param.addcdiv_(grad, std, value=-clr)
                      text="d = g + λθ; s' = s + d²; θ' = θ − η·d/(√s' + ε)")


RULES: dict[str, UpdateRule] = {**_sgd_rules(), **_adam_rules(), "rmsprop": _rmsprop_rule(),
                                "adagrad": _adagrad_rule()}

# -- the declarations ----------------------------------------------------------------------------------------

#: torch classes, by name (``torch.optim.<name>``), in the order a saved state dict is matched against them.
TORCH_CLASSES: dict[str, TorchClass] = {c.name: c for c in (
    TorchClass("SGD", {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False},
               ("nesterov", "dampening")),
    TorchClass("Adam", {"decoupled_weight_decay": False, "amsgrad": False, "maximize": False}, ("betas",)),
    TorchClass("AdamW", {"decoupled_weight_decay": True, "amsgrad": False, "maximize": False}),
    TorchClass("RMSprop", {"momentum": 0.0, "centered": False, "maximize": False}, ("alpha", "centered")),
    TorchClass("Adagrad", {"lr_decay": 0.0, "maximize": False}, ("lr_decay", "initial_accumulator_value")),
)}

_SGD_STATE = {"b": "momentum_buffer"}
_ADAM_STATE = {"m": "exp_avg", "s": "exp_avg_sq"}
_ADAM_SELECT = (NOT_MAXIMIZED, Cond("amsgrad", "false"))

#: law name → declaration, in declaration order (the CLI lists them in this order).
DECLARATIONS: dict[str, OptimizerDecl] = {d.name: d for d in (
    OptimizerDecl("sgd", "SGD", (NOT_MAXIMIZED, Cond("momentum", "zero")), RULES["sgd"], RULES["sgd"], {},
                  "taylor", "torch.optim.SGD(lr, weight_decay)", "plain SGD"),
    OptimizerDecl("momentum", "SGD", (NOT_MAXIMIZED, Cond("momentum", "positive"), Cond("nesterov", "false")),
                  RULES["momentum/first"], RULES["momentum"], _SGD_STATE, "momentum",
                  "torch.optim.SGD(lr, momentum, dampening, weight_decay)", "momentum"),
    OptimizerDecl("nesterov", "SGD", (NOT_MAXIMIZED, Cond("momentum", "positive"), Cond("nesterov", "true")),
                  RULES["nesterov/first"], RULES["nesterov"], _SGD_STATE, "momentum",
                  "torch.optim.SGD(lr, momentum, weight_decay, nesterov=True)", "Nesterov momentum",
                  flags={"nesterov": True}),
    OptimizerDecl("adam", "Adam", _ADAM_SELECT + (Cond("decoupled_weight_decay", "false"),), RULES["adam"],
                  RULES["adam"], _ADAM_STATE, "preconditioned", "torch.optim.Adam(lr, weight_decay)", "Adam"),
    OptimizerDecl("adamw", "AdamW", _ADAM_SELECT + (Cond("decoupled_weight_decay", "true"),), RULES["adamw"],
                  RULES["adamw"], _ADAM_STATE, "preconditioned", "torch.optim.AdamW(lr, weight_decay)", "AdamW",
                  also_on=("Adam",)),
    OptimizerDecl("rmsprop", "RMSprop", (NOT_MAXIMIZED, Cond("centered", "false"), Cond("momentum", "zero")),
                  RULES["rmsprop"], RULES["rmsprop"], {"s": "square_avg"}, "preconditioned",
                  "torch.optim.RMSprop(lr, alpha, eps, weight_decay; centered=False, momentum=0)", "RMSprop"),
    OptimizerDecl("adagrad", "Adagrad", (NOT_MAXIMIZED, Cond("lr_decay", "zero")), RULES["adagrad"],
                  RULES["adagrad"], {"s": "sum"}, "preconditioned",
                  "torch.optim.Adagrad(lr, eps, weight_decay, initial_accumulator_value; lr_decay=0)", "Adagrad"),
)}

#: optimizer name → (rule of the first step, rule of every later step)
OPTIMIZERS: dict[str, tuple[UpdateRule, UpdateRule]] = {n: (d.first, d.rule) for n, d in DECLARATIONS.items()}


def _check_declarations() -> None:
    for d in DECLARATIONS.values():
        assert d.law_kind in LAW_KINDS, d
        assert all(c in TORCH_CLASSES for c in d.classes), d
        assert set(d.state) == set(d.rule.state) | set(d.first.state), d
        assert all(s in GROUP_ENTRIES for s in d.hyper if s is not STEP), d


_check_declarations()


def declaration(name: str) -> OptimizerDecl:
    """The declaration of a named optimizer law (SymtoolsError naming the choices for an unknown one)."""
    if name not in DECLARATIONS:
        raise SymtoolsError(f"unknown optimizer {name!r}; choose one of {', '.join(DECLARATIONS)}")
    return DECLARATIONS[name]


def optimizer(name: str) -> tuple[UpdateRule, UpdateRule]:
    """(first-step rule, later-step rule) of a named optimizer."""
    return OPTIMIZERS[declaration(name).name]


def torch_kwargs(name: str, **values: float) -> dict:
    """Keyword arguments of ``torch.optim.<declaration(name).torch_class>`` running law ``name``: the given
    values of its hyper-parameters, by python name (``lr=…, weight_decay=…``; the names the law lacks are
    ignored), and the declaration's flags. ``betas`` is assembled from ``beta1``/``beta2``."""
    decl = declaration(name)
    out: dict = {}
    for sym in decl.hyper:
        py = PYTHON_NAMES[sym]
        if sym is STEP or py not in values:
            continue
        entry, index = GROUP_ENTRIES[sym]
        if index is None:
            out[entry] = values[py]
        else:
            out.setdefault(entry, {})[index] = values[py]
    for entry, parts in list(out.items()):
        if isinstance(parts, dict):  # betas: both parts needed
            if set(parts) != {0, 1}:
                raise SymtoolsError(f"{name}: give both parts of {entry} or neither")
            out[entry] = (parts[0], parts[1])
    out.update(decl.flags)
    return out
