"""One error model for every command: a documented bad input is one line on stderr, exit 2, no traceback,
and nothing deleted or half-written (docs/commands/*.md, "Errors").

Also here: the one checkpoint loader as ``check --weights`` uses it (inference of model, input size and
classes like ``audit``), the one DDP/DataParallel unwrap rule, and the declared-dependency contract
(a missing plotting package is refused before any work; ``symtools.testing`` without hypothesis says what to
install). Models are VGG-11(-BN) at 32×32 so that the few runs that train or check take seconds.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from symtools.cli.main import main
from symtools.nn.models import build_model


def cli(argv, capsys) -> tuple[int, str, str]:
    """``symtools ARGV`` in-process: (exit code, stdout, stderr); argparse's usage errors exit via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one stderr line starting with 'symtools', naming every needle; no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("symtools") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def vgg11_bn_weights(tmp_path_factory) -> Path:
    """A plain state_dict of VGG-11-BN for 32×32 inputs and 10 classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg11_bn_32_10.pt"
    torch.save(build_model("vgg11_bn", input_size=32, classes=10).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------------ demo
def test_demo_validates_options_before_touching_the_disk(tmp_path, capsys):
    out = tmp_path / "X"
    (out / "run").mkdir(parents=True)
    (out / "run" / "mine.txt").write_text("a user's file")
    before = tree(out)
    code, _, err = cli(["demo", "--out", out, "--model", "bogus"], capsys)
    assert_one_line(code, err, "unknown model 'bogus'")
    assert tree(out) == before  # nothing deleted, nothing written
    code, _, err = cli(["demo", "--out", out, "--steps", "0"], capsys)
    assert_one_line(code, err, "--steps")
    code, _, err = cli(["demo", "--out", out, "--derive-only"], capsys)  # valid options, but not our folder
    assert_one_line(code, err, "not empty", "--force")
    assert tree(out) == before


def test_demo_force_reuses_a_folder_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = cli(["demo", "--out", out, "--derive-only", "--force"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "torch" / "scale.py").is_file()
    (tmp_path / "file").write_text("")
    code, _, err = cli(["demo", "--out", tmp_path / "file", "--derive-only"], capsys)
    assert_one_line(code, err, "is a file")


# ----------------------------------------------------------------------------------------------------- train
TINY_TRAIN = ["train", "--model", "vgg11", "--input", "32", "--batch", "4", "--stride", "1", "--quiet"]


def test_train_out_must_be_a_new_or_empty_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", tmp_path / "file"], capsys)
    assert_one_line(code, err, "is a file")
    assert (tmp_path / "file").read_text() == "not a folder"
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", "/proc/symtools-cannot-be-here"], capsys)
    assert_one_line(code, err, "cannot create")
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("x")
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", used], capsys)
    assert_one_line(code, err, "not empty", "--force", "--resume")
    assert tree(used) == {"mine.txt": b"x"}
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", tmp_path / "new", "--model", "bogus"], capsys)
    assert_one_line(code, err, "bogus")
    assert not (tmp_path / "new").exists()  # a bad option creates nothing
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", used, "--resume", "--force"], capsys)
    assert_one_line(code, err, "--resume", "--force")


def test_train_force_replaces_a_run_and_keeps_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(TINY_TRAIN + ["--steps", "2", "--checkpoint-every", "1", "--out", run], capsys)
    assert code == 0, err
    (run / "mine.txt").write_text("x")
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", run], capsys)
    assert_one_line(code, err, "--force")
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", run, "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000.pt", "step_000001.pt"]
    assert (run / "mine.txt").read_text() == "x"
    from symtools.numeric.records import read_stream

    assert read_stream(run / "records", "train")[1][:, 0].tolist() == [1.0]  # the old rows are gone


def test_train_monitor_reducer_is_chosen_said_and_refused_where_it_cannot_run(tmp_path, capsys, monkeypatch):
    import json

    from symtools.numeric import native

    for reducer, expected in (("auto", "compiled" if native.available() else "sites"), ("sites", "sites")):
        run = tmp_path / reducer
        code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", run, "--monitor-reducer", reducer], capsys)
        assert code == 0, err
        assert json.loads((run / "summary.json").read_text())["monitor_reducer"] == expected
    monkeypatch.setattr(native, "_PROBE", {})
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "compiler", lambda: None)
    code, _, err = cli(TINY_TRAIN + ["--steps", "1", "--out", tmp_path / "c", "--monitor-reducer", "compiled"], capsys)
    assert_one_line(code, err, "C compiler", "sites")
    assert not (tmp_path / "c").exists()  # refused before anything is written


# ----------------------------------------------------------------------------------------------------- check
def test_check_weights_that_do_not_fit_are_one_line(vgg11_bn_weights, tmp_path, capsys):
    code, _, err = cli(["check", "--weights", vgg11_bn_weights, "--classes", "200"], capsys)
    assert_one_line(code, err, "--classes 200", "--classes 10")
    code, _, err = cli(["check", "--weights", vgg11_bn_weights, "--input", "64"], capsys)
    assert_one_line(code, err, "--input 32")
    code, _, err = cli(["check", "--weights", vgg11_bn_weights, "--model", "vgg13_bn"], capsys)
    assert_one_line(code, err, "does not fit", "missing keys")
    sd = torch.load(vgg11_bn_weights, weights_only=True)
    sd["features.0.weight"] = torch.zeros(64, 3, 3, 3)[:32]  # a shape mismatch inside a right-looking file
    torch.save(sd, tmp_path / "bad.pt")
    code, _, err = cli(["check", "--weights", tmp_path / "bad.pt", "--model", "vgg11_bn"], capsys)
    assert_one_line(code, err, "bad.pt", "shape mismatches", "features.0.weight")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # needs unpickling code: refused, never run
    code, _, err = cli(["check", "--weights", tmp_path / "pickled.pt"], capsys)
    assert_one_line(code, err, "refusing to load")
    code, _, err = cli(["check", "--weights", tmp_path / "nowhere.pt"], capsys)
    assert_one_line(code, err, "no such file")
    code, _, err = cli(["check", "--model", "auto"], capsys)
    assert_one_line(code, err, "--weights")


def test_check_infers_model_input_and_classes_from_the_weights(vgg11_bn_weights, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = cli(["check", "--weights", vgg11_bn_weights, "--batch", "2", "--json"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code in (0, 1) and not err.strip(), err
    import json

    report = json.loads(out)
    assert report["model"] == "vgg11_bn"
    assert report["parameters"] == sum(p.numel() for p in build_model("vgg11_bn", 32, 10).parameters())


# --------------------------------------------------------------------------------------- other documented inputs
@pytest.mark.parametrize("argv, needle", [
    (["plot", "{tmp}/no-run"], "no-run"),
    (["audit", "{tmp}/none.pt"], "no such file"),
    (["audit", "{tmp}"], "directory"),
    (["symmetries", "--model", "vgg12"], "vgg12"),
    (["symmetries", "--model", "vgg11", "--input", "33"], "32"),
    (["derive", "w1 -> (a*"], "cannot parse"),
    (["check", "--model", "vgg12"], "unknown model 'vgg12'"),
    (["check", "--dtype", "float16"], "float16"),
    (["train", "--out", "{tmp}/r", "--lr", "0", "--steps", "1"], "--lr"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/no-folder", "--steps", "1"], "no-folder"),
    (["train", "--out", "{tmp}/r", "--resume", "--force"], "--force"),
])
def test_documented_bad_inputs(argv, needle, tmp_path, capsys):
    code, _, err = cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert_one_line(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------- declared packages
def test_missing_matplotlib_is_refused_before_any_work(vgg11_bn_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = cli(["audit", vgg11_bn_weights, "--report", tmp_path / "report"], capsys)
    assert_one_line(code, err, "pip install matplotlib")
    assert not out and not (tmp_path / "report").exists()
    code, _, err = cli(["plot", tmp_path], capsys)
    assert_one_line(code, err, "pip install matplotlib")
    code, _, err = cli(["demo", "--out", tmp_path / "demo"], capsys)
    assert_one_line(code, err, "pip install matplotlib")
    assert not (tmp_path / "demo").exists()


def test_symtools_testing_without_hypothesis_says_what_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "symtools.testing" or n.startswith("symtools.testing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match="pip install 'symtools\\[test\\]'"):
        importlib.import_module("symtools.testing")


def test_no_test_skips_for_a_package():
    """Our modules and declared packages are imported plainly (a broken one must fail, not skip)."""
    here = Path(__file__).parent
    offenders = [p.name for p in here.glob("test_*.py") if "importorskip(" in p.read_text().replace(
        'importorskip(" in', "")]
    assert offenders == []


# ------------------------------------------------------------------------------------------------ unwrap
class _HasChildNamedModule(nn.Module):
    """Not a wrapper: a model whose first block happens to be called ``module`` (names ``module.fc0.*``)."""

    def __init__(self):
        super().__init__()
        from symtools.nn.small import mlp

        self.module = mlp(6, [5], 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.module(x)))


def test_monitor_and_training_unwrap_only_real_wrappers(tmp_path):
    from symtools.checkpoints import unwrap_model
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.monitor import Monitor
    from symtools.training import load_checkpoint, train

    torch.manual_seed(0)
    model = _HasChildNamedModule().double()
    assert unwrap_model(model) is model and unwrap_model(nn.DataParallel(model)) is model
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
               for _ in range(3)]
    monitor = Monitor(find_symmetries(model, batches[0][0][:1]), stride=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    summary = train(model, opt, batches, 3, out_dir=tmp_path / "run", callbacks=[monitor], progress=False)
    assert summary["status"] == "completed" and summary["max_rel_residual_discrete"] < 1e-8
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000003.pt")
    assert list(ckpt["model"]) == list(model.state_dict())  # keys kept as the model names them
    model2 = _HasChildNamedModule().double()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, weight_decay=1e-3)
    resumed = train(model2, opt2, batches, 3, out_dir=tmp_path / "run", progress=False, resume=True)
    assert resumed["start_step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_demo_exits_1_when_its_final_audit_does_not_pass(tmp_path, monkeypatch, capsys):
    """The demo lists its outputs and then exits with the audit's 1, never 0, when the audit does not pass
    (issue 11: a demo whose own audit printed FAIL exited 0). The stages are stubbed: only the exit logic runs."""
    import symtools.cli.main as cli_main
    import symtools.training as training
    from symtools.cli.main import main

    real_main = main
    calls = []

    def fake(argv):
        calls.append(argv[0])
        return 1 if argv[0] == "audit" else 0
    monkeypatch.setattr(cli_main, "main", fake)
    monkeypatch.setattr(training, "latest_checkpoint", lambda run_dir: run_dir / "step_000004.pt")
    code = real_main(["demo", "--out", str(tmp_path / "d"), "--model", "vgg11_bn", "--steps", "4", "--batch", "8",
                 "--check-every", "2", "--audit-batch", "8"])
    assert calls == ["train", "plot", "audit"] and code == 1
    captured = capsys.readouterr()
    assert "audit JSON" in captured.out and "final audit did not pass" in captured.err
