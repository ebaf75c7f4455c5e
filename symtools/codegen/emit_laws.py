"""Emit the per-step charge laws as readable torch modules: ``generated/law_<family>_<optimizer>.py``.

A law module (contract in ``docs/laws.md``) holds, printed from the SymPy results of
:mod:`symtools.symbolic.laws` and :mod:`symtools.symbolic.continuous`:

* one elementwise torch function per (quantity, slot) — ``density_G__x_in(x_in, g_x_in)`` — for every tracked
  state quantity and measured term, in the tables ``DENSITY[name][slot]`` and ``ARGS[name][slot]`` (argument
  names: the slot ``x``, its gradient ``g_x``, momentum buffer before the step ``b_x``, applied update
  direction ``u_x``, displacement of the step ``d_x``); a per-group value is the density summed over the
  group's elements, as for the symmetry modules (:mod:`symtools.codegen.emit`, whose helpers this reuses);
* ``first_step`` / ``step(state, measured, lr, weight_decay, momentum=0.0, dampening=0.0)``: the exact
  recurrence on dicts of per-group float64 tensors;
* ``continuous_start`` / ``continuous_step``: the paper's continuous theory advanced by one step with that
  step's hyper-parameters (None where the paper gives no theory: Nesterov, Adam).
"""

from __future__ import annotations

from functools import lru_cache

import sympy as sp

from symtools.codegen import emit_facts
from symtools.codegen.emit import HEADER, _arg_names, _function
from symtools.codegen.printer import torch_expr
from symtools.symbolic import library
from symtools.symbolic.continuous import ContinuousStep, continuous_step
from symtools.symbolic.derive import derive
from symtools.symbolic.laws import Law, Term, law, quantity
from symtools.symbolic.optimizers import DECLARATIONS, PYTHON_NAMES

OPTIMIZERS = tuple(DECLARATIONS)  # every declared optimizer (symtools.symbolic.optimizers), in declaration order
PREFIX = "law_"
HYPER_ARGS = "lr, weight_decay, momentum=0.0, dampening=0.0"
ARG_PREFIXES = ("b_", "u_", "d_")  # buffer, update direction, displacement (after the gradient g_)

TITLES = {name: decl.title for name, decl in DECLARATIONS.items()}  # the torch call each law stands for


@lru_cache(maxsize=None)
def families() -> tuple[str, ...]:
    """The families that get law modules: every elementwise family of the library
    (:data:`symtools.symbolic.library.ELEMENTWISE`, in its order) whose derivation finds a charge."""
    return tuple(name for name in library.ELEMENTWISE if derive(library.elementwise(name)).charge.exists)


def __getattr__(name: str):
    if name == "FAMILIES":  # derived on first use (a derivation per family), not at import
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def module_name(family: str, optimizer: str) -> str:
    return f"{PREFIX}{family}_{optimizer}"


def _python(expr: sp.Expr) -> sp.Expr:
    """Hyper-parameter symbols renamed to torch's keywords (η → lr, λ → weight_decay, …)."""
    return sp.sympify(expr).xreplace({s: sp.Symbol(n, **s.assumptions0) for s, n in PYTHON_NAMES.items()})


def _equation(name: str, expr: sp.Expr) -> str:
    return f"{name}' = {sp.sstr(_python(expr))}"


def _densities(terms: list[Term], slots: tuple[str, ...]) -> tuple[list[str], dict, dict]:
    code, table, args_table = [], {}, {}
    for term in terms:
        for s in slots:
            expr = sp.sympify(term.density.get(s, 0))
            names = {str(x) for x in expr.free_symbols}
            extra = tuple(p + t for p in ARG_PREFIXES for t in slots if p + t in names)
            args = _arg_names(expr, s, slots, extra)
            fname = f"density_{term.name}__{s}"
            doc = f"{term.name} on slot {s}: {term.meaning}."
            code.append("\n" + _function(fname, args, expr, doc, s) + "\n")
            table.setdefault(term.name, {})[s] = fname
            args_table.setdefault(term.name, {})[s] = args
    return code, table, args_table


def _update_function(name: str, doc: str, update: dict[str, sp.Expr],
                     auxiliary: list[tuple[sp.Symbol, sp.Expr]] = (), tensors: bool = False) -> str:
    """def name(state, measured, lr, …): unpack what the update reads, assignments, return the new state."""
    exprs = [_python(e) for e in update.values()]
    aux = [(s, _python(e)) for s, e in auxiliary]
    used = set().union(*(e.free_symbols for e in exprs), *(e.free_symbols for _, e in aux)) if exprs else set()
    used -= {s for s, _ in aux}
    hyper = {sp.Symbol(n) for n in ("lr", "weight_decay", "momentum", "dampening")}
    names = sorted(str(s) for s in used if s.name not in {h.name for h in hyper})
    lines = [f"def {name}(state, measured, {HYPER_ARGS}):", f'    """{doc}"""']
    if tensors:
        first = next(iter(update))
        lines.append(f"    lr, weight_decay, momentum, dampening = _hyper(state[{first!r}], lr, weight_decay, momentum, "
                     "dampening)")
    for n in names:
        lines.append(f"    {n} = {'state' if n in update else 'measured'}[{n!r}]")
    for s, e in aux:
        lines.append(f"    {s} = {torch_expr(e)}")
    reps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("t"))
    for s, e in reps:
        lines.append(f"    {s} = {torch_expr(e)}")
    body = ", ".join(f"{k!r}: {torch_expr(e)}" for k, e in zip(update, reduced))
    lines.append(f"    return {{{body}}}")
    return "\n".join(lines)


def emit_law(lw: Law, cont: ContinuousStep | None = None) -> str:
    """Source of the module for one law (and the continuous theory of the same optimizer, if any)."""
    d = lw.derivation
    slots = d.slots
    first_rule, rule = lw.rules
    title = f"Per-step law of the '{lw.family}' charge under {TITLES.get(lw.optimizer, lw.optimizer)}."
    out = [HEADER.format(title=title, spec=d.action.spec())]
    meaning = {t.name: t.meaning for t in lw.state + lw.measured}
    predicted = {t.name: t.predicted for t in lw.measured if t.predicted}
    cont_terms = [t for t in (cont.measured if cont else ()) if t.name not in meaning]
    meaning.update({t.name: t.meaning for t in cont_terms})
    out.append(
        f"FAMILY = {lw.family!r}\nOPTIMIZER = {lw.optimizer!r}\nSPEC = {d.action.spec()!r}\nSLOTS = {slots!r}\n"
        f"RULE = {rule.text!r}\nFIRST_RULE = {first_rule.text!r}\nCLOSED = {lw.closed!r}\n"
        f"STATE = {lw.state_names!r}\nMEASURED = {lw.measured_names!r}\n"
        f"FIRST_STATE = {lw.first_state!r}\nFIRST_MEASURED = {lw.first_measured!r}\n"
        f"MEANING = {meaning!r}\nPREDICTED = {predicted!r}\n"
        f"LAW = {({k: _equation(k, e) for k, e in lw.update.items()})!r}\n"
        f"FIRST_LAW = {({k: _equation(k, e) for k, e in lw.first_update.items()})!r}\n")
    code, table, args_table = _densities(list(lw.state + lw.measured) + cont_terms, slots)
    out += code
    entries = ", ".join(f"{n!r}: {{" + ", ".join(f"{s!r}: {f}" for s, f in fs.items()) + "}" for n, fs in table.items())
    out.append(f"DENSITY = {{{entries}}}\nARGS = {args_table!r}\n")
    out.append(_facts(lw, cont, list(lw.state + lw.measured) + cont_terms))
    reads = "state[X] for X in FIRST_STATE and measured[M] for M in FIRST_MEASURED"
    out.append("\n" + _update_function(
        "first_step", f"torch's first step ({first_rule.text}): the new state from {reads} (per-group float64 "
        "tensors; momentum/dampening are ignored where the rule has none).", lw.first_update) + "\n")
    when = ("measured on θ, g, buffers BEFORE the step" if lw.closed
            else "the U terms measured on u, the update the step applied")
    out.append("\n" + _update_function(
        "step", f"A later step ({rule.text}): the new state from state[X] for X in STATE and measured[M] for M in "
        f"MEASURED (per-group float64 tensors; {when}).", lw.update) + "\n")
    if cont is None:
        out.append("\nCONTINUOUS_MODEL = None\nCONTINUOUS_STATE = ()\nCONTINUOUS_MEASURED = ()\n"
                   "continuous_start = None\ncontinuous_step = None\n")
    else:
        start = ", ".join(f"{k!r}: " + ("torch.zeros_like(state['Q'])" if e == 0 else f"state[{str(e)!r}]")
                          for k, e in cont.start.items())
        out.append(f"\nCONTINUOUS_MODEL = {cont.model + ': ' + cont.doc!r}\nCONTINUOUS_STATE = {cont.state!r}\n"
                   f"CONTINUOUS_MEASURED = {tuple(t.name for t in cont.measured)!r}\n")
        out.append('\ndef _hyper(like, *values):\n    """The hyper-parameters as float64 tensors on the device of '
                   '``like`` (torch functions take tensors)."""\n'
                   "    return tuple(torch.as_tensor(v, dtype=torch.float64, device=like.device) for v in values)\n")
        out.append(f'\ndef continuous_start(state):\n    """The continuous state at t = 0 from the law\'s state '
                   f'(the paper\'s initial conditions)."""\n    return {{{start}}}\n')
        out.append("\n" + _update_function(
            "continuous_step", f"{cont.model}: the continuous state one step later ({cont.doc}); reads "
            "measured[M] for M in CONTINUOUS_MEASURED.", cont.update, auxiliary=cont.auxiliary, tensors=True) + "\n")
    return "\n".join(out).rstrip() + "\n"


def _facts(lw: Law, cont: ContinuousStep | None, terms: list[Term]) -> str:
    """The constants of :mod:`symtools.codegen.emit_facts` for one law module."""
    densities = {t.name: t.density for t in terms}
    q = next((t.density for t in lw.state if t.name == "Q"), None)
    charge = lw.derivation.charge.density
    factor = emit_facts.charge_factor(charge, q) if charge and q else None
    names = [*lw.state_names, *lw.measured_names, *lw.first_state, *lw.first_measured]
    updates = [lw.update, lw.first_update]
    auxiliary = []
    if cont is not None:
        names += [*cont.state, *(t.name for t in cont.measured)]
        updates.append(cont.update)
        auxiliary = cont.auxiliary
    variables = [quantity(n) for n in dict.fromkeys(names)]
    return (f"MONOMIALS = {emit_facts.monomial_table(densities)!r}\n"
            f"DENSITY_TEXT = {({n: emit_facts.texts(d) for n, d in densities.items()})!r}\n"
            f"NONNEGATIVE = {({n: emit_facts.nonnegative(d) for n, d in densities.items()})!r}\n"
            f"CHARGE_FACTOR = {factor!r}\n"
            f"LINEAR = {emit_facts.linear(updates, variables, auxiliary)!r}\n")


def sources() -> dict[str, str]:
    """Module name → source of every law module (derived now, not read from disk)."""
    out = {}
    for family in families():
        d = derive(library.elementwise(family))
        for opt in OPTIMIZERS:
            out[module_name(family, opt)] = emit_law(law(d, opt), continuous_step(d, opt))
    return out


def table_markdown() -> str:
    """The family × optimizer table of tracked state and measured terms (``docs/laws.md`` embeds it)."""
    import importlib

    rows = ["| family | optimizer | state | measured (later steps) | first step reads | continuous state ← measured |",
            "|---|---|---|---|---|---|"]
    for family in families():
        for opt in OPTIMIZERS:
            m = importlib.import_module(f"symtools.codegen.generated.{module_name(family, opt)}")
            cont = (", ".join(m.CONTINUOUS_STATE) + " ← " + (", ".join(m.CONTINUOUS_MEASURED) or "—")
                    if m.CONTINUOUS_STATE else "—")
            rows.append(f"| {family} | {opt} | {', '.join(m.STATE)} | {', '.join(m.MEASURED)} | "
                        f"{', '.join(m.FIRST_STATE + m.FIRST_MEASURED)} | {cont} |")
    return "\n".join(rows) + "\n"
