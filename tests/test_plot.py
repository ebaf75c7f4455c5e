"""`symtools plot`: figures of a monitored run, bad input, and the lazy matplotlib import.

One tiny monitored run (a 2-conv BatchNorm CNN, 6 steps of SGD with momentum, float32) is shared by the
tests. Checks are on files (PNG/PDF signatures, non-trivial sizes) and exit codes, not on pixels; the words
of the legends and titles (which law, which continuous theory) are checked on the figures' text.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys

import numpy as np
import pytest
import torch

from symtools import plots
from symtools.cli.main import main
from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn
from symtools.numeric.monitor import Monitor
from symtools.numeric.records import RecordWriter
from symtools.training import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["layers", "groups_translation", "groups_scale", "groups_rescale", "momentum", "residuals"]


def _train(out, steps=6, nesterov=False):
    torch.manual_seed(0)
    model = cnn(3, [4, 6], 5, 8, norm="batch")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9, nesterov=nesterov)
    monitor = Monitor(find_symmetries(model, batches[0][0][:1]), stride=2)
    summary = train(model, opt, batches, steps, out_dir=out, callbacks=[monitor], progress=False)
    assert summary["status"] == "completed"
    assert summary["optimizer_law"] == ("nesterov" if nesterov else "momentum")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plot") / "run")


def _assert_figure(path):
    assert path.is_file(), path
    data = path.read_bytes()
    if path.suffix == ".png":
        assert data[:8] == PNG_MAGIC, path
        assert len(data) > 20_000, (path, len(data))  # several panels of lines and text, not an empty canvas
    else:
        assert data[:5] == b"%PDF-" and b"%%EOF" in data[-1024:], path
        assert len(data) > 5_000, (path, len(data))


def test_plot_writes_every_figure(run, capsys):
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out
    plots = run / "plots"
    expected = [plots / f"{name}.{fmt}" for name in ALL_FIGURES for fmt in ("png", "pdf")]
    for path in expected:
        _assert_figure(path)
        assert str(path) in printed  # the command lists what it wrote
    assert sorted(p.name for p in plots.iterdir()) == sorted(p.name for p in expected)


def test_plot_options(run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(run), "--out", str(out), "--families", "scale", "--max-groups", "2"]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.{f}" for n in ("layers", "groups_scale", "residuals") for f in ("png", "pdf"))
    for name in names:
        _assert_figure(out / name)
    assert "momentum" not in " ".join(names) and str(out / "layers.png") in printed


def test_measured_only_run_skips_law_figures(tmp_path, capsys):
    # a run whose optimizer has no derived law (e.g. Adam): the monitor writes NaN predictions
    with RecordWriter(tmp_path / "adam" / "records") as w:
        cols = ["step"] + [f"scale|{i}|conv{i} → norm{i}|{q}" for i in (0, 1)
                           for q in ("measured", "step", "accumulated", "continuous",
                                     "residual_step", "residual_accumulated", "residual_continuous")]
        s = w.stream("laws", cols, meta={"optimizer": None, "families": ["scale"]})
        for step in range(1, 5):
            row = np.full(len(cols), np.nan)
            row[0], row[1], row[8] = step, 1.0 + 0.1 * step, 2.0 - 0.1 * step
            s.append(row)
    assert main(["plot", str(tmp_path / "adam")]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "adam" / "plots").iterdir()) == ["layers.pdf", "layers.png"]
    assert "skipped residuals" in printed and "skipped groups_scale" in printed


def _no_monitor_run(path):
    with RecordWriter(path / "records") as w:
        w.stream("train", ["step", "loss", "accuracy", "lr", "time_s"]).append([1, 2.3, 0.1, 0.1, 0.5])
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no run at"),
    ("not_a_run", "no records/"),
    ("empty_records", "no record streams"),
    ("no_monitor", "no monitor streams"),
    ("empty_laws", "no rows yet"),
    ("bad_family", "is not in this run"),
    ("bad_max_groups", "--max-groups"),
])
def test_bad_input_exits_2(run, tmp_path, capsys, case, needle):
    extra = []
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "not_a_run":
        target = tmp_path / "plain"
        target.mkdir()
    elif case == "empty_records":
        target = tmp_path / "empty"
        (target / "records").mkdir(parents=True)
    elif case == "no_monitor":
        target = _no_monitor_run(tmp_path / "bare")
    elif case == "empty_laws":
        target = tmp_path / "fresh"
        with RecordWriter(target / "records") as w:
            w.stream("laws", ["step", "scale|0|conv0|measured"])
    elif case == "bad_family":
        target, extra = run, ["--families", "rotation"]
    else:
        target, extra = run, ["--max-groups", "0"]
    assert main(["plot", str(target), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symtools plot: ") and needle in err and err.count("\n") == 1, err


def test_missing_matplotlib_is_one_line_error(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["plot", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_package_imports_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in ("symtools.plots", "symtools.cli.plot"):
        importlib.reload(importlib.import_module(name))  # no module-level matplotlib import


# ----------------------------------------------------------------------------------------- the law's words
def _texts(rec):
    """{figure: (legend texts, title texts)} of every figure of a run, drawn without saving."""
    figures = {"layers": plots.layers_figure(rec, rec.families),
               "momentum": plots.momentum_figure(rec),
               "residuals": plots.residuals_figure(rec, rec.families)}
    figures.update({f"groups_{f}": plots.groups_figure(rec, f, 4) for f in rec.families})
    out = {}
    for name, fig in figures.items():
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        legend = [_words(t.get_text()) for lg in legends for t in lg.get_texts()]
        suptitle = fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()  # mpl < 3.8
        titles = [_words(suptitle)] + [_words(ax.get_title()) for ax in fig.axes]
        out[name] = (legend, titles)
    return out


def _words(text):
    """A label with its line breaks (legends and titles are wrapped to fit) read as single spaces."""
    return " ".join(text.split())


def _flat(text):
    return re.sub(r"\s+", "", text)


def test_nesterov_run_is_labelled_with_the_nesterov_law_not_the_heavy_ball(tmp_path):
    law = importlib.import_module("symtools.codegen.generated.law_translation_nesterov")
    assert law.CONTINUOUS_MODEL is None  # the paper gives Nesterov no continuous theory
    rec = plots.load_run(_train(tmp_path / "nesterov", steps=3, nesterov=True))
    assert rec.optimizer == "nesterov"
    texts = _texts(rec)
    for name, (legend, titles) in texts.items():
        words = " ".join(legend + titles).lower()
        for wrong in ("heavy", "oscillator", "momentum law", "eqs. 33", "eqs 33", "continuous theory:"):
            assert wrong not in words, (name, wrong, words)
        if name != "residuals":  # the residuals figure draws no continuous line; it says so only where one could be
            assert any("exact nesterov law" in t for t in legend), (name, legend)
        assert any(_words(law.RULE) in t for t in titles), (name, titles)  # the derived update rule, in the title
    # where a continuous line would be, the legend says the derivation has none
    for name in ("layers", "momentum", "groups_scale", "residuals"):
        assert any(t == "no continuous theory for the nesterov law" for t in texts[name][0]), (name, texts[name][0])
    # the momentum figure's law is the nesterov module's own LAW for the translation charge
    assert any(_flat(law.LAW["Q"]) in _flat(t) for t in texts["momentum"][0]), texts["momentum"][0]
    heavy = importlib.import_module("symtools.codegen.generated.law_translation_momentum")
    assert not any(_flat(heavy.LAW["Q"]) in _flat(t) for t in texts["momentum"][0])


def test_heavy_ball_run_names_its_law_and_continuous_theory_from_the_derivation(run):
    law = importlib.import_module("symtools.codegen.generated.law_translation_momentum")
    theory = law.CONTINUOUS_MODEL.split(":", 1)[0]  # "modified flow with momentum (eqs. 33–38)"
    texts = _texts(plots.load_run(run))
    legend = texts["momentum"][0]
    assert any(_flat(law.LAW["Q"]) in _flat(t) for t in legend) and "exact momentum law" in " ".join(legend)
    assert f"continuous theory: {theory}" in legend
    for name in ("layers", "residuals"):
        assert f"continuous theory: {theory}" in texts[name][0], (name, texts[name][0])
        assert not any("no continuous theory" in t for t in texts[name][0])
    # charges are named by their formula, written from the symmetry modules' CHARGE_TEXT
    assert "translation: Σ x per layer" in texts["layers"][1] and "scale: Σ x² per layer" in texts["layers"][1]
    assert "rescale: Σ x_in² − Σ x_out² per layer" in texts["layers"][1]
    assert "per-group charges Σ x_in² − Σ x_out²" in texts["groups_rescale"][1][0]


def test_momentum_figure_only_for_declared_momentum_laws(tmp_path, monkeypatch):
    """The momentum figure is drawn for the laws declared with law_kind "momentum"; under another declaration
    the same run gets none (negative control) and the note names the momentum laws."""
    run = _train(tmp_path / "hb", steps=2)
    written, notes = plots.plot_run(run, formats=("png",))
    assert "momentum.png" in [p.name for p in written] and not any(n.startswith("momentum") for n in notes)
    from symtools.symbolic import optimizers

    decl = dataclasses.replace(optimizers.DECLARATIONS["momentum"], law_kind="taylor")
    monkeypatch.setitem(optimizers.DECLARATIONS, "momentum", decl)
    assert plots.momentum_laws() == ("nesterov",)
    written, notes = plots.plot_run(run, out=tmp_path / "o2", formats=("png",))
    assert "momentum.png" not in [p.name for p in written]
    assert any(n.startswith("momentum: the run's optimizer law is momentum, not a momentum law (nesterov)")
               for n in notes), notes


def test_law_text_comes_from_the_module():
    for fam in ("translation", "scale", "rescale"):
        for opt in ("sgd", "momentum", "nesterov", "adam"):
            module = importlib.import_module(f"symtools.codegen.generated.law_{fam}_{opt}")
            text = plots.law_text(opt, fam)
            assert (text.name, text.rule, text.law, text.found) == (module.OPTIMIZER, module.RULE, module.LAW["Q"], True)
            assert text.continuous == (module.CONTINUOUS_MODEL.split(":")[0] if module.CONTINUOUS_MODEL else None)
    assert plots.law_text(None, "scale") == plots.LawText(None)
    assert plots.law_text("nosuchlaw", "scale") == plots.LawText("nosuchlaw")  # no module: the meta's name only
