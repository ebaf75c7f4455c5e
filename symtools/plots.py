"""Figures of a monitored training run, in the style of the paper's Figs 5, 6 and 8–10.

Reads only the run's records (``RUN/records``, through :func:`symtools.numeric.records.read_stream` and
:func:`~symtools.numeric.records.read_meta`) as written by :class:`symtools.numeric.monitor.Monitor`:

- stream ``laws``: one row per step, columns ``family|index|layer|quantity`` with quantity one of
  ``measured``, ``step`` (the per-step law's prediction from the measured state one step earlier),
  ``accumulated`` (the law iterated on its own predictions from step 0), ``continuous`` (the paper's
  ODE solution), each summed over the layer's groups, and ``residual_<quantity>`` (the largest per-group
  relative residual of that prediction in the layer);
- streams ``groups_<family>``: per-group values every ``stride`` steps, columns ``quantity|index|k``
  (``k`` = group number within site ``index``), meta ``sites = [[index, layer, count], ...]``.

Figures (each written as PNG and PDF), empirical lines solid and coloured, theory black (the exact
accumulated law dashed, the continuous theory dotted), as in the paper:

==================  ==========================================================================================
``layers``          one panel per family, one line per layer (colour = depth): measured per-layer charge vs
                    the accumulated law and the continuous theory (paper Figs 5, 8, 9, 10 at layer level)
``groups_<family>`` one panel per layer, a sample of at most ``max_groups`` groups (neurons/channels) each
``momentum``        the translation sums under heavy-ball momentum: measured vs the discrete recurrence
                    (oscillates for large β) and the damped-oscillator theory (paper Fig. 6); only for runs
                    with momentum
``residuals``       log scale: per-step law, accumulated law and continuous theory residuals over steps,
                    one panel per family; only when the run has law predictions
==================  ==========================================================================================

matplotlib is imported only when a figure is drawn (``pip install matplotlib``); figures are drawn on
the Agg canvas without pyplot, so the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from symtools.errors import SymtoolsError
from symtools.numeric.records import list_streams, read_meta, read_stream

__all__ = ["plot_run", "load_run", "RunRecords", "FIGURES"]

#: figure names (files NAME.png and NAME.pdf); ``groups_<family>`` comes once per family
FIGURES = ("layers", "groups_<family>", "momentum", "residuals")
FORMATS = ("png", "pdf")
FAMILY_ORDER = ("translation", "scale", "rescale")  # the paper's order
LAW_QUANTITIES = ("measured", "step", "accumulated", "continuous")
RESIDUALS = ("step", "accumulated", "continuous")
RESIDUAL_FLOOR = 1e-18  # an exactly-zero residual is drawn here (a log axis has no 0)
CHARGE_LABEL = {"translation": "Σθ (sum)", "scale": "|θ|² (squared norm)", "rescale": "|θ_in|² − |θ_out|²"}

# styles shared by every figure: empirical coloured and solid, theory black
MEASURED = dict(linestyle="-", linewidth=2.0, alpha=0.85)
ACCUMULATED = dict(color="black", linestyle="--", linewidth=0.9)
CONTINUOUS = dict(color="black", linestyle=":", linewidth=1.1)
RESIDUAL_STYLE = {"step": dict(linestyle="-", linewidth=1.3), "accumulated": dict(linestyle="--", linewidth=1.3),
                  "continuous": dict(linestyle=":", linewidth=1.5)}
RESIDUAL_LABEL = {"step": "per-step law", "accumulated": "accumulated law", "continuous": "continuous theory"}


# ----------------------------------------------------------------------------------------- reading
@dataclass
class Site:
    """One monitored group set: a family at one layer (``index`` = the monitor's site number)."""

    family: str
    index: int
    layer: str
    count: int | None = None  # groups in the site (from the groups stream's meta), if known
    laws: dict[str, np.ndarray] = field(default_factory=dict)  # quantity → per-step values

    def has(self, quantity: str) -> bool:
        v = self.laws.get(quantity)
        return v is not None and bool(np.isfinite(v).any())


@dataclass
class RunRecords:
    """What the plots need from one run: the ``laws`` stream split per site, where the groups streams are."""

    run: Path
    records: Path
    steps: np.ndarray
    sites: list[Site]
    optimizer: str | None
    group_streams: dict[str, str]  # family → stream name
    config: dict

    @property
    def families(self) -> list[str]:
        found = list(dict.fromkeys(s.family for s in self.sites))
        return sorted(found, key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f))

    def of(self, family: str) -> list[Site]:
        return [s for s in self.sites if s.family == family]


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


def load_run(run: str | os.PathLike) -> RunRecords:
    """Read the monitor's streams of ``run`` (a run directory or its ``records/``); SymtoolsError if absent."""
    run_dir, records = _resolve(run)
    streams = list_streams(records)
    if not streams:
        raise SymtoolsError(f"{records} holds no record streams")
    if "laws" not in streams:
        raise SymtoolsError(f"{records} has no monitor streams (laws, groups_<family>): the run was trained "
                            f"without the conservation-law monitor (use `symtools train` or pass a Monitor callback)")
    columns, data = read_stream(records, "laws")
    if data.shape[0] == 0:
        raise SymtoolsError(f"{records}/laws has no rows yet: nothing to plot")
    meta = read_meta(records, "laws").get("meta", {})
    sites: dict[int, Site] = {}
    for j, name in enumerate(columns):
        if j == 0:
            continue
        parts = name.split("|")
        if len(parts) < 4:
            raise SymtoolsError(f"{records}/laws: unexpected column {name!r} (want family|index|layer|quantity)")
        family, index, layer, quantity = parts[0], int(parts[1]), "|".join(parts[2:-1]), parts[-1]
        site = sites.setdefault(index, Site(family, index, layer))
        site.laws[quantity] = np.asarray(data[:, j], dtype=np.float64)
    group_streams = {}
    for name in streams:
        if name.startswith("groups_"):
            family = name[len("groups_"):]
            group_streams[family] = name
            for index, layer, count in read_meta(records, name).get("meta", {}).get("sites", []):
                if int(index) in sites:
                    sites[int(index)].count = int(count)
    config = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            config = json.loads(summary.read_text(encoding="utf-8")).get("config", {}) or {}
        except (OSError, ValueError):
            config = {}
    return RunRecords(run=run_dir, records=records, steps=np.asarray(data[:, 0]),
                      sites=sorted(sites.values(), key=lambda s: s.index), optimizer=meta.get("optimizer"),
                      group_streams=group_streams, config=config)


def _labels(sites: Sequence[Site]) -> list[str]:
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


def _style_handles(with_continuous: bool, with_law: bool = True):
    Line2D = _matplotlib()[3]
    handles = [Line2D([], [], color="0.45", **MEASURED, label="measured (empirical)")]
    if with_law:
        handles.append(Line2D([], [], **ACCUMULATED, label="exact law, accumulated from step 0"))
    if with_continuous:
        handles.append(Line2D([], [], **CONTINUOUS, label="continuous theory (paper)"))
    return handles


def _markers(n: int) -> dict:
    return dict(marker="o", markersize=3) if n <= 25 else {}


def _title(rec: RunRecords, what: str) -> str:
    c = rec.config
    hyper = []
    for key, sym in (("lr", "η"), ("wd", "λ"), ("momentum", "β")):
        if isinstance(c.get(key), (int, float)):
            hyper.append(f"{sym}={c[key]:g}")
    law = rec.optimizer or "none (measured only)"
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


def layers_figure(rec: RunRecords, families: Sequence[str]):
    """Per-layer charges: one panel per family, one colour per layer (by depth)."""
    fig, axes = _new_figure(len(families))
    fig.suptitle(_title(rec, "per-layer charges: measured (colour) vs exact law (dashed) and continuous theory "
                             "(dotted)"), fontsize=10)
    markers = _markers(len(rec.steps))
    for ax, fam in zip(axes, families):
        sites = rec.of(fam)
        colours = _depth_colours(len(sites))
        any_law = any_cont = False
        handles = []
        for site, colour, label in zip(sites, colours, _labels(sites)):
            (h,) = ax.plot(rec.steps, site.laws["measured"], color=colour, label=label, **MEASURED, **markers)
            handles.append(h)
            if site.has("accumulated"):
                ax.plot(rec.steps, site.laws["accumulated"], **ACCUMULATED)
                any_law = True
            if site.has("continuous"):
                ax.plot(rec.steps, site.laws["continuous"], **CONTINUOUS)
                any_cont = True
        ax.set_title(f"{fam}: {CHARGE_LABEL.get(fam, 'charge')} per layer", fontsize=10)
        _step_axis(ax)
        ax.set_ylabel("Σ over the layer's groups")
        ax.legend(handles=_style_handles(any_cont, any_law) + handles, fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="layer (colour = depth)", title_fontsize=7)
    return fig


def groups_figure(rec: RunRecords, family: str, max_groups: int):
    """Per-group (neuron/channel) charges of one family: one panel per layer, a sample of groups each."""
    name = rec.group_streams[family]
    columns, data = read_stream(rec.records, name, mmap=True)
    where = {c: j for j, c in enumerate(columns)}
    meta_sites = read_meta(rec.records, name).get("meta", {}).get("sites", [])
    by_index = {s.index: s for s in rec.sites}
    steps = np.asarray(data[:, 0])
    panel_sites = [(int(i), layer, int(n)) for i, layer, n in meta_sites if int(i) in by_index]
    fig, axes = _new_figure(max(len(panel_sites), 1), ncols=min(max(len(panel_sites), 1), 4), panel_size=(4.0, 3.0))
    fig.suptitle(_title(rec, f"{family}: per-group charges {CHARGE_LABEL.get(family, '')} — measured (colour), "
                             f"exact law accumulated (dashed), continuous theory (dotted)"), fontsize=10)
    markers = _markers(len(steps))
    labels = dict(zip([s.index for s in rec.of(family)], _labels(rec.of(family))))
    any_law = any_cont = False
    matplotlib = _matplotlib()[0]
    cmap = matplotlib.colormaps["tab10"]  # strong colours under the black theory lines
    for ax, (index, layer, count) in zip(axes, panel_sites):
        chosen = sample_groups(count, max_groups)
        for n, k in enumerate(chosen):
            colour = cmap(n % 10)
            series = {q: np.asarray(data[:, where[f"{q}|{index}|{k}"]]) for q in LAW_QUANTITIES
                      if f"{q}|{index}|{k}" in where}
            ax.plot(steps, series["measured"], color=colour, **{**MEASURED, "linewidth": 1.6}, **markers)
            if "accumulated" in series and np.isfinite(series["accumulated"]).any():
                ax.plot(steps, series["accumulated"], **ACCUMULATED)
                any_law = True
            if "continuous" in series and np.isfinite(series["continuous"]).any():
                ax.plot(steps, series["continuous"], **CONTINUOUS)
                any_cont = True
        shown = (f"all {count} groups" if count > 1 else "1 group") if len(chosen) == count \
            else f"{len(chosen)} of {count} groups"
        ax.set_title(f"{labels.get(index, layer)}: {shown}", fontsize=9)
        _step_axis(ax)
        if len(steps) == 0:
            _empty_note(ax, "no per-group rows yet")
    if not panel_sites:
        _empty_note(axes[0], f"no {family} groups selected")
    axes[0].set_ylabel("per-group charge")
    fig.legend(handles=_style_handles(any_cont, any_law), loc="outside lower center", ncols=3, fontsize=8)
    return fig


def momentum_figure(rec: RunRecords):
    """Translation sums under momentum: measured vs the exact heavy-ball recurrence and the oscillator theory."""
    sites = rec.of("translation")
    fig, axes = _new_figure(len(sites), ncols=min(len(sites), 4), panel_size=(4.0, 3.0))
    beta = rec.config.get("momentum")
    fig.suptitle(_title(rec, "momentum: translation sums Σθ per layer — measured (colour), exact heavy-ball "
                             "recurrence (dashed), damped-oscillator theory (dotted)"
                             + (f", β = {beta:g}" if isinstance(beta, (int, float)) else "")), fontsize=10)
    colours = _depth_colours(len(sites))
    markers = _markers(len(rec.steps))
    any_cont = False
    for ax, site, colour, label in zip(axes, sites, colours, _labels(sites)):
        ax.plot(rec.steps, site.laws["measured"], color=colour, **MEASURED, **markers)
        if site.has("accumulated"):
            ax.plot(rec.steps, site.laws["accumulated"], **ACCUMULATED)
        if site.has("continuous"):
            ax.plot(rec.steps, site.laws["continuous"], **CONTINUOUS)
            any_cont = True
        ax.set_title(label, fontsize=9)
        _step_axis(ax)
    axes[0].set_ylabel("Σθ over the layer's translation groups")
    handles = _style_handles(any_cont)
    handles[1].set_label("exact recurrence, accumulated from step 0 (no dampening: s' = (1+β−ηλ)s − βs₋₁)")
    if any_cont:
        handles[2].set_label("continuous theory: driven damped oscillator (eqs 33–38)")
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    return fig


def residuals_figure(rec: RunRecords, families: Sequence[str]):
    """Largest per-group relative residual in each layer, per step, of the three predictions (log scale)."""
    fig, axes = _new_figure(len(families))
    fig.suptitle(_title(rec, "relative residuals |measured − predicted| / scale, largest group of each layer "
                             f"(0 drawn at {RESIDUAL_FLOOR:g})"), fontsize=10)
    Line2D = _matplotlib()[3]
    markers = _markers(len(rec.steps))
    for ax, fam in zip(axes, families):
        sites = rec.of(fam)
        colours = _depth_colours(len(sites))
        handles, present = [], set()
        for site, colour, label in zip(sites, colours, _labels(sites)):
            for q in RESIDUALS:
                values = site.laws.get(f"residual_{q}")
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
        styles = [Line2D([], [], color="0.3", **RESIDUAL_STYLE[q], label=RESIDUAL_LABEL[q]) for q in RESIDUALS
                  if q in present]
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
    if "translation" in chosen and rec.optimizer in ("momentum", "nesterov"):
        written += _save(momentum_figure(rec), out_dir, "momentum", formats)
    elif "translation" in chosen:
        notes.append(f"momentum: the run's optimizer law is {rec.optimizer or 'none'}, not heavy-ball momentum")
    if any(s.has(f"residual_{q}") for s in rec.sites if s.family in chosen for q in RESIDUALS):
        written += _save(residuals_figure(rec, chosen), out_dir, "residuals", formats)
    else:
        notes.append("residuals: the run has no law predictions (measured-only mode)")
    return written, notes
