"""ResNet-18/34/50 (symtools.nn.resnet): torchvision's layout, the registry, loading with ``--model auto``, the
commands on a ResNet, and the symmetry group counts of docs/architectures/resnet.md.

The expected layout is written here from torchvision's public definition (``torchvision/models/resnet.py``:
``conv1, bn1, relu, maxpool, layer1 … layer4, avgpool, fc``; blocks ``conv1, bn1, conv2, bn2[, conv3, bn3],
downsample``), independently of :mod:`symtools.nn.resnet`. :func:`expected_counts` counts the symmetry groups
from the module tree (``named_modules``) by the rules of the doc, not with the graph walk; the tests comparing
it with :func:`symtools.nn.graph.find_symmetries` need the graph walk through residual adds (issue 12).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from symtools.audit.loading import VGGArch, build_model_for
from symtools.errors import SymtoolsError
from symtools.nn.graph import find_symmetries
from symtools.nn.models import MODEL_NAMES, RESNET_NAMES, VGG_NAMES, build_model
from symtools.nn.resnet import resnet
from symtools.nn.vgg import vgg
from symtools.testing.cli import run_cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures" / "resnet.md"

#: torchvision's parameter counts at 1000 classes (its model docs / the ResNet paper's implementations)
TORCHVISION_PARAMETERS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
#: blocks per stage and whether blocks are Bottlenecks, as torchvision's resnet18/34/50 call ResNet(...)
TORCHVISION_LAYERS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}


run = run_cli  # symtools.testing.cli: (exit code, stdout, stderr) of an in-process command


# ----------------------------------------------------------------------------------------------------------
# (a) torchvision's layout


def torchvision_layout(depth: int, classes: int = 1000, in_channels: int = 3) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of torchvision's ``resnet{depth}().state_dict()``, in its order, from its definition."""
    layers, bottleneck = TORCHVISION_LAYERS[depth]
    expansion = 4 if bottleneck else 1

    def bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] + \
            [(f"{prefix}.num_batches_tracked", ())]

    out = [("conv1.weight", (64, in_channels, 7, 7))] + bn("bn1", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        stride = 1 if stage == 1 else 2
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if bottleneck:  # conv1 1×1, conv2 3×3 (stride here: v1.5), conv3 1×1 to 4·planes
                out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + bn(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
                out += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + bn(f"{p}.bn3", planes * 4)
            else:
                out += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + bn(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                out += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1))]
                out += bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return out + [("fc.weight", (classes, 512 * expansion)), ("fc.bias", (classes,))]


@pytest.mark.parametrize("depth", [18, 50])
def test_state_dict_keys_and_shapes_are_torchvisions(depth):
    with torch.device("meta"):
        model = resnet(depth)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == torchvision_layout(depth)
    # torchvision's parameter count (every layout entry but the BN buffers is a parameter)
    params = sum(math.prod(s) for k, s in torchvision_layout(depth) if not k.endswith(("running_mean", "running_var",
                                                                                        "num_batches_tracked")))
    assert params == TORCHVISION_PARAMETERS[depth]


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_parameter_counts_are_torchvisions(depth):
    with torch.device("meta"):
        model = resnet(depth)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[depth]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == torchvision_layout(depth)
    with torch.device("meta"):  # classes and input channels enter only fc and conv1
        small = resnet(depth, classes=10, in_channels=1)
    assert [(k, tuple(v.shape)) for k, v in small.state_dict().items()] == torchvision_layout(depth, 10, 1)


def test_modules_strides_and_init_are_torchvisions():
    torch.manual_seed(0)
    model = resnet(50, classes=10)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == (1, 1)
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    block = model.layer2[0]  # v1.5: the stride sits on the 3×3 conv of a Bottleneck
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.downsample[0].stride == (2, 2)
    assert resnet(18).layer3[0].conv1.stride == (2, 2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    conv = model.layer4[0].conv2  # Kaiming normal, fan_out, relu: std √(2 / (out·k·k)); 2.4M samples
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.01)
    assert abs(conv.weight.mean().item()) < 1e-3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all()) and not m.bias.any() for m in bns)
    bound = 1 / math.sqrt(model.fc.in_features)  # torch's default Linear init: U(±1/√fan_in), bias too
    assert model.fc.weight.abs().max().item() <= bound and model.fc.bias.abs().max().item() <= bound
    assert model.fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_torchvision_layout_state_dict_loads_strictly():
    source = {k: (torch.randn(s) if not k.endswith("num_batches_tracked") else torch.tensor(7))
              for k, s in torchvision_layout(18, classes=5)}
    model = resnet(18, classes=5)
    model.load_state_dict(source, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_bad_arguments():
    for bad in (101, "50x", 0):
        with pytest.raises(SymtoolsError, match="unknown ResNet depth"):
            resnet(bad)
    with pytest.raises(SymtoolsError, match="classes"):
        resnet(18, classes=0)


# ----------------------------------------------------------------------------------------------------------
# (b) forward


@pytest.mark.parametrize("depth", [18, 34, 50])
@pytest.mark.parametrize("side", [32, 64])
def test_forward_batch_2(depth, side):
    torch.manual_seed(0)
    model = resnet(depth, classes=7)
    x = torch.randn(2, 3, side, side)
    y = model(x)  # training mode: batch statistics (at 32×32 the last stage has 1×1 maps: 2 values per channel)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(x).shape == (2, 7)


def test_forward_other_sides_and_channels():
    model = resnet(18, classes=3, in_channels=1).eval()
    for side in (33, 48, 100):
        assert model(torch.randn(1, 1, side, side)).shape == (1, 3)


# ----------------------------------------------------------------------------------------------------------
# (c) the registry


def test_build_model_resnet18():
    torch.manual_seed(0)
    model = build_model("resnet18", input_size=32, classes=10)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 3
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[18] - 513 * 990
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert RESNET_NAMES == ("resnet18", "resnet34", "resnet50") and MODEL_NAMES == VGG_NAMES + RESNET_NAMES
    assert VGG_NAMES == tuple(f"vgg{d}{s}" for d in (11, 13, 16, 19) for s in ("", "_bn"))
    for name in ("resnet34", "resnet50"):
        with torch.device("meta"):
            assert build_model(name, input_size=96, classes=4).fc.out_features == 4


def test_build_model_errors():
    with pytest.raises(SymtoolsError, match=r"unknown model 'resnet101'; choose one of vgg11, .*resnet18, resnet34, "
                                            r"resnet50"):
        build_model("resnet101")
    for size in (16, 31, 32.0, True):
        with pytest.raises(SymtoolsError, match="≥ 32"):
            build_model("resnet18", input_size=size)
    with pytest.raises(SymtoolsError, match="classes"):
        build_model("resnet50", classes=0)


def test_vgg_unchanged():
    """The registry builds VGG exactly as vgg() does: same modules, same draws from the generator."""
    for name, depth, bn in (("vgg11_bn", "11", True), ("vgg13", "13", False)):
        torch.manual_seed(3)
        a = build_model(name, input_size=32, classes=10)
        torch.manual_seed(3)
        b = vgg(depth, batch_norm=bn, input_size=32, classes=10)
        assert list(a.state_dict()) == list(b.state_dict())
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(SymtoolsError, match="multiple of 32"):
        build_model("vgg11", input_size=48)


# ----------------------------------------------------------------------------------------------------------
# (d) loading: --model auto


def _trained_like(depth: int, classes: int, seed: int = 1, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A state_dict whose values differ from any fresh init (so a round trip must carry them)."""
    g = torch.Generator().manual_seed(seed)
    sd = resnet(depth, classes=classes, in_channels=in_channels).state_dict()
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 5) for k, v in sd.items()}


def test_auto_round_trip_resnet50():
    sd = _trained_like(50, classes=7)
    model, arch, notes = build_model_for(sd)
    assert (arch.name, arch.depth, arch.classes, arch.in_channels, arch.input_size) == ("resnet50", 50, 7, 3, 64)
    assert arch.batch_norm and arch.hidden is None and not arch.input_from_weights
    assert any("input size 64×64 assumed" in n for n in notes)
    got = model.state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    named, arch2, _ = build_model_for(sd, "resnet50")
    assert arch2 == arch and all(torch.equal(named.state_dict()[k], v) for k, v in sd.items())


def test_auto_resnet18_34_float64_and_one_channel():
    for depth in (18, 34):
        with torch.device("meta"):
            sd = resnet(depth, classes=3, in_channels=1).state_dict()
        sd = {k: torch.zeros(v.shape, dtype=torch.float64 if v.is_floating_point() else v.dtype)
              for k, v in sd.items()}
        model, arch, _ = build_model_for(sd, "auto")
        assert (arch.name, arch.classes, arch.in_channels) == (f"resnet{depth}", 3, 1)
        assert model.fc.weight.dtype == torch.float64 and model.conv1.in_channels == 1


def test_vgg_still_inferred():
    with torch.device("meta"):
        sd = vgg(11, batch_norm=True, input_size=32, classes=10).state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    _, arch, _ = build_model_for(sd)
    assert isinstance(arch, VGGArch) and (arch.name, arch.input_size, arch.classes) == ("vgg11_bn", 32, 10)


@pytest.fixture(scope="module")
def resnet50_sd():
    return _trained_like(50, classes=7, seed=2)


@pytest.mark.parametrize("case, pattern", [
    ("no_layer4", r"keys look like a ResNet .* found stages layer1, layer2, layer3 with \[3, 4, 6\] blocks of "
                  r"Bottleneck .* match no ResNet"),
    ("block_missing", r"found stages layer1, layer2, layer3, layer4 with \[3, 4, 5, 3\] blocks of Bottleneck"),
    ("block_renumbered", r"block indices not 0, 1, … in layer3"),
    ("one_key_missing", r"does not fit ResNet: missing keys \(1\): layer2\.1\.bn2\.running_var"),
    ("fc_garbled", r"shape mismatches \(1\): fc\.weight: file \(7, 100\) vs model \(7, 2048\)"),
    ("conv_garbled", r"shape mismatches \(1\): layer3\.2\.conv2\.weight: file \(256, 256, 1, 1\)"),
    ("unexpected_key", r"unexpected keys \['layer1\.0\.conv9\.weight'\]"),
    ("mixed_blocks", r"some blocks have conv3/bn3 \(Bottleneck\) and others do not \(layer2\.1"),
    ("no_fc", r"no 2-D fc\.weight"),
    ("as_resnet18", r"does not fit ResNet: unexpected keys \(\d+\): layer1\.0\.conv3\.weight"),
    ("densenet", r"not a VGG or ResNet checkpoint: its keys look like a DenseNet .*ResNet-18/34/50"),
])
def test_truncated_or_garbled_state_dicts_are_named(resnet50_sd, case, pattern):
    sd, model = dict(resnet50_sd), "auto"
    if case == "no_layer4":
        sd = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    elif case == "block_missing":
        sd = {k: v for k, v in sd.items() if not k.startswith("layer3.5.")}
    elif case == "block_renumbered":
        sd = {k.replace("layer3.5.", "layer3.9."): v for k, v in sd.items()}
    elif case == "one_key_missing":
        del sd["layer2.1.bn2.running_var"]
    elif case == "fc_garbled":
        sd["fc.weight"] = torch.zeros(7, 100)
    elif case == "conv_garbled":
        sd["layer3.2.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    elif case == "unexpected_key":
        sd["layer1.0.conv9.weight"] = torch.zeros(3)
    elif case == "mixed_blocks":
        sd = {k: v for k, v in sd.items() if not k.startswith(("layer2.1.conv3", "layer2.1.bn3"))}
    elif case == "no_fc":
        del sd["fc.weight"]
    elif case == "as_resnet18":
        model = "resnet18"
    elif case == "densenet":
        sd = {"features.denseblock1.denselayer1.conv1.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)}
    with pytest.raises(SymtoolsError, match=pattern):
        build_model_for(sd, model)


def test_named_model_on_the_other_family():
    with torch.device("meta"):
        vsd = vgg(11, batch_norm=True, input_size=32, classes=10).state_dict()
    with pytest.raises(SymtoolsError, match="not a ResNet checkpoint: its first keys are features.0.weight"):
        build_model_for(vsd, "resnet18")
    with pytest.raises(SymtoolsError, match="unknown model 'resnet19'; choose auto or one of .*resnet50"):
        build_model_for(vsd, "resnet19")


# ----------------------------------------------------------------------------------------------------------
# (e) the commands


def test_cli_symmetries_resnet18():
    code, out, err = run(["symmetries", "--model", "resnet18", "--input", 32, "--classes", 10, "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["model"] == "resnet18" and rep["parameters"] == 11_181_642
    assert rep["groups"] > 0 and all(n > 0 for n in rep["families"].values()) and rep["families"]
    code, out, err = run(["symmetries", "--model", "resnet18", "--input", 32, "--classes", 10])
    assert code == 0 and "resnet18 (input 32×32, 10 classes" in out


def test_cli_check_resnet18():
    code, out, err = run(["check", "--model", "resnet18", "--input", 32, "--classes", 10, "--batch", 4,
                          "--dtype", "float64", "--json"])
    assert code in (0, 1, 3), err  # it ran (2: bad input, 4: no groups)
    doc = json.loads(out)
    assert doc["model"] == "resnet18" and doc["parameters"] == 11_181_642
    assert doc["families"] and all(f["groups"] > 0 for f in doc["families"].values())


def test_cli_check_weights_of_a_resnet(tmp_path):
    """``check --weights`` infers a ResNet; its input size comes from --input (64 when not given), which its
    weights do not fix (a VGG's do: there a different --input is an error)."""
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(build_model("resnet18", input_size=32, classes=10).state_dict(), path)
    code, out, err = run(["check", "--weights", path, "--input", 48, "--batch", 2, "--dtype", "float32", "--json"])
    assert code in (0, 1, 3), err
    doc = json.loads(out)
    assert doc["model"] == "resnet18" and doc["families"]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet_run") / "run"
    code, stdout, err = run(["train", "--model", "resnet18", "--input", 32, "--steps", 3, "--batch", 4,
                             "--stride", 1, "--checkpoint-every", 0, "--quiet", "--out", out])
    return code, stdout, err, out


def test_cli_train_resnet18_with_the_monitor(resnet_run):
    code, _, err, out = resnet_run
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["config"]["model"] == "resnet18" and summary["config"]["model_class"] == "ResNet"
    # the monitor followed every family the graph walk found, step by step, with its law (float32 round-off)
    assert summary["max_rel_residual_discrete"] < 1e-4
    assert summary["families"]
    for family in summary["families"]:
        assert (out / "records" / f"groups_{family}.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000.pt", "step_000003.pt"]


def test_cli_audit_of_the_trained_resnet(resnet_run):
    _, _, _, out = resnet_run
    code, stdout, err = run(["audit", out / "checkpoints" / "step_000003.pt", "--run", out, "--no-identities",
                             "--batch", 2, "--json", "-"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert {k: rep["model"][k] for k in ("name", "input_size", "classes", "inferred", "batch_norm")} == \
        {"name": "resnet18", "input_size": 64, "classes": 10, "inferred": True, "batch_norm": True}
    assert rep["init"] is not None and rep["families"]
    assert any("input size 64×64 assumed" in n for n in rep["checkpoint"]["notes"])


def test_cli_audit_model_auto_of_a_saved_state_dict(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", input_size=32, classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    code, stdout, err = run(["audit", path, "--model", "auto", "--no-identities", "--batch", 2, "--json", "-"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"]["name"] == "resnet18" and rep["model"]["parameters"] == 11_181_642
    assert rep["model"]["inferred"] and rep["model"]["input_size"] == 64 and rep["families"]
    # a named model that does not fit: one line, exit 2, before any work
    code, _, err = run(["audit", path, "--model", "resnet50", "--no-identities", "--batch", 2])
    assert code == 2 and "does not fit ResNet" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# (f) symmetry group counts (docs/architectures/resnet.md)


def _positive_homogeneous(m: nn.Module) -> bool:
    return type(m) in (nn.ReLU, nn.LeakyReLU)


def expected_counts(model: nn.Module) -> dict[str, int]:
    """Groups per family, as ``SymmetryMap.families()`` gives them (families with no group left out); the
    rules are those of :func:`count_parts`."""
    parts = count_parts(model)
    counts = {"scale": parts["scale"], "rescale": parts["rescale_in_block"] + parts["rescale_stream"],
              "translation": parts["translation"]}
    return {family: n for family, n in counts.items() if n}


def count_parts(model: nn.Module) -> dict[str, int]:
    """Symmetry groups of a (ReLU) ResNet's cross-entropy loss with BatchNorm in training mode, counted from the
    module tree by the rules of docs/architectures/resnet.md (independent of the graph walk).

    * scale: each Conv2d that feeds a BatchNorm (``…convK`` → ``…bnK``, ``downsample.0`` → ``downsample.1``):
      one group per output channel;
    * rescale inside a block: each BN but the last of a block whose activation is positively homogeneous
      (ReLU): one group per channel;
    * rescale of the residual stream: the stream is cut into segments at every projection (a block with a
      ``downsample``); a segment is rescalable when every activation writing into it (the stem's, each of its
      blocks' last) is positively homogeneous: one group per channel;
    * translation: one per input column of ``fc`` and one for its whole bias.
    """
    mods = dict(model.named_modules())
    scale = 0
    for name, m in mods.items():
        if not isinstance(m, nn.Conv2d):
            continue
        head, _, last = name.rpartition(".")
        partner = f"{head}.1" if last == "0" else (f"{head}." if head else "") + last.replace("conv", "bn")
        bn = mods.get(partner)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == m.out_channels, (name, partner)
        scale += m.out_channels

    in_block = 0
    segments: list[tuple[int, list[nn.Module]]] = [(model.bn1.num_features, [model.relu])]  # the stem's
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b, block in enumerate(stage):
            children = dict(block.named_children())
            bns = [m for n, m in children.items() if re.fullmatch(r"bn\d", n)]
            acts = [m for n, m in children.items() if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Sequential))
                    and m is not None]
            assert len(acts) == len(bns), list(children)
            in_block += sum(bn.num_features for bn, act in zip(bns[:-1], acts[:-1]) if _positive_homogeneous(act))
            if b == 0 and block.downsample is not None:  # a projection starts a new segment
                segments.append((block.downsample[1].num_features, []))
            assert bns[-1].num_features == segments[-1][0]
            segments[-1][1].append(acts[-1])
    stream = sum(width for width, acts in segments if all(_positive_homogeneous(a) for a in acts))

    translation = model.fc.in_features + (model.fc.bias is not None)
    return {"scale": scale, "rescale_in_block": in_block, "rescale_stream": stream, "translation": translation}


def closed_form(depth: int) -> dict[str, int]:
    """The doc's formulas (as :func:`count_parts`): n_s blocks of p_s = 64·2^(s−1) planes per stage, expansion
    e (1 or 4), N = Σ n_s·p_s."""
    layers, bottleneck = TORCHVISION_LAYERS[depth]
    planes = (64, 128, 256, 512)
    e = 4 if bottleneck else 1
    n = sum(k * p for k, p in zip(layers, planes))
    projections = planes[int(not bottleneck):]  # the stages whose first block has a downsample
    return {"scale": 64 + (6 if bottleneck else 2) * n + e * sum(projections),
            "rescale_in_block": (2 if bottleneck else 1) * n,
            "rescale_stream": (64 if bottleneck else 0) + e * sum(planes),
            "translation": 512 * e + 1}


def gelu_variant(model: nn.Module) -> nn.Module:
    """The negative control: every ReLU replaced by a GELU (not positively homogeneous)."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(m, child_name, nn.GELU())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    return model


@pytest.fixture(scope="module")
def models_10_classes() -> dict[int, nn.Module]:
    torch.manual_seed(0)
    return {d: resnet(d, classes=10) for d in (18, 34, 50)}


def test_expected_counts_closed_form(models_10_classes):
    assert expected_counts(models_10_classes[18]) == {"scale": 4800, "rescale": 2880, "translation": 513}
    assert count_parts(models_10_classes[18])["rescale_in_block"] == 1920
    for depth, model in models_10_classes.items():
        assert count_parts(model) == closed_form(depth)
    with torch.device("meta"):  # the counts do not depend on the classes (fc's rows enter none of them)
        assert count_parts(resnet(50, classes=1000)) == closed_form(50)
        assert count_parts(resnet(34, classes=3)) == closed_form(34)
    # negative control: with GELU (not positively homogeneous) no rescale group is left
    assert expected_counts(gelu_variant(resnet(18, classes=10))) == {"scale": 4800, "translation": 513}


def test_doc_table_matches_the_counts(models_10_classes):
    """The table of docs/architectures/resnet.md (model | scale | in-block | stream | rescale | translation)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\|\s*ResNet-(\d+)\s*\|([\d\s,|]+)\|", line.strip())
        if m:
            rows[int(m.group(1))] = [int(c.replace(",", "")) for c in m.group(2).split("|")]
    assert set(rows) == {18, 34, 50}
    for depth, model in models_10_classes.items():
        c, total = count_parts(model), expected_counts(model)
        assert rows[depth] == [c["scale"], c["rescale_in_block"], c["rescale_stream"], total["rescale"],
                               c["translation"]]


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_graph_walk_finds_the_expected_groups(models_10_classes, depth):
    """Needs the graph walk through residual adds (issue 12): fails until it lands."""
    model = models_10_classes[depth]
    assert find_symmetries(model, torch.zeros(2, 3, 32, 32)).families() == expected_counts(model)


def test_graph_walk_gelu_negative_control():
    torch.manual_seed(0)
    model = gelu_variant(resnet(18, classes=10))
    families = find_symmetries(model, torch.zeros(2, 3, 32, 32)).families()
    assert families.get("rescale", 0) == 0
    assert families == expected_counts(model)
