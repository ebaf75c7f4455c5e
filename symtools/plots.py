"""Figures of a monitored training run, in the style of the paper's Figs 5, 6 and 8–10.

Reads only the run's records (``RUN/records``, through :func:`symtools.numeric.records.read_stream` and
:func:`~symtools.numeric.records.read_meta`) as written by :class:`symtools.numeric.monitor.Monitor`:

- stream ``laws``: one row per step, columns ``family|index|layer|quantity`` with quantity one of
  ``measured``, ``step`` (the per-step law's prediction from the measured state one step earlier),
  ``accumulated`` (the law iterated on its own predictions from step 0), ``continuous`` (the paper's
  ODE solution), each summed over the layer's groups, and ``residual_<quantity>`` (the largest per-group
  relative residual of that prediction in the layer); meta ``optimizer``: the law's name;
- streams ``groups_<family>``: per-group values every ``stride`` steps, columns ``quantity|index|k``
  (``k`` = group number within site ``index``), meta ``sites = [[index, layer, count], ...]``.

The column names are read by :mod:`symtools.numeric.record_schema` (their one reader and writer). Every
legend or title that names the law or the continuous theory takes its words from the derived law module
``symtools.codegen.generated.law_<family>_<optimizer>`` of the run's law (``OPTIMIZER``, ``RULE``, ``LAW``,
``CONTINUOUS_MODEL``; :func:`law_text`), never from text written here; a charge is named by its formula,
written from the family's generated module ``CHARGE_TEXT`` (:func:`charge_label`).

Figures (each written as PNG and PDF), empirical lines solid and coloured, theory black (the exact
accumulated law dashed, the continuous theory dotted), as in the paper:

==================  ==========================================================================================
``layers``          one panel per family, one line per layer (colour = depth): measured per-layer charge vs
                    the accumulated law and the continuous theory (paper Figs 5, 8, 9, 10 at layer level)
``groups_<family>`` one panel per layer, a sample of at most ``max_groups`` groups (neurons/channels) each
``momentum``        the translation sums under a momentum law (the declarations of ``law_kind`` "momentum":
                    heavy ball, Nesterov; :func:`momentum_laws`): measured vs the run's exact law (oscillates
                    for large β) and its continuous theory where the derivation has one (heavy ball: the
                    damped oscillator, paper Fig. 6); only for runs with such a law
``residuals``       log scale: per-step law, accumulated law and continuous theory residuals over steps,
                    one panel per family; only when the run has law predictions
==================  ==========================================================================================

matplotlib is imported only when a figure is drawn (``pip install matplotlib``); figures are drawn on
the Agg canvas without pyplot, so the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from symtools.errors import SymtoolsError
from symtools.numeric.record_schema import (GROUP_QUANTITIES, LAWS_STREAM, RESIDUALS, LawSeries, groups_family,
                                            parse_sites, read_groups, read_laws, residual)
from symtools.numeric.records import list_streams, read_meta, read_stream

__all__ = ["plot_run", "load_run", "PlottedRun", "LawText", "law_text", "charge_label", "momentum_laws", "FIGURES"]

#: figure names (files NAME.png and NAME.pdf); ``groups_<family>`` comes once per family
FIGURES = ("layers", "groups_<family>", "momentum", "residuals")
FORMATS = ("png", "pdf")
FAMILY_ORDER = ("translation", "scale", "rescale")  # the paper's order
RESIDUAL_FLOOR = 1e-18  # an exactly-zero residual is drawn here (a log axis has no 0)

# styles shared by every figure: empirical coloured and solid, theory black
MEASURED = dict(linestyle="-", linewidth=2.0, alpha=0.85)
ACCUMULATED = dict(color="black", linestyle="--", linewidth=0.9)
CONTINUOUS = dict(color="black", linestyle=":", linewidth=1.1)
RESIDUAL_STYLE = {"step": dict(linestyle="-", linewidth=1.3), "accumulated": dict(linestyle="--", linewidth=1.3),
                  "continuous": dict(linestyle=":", linewidth=1.5)}
LEGEND_WIDTH = 72  # characters per line of a legend below the panels (a derived formula is wrapped)
PANEL_LEGEND_WIDTH = 36  # the same for a legend beside a panel


# ----------------------------------------------------------------------------------------- the law's words
def momentum_laws() -> tuple[str, ...]:
    """The declared optimizer laws whose derivation is the momentum kind (a buffer: heavy ball, Nesterov), in
    declaration order: the runs that get the momentum figure (``symtools.symbolic.optimizers.DECLARATIONS``)."""
    from symtools.symbolic.optimizers import DECLARATIONS

    return tuple(name for name, decl in DECLARATIONS.items() if decl.law_kind == "momentum")


def charge_label(family: str) -> str:
    """The charge of ``family`` as a formula written from its generated module's ``CHARGE_TEXT``
    (:func:`symtools.audit.charges.charge_formula`: ``Σ x_in² − Σ x_out²``), or "charge" when there is none."""
    try:
        module = importlib.import_module(f"symtools.codegen.generated.{family}")
    except ImportError:
        return "charge"
    from symtools.audit.charges import charge_formula

    return charge_formula(getattr(module, "CHARGE_TEXT", None)) or "charge"


@dataclass(frozen=True)
class LawText:
    """What the figures say about the law one family follows, in the words of its derived module
    ``symtools.codegen.generated.law_<family>_<optimizer>``.

    ``name``: the law's name (the module's ``OPTIMIZER``; the ``laws`` meta's ``optimizer`` when no module
    exists; None: no law, measured only). ``rule``: the optimizer's update as derived (``RULE``), ``law``:
    the law of the charge (``LAW["Q"]``), ``continuous``: the continuous theory's name, the first clause of
    ``CONTINUOUS_MODEL`` (None: the derivation has no continuous theory for this law, or no module).
    ``found``: whether the module was found."""

    name: str | None
    rule: str | None = None
    law: str | None = None
    continuous: str | None = None
    found: bool = False

    def accumulated(self) -> str:
        """Legend of the accumulated law's line."""
        return f"exact {self.name} law, accumulated from step 0"

    def title(self) -> str:
        """The law in a figure's title: its name and the optimizer's update it was derived from."""
        if not self.name:
            return "none (measured only)"
        return f"{self.name} ({self.rule})" if self.rule else self.name

    def continuous_label(self) -> str:
        """Legend of the continuous theory's line."""
        return f"continuous theory: {self.continuous}" if self.continuous else "continuous theory"

    def no_continuous(self) -> str:
        return f"no continuous theory for the {self.name} law"

    def residual(self, quantity: str) -> str:
        """Legend of one residual's line style."""
        if quantity == "continuous":
            return self.continuous_label()
        return {"step": f"per-step {self.name} law", "accumulated": f"{self.name} law accumulated from step 0"}[quantity]


def law_text(optimizer: str | None, family: str) -> LawText:
    """The words of the law ``optimizer`` for ``family``, from ``symtools.codegen.generated.law_<family>_<optimizer>``."""
    if not optimizer:
        return LawText(None)
    try:
        module = importlib.import_module(f"symtools.codegen.generated.law_{family}_{optimizer}")
    except ImportError:
        return LawText(optimizer)
    model = getattr(module, "CONTINUOUS_MODEL", None)
    clause = model.split(":", 1)[0].strip() if isinstance(model, str) and model.strip() else None
    return LawText(getattr(module, "OPTIMIZER", optimizer), getattr(module, "RULE", None) or None,
                   (getattr(module, "LAW", None) or {}).get("Q"), clause, True)


# ----------------------------------------------------------------------------------------- reading
@dataclass
class PlottedRun:
    """What the plots need from one run: the ``laws`` stream split per site, where the groups streams are."""

    run: Path
    records: Path
    steps: np.ndarray
    sites: list[LawSeries]
    optimizer: str | None
    group_streams: dict[str, str]  # family → stream name
    config: dict

    @property
    def families(self) -> list[str]:
        found = list(dict.fromkeys(s.family for s in self.sites))
        return sorted(found, key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f))

    def of(self, family: str) -> list[LawSeries]:
        return [s for s in self.sites if s.family == family]

    def law(self, family: str) -> LawText:
        """The words of the law this run's ``family`` follows (see :func:`law_text`)."""
        return law_text(self.optimizer, family)


def _resolve(run: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(run)
    if not path.exists():
        raise SymtoolsError(f"no run at {path} (expected a run directory such as runs/NAME)")
    if not path.is_dir():
        raise SymtoolsError(f"{path} is not a directory (expected a run directory such as runs/NAME)")
    if (path / "records").is_dir():
        return path, path / "records"
    if list_streams(path):  # the records directory itself was given
        return path.parent, path
    raise SymtoolsError(f"{path} has no records/ directory: not a symtools run (make one with `symtools train`)")


def load_run(run: str | os.PathLike) -> PlottedRun:
    """Read the monitor's streams of ``run`` (a run directory or its ``records/``); SymtoolsError if absent."""
    run_dir, records = _resolve(run)
    streams = list_streams(records)
    if not streams:
        raise SymtoolsError(f"{records} holds no record streams")
    if LAWS_STREAM not in streams:
        raise SymtoolsError(f"{records} has no monitor streams (laws, groups_<family>): the run was trained "
                            f"without the conservation-law monitor (use `symtools train` or pass a Monitor callback)")
    columns, data = read_stream(records, LAWS_STREAM)
    if data.shape[0] == 0:
        raise SymtoolsError(f"{records}/{LAWS_STREAM} has no rows yet: nothing to plot")
    meta = read_meta(records, LAWS_STREAM).get("meta", {})
    try:
        sites = {s.index: s for s in read_laws(columns, data)}
    except SymtoolsError as exc:
        raise SymtoolsError(f"{records}/{LAWS_STREAM}: {exc}") from None
    group_streams = {}
    for name in streams:
        family = groups_family(name)
        if family is None:
            continue
        group_streams[family] = name
        try:
            listed = parse_sites(read_meta(records, name).get("meta", {}).get("sites", []))
        except SymtoolsError as exc:
            raise SymtoolsError(f"{records}/{name}: {exc}") from None
        for index, _, count in listed:
            if index in sites:
                sites[index].count = count
    config = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            config = json.loads(summary.read_text(encoding="utf-8")).get("config", {}) or {}
        except (OSError, ValueError):
            config = {}
    return PlottedRun(run=run_dir, records=records, steps=np.asarray(data[:, 0]),
                      sites=sorted(sites.values(), key=lambda s: s.index), optimizer=meta.get("optimizer"),
                      group_streams=group_streams, config=config)


def _labels(sites: Sequence[LawSeries]) -> list[str]:
    """Layer names, made unique where one layer holds two sites of a family (e.g. a weight's columns and a bias)."""
    names = [s.layer for s in sites]
    out = []
    for s in sites:
        if names.count(s.layer) > 1:
            plural = "s" if s.count != 1 else ""
            out.append(f"{s.layer} ({s.count} group{plural})" if s.count else f"{s.layer} #{s.index}")
        else:
            out.append(s.layer)
    return out


def sample_groups(count: int, max_groups: int) -> np.ndarray:
    """At most ``max_groups`` group numbers spread evenly over ``0 … count−1`` (all when there are few)."""
    if count <= max_groups:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max_groups).round().astype(int))


# ----------------------------------------------------------------------------------------- drawing
def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise SymtoolsError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    return matplotlib, Figure, FigureCanvasAgg, Line2D


def _new_figure(panels: int, ncols: int | None = None, panel_size=(4.6, 3.3)):
    _, Figure, FigureCanvasAgg, _ = _matplotlib()
    ncols = ncols or min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols + 2.4, panel_size[1] * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg regardless of pyplot's backend
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def _depth_colours(n: int) -> list:
    matplotlib = _matplotlib()[0]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _style_handles(text: LawText, with_law: bool, with_continuous: bool, accumulated: str | None = None,
                   width: int = LEGEND_WIDTH):
    """Legend handles of the line styles: measured; the accumulated law and the continuous theory (named by
    the law's module) where drawn; "no continuous theory" where the law has a module without one."""
    Line2D = _matplotlib()[3]
    handles = [Line2D([], [], color="0.45", **MEASURED, label="measured (empirical)")]
    if with_law:
        handles.append(Line2D([], [], **ACCUMULATED, label=accumulated or _wrap(text.accumulated(), width)))
    if with_continuous:
        handles.append(Line2D([], [], **CONTINUOUS, label=_wrap(text.continuous_label(), width)))
    elif with_law and text.found and text.continuous is None:
        handles.append(Line2D([], [], linestyle="none", label=_wrap(text.no_continuous(), width)))
    return handles


def _wrap(text: str, width: int = LEGEND_WIDTH, indent: str = "   ") -> str:
    """``text`` in lines of at most ``width`` characters (words kept whole), continuation lines indented."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, subsequent_indent=indent)) or text


def _markers(n: int) -> dict:
    return dict(marker="o", markersize=3) if n <= 25 else {}


def _predictions(rec: PlottedRun, families: Sequence[str]) -> str:
    """What the dashed and dotted lines are, in the words of the families' law modules."""
    if not rec.optimizer:
        return "no law (measured only)"
    texts = [rec.law(f) for f in families]
    words = f"exact {texts[0].name if texts else rec.optimizer} law accumulated (dashed)"
    theories = list(dict.fromkeys(t.continuous for t in texts if t.continuous))
    if theories:
        return words + f", continuous theory: {'; '.join(theories)} (dotted)"
    if any(t.found for t in texts):
        return words + f", {texts[0].no_continuous()}"
    return words


def _suptitle(fig, rec: PlottedRun, what: str) -> None:
    """The figure's title (:func:`_title`), each line wrapped to the figure's width (10 pt: ~13 characters an inch)."""
    width = max(int(fig.get_figwidth() * 13), 40)
    lines = _title(rec, what).split("\n")
    fig.suptitle("\n".join(_wrap(line, width, indent="") for line in lines), fontsize=10)


def _title(rec: PlottedRun, what: str) -> str:
    c = rec.config
    hyper = []
    for key, sym in (("lr", "η"), ("wd", "λ"), ("momentum", "β")):
        if isinstance(c.get(key), (int, float)):
            hyper.append(f"{sym}={c[key]:g}")
    law = rec.law(rec.families[0] if rec.families else "").title()
    model = c.get("model") or c.get("model_class") or ""
    second = " · ".join(x for x in (model, f"law: {law}", ", ".join(hyper)) if x)
    return f"{rec.run.name}: {what}\n{second}"


def _save(fig, out: Path, name: str, formats: Sequence[str]) -> list[Path]:
    written = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=130, format=fmt, metadata={"Creator": "symtools"} if fmt == "pdf" else None)
        fig.set_layout_engine("none")  # the layout of the first save holds for the others (saves a layout pass)
        written.append(path)
    return written


def _step_axis(ax) -> None:
    """x axis in optimizer steps (integers), light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step (optimizer updates)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.25)


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")


def layers_figure(rec: PlottedRun, families: Sequence[str]):
    """Per-layer charges: one panel per family, one colour per layer (by depth)."""
    fig, axes = _new_figure(len(families))
    _suptitle(fig, rec, f"per-layer charges: measured (colour) vs {_predictions(rec, families)}")
    markers = _markers(len(rec.steps))
    for ax, fam in zip(axes, families):
        sites = rec.of(fam)
        colours = _depth_colours(len(sites))
        any_law = any_cont = False
        handles = []
        for site, colour, label in zip(sites, colours, _labels(sites)):
            (h,) = ax.plot(rec.steps, site.values["measured"], color=colour, label=label, **MEASURED, **markers)
            handles.append(h)
            if site.has("accumulated"):
                ax.plot(rec.steps, site.values["accumulated"], **ACCUMULATED)
                any_law = True
            if site.has("continuous"):
                ax.plot(rec.steps, site.values["continuous"], **CONTINUOUS)
                any_cont = True
        ax.set_title(f"{fam}: {charge_label(fam)} per layer", fontsize=10)
        _step_axis(ax)
        ax.set_ylabel("Σ over the layer's groups")
        ax.legend(handles=_style_handles(rec.law(fam), any_law, any_cont, width=PANEL_LEGEND_WIDTH) + handles,
                  fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="layer (colour = depth)", title_fontsize=7)
    return fig


def groups_figure(rec: PlottedRun, family: str, max_groups: int):
    """Per-group (neuron/channel) charges of one family: one panel per layer, a sample of groups each."""
    name = rec.group_streams[family]
    columns, data = read_stream(rec.records, name, mmap=True)
    meta_sites = read_meta(rec.records, name).get("meta", {}).get("sites", [])
    try:
        group_sites = read_groups(columns, data, meta_sites, family=family)
    except SymtoolsError as exc:
        raise SymtoolsError(f"{rec.records}/{name}: {exc}") from None
    by_index = {s.index: s for s in rec.sites}
    steps = np.asarray(data[:, 0])
    panel_sites = [g for g in group_sites if g.index in by_index]
    fig, axes = _new_figure(max(len(panel_sites), 1), ncols=min(max(len(panel_sites), 1), 4), panel_size=(4.0, 3.0))
    _suptitle(fig, rec, f"{family}: per-group charges {charge_label(family)} — measured (colour), "
                        f"{_predictions(rec, [family])}")
    markers = _markers(len(steps))
    labels = dict(zip([s.index for s in rec.of(family)], _labels(rec.of(family))))
    any_law = any_cont = False
    matplotlib = _matplotlib()[0]
    cmap = matplotlib.colormaps["tab10"]  # strong colours under the black theory lines
    for ax, site in zip(axes, panel_sites):
        count = site.count
        chosen = sample_groups(count, max_groups)
        series = {q: site.values(q, chosen) for q in GROUP_QUANTITIES if site.has(q)}
        for n in range(len(chosen)):
            colour = cmap(n % 10)
            if "measured" in series:
                ax.plot(steps, series["measured"][:, n], color=colour, **{**MEASURED, "linewidth": 1.6}, **markers)
            if "accumulated" in series and np.isfinite(series["accumulated"][:, n]).any():
                ax.plot(steps, series["accumulated"][:, n], **ACCUMULATED)
                any_law = True
            if "continuous" in series and np.isfinite(series["continuous"][:, n]).any():
                ax.plot(steps, series["continuous"][:, n], **CONTINUOUS)
                any_cont = True
        shown = (f"all {count} groups" if count > 1 else "1 group") if len(chosen) == count \
            else f"{len(chosen)} of {count} groups"
        ax.set_title(f"{labels.get(site.index, site.layer)}: {shown}", fontsize=9)
        _step_axis(ax)
        if len(steps) == 0:
            _empty_note(ax, "no per-group rows yet")
    if not panel_sites:
        _empty_note(axes[0], f"no {family} groups selected")
    axes[0].set_ylabel("per-group charge")
    fig.legend(handles=_style_handles(rec.law(family), any_law, any_cont), loc="outside lower center", ncols=3,
               fontsize=8)
    return fig


def momentum_figure(rec: PlottedRun):
    """Translation sums under momentum: measured vs the run's exact law and its continuous theory, if any
    (the heavy ball's is the driven damped oscillator; the words come from the law's module)."""
    sites = rec.of("translation")
    text = rec.law("translation")
    fig, axes = _new_figure(len(sites), ncols=min(len(sites), 4), panel_size=(4.0, 3.0))
    beta = rec.config.get("momentum")
    theory = (f"continuous theory: {text.continuous} (dotted)" if text.continuous
              else text.no_continuous() if text.found else "")
    _suptitle(fig, rec, f"{text.name}: translation sums Σθ per layer — measured (colour), exact {text.name} "
                        f"law accumulated (dashed)" + (f", {theory}" if theory else "")
                        + (f", β = {beta:g}" if isinstance(beta, (int, float)) else ""))
    colours = _depth_colours(len(sites))
    markers = _markers(len(rec.steps))
    any_cont = False
    for ax, site, colour, label in zip(axes, sites, colours, _labels(sites)):
        ax.plot(rec.steps, site.values["measured"], color=colour, **MEASURED, **markers)
        if site.has("accumulated"):
            ax.plot(rec.steps, site.values["accumulated"], **ACCUMULATED)
        if site.has("continuous"):
            ax.plot(rec.steps, site.values["continuous"], **CONTINUOUS)
            any_cont = True
        ax.set_title(label, fontsize=9)
        _step_axis(ax)
    axes[0].set_ylabel("Σθ over the layer's translation groups")
    accumulated = text.accumulated()
    if text.law:
        accumulated += ":\n" + _wrap(text.law, LEGEND_WIDTH)
    handles = _style_handles(text, True, any_cont, accumulated=accumulated)
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    return fig


def residuals_figure(rec: PlottedRun, families: Sequence[str]):
    """Largest per-group relative residual in each layer, per step, of the three predictions (log scale)."""
    fig, axes = _new_figure(len(families))
    _suptitle(fig, rec, "relative residuals |measured − predicted| / scale, largest group of each layer "
                        f"(0 drawn at {RESIDUAL_FLOOR:g})")
    Line2D = _matplotlib()[3]
    markers = _markers(len(rec.steps))
    for ax, fam in zip(axes, families):
        sites = rec.of(fam)
        text = rec.law(fam)
        colours = _depth_colours(len(sites))
        handles, present = [], set()
        for site, colour, label in zip(sites, colours, _labels(sites)):
            for q in RESIDUALS:
                values = site.values.get(residual(q))
                if values is None or not np.isfinite(values).any():
                    continue
                present.add(q)
                ax.plot(rec.steps, np.where(values == 0, RESIDUAL_FLOOR, values), color=colour,
                        **RESIDUAL_STYLE[q], **markers)
            handles.append(Line2D([], [], color=colour, linewidth=2, label=label))
        ax.set_yscale("log")
        ax.set_title(f"{fam}", fontsize=10)
        _step_axis(ax)
        ax.set_ylabel("relative residual")
        if not present:
            _empty_note(ax, "no law prediction for this family")
        styles = [Line2D([], [], color="0.3", **RESIDUAL_STYLE[q], label=_wrap(text.residual(q), PANEL_LEGEND_WIDTH))
                  for q in RESIDUALS if q in present]
        if present and "continuous" not in present and text.found and text.continuous is None:
            styles.append(Line2D([], [], linestyle="none", label=_wrap(text.no_continuous(), PANEL_LEGEND_WIDTH)))
        ax.legend(handles=styles + handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0, title="prediction / layer", title_fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------- entry point
def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None, *, families: Sequence[str] | None = None,
             max_groups: int = 16, formats: Sequence[str] = FORMATS) -> tuple[list[Path], list[str]]:
    """Draw every figure of a monitored run; return ``(files written, notes on figures skipped)``.

    ``out`` defaults to ``RUN/plots``. ``families`` restricts the figures to those families (default:
    all that the monitor recorded). ``max_groups``: groups drawn per layer in the per-group figures.
    """
    if not isinstance(max_groups, int) or max_groups < 1:
        raise SymtoolsError(f"--max-groups must be a positive integer, got {max_groups!r}")
    bad_formats = [f for f in formats if f not in FORMATS]
    if bad_formats:
        raise SymtoolsError(f"unknown figure format(s) {', '.join(bad_formats)}: use {', '.join(FORMATS)}")
    rec = load_run(run)
    available = rec.families
    if not available:
        raise SymtoolsError(f"{rec.records}/laws records no symmetry family: nothing to plot")
    if families:
        unknown = [f for f in families if f not in available]
        if unknown:
            raise SymtoolsError(f"family {', '.join(unknown)} is not in this run; it has: {', '.join(available)}")
        chosen = [f for f in available if f in families]
    else:
        chosen = available
    _matplotlib()  # fail before creating the output directory
    out_dir = Path(out) if out is not None else rec.run / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SymtoolsError(f"cannot create the output directory {out_dir}: {exc.strerror or exc}") from None

    written: list[Path] = []
    notes: list[str] = []
    written += _save(layers_figure(rec, chosen), out_dir, "layers", formats)
    for fam in chosen:
        if fam in rec.group_streams:
            written += _save(groups_figure(rec, fam, max_groups), out_dir, f"groups_{fam}", formats)
        else:
            notes.append(f"groups_{fam}: the run has no per-group stream for {fam}")
    if "translation" in chosen and rec.optimizer in momentum_laws():
        written += _save(momentum_figure(rec), out_dir, "momentum", formats)
    elif "translation" in chosen:
        notes.append(f"momentum: the run's optimizer law is {rec.optimizer or 'none'}, not a momentum law "
                     f"({' or '.join(momentum_laws())})")
    if any(s.has(residual(q)) for s in rec.sites if s.family in chosen for q in RESIDUALS):
        written += _save(residuals_figure(rec, chosen), out_dir, "residuals", formats)
    else:
        notes.append("residuals: the run has no law predictions (measured-only mode)")
    return written, notes
