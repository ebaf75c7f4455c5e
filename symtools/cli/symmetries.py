"""``symtools symmetries``: the symmetry groups of a named model's loss, found by walking its graph.

The model is built with fresh weights (the groups depend on the architecture only) and traced once on a
zero image of the requested size; see :func:`symtools.nn.graph.find_symmetries` for the rules. A Hugging Face
causal LM (``--hf-config DIR|NAME``, ``--hf CHECKPOINT_DIR``; :mod:`symtools.nn.hf`) is traced on one sequence
of 8 zero tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

HELP = "list the symmetry groups of a model's loss (translation, scale, rescale, attention heads), found from its graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from symtools.cli.common import HF_CHECKPOINT_HELP, HF_CONFIG_HELP

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model name, e.g. vgg16 or vgg16_bn (vgg11 … vgg19_bn, resnet18/34/50)")
    which.add_argument("--hf-config", metavar="DIR", help=HF_CONFIG_HELP)
    which.add_argument("--hf", metavar="DIR", help=HF_CHECKPOINT_HELP)
    parser.add_argument("--input", type=int, default=64, metavar="SIZE",
                        help="side of the square RGB input, a multiple of 32 for VGG, ≥ 32 for ResNet "
                             "(default 64, Tiny ImageNet)")
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
    return {"model": model_name, "input": input_size, "classes": classes, "loss": loss, **summary(model, found)}


#: above this many parameters ``--hf-config`` builds the model on the meta device (no memory, no init)
ARCHITECTURE_ONLY_ABOVE = 100_000_000


def hf_report(flag: str, value: str, loss: str = "cross_entropy") -> dict[str, Any]:
    """The symmetry summary of a Hugging Face causal LM: ``--hf-config`` (``flag``) folder or bundled name, or
    ``--hf`` checkpoint folder. A config of more than :data:`ARCHITECTURE_ONLY_ABOVE` parameters is built with
    :func:`symtools.nn.hf.empty_weights` (parameters on meta, traced on a meta input); smaller ones with random
    weights (seed 0). The example input is one sequence of 8 zero tokens."""
    import torch

    from symtools.nn.hf import (
        EXAMPLE_INPUT_SHAPE,
        from_checkpoint_dir,
        from_config_dir,
        symmetries_or_blocked,
    )

    if flag == "--hf-config":
        model = from_config_dir(value, empty=True)
        weights = "meta"
        if sum(p.numel() for p in model.parameters()) <= ARCHITECTURE_ONLY_ABOVE:
            model, weights = from_config_dir(value, seed=0), "random"
    else:
        model, weights = from_checkpoint_dir(value, dtype=torch.float32), "checkpoint"
    device = next(model.parameters()).device
    example = torch.zeros(*EXAMPLE_INPUT_SHAPE, dtype=torch.long, device=device)
    found = symmetries_or_blocked(model, example, loss=loss)
    return {"model": f"{type(model.model).__name__} ({flag} {value})", "architecture": type(model.model).__name__,
            "config": model.source, "weights": weights, "input": list(EXAMPLE_INPUT_SHAPE),
            "classes": model.vocab_size, "loss": loss, **summary(model, found)}


def summary(model, found) -> dict[str, Any]:
    """The report's keys common to every model: parameters, families (groups per family), dimensions (Lie
    algebra dimension per family), groups, layers (elementwise group sets, then matrix group sets), blocked."""
    families = dict(found.families())
    for ms in found.matrix_sets:
        families[ms.family] = families.get(ms.family, 0) + ms.count
    layers = [{"layer": gs.layer, "family": gs.family, "groups": gs.count, "params": _params_in_slot_order(gs),
               "note": gs.note} for gs in found.group_sets]
    layers += [{"layer": ms.layer, "family": ms.family, "groups": ms.count, "params": _matrix_params(ms),
                "note": ms.note} for ms in found.matrix_sets]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "families": families,
        "dimensions": dimensions(found, {n: tuple(p.shape) for n, p in model.named_parameters()}),
        "groups": sum(families.values()),
        "layers": layers,
        "blocked": [{"node": b.node, "reason": b.reason} for b in found.blocked],
    }


def dimensions(found, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Family → dimension of its Lie algebra summed over its groups: 1 per group of an elementwise family; per
    group of a matrix family the dimension of the algebra its group runs through — ``algebra.shape[0]`` when the
    set gives a basis, else the family's whole algebra: h² for gl, h(h−1)/2 for so (rotation_pair), h the size
    of the group's matrices (read off the slot whose side is h in the family's declaration)."""
    out: dict[str, int] = {}
    for gs in found.group_sets:
        out[gs.family] = out.get(gs.family, 0) + gs.count
    for ms in found.matrix_sets:
        out[ms.family] = out.get(ms.family, 0) + ms.count * _algebra_dimension(ms, shapes)
    return out


def _algebra_dimension(ms, shapes) -> int:
    if ms.algebra is not None:
        return int(ms.algebra.shape[0])
    from symtools.symbolic.library import MATRIX

    action = MATRIX[ms.family][0] if ms.family in MATRIX else None
    h = _matrix_size(ms, shapes, action)
    return h * (h - 1) // 2 if action is not None and action.algebra == "so" else h * h


def _matrix_size(ms, shapes, action) -> int:
    """h of a matrix group set: the side of the first slot whose declared dims hold h (columns if both are)."""
    group = ms.groups[0]
    for slot, pieces in group.items():
        rows, cols = _slot_shape(pieces, ms.stack.get(slot, "rows"), shapes)
        if action is None:
            return cols
        dims = action.slot_dims.get(slot)
        if dims is not None and dims[1] == action.h:
            return cols
        if dims is not None and dims[0] == action.h:
            return rows
    raise ValueError(f"{ms.family} at {ms.layer}: no slot of the declaration has the group's size h")


def _slot_shape(pieces, stack: str, shapes) -> tuple[int, int]:
    sizes = []
    for piece in pieces:
        shape = shapes[piece.param]
        r, c = (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
        r = r if piece.rows is None else piece.rows[1] - piece.rows[0]
        c = c if piece.cols is None else piece.cols[1] - piece.cols[0]
        sizes.append((c, r) if piece.transpose else (r, c))
    if stack == "cols":
        return sizes[0][0], sum(c for _, c in sizes)
    return sum(r for r, _ in sizes), sizes[0][1]


def _matrix_params(ms) -> list[str]:
    return list(dict.fromkeys(p.param for g in ms.groups for pieces in g.values() for p in pieces))


def _params_in_slot_order(gs) -> list[str]:
    return list(dict.fromkeys(t.param for tensors in gs.slots.values() for t in tensors))


def format_table(rep: dict[str, Any]) -> str:
    """``rep`` as a readable table: one line per group set, then totals per family."""
    rows = [("family", "groups", "layer", "parameters")]
    rows += [(r["family"], str(r["groups"]), r["layer"], ", ".join(r["params"])) for r in rep["layers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    seen = (f"input {rep['input']}×{rep['input']}, {rep['classes']} classes" if isinstance(rep["input"], int) else
            f"tokens {'×'.join(map(str, rep['input']))}, vocabulary {rep['classes']}, {rep['weights']} weights")
    lines = [f"{rep['model']} ({seen}, loss {rep['loss']}): {rep['parameters']:,} parameters", ""]
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    lines.append("")
    dims = rep.get("dimensions", {})
    lines += [f"{family:<{widths[0]}}  {count:>{widths[1]}}  total"
              + (f" (Lie algebra dimension {dims[family]:,})" if dims.get(family, count) != count else "")
              for family, count in rep["families"].items()]
    lines.append(f"{'all':<{widths[0]}}  {rep['groups']:>{widths[1]}}  total")
    for b in rep["blocked"]:
        lines.append(f"blocked at {b['node']}: {b['reason']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.hf_config or args.hf:
        rep = hf_report("--hf-config" if args.hf_config else "--hf", args.hf_config or args.hf, loss=args.loss)
    else:
        rep = report(args.model, input_size=args.input, classes=args.classes, loss=args.loss)
    print(json.dumps(rep, indent=2, ensure_ascii=False) if args.json else format_table(rep))
    return 0
