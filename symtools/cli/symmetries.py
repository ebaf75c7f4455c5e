"""``symtools symmetries``: the symmetry groups of a named model's loss, found by walking its graph.

The model is built with fresh weights (the groups depend on the architecture only) and traced once on a
zero image of the requested size; see :func:`symtools.nn.graph.find_symmetries` for the rules.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "list the translation, scale and rescale groups of a model's loss, found from its graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name, e.g. vgg16 or vgg16_bn (vgg11 … vgg19_bn)")
    parser.add_argument("--input", type=int, default=64, metavar="SIZE",
                        help="side of the square RGB input, a multiple of 32 (default 64, Tiny ImageNet)")
    parser.add_argument("--classes", type=int, default=200, help="number of classes (default 200)")
    parser.add_argument("--loss", default="cross_entropy", help="cross_entropy (default) or mse")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def report(model_name: str, input_size: int = 64, classes: int = 200, loss: str = "cross_entropy") -> dict[str, Any]:
    """The symmetry summary of ``model_name``: parameter count, groups per family, per layer, blocked ops."""
    import torch

    from symtools.nn.graph import find_symmetries
    from symtools.nn.models import build_model

    model = build_model(model_name, input_size=input_size, classes=classes)
    found = find_symmetries(model, torch.zeros(1, 3, input_size, input_size), loss=loss)
    return {
        "model": model_name,
        "input": input_size,
        "classes": classes,
        "loss": loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "families": found.families(),
        "groups": sum(gs.count for gs in found.group_sets),
        "layers": [{"layer": gs.layer, "family": gs.family, "groups": gs.count, "params": _params_in_slot_order(gs),
                    "note": gs.note} for gs in found.group_sets],
        "blocked": [{"node": b.node, "reason": b.reason} for b in found.blocked],
    }


def _params_in_slot_order(gs) -> list[str]:
    return list(dict.fromkeys(t.param for tensors in gs.slots.values() for t in tensors))


def format_table(rep: dict[str, Any]) -> str:
    """``rep`` as a readable table: one line per group set, then totals per family."""
    rows = [("family", "groups", "layer", "parameters")]
    rows += [(r["family"], str(r["groups"]), r["layer"], ", ".join(r["params"])) for r in rep["layers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{rep['model']} (input {rep['input']}×{rep['input']}, {rep['classes']} classes, loss {rep['loss']}): "
             f"{rep['parameters']:,} parameters", ""]
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    lines.append("")
    lines += [f"{family:<{widths[0]}}  {count:>{widths[1]}}  total" for family, count in rep["families"].items()]
    lines.append(f"{'all':<{widths[0]}}  {rep['groups']:>{widths[1]}}  total")
    for b in rep["blocked"]:
        lines.append(f"blocked at {b['node']}: {b['reason']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rep = report(args.model, input_size=args.input, classes=args.classes, loss=args.loss)
    print(json.dumps(rep, indent=2, ensure_ascii=False) if args.json else format_table(rep))
    return 0
