"""A model's forward pass as an ATen graph (``torch.export``), with the facts the symmetry walks read from it.

``torch.export`` sees through modules: a residual add, a head-splitting view, an RMSNorm written as
``pow → mean → add ε → rsqrt → mul`` and a rotary embedding are plain ATen ops in one flat graph, whatever
Python code produced them (Hugging Face models included). Parameters are placeholders named by
:attr:`ExportedGraph.param_of`; every value carries its shape (``node.meta["val"]``, a fake tensor) and the
module it was computed in (``nn_module_stack``), which names the normalisation whose ε breaks a scale group.

The model is exported in training mode (BatchNorm with batch statistics: the identities are checked there) and
its ``training`` flags and buffers are restored afterwards; export runs on fake tensors, so a model on the
``meta`` device (a Llama-7B-sized config with no weights) exports too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from symtools.errors import SymtoolsError


def op_name(node: fx.Node) -> str:
    """``"linear"`` for ``aten.linear.default``, ``"getitem"`` for ``operator.getitem``; ``""`` otherwise."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "_opname", getattr(node.target, "__name__", str(node.target)))


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


@dataclass
class ExportedGraph:
    """The exported graph and what the walks need to know about it."""

    graph: fx.Graph
    param_of: dict[fx.Node, str]          # placeholder → parameter name (``model.named_parameters()``)
    placeholder_of: dict[str, fx.Node]    # parameter name → placeholder
    outputs: list[fx.Node]                # the user outputs (the logits), in order
    model: nn.Module
    buffer_of: dict[fx.Node, str] = None  # type: ignore[assignment]  # placeholder → buffer name
    constants: dict[fx.Node, torch.Tensor] = None  # type: ignore[assignment]  # lifted tensor constants
    example: torch.Tensor | None = None   # the input the graph was traced with

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    def module_of(self, node: fx.Node) -> tuple[str, str]:
        """(qualified name, class name) of the innermost module ``node`` was computed in (``("", "")`` at the
        top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        fqn, cls = list(stack.values())[-1]
        return str(fqn), str(cls).rsplit(".", 1)[-1]

    def uses(self, name: str) -> list[fx.Node]:
        """The ops that read parameter ``name``."""
        node = self.placeholder_of.get(name)
        return [] if node is None else list(node.users)


def export(model: nn.Module, example_input: torch.Tensor) -> ExportedGraph:
    """Export ``model(example_input)`` in training mode (see the module docstring); a clear error if it fails."""
    modes = {m: m.training for m in model.modules()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers() if b.device.type != "meta"}
    model.train()
    if example_input.shape and example_input.shape[0] == 1:  # BatchNorm in training needs 2 values per channel
        example_input = torch.cat([example_input, example_input])  # (a ResNet's last maps are 1×1 at 32×32)
    try:
        ep = torch.export.export(model, (example_input,), strict=False)
    except Exception as exc:  # export raises many kinds of errors on untraceable code
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SymtoolsError(f"torch.export cannot trace {type(model).__name__} on an input of shape "
                            f"{tuple(example_input.shape)}: {first}; bind its symmetries by hand with "
                            f"symtools.nn.graph.bind()") from exc
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    sig = ep.graph_signature
    by_arg = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    param_of = {by_arg[arg]: name for arg, name in sig.inputs_to_parameters.items()}
    user_outputs = set(sig.user_outputs)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = [a for a in _flatten(out_node.args[0]) if isinstance(a, fx.Node) and a.name in user_outputs]
    buffer_of = {by_arg[arg]: name for arg, name in sig.inputs_to_buffers.items()}
    lifted = getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {}
    constants = {by_arg[arg]: ep.constants[name] for arg, name in lifted.items() if name in ep.constants}
    return ExportedGraph(ep.graph, param_of, {v: k for k, v in param_of.items()}, outs, model, buffer_of, constants,
                         example_input)


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x]


def forward_states(g: ExportedGraph, params: dict, live: set[fx.Node], states: dict, rule) -> None:
    """Fill ``states`` (node → abstract state) in graph order: parameters from ``params`` (name → state), every
    live op that something with a state reaches from ``rule(node)`` (a None result: no state)."""
    for node in g.graph.nodes:
        if node.op == "placeholder":
            name = g.param_of.get(node)
            if name in params:
                states[node] = params[name]
            continue
        if node.op != "call_function" or node not in live:
            continue
        if not any(a in states for a in node.all_input_nodes):
            continue  # nothing transformed reaches this op
        state = rule(node)
        if state is not None:
            states[node] = state
