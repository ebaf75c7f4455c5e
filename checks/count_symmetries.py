"""Count the symmetry groups of VGG-16 and VGG-16-BN from their graphs and compare with the paper's Table 5.

Kunin et al. (ICLR 2021), app. J, Table 5 lists for VGG-16 on Tiny ImageNet (64×64 inputs, 200 classes)
scale 0 / 4,227 (without / with BN), rescale 8,323 and translation 201. This script
1. counts the groups that :func:`symtools.nn.graph.find_symmetries` binds in both models (per family, per layer);
2. evaluates the paper's own arithmetic (the expressions printed in its appendix);
3. verifies each explanation of a difference by computation: graph counts under changed input size or class
   count, and the loss before/after explicit parameter changes (float64, BN with batch statistics);
4. writes everything to ``docs/symmetry-counts.md`` (``--out`` to change). It exits 1 if a claim fails.

Loss evaluations: generic float64 weights (He-normal weights, random biases, BN γ ∈ [0.5, 1.5] and random β),
BN eps set to 1e-30 (eps breaks the scale symmetry explicitly and would otherwise show up at ~1e-5), a batch of
2 random images with random labels, cross-entropy, BN in train mode, dropout active with the same mask in
every evaluation (reseeded). "unchanged" means a relative change below 1e-12 (float64 round-off through
16 layers is ~1e-15), "changed" above 1e-8.

Run: ``python checks/count_symmetries.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import ast
import copy
import operator
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from symtools.cli.symmetries import report  # noqa: E402
from symtools.nn.models import build_model  # noqa: E402
from symtools.nn.vgg import vgg  # noqa: E402

INPUT, CLASSES = 64, 200
MODELS = ("vgg16", "vgg16_bn")
FAMILIES = ("scale", "rescale", "translation")
UNCHANGED, CHANGED = 1e-12, 1e-8

# Table 5 and the arithmetic of app. J, verbatim except "·" (the paper's multiplication dot).
PAPER = {
    "vgg16": {"parameters": 18_067_464, "scale": 0, "rescale": 8_323, "translation": 201},
    "vgg16_bn": {"parameters": 18_075_912, "scale": 4_227, "rescale": 8_323, "translation": 201},
}
PAPER_ARITHMETIC = {
    "scale (with BN)": "2·64+2·128+3·256+3·512+3·512+3",
    "rescale": "(2·64+2·128+3·256+3·512+3·512+3)+(2048+1024+1024)",
    "translation": "200+1",
}


def evaluate(expression: str) -> int:
    """Value of an integer expression with + and · (or *), parsed, not eval'd."""
    ops = {ast.Add: operator.add, ast.Mult: operator.mul}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression {expression!r}")

    return walk(ast.parse(expression.replace("·", "*"), mode="eval"))


# ----------------------------------------------------------------------------------------------------------
# loss probes


class Probe:
    """A float64 copy of a model with generic weights, and the relative loss change of an in-place edit."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        self.model = copy.deepcopy(model).double()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps = 1e-30
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                    m.bias.normal_(0.0, 0.3, generator=g)
                elif isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.normal_(0.0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
                    m.bias.normal_(0.0, 0.3, generator=g)
        self.x = torch.randn(2, 3, INPUT, INPUT, generator=g, dtype=torch.float64)
        self.y = torch.randint(CLASSES, (2,), generator=g)
        self.params = dict(self.model.named_parameters())
        self.base = {True: self.loss(True), False: self.loss(False)}

    def loss(self, train: bool) -> float:
        self.model.train(train)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1234)  # the same dropout mask in every evaluation
            return F.cross_entropy(self.model(self.x), self.y).item()

    def change(self, edit: Callable[[dict[str, torch.Tensor]], None], train: bool = True) -> float:
        """|L(edited) − L| / |L|; the parameters and BN buffers are restored afterwards."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            edit(self.params)
        try:
            return abs(self.loss(train) - self.base[train]) / abs(self.base[train])
        finally:
            self.model.load_state_dict(saved)


def verdict(value: float, expect_unchanged: bool) -> tuple[str, bool]:
    ok = value < UNCHANGED if expect_unchanged else value > CHANGED
    return f"{value:.1e} ({'unchanged' if value < UNCHANGED else 'changed' if value > CHANGED else 'unclear'})", ok


# ----------------------------------------------------------------------------------------------------------
# the checks; each returns lines of markdown and records failures


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def claim(self, text: str, ok: bool) -> str:
        if not ok:
            self.failures.append(text)
        return f"- {text} {'✔' if ok else '**FAILED**'}"

    def relative(self, probe: Probe, what: str, edit, unchanged: bool, train: bool = True) -> str:
        shown, ok = verdict(probe.change(edit, train), unchanged)
        return self.claim(f"{what}: relative loss change {shown}.", ok)


def channel_scale(name: str, channel: int, a: float, axis: int = 0, shape=None):
    """Edit: multiply the slice ``channel`` along ``axis`` of parameter ``name`` (viewed as ``shape``) by ``a``."""

    def edit(params):
        view = params[name].view(shape) if shape else params[name]
        view.select(axis, channel).mul_(a)

    return edit


def chain(*edits):
    def edit(params):
        for e in edits:
            e(params)

    return edit


def counts(name: str, input_size: int = INPUT, classes: int = CLASSES) -> dict[str, int]:
    rep = report(name, input_size=input_size, classes=classes)
    return {f: rep["families"].get(f, 0) for f in FAMILIES}


def layer_count(name: str, layer: str, family: str, input_size: int = INPUT, classes: int = CLASSES) -> int:
    rep = report(name, input_size=input_size, classes=classes)
    return sum(r["groups"] for r in rep["layers"] if r["layer"] == layer and r["family"] == family)


def verify(reports: dict[str, dict], checks: Checks) -> list[str]:
    """The explanations of every difference, each followed by the computation that supports it."""
    out: list[str] = []
    plain, bn = Probe(build_model("vgg16")), Probe(build_model("vgg16_bn"))
    conv_channels = sum(m.out_channels for m in build_model("vgg16").features if isinstance(m, nn.Conv2d))
    c = 5  # an arbitrary channel / unit

    out += ["### 1. Parameters: both counts agree", ""]
    for name in MODELS:
        ours = reports[name]["parameters"]
        out.append(checks.claim(f"`{name}`: {ours:,} parameters (Table 5: {PAPER[name]['parameters']:,}).",
                                ours == PAPER[name]["parameters"]))
    wide = sum(p.numel() for p in vgg(16, input_size=INPUT, classes=CLASSES, hidden=2048).parameters())
    out.append(checks.claim(
        f"The appendix text says the fully connected layers have \"2048, 2048, and 200\" units; with hidden "
        f"width 2048 VGG-16 would have {wide:,} parameters, so Table 5's count is the 1024-wide classifier "
        f"(our default) and \"2048\" is the width of the first FC layer's *input* (512·2·2).",
        wide != PAPER["vgg16"]["parameters"]))
    out.append("")

    out += ["### 2. The paper's arithmetic", ""]
    for label, expression in PAPER_ARITHMETIC.items():
        out.append(f"- {label}: `{expression}` = {evaluate(expression):,}")
    out.append(checks.claim(
        f"Its per-channel part `2·64+2·128+3·256+3·512+3·512` = {evaluate('2·64+2·128+3·256+3·512+3·512'):,} is "
        f"the number of output channels of the 13 convolutions, {conv_channels:,}.",
        evaluate("2·64+2·128+3·256+3·512+3·512") == conv_channels))
    out.append("")

    out += ["### 3. The trailing \"+3\" (scale and rescale): the image's 3 input channels carry no group", "",
            "No parameter acts on an input channel except the first convolution's input columns, and nothing "
            "before them can compensate a change: there is no normalisation of the input and no layer before it.",
            ""]
    for name, probe in (("vgg16", plain), ("vgg16_bn", bn)):
        touched = [r for r in reports[name]["layers"] if "features.0.weight" in r["params"]
                   and r["family"] in ("rescale", "rescale2") and r["layer"].endswith("→ features.0")]
        out.append(checks.claim(f"`{name}`: no group has the input columns of `features.0.weight` as x_out "
                                f"({len(touched)} found).", not touched))
        out.append(checks.relative(probe, f"`{name}`: scaling input channel 0's columns of `features.0.weight` "
                                          f"by 1.5", channel_scale("features.0.weight", 0, 1.5, axis=1), False))
    out.append(checks.relative(
        bn, "`vgg16_bn`: scaling a whole fully connected layer (`classifier.0` weight and bias, the other "
            "reading of \"3\": three FC layers) by 1.5, no normalisation after it",
        chain(lambda p: p["classifier.0.weight"].mul_(1.5), lambda p: p["classifier.0.bias"].mul_(1.5)), False))
    out.append("")

    out += ["### 4. The \"2048\" in rescale: the 2048 inputs of the first FC layer are 512 channels × 4 positions",
            "",
            "After the last max-pool each of the 512 channels of `features.28` (`features.41` with BN) is a 2×2 "
            "map, flattened into 4 adjacent columns of `classifier.0.weight`. A rescale acts on the whole channel "
            "(one convolution filter produces all 4 values), so those 4 columns form ONE group, already counted "
            "among the 3·512 channels. Per-position rescales do not exist.", ""]
    last = {"vgg16": "features.28", "vgg16_bn": "features.41"}
    for size in (32, 64, 96):
        n = layer_count("vgg16", "features.28 → classifier.0", "rescale", input_size=size)
        flat = 512 * (size // 32) ** 2
        out.append(checks.claim(f"input {size}×{size}: {flat:,} inputs of `classifier.0`, {n} rescale groups "
                                f"between `features.28` and `classifier.0`.", n == 512))
    for name, probe in (("vgg16", plain), ("vgg16_bn", bn)):
        src = last[name]
        shape = (1024, 512, 4)
        rows = [channel_scale(f"{src}.weight", c, 1.7), channel_scale(f"{src}.bias", c, 1.7)]
        whole = channel_scale("classifier.0.weight", c, 1 / 1.7, axis=1, shape=shape)

        def one_position(params, src=src):
            params["classifier.0.weight"].view(shape)[:, c, 0].div_(1.7)

        out.append(checks.relative(probe, f"`{name}`: channel {c} of `{src}` ×1.7, its 4 columns of "
                                          f"`classifier.0.weight` ÷1.7", chain(*rows, whole), True))
        out.append(checks.relative(probe, f"`{name}`: channel {c} of `{src}` ×1.7, only 1 of its 4 columns ÷1.7",
                                   chain(*rows, one_position), False))
    out.append("")

    out += ["### 5. The \"1024 + 1024\" in rescale: hidden units of the classifier (agree)", ""]
    for layer in ("classifier.0 → classifier.3", "classifier.3 → classifier.6"):
        out.append(checks.claim(f"`{layer}`: {layer_count('vgg16', layer, 'rescale')} groups.",
                                layer_count("vgg16", layer, "rescale") == 1024))
    out.append(checks.relative(plain, f"`vgg16`: unit {c} of `classifier.0` (row and bias) ×1.7, column {c} of "
                                      f"`classifier.3` ÷1.7",
                               chain(channel_scale("classifier.0.weight", c, 1.7),
                                     channel_scale("classifier.0.bias", c, 1.7),
                                     channel_scale("classifier.3.weight", c, 1 / 1.7, axis=1)), True))
    out.append("")

    out += ["### 6. Translation \"200 + 1\": the groups are the last layer's 1024 input columns and its bias", "",
            "Softmax ignores a shift common to all logits. Adding c to every entry of column j of "
            "`classifier.6.weight` adds c·h_j to every logit, so each of the 1024 columns (200 entries each) is "
            "a group, and so is the whole bias: 1024 + 1 groups, independent of the number of classes. Shifting "
            "one logit's parameters (a row: one \"input value to the softmax\") is not a symmetry.", ""]
    for classes in (10, CLASSES):
        n = layer_count("vgg16", "classifier.6 → softmax", "translation", classes=classes)
        out.append(checks.claim(f"{classes} classes: {n} translation groups at the softmax.", n == 1024 + 1))

    def column(params):
        params["classifier.6.weight"][:, c].add_(0.9)

    def row(params):
        params["classifier.6.weight"][c, :].add_(0.9)

    out.append(checks.relative(plain, f"`vgg16`: +0.9 on column {c} of `classifier.6.weight`", column, True))
    out.append(checks.relative(plain, "`vgg16`: +0.9 on all of `classifier.6.bias`",
                               lambda p: p["classifier.6.bias"].add_(0.9), True))
    out.append(checks.relative(plain, f"`vgg16`: +0.9 on row {c} of `classifier.6.weight` (one class)", row, False))
    out.append("")

    out += ["### 7. With BatchNorm: scale on the convolutions, rescale on γ/β, translation on the conv biases", "",
            f"Each of the {conv_channels:,} conv channels feeds its own BN channel, which (with batch statistics) "
            "removes both a positive scale of the channel (scale group: weight row + bias) and a shift of it "
            "(translation group: the bias). The ReLU units after BN are rescaled through BN's γ and β, not "
            "through the convolution, whose scale BN undoes.", ""]
    out.append(checks.relative(bn, f"`vgg16_bn`: channel {c} of `features.0` (row and bias) ×1.7 (scale)",
                               chain(channel_scale("features.0.weight", c, 1.7),
                                     channel_scale("features.0.bias", c, 1.7)), True))
    out.append(checks.relative(bn, f"`vgg16_bn`: γ_{c}, β_{c} of `features.1` ×1.7 and column {c} of "
                                   f"`features.3.weight` ÷1.7 (rescale)",
                               chain(channel_scale("features.1.weight", c, 1.7), channel_scale("features.1.bias", c, 1.7),
                                     channel_scale("features.3.weight", c, 1 / 1.7, axis=1)), True))

    def across_bn(params):  # rows of features.0 × a_k, columns of features.3 ÷ a_k, different a_k per channel
        a = torch.linspace(0.6, 1.8, 64, dtype=torch.float64)
        params["features.0.weight"].mul_(a[:, None, None, None])
        params["features.0.bias"].mul_(a)
        params["features.3.weight"].div_(a[None, :, None, None])

    out.append(checks.relative(bn, "`vgg16_bn`: the no-BN rescale of `features.0 → features.3` (conv rows × a_k, "
                                   "next columns ÷ a_k, a_k from 0.6 to 1.8) across BN", across_bn, False))
    out.append(checks.relative(bn, f"`vgg16_bn`: +0.9 on `features.0.bias[{c}]` (translation), train mode",
                               lambda p: p["features.0.bias"][c].add_(0.9), True))
    out.append(checks.relative(bn, f"`vgg16_bn`: the same shift with running statistics (eval mode)",
                               lambda p: p["features.0.bias"][c].add_(0.9), False, train=False))
    out.append(checks.relative(bn, f"`vgg16_bn`: unit {c} of `classifier.0` (row and bias) ×1.7 alone (no BN in "
                                   f"the classifier, so no scale group there)",
                               chain(channel_scale("classifier.0.weight", c, 1.7),
                                     channel_scale("classifier.0.bias", c, 1.7)), False))
    bn_counts = counts("vgg16_bn")
    out.append(checks.claim(
        f"`vgg16_bn` graph counts: scale {bn_counts['scale']:,} = conv channels {conv_channels:,}; translation "
        f"{bn_counts['translation']:,} = {conv_channels:,} conv biases + 1024 columns + 1 bias.",
        bn_counts["scale"] == conv_channels and bn_counts["translation"] == conv_channels + 1024 + 1))
    out.append("")
    return out


# ----------------------------------------------------------------------------------------------------------
# the document


def markdown(reports: dict[str, dict], explanations: list[str]) -> str:
    lines = [
        "# Symmetry counts of VGG-16 and VGG-16-BN",
        "",
        "Generated by `python checks/count_symmetries.py`; do not edit by hand. Models: `symtools.nn.vgg` "
        f"(Tiny-ImageNet variant: {INPUT}×{INPUT} inputs, {CLASSES} classes, classifier "
        "2048 → 1024 → 1024 → 200). Groups: `symtools.nn.graph.find_symmetries` (cross-entropy loss), counted "
        "as the number of independent one-parameter groups, one per unit (channel or feature) and site.",
        "",
        "## Totals",
        "",
        "| model | family | groups (graph) | Table 5 | difference |",
        "|---|---|---:|---:|---:|",
    ]
    for name in MODELS:
        fams = reports[name]["families"]
        for family in FAMILIES:
            ours, theirs = fams.get(family, 0), PAPER[name][family]
            lines.append(f"| {name} | {family} | {ours:,} | {theirs:,} | {ours - theirs:+,} |")
    conv = reports["vgg16_bn"]["families"]["scale"]  # one scale group per conv channel (checked in §7)
    hidden = [r["groups"] for r in reports["vgg16"]["layers"] if r["layer"].startswith("classifier.")
              and r["family"] == "rescale"]
    columns = max(r["groups"] for r in reports["vgg16"]["layers"] if r["layer"].endswith("→ softmax"))
    flat = 512 * (INPUT // 32) ** 2
    lines += ["", "Where the differences come from (each verified below):", "",
              f"- **scale** (BN model): {conv:,} conv channels, not {conv + 3:,}: the paper adds 3, the image's "
              f"input channels, which carry no group (§3).",
              f"- **rescale**: {reports['vgg16']['families']['rescale']:,} = {conv:,} conv channels + "
              f"{' + '.join(f'{h:,}' for h in hidden)} hidden FC units. The paper adds 3 (input channels, §3) and "
              f"{flat:,} (the inputs of the first FC layer, which are the 512 last conv channels × "
              f"{INPUT // 32}×{INPUT // 32} positions, each channel already counted once, §4).",
              f"- **translation**: the softmax groups are the last layer's {columns:,} input columns + 1 bias, not "
              f"{CLASSES} classes + 1 (§6); with BN every conv bias before a BN channel is a translation group too "
              f"(+{conv:,}, §7). With BN the rescale groups sit on BN's γ/β and the convolutions carry scale "
              f"groups instead (§7).",
              "", "## Verification", ""]
    lines += explanations
    lines += ["## Per layer", "",
              "One row per group set: its site (source → consumer), family, number of groups and tensors.", "",
              "| model | layer | family | groups | tensors |", "|---|---|---|---:|---|"]
    for name in MODELS:
        for r in reports[name]["layers"]:
            lines.append(f"| {name} | {r['layer']} | {r['family']} | {r['groups']:,} | "
                         f"{', '.join(f'`{p}`' for p in r['params'])} |")
    blocked = [f"{name}: {b['node']}: {b['reason']}" for name in MODELS for b in reports[name]["blocked"]]
    lines += ["", "Blocked sites (where the graph walk assumed no symmetry): " + ("; ".join(blocked) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "symmetry-counts.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    reports = {name: report(name, input_size=INPUT, classes=CLASSES) for name in MODELS}
    checks = Checks()
    text = markdown(reports, verify(reports, checks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    for name in MODELS:
        print(name, reports[name]["families"])
    if checks.failures:
        print("FAILED:\n" + "\n".join(checks.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
