"""`symtools audit`: safe loading, architecture inference, charges, laws, records, reports, bad input.

Models are kept small for 2 shared cores: the smallest VGG (vgg11_bn at 32×32 input, hidden width 64, 10
classes: 9.2M parameters, all in the convolutions) for what goes through the command line, and a tiny CNN for
the library-level checks of the momentum buffers. Tolerances are stated where they are used.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
from torch import nn

from symtools.audit import (Hyper, RecordedRun, audit_model, describe_vgg, hyper_from_optimizer, infer_vgg,
                            load_checkpoint_file)
from symtools.audit.report import write_html
from symtools.cli.main import main
from symtools.codegen.generated import rescale as RESCALE
from symtools.data.loader import make_loader
from symtools.errors import SymtoolsError
from symtools.nn.models import MODEL_NAMES, VGG_NAMES, build_model
from symtools.nn.vgg import vgg
from symtools.numeric.records import RecordWriter, read_meta, read_stream
from symtools.training import train

SMALL = dict(depth=11, batch_norm=True, input_size=32, classes=10, hidden=64)
LR, WD = 0.05, 5e-3
HIDDEN_LAYER = "classifier.0 → classifier.3"  # rescale groups: the 64 hidden units of the classifier


def small_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return vgg(**SMALL)


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(["audit"] + [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _train_run(path: Path, optimizer: str, steps: int) -> Path:
    from symtools.nn.graph import find_symmetries

    from symtools.numeric import monitor
    model = small_vgg()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=WD)
    stream = make_loader("digits", 8, image_size=32, seed=0)
    x, _ = stream.batch(0)
    callbacks = [monitor.Monitor(find_symmetries(model, x[:1]), stride=1)] if optimizer == "sgd" else []
    train(model, opt, stream, steps, out_dir=path, progress=False, callbacks=callbacks)
    return path


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> Path:
    """3 updates of SGD with weight decay (no momentum), recorded by the training monitor."""
    return _train_run(tmp_path_factory.mktemp("sgd") / "run", "sgd", 3)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> Path:
    return _train_run(tmp_path_factory.mktemp("adamw") / "run", "adamw", 2)


@pytest.fixture(scope="module")
def base_state() -> dict:
    return {k: v.clone() for k, v in small_vgg(1).state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# architecture inference


@pytest.mark.parametrize("name", VGG_NAMES)
def test_infer_vgg_every_config_from_shapes_alone(name):
    """Every VGG config, with and without BatchNorm, at two input sizes (meta tensors: shapes only, no memory)."""
    for size, classes in ((32, 10), (96, 7)):
        with torch.device("meta"):
            sd = build_model(name, input_size=size, classes=classes).state_dict()
        assert infer_vgg(sd) == (name, size, classes)
    assert describe_vgg(sd).hidden == 1024


def test_infer_vgg_names_what_it_cannot_read():
    with torch.device("meta"):
        sd = build_model("vgg13_bn", input_size=64, classes=5).state_dict()
    bad = dict(sd, **{"features.0.weight": torch.empty(100, 3, 3, 3, device="meta")})
    with pytest.raises(SymtoolsError, match=r"output channels \[100, 64.*match no VGG config"):
        infer_vgg(bad)
    bad = dict(sd, **{"classifier.0.weight": torch.empty(1024, 1000, device="meta")})
    with pytest.raises(SymtoolsError, match="cannot infer the input size: classifier.0.weight has 1000 columns"):
        infer_vgg(bad)
    with pytest.raises(SymtoolsError, match="keys look like a ResNet"):
        infer_vgg({"conv1.weight": torch.empty(64, 3, 7, 7), "layer1.0.conv1.weight": torch.empty(64, 64, 3, 3),
                   "fc.weight": torch.empty(10, 512)})


# ----------------------------------------------------------------------------------------------------------
# bad input: one clear message, exit code 2, nothing written


class Custom:  # a class a weights-only load must refuse to instantiate
    def __init__(self):
        self.x = 1


def _case(name: str, state: dict, folder: Path) -> tuple[list[str], str]:
    """(extra CLI args, expected message regex) after writing the checkpoint of the case to folder/ckpt.pt."""
    path = folder / "ckpt.pt"
    sd = {k: v.clone() for k, v in state.items()}
    if name == "missing_key":
        del sd["features.1.running_var"]
        torch.save(sd, path)
        return [], r"missing keys \(1\): features\.1\.running_var"
    if name == "extra_key":
        sd["extra.weight"] = torch.zeros(3)
        torch.save(sd, path)
        return [], r"unexpected keys \['extra\.weight'\]"
    if name == "shape_mismatch":
        sd["features.1.weight"] = torch.ones(65)
        torch.save(sd, path)
        return [], r"shape mismatches \(1\): features\.1\.weight: file \(65,\) vs model \(64,\)"
    if name == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return [], r"truncated or corrupted"
    if name == "corrupted":
        torch.save(sd, path)
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return [], r"corrupted: the CRC-32 of its member .* does not match"
    if name == "nan":
        sd["classifier.0.weight"][3, 5] = float("nan")
        sd["features.0.bias"][0] = float("inf")
        torch.save(sd, path)
        return [], r"non-finite weights: features\.0\.bias: 0 nan, 1 inf of 64; classifier\.0\.weight: 1 nan"
    if name == "unknown_architecture":
        sd["features.4.weight"] = torch.zeros(100, 64, 3, 3)
        torch.save(sd, path)
        return [], r"cannot infer the VGG architecture: .* match no VGG config"
    if name == "other_family":
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8),
                    "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
        return [], r"not a VGG checkpoint: its keys look like a ResNet \(layer1\.0\.conv1\.weight\)"
    if name == "needs_code":
        torch.save({"model": sd, "extra": Custom()}, path)
        return [], r"refusing to load .*arbitrary code \(it stores an object of .*Custom\).*torch\.save\(model\.state_dict\(\)"
    if name == "empty":
        path.write_bytes(b"")
        return [], r"is empty \(0 bytes\)"
    if name == "safetensors_truncated":
        from safetensors.torch import save_file

        path = folder / "ckpt.safetensors"
        save_file({"features.0.weight": sd["features.0.weight"]}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
        return [str(path)], r"is truncated: its header describes"
    if name == "init_does_not_fit":
        torch.save(sd, path)
        init = folder / "init.pt"
        torch.save({k: v for k, v in sd.items() if not k.startswith("classifier.6")}, init)
        return ["--init", str(init)], r"--init .* does not fit the audited vgg11_bn: missing keys \(2\): classifier\.6\.weight"
    if name == "hypothesis_without_init":
        torch.save(sd, path)
        return ["--lr", "0.1", "--steps", "3"], r"needs the initial weights: give --init"
    raise AssertionError(name)


BAD = ["missing_key", "extra_key", "shape_mismatch", "truncated", "corrupted", "nan", "unknown_architecture",
       "other_family", "needs_code", "empty", "safetensors_truncated", "init_does_not_fit",
       "hypothesis_without_init"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_message_exit_2_nothing_written(case, base_state, tmp_path, capsys):
    extra, pattern = _case(case, base_state, tmp_path)
    ckpt = extra.pop(0) if extra and extra[0].endswith(".safetensors") else str(tmp_path / "ckpt.pt")
    out_json, out_report = tmp_path / "out.json", tmp_path / "report"
    code, out, err = run_cli([ckpt, "--no-identities", "--batch", "4", "--json", out_json, "--report", out_report]
                             + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("symtools audit: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_json.exists() and not out_report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# ----------------------------------------------------------------------------------------------------------
# a torchvision-layout state_dict


class TorchvisionStyleVGG(nn.Module):
    """torchvision's VGG structure written independently: features (cfg "A" + BN), avgpool, classifier."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        layers, c_in = [], 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, hidden),
                                        nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, classes))


def test_torchvision_layout_loads_with_model_auto(tmp_path, capsys):
    torch.manual_seed(2)
    tv = TorchvisionStyleVGG()
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    code, out, err = run_cli([path, "--model", "auto", "--no-identities", "--batch", "4", "--json", "-"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert {k: rep["model"][k] for k in ("name", "input_size", "classes", "hidden", "batch_norm", "inferred")} == \
        {"name": "vgg11_bn", "input_size": 32, "classes": 10, "hidden": 64, "batch_norm": True, "inferred": True}
    assert rep["model"]["parameters"] == sum(p.numel() for p in tv.parameters())
    assert rep["families"]["rescale"]["groups"] == 64 + 128 + 256 * 2 + 512 * 4 + 64 + 64  # BN → next conv/linear, hidden units
    # the charges are those of the file's tensors: the first scale group is |conv0 row 0|² + bias0²
    scale0 = next(e for e in rep["layers"] if e["family"] == "scale")
    w, b = tv.features[0].weight.detach().double(), tv.features[0].bias.detach().double()
    assert scale0["values"][0] == pytest.approx(float(w[0].pow(2).sum() + b[0] ** 2), rel=1e-12)
    assert rep["flagged"] == [] and rep["init"] is None


# ----------------------------------------------------------------------------------------------------------
# round trip: train → checkpoint → audit


def _recorded(run: Path, family: str, step: int) -> list[np.ndarray]:
    """The training monitor's per-group charges at ``step``, per site, read with numpy only (independently)."""
    meta = read_meta(run / "records", f"groups_{family}")["meta"]
    cols, arr = read_stream(run / "records", f"groups_{family}")
    row = arr[arr[:, 0] == step][-1]
    return [row[[cols.index(f"measured|{i}|{k}") for k in range(n)]] for i, _, n in meta["sites"]]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_round_trip_sgd_charges_match_records_and_exact_law(sgd_run, tmp_path, capsys):
    ckpt = sgd_run / "checkpoints" / "step_000003.pt"
    out_json, report = tmp_path / "audit.json", tmp_path / "report"
    code, out, err = run_cli([ckpt, "--run", sgd_run, "--batch", "4", "--no-identities", "--json", out_json,
                              "--report", report], capsys)
    assert code == 0, out + err
    rep = json.loads(out_json.read_text())
    assert rep["identities"] is None and rep["flagged"] == []  # identities: see the tiny-CNN tests (cost)
    assert rep["hyper"]["optimizer"] == "sgd" and rep["hyper"]["steps"] == 3 and rep["init"]["step"] == 0
    # 1. the audit reports the charges the run recorded, to round-off: the audit evaluates each density in
    #    float64, the monitor in the weights' dtype (float32, relative rounding ≤ ε32/2 per element) before
    #    summing, so they differ by at most ε32·Σ|density| per group (Σ|density| ≤ the layer's max "scale").
    eps32 = float(np.finfo(np.float32).eps)
    for fam in ("translation", "scale", "rescale"):
        entries = [e for e in rep["layers"] if e["family"] == fam]
        for e, rec in zip(entries, _recorded(sgd_run, fam, 3)):
            assert np.abs(np.array(e["values"]) - rec).max() <= eps32 * e["scale"]["max"], (fam, e["layer"])
            kinds = {p["kind"] for p in e["predictions"]}
            assert "recorded" in kinds, (fam, e["layer"], e["predictions"])
    # 2. translation sums follow the exact law s_3 = (1 − ηλ)³ s_0 from the init checkpoint (float32 training:
    #    the audit's own float32 round-off tolerance is met, and the test's reference formula agrees too)
    decay = (1 - LR * WD) ** 3
    for e in (e for e in rep["layers"] if e["family"] == "translation"):
        law = next(p for p in e["predictions"] if p["kind"] == "exact")
        assert law["quantities"]["Q"]["max_ratio"] < 1.0, e["layer"]
        s0 = np.array(e["vs_init"]["init_values"])
        np.testing.assert_allclose(law["quantities"]["Q"]["predicted"], decay * s0, rtol=1e-14, atol=0)
    # scale norms respect the SGD lower bound Q_3 ≥ (1 − ηλ)⁶ Q_0 (minus the ε term)
    for e in (e for e in rep["layers"] if e["family"] == "scale"):
        lb = next(p for p in e["predictions"] if p["kind"] == "lower_bound")
        assert not lb["flagged"]
    # negative control: the rescale imbalance's drive G = |g_in|² − |g_out|² is not certified ≥ 0 (NONNEGATIVE):
    # no bound from init, said so
    for e in (e for e in rep["layers"] if e["family"] == "rescale"):
        assert "lower_bound" not in {p["kind"] for p in e["predictions"]}
        assert any("driven by G" in (p["note"] or "") for p in e["predictions"]), e["predictions"]
    # 3. the HTML report opens and every image it shows is a real PNG file next to it
    page = (report / "index.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    assert {"hist_rescale.png", "hist_scale.png", "hist_translation.png", "charge_vs_init.png",
            "charge_vs_prediction.png", "deviation_ratio.png"} <= set(parser.src)
    import matplotlib.image as mpimg

    for src in parser.src:
        f = report / src
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        assert mpimg.imread(f).ndim == 3
    assert json.loads((report / "audit.json").read_text())["exit_code"] == 0
    assert "PASS" in out


def test_adamw_checkpoint_is_flagged(adamw_run, capsys):
    """AdamW's per-coordinate preconditioning breaks the translation law; the audit flags it both ways."""
    ckpt = adamw_run / "checkpoints" / "step_000002.pt"
    code, out, err = run_cli([ckpt, "--run", adamw_run, "--no-identities", "--batch", "4", "--json", "-"], capsys)
    assert code == 1, err
    rep = json.loads(out)
    assert rep["hyper"]["optimizer"] == "adamw"
    # every BatchNorm-fed bias moves by ±lr per step under Adam (its gradient is round-off, normalised to 1), and
    # the softmax columns move coordinate-wise too; the whole-bias group (one sum of 10) is not asserted: its
    # first Adam step is lr·(#positive − #negative) signs, which can cancel
    trans = [e for e in rep["layers"] if e["family"] == "translation" and e["groups"] > 1]
    assert len(trans) == 9 and all(e["flagged"] for e in trans)
    for e in trans:
        ref = next(p for p in e["predictions"] if p["kind"] == "reference")
        assert ref["quantities"]["Q"]["max_ratio"] > 100
        # AdamW's first moment holds no weight decay: ⟨exp_avg, 1⟩ = Σ averaged ⟨g, 1⟩ = 0 to round-off
        assert e["buffers"]["exp_avg"]["check"]["flagged_groups"] == 0
    # claiming plain SGD with the same lr and weight decay is flagged by the exact law
    code, out, err = run_cli([ckpt, "--init", adamw_run / "checkpoints" / "step_000000.pt", "--lr", "1e-3", "--wd",
                              str(WD), "--no-identities", "--batch", "4", "--json", "-"], capsys)
    assert code == 1
    rep = json.loads(out)
    assert rep["hyper"]["optimizer"] == "sgd" and rep["hyper"]["steps"] == 2
    assert any(f["family"] == "translation" and "moved beyond the exact law" in f["reason"] for f in rep["flagged"])


# ----------------------------------------------------------------------------------------------------------
# symmetry edits vs non-symmetry edits


def _rescale_factors(a: float) -> dict[str, float]:
    """Per slot, the factor by which the generated rescale action multiplies the charge density.

    Derived from the generated code itself: its ACTION and CHARGE_DENSITY functions are plain arithmetic, so
    they accept SymPy symbols; q(ψ(x, a)) / q(x) must be free of x (the charge is homogeneous in each slot).
    """
    x, sa = sp.symbols("x a", positive=True)
    out = {}
    for slot in RESCALE.SLOTS:
        ratio = sp.simplify(RESCALE.CHARGE_DENSITY[slot](RESCALE.ACTION[slot](x, sa)) / RESCALE.CHARGE_DENSITY[slot](x))
        assert x not in ratio.free_symbols
        out[slot] = float(ratio.subs(sa, a))
    return out


def test_symmetry_edit_keeps_the_loss_and_moves_the_imbalance_exactly(sgd_run, tmp_path, capsys):
    """Rescale hidden unit j of the classifier by a = 3 with the generated ACTION (weights in float64, exact)."""
    sd = {k: (v.double() if v.is_floating_point() else v)
          for k, v in load_checkpoint_file(sgd_run / "checkpoints" / "step_000003.pt").state_dict.items()}
    orig, edited, broken = tmp_path / "orig.pt", tmp_path / "edited.pt", tmp_path / "broken.pt"
    torch.save(sd, orig)
    j, a = 5, 3.0
    w_in, b_in, w_out = sd["classifier.0.weight"], sd["classifier.0.bias"], sd["classifier.3.weight"]
    e = dict(sd)
    e["classifier.0.weight"], e["classifier.0.bias"], e["classifier.3.weight"] = w_in.clone(), b_in.clone(), w_out.clone()
    e["classifier.0.weight"][j] = RESCALE.ACTION["x_in"](w_in[j], a)
    e["classifier.0.bias"][j] = RESCALE.ACTION["x_in"](b_in[j], a)
    e["classifier.3.weight"][:, j] = RESCALE.ACTION["x_out"](w_out[:, j], a)
    torch.save(e, edited)
    factors = _rescale_factors(a)  # {x_in: a², x_out: 1/a²}
    q_in = float(w_in[j].pow(2).sum() + b_in[j] ** 2)
    q_out = float(w_out[:, j].pow(2).sum())
    predicted = (factors["x_in"] - 1) * q_in - (factors["x_out"] - 1) * q_out  # (a²−1)|θ_in|² − (1/a²−1)|θ_out|²

    code, out, err = run_cli([edited, "--init", orig, "--steps", "0", "--no-identities", "--batch", "4",
                              "--json", "-"], capsys)
    rep = json.loads(out)
    fv = rep["function_vs_init"]
    assert fv["dtype"] == "float64" and fv["same_function"]
    assert abs(fv["loss_change"]) <= 1e-13 * abs(fv["loss_init"])  # float64 round-off of one forward pass
    for entry in rep["layers"]:
        delta = np.array(entry["vs_init"]["delta_values"])
        if entry["family"] == "rescale" and entry["layer"] == HIDDEN_LAYER:
            assert delta[j] == pytest.approx(predicted, rel=1e-12, abs=1e-15)
            assert np.all(np.delete(delta, j) == 0.0)  # the other units' imbalances do not move at all
        elif entry["family"] != "rescale":
            assert np.all(delta == 0.0), entry["layer"]  # translation sums and scale norms do not move
    # with steps = 0 every charge must keep its value: the edit is reported, as a symmetry action. Besides the
    # unit's own group, the group sets sharing its tensors move (rows of classifier.3, columns of classifier.0).
    assert code == 1
    assert {f["layer"] for f in rep["flagged"]} == {HIDDEN_LAYER, "classifier.3 → classifier.6",
                                                    "features.26 → classifier.0"}
    assert all("consistent with a symmetry action" in f["reason"] for f in rep["flagged"])

    # a non-symmetry edit: the outgoing weights of the hidden units scaled by 1.5 without the compensating
    # incoming change (all units, so that it cannot hide behind a unit the ReLU turns off on this batch)
    b = dict(sd)
    b["classifier.3.weight"] = w_out * 1.5
    torch.save(b, broken)
    code, out, err = run_cli([broken, "--init", orig, "--steps", "0", "--no-identities", "--batch", "4",
                              "--json", "-"], capsys)
    rep = json.loads(out)
    assert code == 1 and not rep["function_vs_init"]["same_function"]
    assert abs(rep["function_vs_init"]["loss_change"]) > 1e-9
    flagged = {f["layer"]: f["reason"] for f in rep["flagged"]}
    assert HIDDEN_LAYER in flagged and "symmetry action" not in flagged[HIDDEN_LAYER]


def test_weights_modified_after_training_are_flagged_by_the_exact_law(sgd_run, tmp_path, capsys):
    """A float32 checkpoint of the SGD run with one logit weight nudged by 1e-3: the translation law flags it."""
    ckpt = load_checkpoint_file(sgd_run / "checkpoints" / "step_000003.pt")
    raw = torch.load(sgd_run / "checkpoints" / "step_000003.pt", weights_only=True)
    raw["model"]["classifier.6.weight"][2, 7] += 1e-3
    path = tmp_path / "nudged.pt"
    torch.save(raw, path)
    code, out, err = run_cli([path, "--run", sgd_run, "--no-identities", "--batch", "4", "--json", "-"], capsys)
    assert code == 1
    rep = json.loads(out)
    cols = next(e for e in rep["layers"] if e["family"] == "translation" and e["layer"] == "classifier.6 → softmax"
                and e["groups"] == 64)
    law = next(p for p in cols["predictions"] if p["kind"] == "exact")
    assert law["flagged"] and law["quantities"]["Q"]["flagged"] == [7]
    assert ckpt.step == 3


# ----------------------------------------------------------------------------------------------------------
# library level: momentum buffers on a tiny CNN


def _tiny_run(tmp: Path, opt_name: str, steps: int = 3):
    from symtools.nn.small import cnn

    torch.manual_seed(0)
    model = cnn(3, [8, 16], 10, input_size=16, norm="batch")
    if opt_name == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    stream = make_loader("digits", 16, image_size=16, seed=1)
    train(model, opt, stream, steps, out_dir=tmp, progress=False)
    x, y = make_loader("digits", 16, image_size=16, seed=7).batch(0)
    return model, x, y


def test_momentum_buffers_follow_the_law_and_tampering_is_flagged(tmp_path):
    model, x, y = _tiny_run(tmp_path / "run", "momentum")
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000003.pt")
    init = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000000.pt")
    names = [n for n, _ in model.named_parameters()]
    hyper = hyper_from_optimizer(ckpt.optimizer, names, "SGD", steps=3)
    assert (hyper.optimizer, hyper.momentum) == ("momentum", 0.9)
    model.load_state_dict(ckpt.state_dict)
    rep = audit_model(model, x, y, checkpoint=ckpt, init=init, hyper=hyper, identities=True,
                      check_dtype=torch.float64)
    assert rep["pass"], rep["flagged"]
    assert rep["identities"]["pass"] and set(rep["identities"]["families"]) == {"translation", "scale", "rescale"}
    trans = [e for e in rep["layers"] if e["family"] == "translation"]
    for e in trans:  # (s, ⟨b, 1⟩) follow the generated 2×2 momentum recurrence from init, to round-off
        law = next(p for p in e["predictions"] if p["kind"] == "exact")
        assert set(law["quantities"]) == {"Q", "R"} and law["law"] == "law_translation_momentum"
        assert all(q["max_ratio"] < 1 for q in law["quantities"].values())
    # a momentum buffer edited by a constant on a BatchNorm-fed bias breaks ⟨b, 1⟩ = R
    ckpt.optimizer["state"][1]["momentum_buffer"] += 1e-3  # parameter id 1 = conv0.bias (feeds norm0)
    rep = audit_model(model, x, y, checkpoint=ckpt, init=init, hyper=hyper, identities=False)
    first = next(e for e in rep["layers"] if e["family"] == "translation")
    law = next(p for p in first["predictions"] if p["kind"] == "exact")
    assert law["quantities"]["R"]["flagged_groups"] == 8 and law["quantities"]["Q"]["flagged_groups"] == 0
    assert rep["exit_code"] == 1


def test_adamw_first_moment_check_rests_on_derived_facts(tmp_path):
    """⟨exp_avg, v⟩ = 0 is checked where the declarations say AdamW's first moment sums gradients alone and the
    module says v is constant (GENERATOR_CONSTANT); a module of an older symtools without that constant gets no
    check and a note saying why, never a guess."""
    import types

    from symtools.codegen.generated import translation

    model, x, y = _tiny_run(tmp_path / "run", "adamw")
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000003.pt")
    init = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000000.pt")
    hyper = hyper_from_optimizer(ckpt.optimizer, [n for n, _ in model.named_parameters()], "AdamW", steps=3)
    model.load_state_dict(ckpt.state_dict)
    rep = audit_model(model, x, y, checkpoint=ckpt, init=init, hyper=hyper, identities=False)
    trans = [e for e in rep["layers"] if e["family"] == "translation"]
    assert trans and all(e["buffers"]["exp_avg"]["check"]["flagged_groups"] == 0 for e in trans)
    assert all(e["buffers"]["exp_avg"]["check"] is None for e in rep["layers"] if e["family"] == "scale")
    assert not any("GENERATOR_CONSTANT" in n for n in rep["notes"])
    old = types.ModuleType("old_translation")
    old.__dict__.update({k: v for k, v in vars(translation).items() if k not in ("GENERATOR_CONSTANT", "CHARGE_TEXT")})
    rep_old = audit_model(model, x, y, checkpoint=ckpt, init=init, hyper=hyper, identities=False,
                          modules={"translation": old})
    trans_old = [e for e in rep_old["layers"] if e["family"] == "translation"]
    assert all(e["buffers"]["exp_avg"]["check"] is None for e in trans_old)
    assert [n for n in rep_old["notes"] if "GENERATOR_CONSTANT" in n] == [
        "translation: ⟨exp_avg, v⟩ = 0 not checked: its generated module has no GENERATOR_CONSTANT (emitted by an "
        "older symtools); re-emit it with `symtools derive SPEC --torch FILE`"]
    for a, b in zip(trans, trans_old):  # the charges themselves do not depend on the derived facts
        assert a["values"] == b["values"] and a["charge_name"] == "translation sum Σ x"
    assert trans_old[0]["charge_name"] == "translation sum"  # no CHARGE_TEXT: words only


def test_failing_identity_gives_exit_code_1(tmp_path):
    """Negative control: groups found for cross-entropy, loss evaluated as MSE (no softmax translation symmetry)."""
    from symtools.nn.graph import find_symmetries

    model, x, y = _tiny_run(tmp_path / "run", "momentum", steps=1)
    symmetries = find_symmetries(model, x[:1])
    onehot = torch.nn.functional.one_hot(y, 10).to(x.dtype)
    rep = audit_model(model, x, onehot, symmetries=symmetries, loss="mse", check_dtype=torch.float64)
    assert not rep["identities"]["families"]["translation"]["pass"]
    assert rep["identities"]["families"]["scale"]["pass"] and rep["exit_code"] == 1 and not rep["pass"]


def test_no_hypothesis_means_no_prediction_said_clearly(tmp_path):
    model, x, y = _tiny_run(tmp_path / "run", "adamw", steps=1)
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000001.pt")
    init = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "step_000000.pt")
    rep = audit_model(model, x, y, checkpoint=ckpt, init=init, identities=False)
    notes = {p["note"] for e in rep["layers"] for p in e["predictions"]}
    assert notes == {"no prediction available: no training hypothesis: give --run, --lr/--wd/--steps, or a "
                     "checkpoint with optimizer state"}
    assert rep["pass"] and all(e["vs_init"] is not None for e in rep["layers"])
    # rescale under plain SGD: no prediction from init alone, and the reason says what is needed
    hyper = Hyper("sgd", lr=0.1, weight_decay=0.0, steps=1)
    rep = audit_model(model, x, y, checkpoint=ckpt, init=init, hyper=hyper, identities=False)
    resc = next(e for e in rep["layers"] if e["family"] == "rescale")
    assert resc["predictions"][0]["kind"] == "none" and "needs the run's records" in resc["predictions"][0]["note"]


# ----------------------------------------------------------------------------------------------------------
# records reader and atomic report


def test_records_reader_understands_long_and_wide_layouts(tmp_path):
    with RecordWriter(tmp_path / "records") as w:
        s = w.stream("charges.rescale", ["step", "layer", "group", "Q", "G"], meta={"layers": ["a → b", "b → c"]})
        for step in (0, 1):
            for li, n in ((0, 3), (1, 2)):
                for g in range(n):
                    s.append([step, li, g, 10 * step + g + li / 10, -g])
        t = w.stream("scale_wide", ["step", "Q[0]", "Q[1]", "Q[2]"], meta={"family": "scale", "layer": "a → bn"})
        t.append([[0, 1.0, 2.0, 3.0], [5, 4.0, 5.0, 6.0]])
        w.stream("train", ["step", "loss", "accuracy", "lr", "time_s"]).append([[1, 2.3, 0.1, 0.5, 0.0],
                                                                              [2, 2.2, 0.1, 0.25, 0.1]])
    rec = RecordedRun(tmp_path)
    q = rec.quantities("rescale", "b → c", 2)
    np.testing.assert_array_equal(q["Q"][1], [10.1, 11.1])
    np.testing.assert_array_equal(q["G"][0], [0.0, -1.0])
    np.testing.assert_array_equal(rec.quantities("scale", "a → bn", 3)["Q"][5], [4.0, 5.0, 6.0])
    assert rec.lr_schedule(0, 2) == [0.5, 0.25] and rec.lr_schedule(0, 3) is None
    assert "no stream declares per-group translation" in rec.why_not("translation", "x")


def test_html_report_is_written_atomically(tmp_path, monkeypatch):
    from symtools.audit import report as R

    target = tmp_path / "rep"
    rep = {"layers": [{"family": "scale", "layer": "a → b", "groups": 3, "values": [1.0, 2.0, 3.0],
                       "charge": {"mean": 2.0}, "predictions": [], "reasons": []}], "pass": True, "flagged": []}
    write_html(rep, target)
    before = sorted(p.name for p in target.iterdir())
    assert "index.html" in before and "hist_scale.png" in before

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "_html", boom)
    with pytest.raises(RuntimeError):
        write_html(rep, target)
    assert sorted(p.name for p in target.iterdir()) == before  # the old report is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]     # no temporary folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SymtoolsError, match="not an audit report"):
        write_html(rep, tmp_path / "other")
