"""The ONE mapping from a torch optimizer (live, or a saved state dict) to the derived law it follows.

Everything here is read off the declarations of :mod:`symtools.symbolic.optimizers` (``DECLARATIONS``,
``TORCH_CLASSES``, ``GROUP_ENTRIES``); no optimizer name is written in this module. The training monitor, the
audit and the CLI use it, so they cannot disagree.

Rules (all from the declarations):

* a param group of ``torch.optim.<C>`` follows the first declared law that runs on C (``torch_class`` or
  ``also_on``) whose conditions (``select``) all hold; an entry the group lacks takes C's constructor default
  (``TorchClass.defaults``). None when no declaration fits, with a reason: ``SGD with maximize=True has no
  derived law``, ``RMSprop with centered=True has no derived law (rmsprop needs …)``;
* a whole optimizer (or a state dict's ``param_groups``) follows its groups' law when they agree. Groups that
  follow different laws keeping the same optimizer state (heavy ball and Nesterov; Adam and AdamW) give the
  first group's law: a caller checks each group (:func:`law_of_group`) where it applies a law. Groups whose
  laws keep different state (plain SGD and momentum) give None (``param groups mix momentum and plain SGD``),
  and so does one group without a law;
* a class is recognised by its exact type (a subclass of ``torch.optim.SGD`` has no law); a saved state dict
  without its class name is recognised by its param-group entries (``TorchClass.signature``).

Reasons: every ``(name, reason)`` pair below has ``reason == ""`` exactly when a law applies AND closes. For a
law that does not close (Adam, AdamW, RMSprop, Adagrad: ``closes(name)`` is False) the name is returned with a
reason saying so (``no exact law is derived for AdamW: …``), which a monitor can print as is.

Public API::

    CHOICES: tuple[str, ...]                     law names in declaration order (CLI choices)
    declaration(name) -> OptimizerDecl           (re-exported from symtools.symbolic.optimizers)
    HYPER_NAMES: tuple[str, ...]                 every param-group hyper-parameter, by its emitted python name
    closes(name) -> bool
    torch_class(name) -> str                     "SGD", "Adam", … (torch.optim.<it> runs the law)
    law_of_group(pg, optimizer_class) -> str | None
    law_of_group_with_reason(pg, optimizer_class) -> tuple[str | None, str]
    law_of_groups(groups, optimizer_class=None) -> tuple[str | None, str]
    law_of_optimizer(optimizer) -> tuple[str | None, str]
    law_of_state_dict(state_dict, optimizer_class=None) -> tuple[str | None, str]
    identify_class(groups) -> str | None          the torch class of saved param groups, from their entries
    hyper_of_group(pg, name) -> dict[str, float]  keys HYPER_NAMES; 0.0 for those the law lacks
    group_keys(name) -> tuple[str, ...]           param-group entries the law reads (hyper-parameters, selection)
    state_entry(name, state_symbol) -> str        torch optimizer-state key ("b" → "momentum_buffer", "k" → "step")
    state_entries(name) -> dict[str, str]
    decay(name, hyper) -> float                   θ' = decay·θ − η·u defines the applied update direction u
    make_optimizer(name, params, **values) -> torch.optim.Optimizer
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import sympy as sp

from symtools.errors import SymtoolsError
from symtools.symbolic.optimizers import (
    DECLARATIONS,
    GROUP_ENTRIES,
    PYTHON_NAMES,
    STEP,
    TORCH_CLASSES,
    OptimizerDecl,
    declaration,
    torch_kwargs,
)

__all__ = [
    "CHOICES",
    "HYPER_NAMES",
    "closes",
    "decay",
    "declaration",
    "group_keys",
    "hyper_of_group",
    "identify_class",
    "law_of_group",
    "law_of_group_with_reason",
    "law_of_groups",
    "law_of_optimizer",
    "law_of_state_dict",
    "make_optimizer",
    "state_entries",
    "state_entry",
    "torch_class",
]

#: law names, in declaration order.
CHOICES: tuple[str, ...] = tuple(DECLARATIONS)

#: every hyper-parameter kept in a param group, by the python name the emitted code uses (declaration order).
HYPER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(PYTHON_NAMES[s] for d in DECLARATIONS.values() for s in d.hyper
                                                   if s is not STEP))


def closes(name: str) -> bool:
    """Whether the law ``name`` closes (False for the preconditioned ones: Adam, AdamW, RMSprop, Adagrad)."""
    return declaration(name).closes


def torch_class(name: str) -> str:
    """The ``torch.optim`` class name that runs law ``name``."""
    return declaration(name).torch_class


def _class_name(optimizer_class) -> str | None:
    """The declared torch class named ``optimizer_class`` (case-insensitive), or None."""
    if optimizer_class is None:
        return None
    text = str(optimizer_class).lower()
    return next((c for c in TORCH_CLASSES if c.lower() == text), None)


def _fmt(value) -> str:
    try:
        if isinstance(value, bool):
            return repr(value)
        f = float(value)
        return repr(int(f)) if f.is_integer() and not isinstance(value, float) else repr(f)
    except (TypeError, ValueError):
        return repr(value)


def _value(pg: Mapping, cls: str, key: str):
    value = pg.get(key)
    return TORCH_CLASSES[cls].defaults.get(key) if value is None else value


def law_of_group_with_reason(pg: Mapping, optimizer_class: str | None) -> tuple[str | None, str]:
    """(law name, "") for a param group of ``torch.optim.<optimizer_class>``, or (None, why not).

    ``optimizer_class`` None: the class is recognised from the group's entries (:func:`identify_class`).
    The reason is "" whenever a law applies (closing or not; :func:`closes` tells which).
    """
    given = optimizer_class
    cls = _class_name(optimizer_class) if optimizer_class is not None else identify_class([pg])
    if cls is None:
        what = (f"optimizer {given}" if given is not None else
                f"an optimizer of unknown class (param group entries {sorted(k for k in pg if k != 'params')})")
        return None, (f"no law is declared for {what} (symtools.symbolic.optimizers declares "
                      f"{', '.join(TORCH_CLASSES)})")
    candidates = [d for d in DECLARATIONS.values() if cls in d.classes]
    failed: list[tuple[OptimizerDecl, str]] = []
    for d in candidates:
        bad = next((c for c in d.select if not c.holds(_value(pg, cls, c.key))), None)
        if bad is None:
            return d.name, ""
        failed.append((d, bad.key))
    keys = list(dict.fromkeys(k for _, k in failed))
    why = f"{cls} with " + ", ".join(f"{k}={_fmt(_value(pg, cls, k))}" for k in keys) + " has no derived law"
    if len(candidates) == 1:
        d = candidates[0]
        why += f" (the {d.name} law needs {', '.join(c.describe() for c in d.select)})"
    return None, why


def law_of_group(pg: Mapping, optimizer_class: str | None) -> str | None:
    """The law a param group of ``torch.optim.<optimizer_class>`` follows, or None
    (:func:`law_of_group_with_reason` says why)."""
    return law_of_group_with_reason(pg, optimizer_class)[0]


def identify_class(groups: Iterable[Mapping]) -> str | None:
    """The declared torch class whose signature entries appear in the first param group, or None."""
    groups = list(groups)
    if not groups:
        return None
    keys = set(groups[0])
    return next((c.name for c in TORCH_CLASSES.values() if c.signature and keys & set(c.signature)), None)


def _not_closed(name: str) -> str:
    return (f"no exact law is derived for {declaration(name).label}: its per-coordinate preconditioning breaks the gradient identity's "
            f"cancellation (the {name} law, docs/laws.md, measures the breaking term U1 = ⟨u, v⟩); recording "
            f"measured charges only")


def law_of_groups(groups: Sequence[Mapping], optimizer_class: str | None = None) -> tuple[str | None, str]:
    """(law name or None, reason) of an optimizer with these param groups (see the module docstring)."""
    groups = list(groups)
    if not groups:
        return None, "the optimizer has no param groups"
    cls = _class_name(optimizer_class) if optimizer_class is not None else identify_class(groups)
    if cls is None:
        return law_of_group_with_reason(groups[0], optimizer_class)
    found = [law_of_group_with_reason(pg, cls) for pg in groups]
    bad = next((why for name, why in found if name is None), None)
    if bad is not None:
        return None, bad
    names = list(dict.fromkeys(name for name, _ in found))
    if len({tuple(sorted(declaration(n).state.items())) for n in names}) > 1:
        labels = sorted((declaration(n).label for n in names), key=str.lower)
        return None, "param groups mix " + " and ".join(labels)
    name = names[0]
    return name, ("" if closes(name) else _not_closed(name))


def law_of_optimizer(optimizer) -> tuple[str | None, str]:
    """(law name or None, reason) for a live ``torch.optim`` optimizer (its exact class and its param groups)."""
    import torch

    kind = type(optimizer)
    cls = kind.__name__
    if getattr(torch.optim, cls, None) is not kind or _class_name(cls) is None:
        return None, (f"no law is declared for {kind.__module__}.{kind.__qualname__} (symtools.symbolic.optimizers "
                      f"declares torch.optim.{', torch.optim.'.join(TORCH_CLASSES)}, exact classes only)")
    return law_of_groups(optimizer.param_groups, cls)


def law_of_state_dict(state_dict: Mapping, optimizer_class: str | None = None) -> tuple[str | None, str]:
    """(law name or None, reason) from a saved ``optimizer.state_dict()`` (its ``param_groups``) and, when known,
    the optimizer's class name (a symtools checkpoint's ``config["optimizer_class"]``)."""
    return law_of_groups(list(state_dict.get("param_groups") or []), optimizer_class)


def hyper_of_group(pg: Mapping, name: str) -> dict[str, float]:
    """The hyper-parameters of law ``name`` in param group ``pg``, as floats keyed by :data:`HYPER_NAMES`
    (``lr``, ``weight_decay``, ``momentum``, ``dampening``, ``beta1``, ``beta2``, ``eps``, ``alpha``); 0.0 for
    those the law lacks (e.g. ``momentum`` under plain SGD even if the group has a dampening) and for entries
    the group lacks."""
    decl = declaration(name)
    out = {n: 0.0 for n in HYPER_NAMES}
    defaults = TORCH_CLASSES[decl.torch_class].defaults
    for sym in decl.hyper:
        if sym is STEP:
            continue
        entry, index = GROUP_ENTRIES[sym]
        value = pg.get(entry, defaults.get(entry))
        if value is not None:  # an entry a (hand-made) group lacks counts as 0, as torch's weight_decay default
            out[PYTHON_NAMES[sym]] = float(value if index is None else value[index])
    return out


def group_keys(name: str) -> tuple[str, ...]:
    """The param-group entries law ``name`` reads: its hyper-parameters' entries and its selection entries.
    Two groups equal on these follow the same law with the same hyper-parameters."""
    decl = declaration(name)
    keys = [GROUP_ENTRIES[s][0] for s in decl.hyper if s is not STEP] + [c.key for c in decl.select]
    return tuple(dict.fromkeys(keys))


def state_entries(name: str) -> dict[str, str]:
    """State symbol kind → torch optimizer-state entry of law ``name`` (plus ``"k"`` → ``"step"`` when its rule
    reads the step count)."""
    decl = declaration(name)
    out = dict(decl.state)
    if STEP in decl.hyper:
        out["k"] = "step"
    return out


def state_entry(name: str, state_symbol) -> str:
    """The torch optimizer-state key of state symbol ``state_symbol`` (a kind such as ``"b"``, or its template
    symbol) under law ``name``: ``state_entry("momentum", "b") == "momentum_buffer"``."""
    kind = state_symbol.name if isinstance(state_symbol, sp.Symbol) else str(state_symbol)
    entries = state_entries(name)
    if kind not in entries:
        raise SymtoolsError(f"the {name} law keeps no optimizer state {kind!r} (it keeps "
                            f"{', '.join(f'{k} = {v}' for k, v in entries.items()) or 'none'})")
    return entries[kind]


def decay(name: str, hyper: Mapping[str, float]) -> float:
    """The factor of θ outside the update direction: θ' = decay·θ − η·u (1 − ηλ for AdamW, else 1), at the
    hyper-parameters ``hyper`` (python names, e.g. from :func:`hyper_of_group`)."""
    expr = sp.sympify(declaration(name).rule.decay)
    values = {s: float(hyper.get(PYTHON_NAMES[s], 0.0)) for s in expr.free_symbols}
    return float(expr.xreplace(values))


def make_optimizer(name: str, params, **values: float):
    """``torch.optim.<torch_class(name)>(params, …)`` running law ``name``: ``values`` by python name
    (``lr=0.1, weight_decay=5e-4, momentum=0.9 …``; a hyper-parameter not given keeps torch's default) plus the
    declaration's flags. SymtoolsError when a nonzero value is given that the law has no use for, or when the
    optimizer built does not follow ``name`` (e.g. ``momentum`` with ``momentum=0``)."""
    import torch

    decl = declaration(name)
    extra = [k for k, v in values.items() if k not in decl.python_names and v]
    if extra:
        raise SymtoolsError(f"the {name} law ({decl.call}) has no {', '.join(extra)}")
    cls = getattr(torch.optim, decl.torch_class)
    opt = cls(params, **torch_kwargs(name, **values))
    got, why = law_of_optimizer(opt)
    if got != name:
        needs = ", ".join(c.describe() for c in decl.select)
        raise SymtoolsError(f"torch.optim.{decl.torch_class} built with {values} follows "
                            f"{got or 'no law'}{' (' + why + ')' if got is None else ''}, not {name} "
                            f"(which needs {needs})")
    return opt
