"""The VGG family, the model registry, the small builders, the ``symmetries`` command and the counts doc."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from symtools.cli.main import main
from symtools.cli.symmetries import report
from symtools.errors import SymtoolsError
from symtools.nn.models import MODEL_NAMES, build_model
from symtools.nn.small import Square, cnn, mlp
from symtools.nn.vgg import CONFIGS, vgg

DOC = Path(__file__).resolve().parents[1] / "docs" / "symmetry-counts.md"


@pytest.fixture(scope="module")
def tiny_imagenet() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name) for name in ("vgg16", "vgg16_bn")}


def test_parameter_counts_match_the_paper(tiny_imagenet) -> None:
    """Table 5 of Kunin et al. (ICLR 2021): the Tiny-ImageNet VGG-16 with and without BatchNorm."""
    assert sum(p.numel() for p in tiny_imagenet["vgg16"].parameters()) == 18_067_464
    assert sum(p.numel() for p in tiny_imagenet["vgg16_bn"].parameters()) == 18_075_912


def torchvision_keys(config: tuple, batch_norm: bool) -> list[str]:
    """Reference: the state_dict keys of torchvision's VGG, enumerated as its ``make_layers`` numbers modules."""
    keys, index = [], 0
    for entry in config:
        if entry == "M":
            index += 1
            continue
        keys += [f"features.{index}.weight", f"features.{index}.bias"]
        if batch_norm:
            keys += [f"features.{index + 1}.{k}" for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        index += 3 if batch_norm else 2
    return keys + [f"classifier.{i}.{k}" for i in (0, 3, 6) for k in ("weight", "bias")]


def test_torchvision_key_layout(tiny_imagenet) -> None:
    # literal keys of torchvision's vgg16 (convs at these indices, FC layers at 0, 3, 6)
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    literal = [f"features.{i}.{k}" for i in convs for k in ("weight", "bias")]
    literal += [f"classifier.{i}.{k}" for i in (0, 3, 6) for k in ("weight", "bias")]
    assert list(tiny_imagenet["vgg16"].state_dict()) == literal
    assert list(tiny_imagenet["vgg16_bn"].state_dict()) == torchvision_keys(CONFIGS["16"], True)
    assert "features.40.weight" in tiny_imagenet["vgg16_bn"].state_dict()  # torchvision's last BN conv
    for depth, config in CONFIGS.items():
        for bn in (False, True):
            assert list(vgg(depth, bn, input_size=32, classes=3).state_dict()) == torchvision_keys(config, bn)


def test_torchvision_layout_state_dict_loads() -> None:
    """A checkpoint written with torchvision's key names (same shapes) loads strictly, values intact."""
    source = vgg(11, batch_norm=True, input_size=32, classes=5)
    checkpoint = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
                  for k, v in source.state_dict().items()}
    target = vgg(11, batch_norm=True, input_size=32, classes=5)
    target.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in checkpoint.items())


def test_forward_shapes_and_flatten() -> None:
    for name in ("vgg11", "vgg13_bn"):
        model = build_model(name, input_size=64, classes=7).eval()
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert model.classifier[0].in_features == 512 * 2 * 2
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for m in build_model("vgg11").modules())


def test_init_follows_torchvision(tiny_imagenet) -> None:
    model = tiny_imagenet["vgg16_bn"]
    conv, bn, fc = model.features[37], model.features[38], model.classifier[3]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.01)  # Kaiming, fan_out, relu
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert not conv.bias.any() and not fc.bias.any() and not bn.bias.any() and bool((bn.weight == 1).all())


def test_registry_names_and_errors() -> None:
    assert set(MODEL_NAMES) == {f"vgg{d}{s}" for d in (11, 13, 16, 19) for s in ("", "_bn")} | {
        f"resnet{d}" for d in (18, 34, 50)}
    with pytest.raises(SymtoolsError, match="vgg11, vgg11_bn"):
        build_model("resnet101")
    for size in (0, 48, 65, -32, 64.0):
        with pytest.raises(SymtoolsError, match="multiple of 32"):
            build_model("vgg11", input_size=size)
    with pytest.raises(SymtoolsError, match="classes"):
        build_model("vgg11", classes=0)


def test_small_builders() -> None:
    net = mlp(3, [4, 5], 2, activation="quadratic", norm="layer", bias=False)
    assert [n for n, _ in net.named_children()] == ["fc0", "norm0", "act0", "fc1", "norm1", "act1", "out"]
    assert isinstance(net.act0, Square) and net.fc0.bias is None
    x = torch.randn(4, 3)
    assert torch.allclose(net.act0(x), x**2)
    conv = cnn(3, [4, 6], 5, 8, norm="batch")
    assert conv(torch.randn(2, 3, 8, 8)).shape == (2, 5) and conv.out.in_features == 6 * 2 * 2
    assert cnn(1, [2], 3, 5, pool=False)(torch.randn(2, 1, 5, 5)).shape == (2, 3)
    with pytest.raises(SymtoolsError, match="activation"):
        mlp(3, [4], 2, activation="gelu")
    with pytest.raises(SymtoolsError, match="norm"):
        cnn(3, [4], 2, 8, norm="layer")
    with pytest.raises(SymtoolsError, match="halved"):
        cnn(3, [4, 4], 2, 6)


# ----------------------------------------------------------------------------------------------------------
# the command line


def test_cli_json(capsys) -> None:
    assert main(["symmetries", "--model", "vgg11_bn", "--input", "32", "--classes", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"parameters", "families", "layers", "groups", "blocked"} <= set(out)
    assert out["parameters"] == sum(p.numel() for p in build_model("vgg11_bn", 32, 10).parameters())
    assert out["groups"] == sum(out["families"].values()) == sum(r["groups"] for r in out["layers"])
    assert set(out["families"]) == {"scale", "rescale", "translation"} and out["blocked"] == []
    assert all({"layer", "family", "groups", "params"} <= set(r) for r in out["layers"])


def test_cli_table(capsys) -> None:
    assert main(["symmetries", "--model", "vgg11", "--input", "32", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "features.0 → features.3" in out and "translation" in out and "total" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg17"], "unknown model 'vgg17'"),
    (["--model", "vgg11", "--input", "50"], "multiple of 32"),
    (["--model", "vgg11", "--input", "32", "--classes", "0"], "classes"),
    (["--model", "vgg11", "--input", "32", "--loss", "hinge"], "unknown loss"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, message) -> None:
    assert main(["symmetries", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("symtools symmetries:")


def test_cli_usage_errors_exit_2(capsys) -> None:
    for argv in (["symmetries"], ["symmetries", "--model", "vgg11", "--input", "abc"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_command_page_exists() -> None:
    assert (DOC.parent / "commands" / "symmetries.md").is_file()


# ----------------------------------------------------------------------------------------------------------
# docs/symmetry-counts.md holds what the graph gives


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _int(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_counts_doc_matches_the_graph() -> None:
    text = DOC.read_text(encoding="utf-8")
    reports = {name: report(name, input_size=64, classes=200) for name in ("vgg16", "vgg16_bn")}
    totals = _table(text, "| model | family | groups (graph) | Table 5 | difference |")
    assert {row[0] for row in totals} == set(reports)
    for model, family, ours, paper, diff in totals:
        assert _int(ours) == reports[model]["families"].get(family, 0), (model, family)
        assert _int(diff) == _int(ours) - _int(paper)
    layers = _table(text, "| model | layer | family | groups | tensors |")
    expected = [[name, r["layer"], r["family"], r["groups"], re.findall(r"`([^`]+)`", ", ".join(
        f"`{p}`" for p in r["params"]))] for name in reports for r in reports[name]["layers"]]
    found = [[m, layer, fam, _int(n), re.findall(r"`([^`]+)`", tensors)] for m, layer, fam, n, tensors in layers]
    assert found == expected
    assert "FAILED" not in text and text.count("✔") >= 20
