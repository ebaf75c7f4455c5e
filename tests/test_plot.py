"""`symtools plot`: figures of a monitored run, bad input, and the lazy matplotlib import.

One tiny monitored run (a 2-conv BatchNorm CNN, 6 steps of SGD with momentum, float32) is shared by the
tests. Checks are on files (PNG/PDF signatures, non-trivial sizes) and exit codes, not on pixels.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from symtools.cli.main import main
from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn
from symtools.numeric.monitor import Monitor
from symtools.numeric.records import RecordWriter
from symtools.training import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["layers", "groups_translation", "groups_scale", "groups_rescale", "momentum", "residuals"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = cnn(3, [4, 6], 5, 8, norm="batch")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9)
    monitor = Monitor(find_symmetries(model, batches[0][0][:1]), stride=2)
    out = tmp_path_factory.mktemp("plot") / "run"
    summary = train(model, opt, batches, 6, out_dir=out, callbacks=[monitor], progress=False)
    assert summary["status"] == "completed" and summary["optimizer_law"] == "momentum"
    return out


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
