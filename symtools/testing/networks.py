"""Hypothesis strategies of small random networks, for property tests of symmetry identities.

Two strategies and one plain builder, usable from any test suite (``hypothesis`` is imported only when a
strategy is built):

- :func:`architectures` draws an :class:`Architecture`: an MLP or a CNN of depth 1–4 (hidden layers), widths
  2–6, activation ReLU / LeakyReLU / identity / quadratic (z ↦ z²), with or without biases, no norm,
  BatchNorm, or LayerNorm (MLP only), cross-entropy or MSE loss, a batch size and an input size.
- :func:`networks` draws an architecture and a seed, and builds a :class:`Network`: the float64 model (from
  :func:`symtools.nn.small.mlp` / :func:`symtools.nn.small.cnn`, layers named ``fc0``/``conv0``, ``norm0``,
  ``act0``, … ``out``), random inputs and targets, and the loss name. It unpacks as
  ``model, inputs, targets, loss``; ``network.architecture`` and ``network.seed`` say what was drawn.
- :func:`build_network` is the builder behind :func:`networks`: the same network for the same
  ``(architecture, seed)``, without hypothesis (to reproduce a failing example by hand).

All three are re-exported by :mod:`symtools.testing`; import them from there (in that package the name
``networks`` is the strategy, which shadows this module's name) or with ``from symtools.testing.networks
import …``.

Example (the property symtools' own ``tests/test_checker.py`` tests)::

    from hypothesis import given
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.checker import check
    from symtools.testing import networks

    @given(networks())
    def test_every_symmetry_holds(net):
        model, x, y, loss = net
        found = find_symmetries(model, x[:1], loss=loss)
        assert check(model, x, y, found, loss=loss).passed

Randomness: everything comes from a private ``torch.Generator`` seeded with ``seed`` (the global torch RNG
is left as it was, also by the modules' default initialisation, which runs under ``fork_rng``). Weights are
N(0, 1/fan_in), biases N(0, 0.5²), norm scales γ uniform in [0.5, 1.5] and shifts β N(0, 0.5²)
(non-trivial, so that no identity holds by accident of γ = 1, β = 0). Inputs are N(0, 1); cross-entropy
targets are uniform class indices, MSE targets N(0, 1) shaped like the outputs (``(batch, classes)``).
Then, in order, each Linear/Conv layer's weight and bias are divided by the RMS of its output on the drawn
batch (BatchNorm with batch statistics), so every layer, the logits included, is of order 1: without this,
three z² layers give logits ~10² and a saturated softmax, where the round-off of the Hessian identities is
larger than the permuted-batch floor the checker measures (seen: 5e-14 against a tolerance of 2.2e-14 at a
loss of 124; docs/checker.md). The rescaling is a positive factor per layer: the networks stay generic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from symtools.errors import SymtoolsError
from symtools.nn.small import cnn, mlp

__all__ = [
    "Architecture",
    "Network",
    "architectures",
    "build_network",
    "networks",
]

KINDS = ("mlp", "cnn")
ACTIVATIONS = ("relu", "leaky_relu", "identity", "quadratic")
NORMS = (None, "batch", "layer")  # "layer" only for MLPs
LOSS_NAMES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class Architecture:
    """What :func:`architectures` draws; :func:`build_network` turns it into a model and a batch.

    ``widths``: one entry per hidden layer (features of an MLP layer, channels of a CNN layer), so
    ``depth == len(widths)``. ``in_features``: input features (MLP) or input channels (CNN).
    ``input_size``: the side of the square CNN input (each hidden CNN layer ends with a 2×2 max-pool, so it
    is a multiple of ``2**depth``; unused for MLPs). ``classes``: outputs of the last Linear layer.
    """

    kind: str
    widths: tuple[int, ...]
    activation: str
    bias: bool
    norm: str | None
    loss: str
    in_features: int = 3
    classes: int = 3
    batch: int = 6
    input_size: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {KINDS}")
        if not self.widths or any(int(w) < 1 for w in self.widths):
            problems.append(f"widths {self.widths!r} must be a non-empty tuple of positive integers")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.norm not in NORMS or (self.kind == "cnn" and self.norm == "layer"):
            problems.append(f"norm {self.norm!r} is not one of {NORMS} (\"layer\" only for kind='mlp')")
        if self.loss not in LOSS_NAMES:
            problems.append(f"loss {self.loss!r} is not one of {LOSS_NAMES}")
        if self.batch < 2:
            problems.append(f"batch {self.batch} must be at least 2 (BatchNorm needs batch statistics)")
        if self.kind == "cnn" and self.input_size % (2 ** self.depth):
            problems.append(f"input_size {self.input_size} is not a multiple of 2**depth = {2 ** self.depth}")
        if problems:
            raise SymtoolsError("bad architecture: " + "; ".join(problems))

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one batch of inputs."""
        if self.kind == "mlp":
            return (self.batch, self.in_features)
        return (self.batch, self.in_features, self.input_size, self.input_size)

    def describe(self) -> str:
        norm = f", {self.norm} norm" if self.norm else ""
        return (f"{self.kind} {'×'.join(map(str, self.widths))} {self.activation}"
                f"{'' if self.bias else ', no bias'}{norm}, {self.loss}, batch {self.batch}")


@dataclass
class Network:
    """A built network and one batch; unpacks as ``model, inputs, targets, loss``.

    ``model`` is float64 and in training mode (as built); ``loss`` is ``"cross_entropy"`` (``targets``: class
    indices, shape ``(batch,)``) or ``"mse"`` (``targets``: float64, shape ``(batch, classes)``).
    """

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: str
    architecture: Architecture = field(repr=False)
    seed: int = 0

    def __iter__(self) -> Iterator:
        return iter((self.model, self.inputs, self.targets, self.loss))

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Network({self.architecture!r}, seed={self.seed})"


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter with seeded random values (see the module docstring for the laws)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = math.prod(module.weight.shape[1:])
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=torch.float64)
                                    / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen, dtype=torch.float64))
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen, dtype=torch.float64))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen, dtype=torch.float64))


def _unit_outputs(model: nn.Module, inputs: torch.Tensor) -> None:
    """Divide each Linear/Conv layer (in order) by the RMS of its output on ``inputs``."""
    from symtools.numeric.evaluation import evaluation_mode

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad(), evaluation_mode(model, "batch"):
        for layer in layers:
            seen: dict[str, torch.Tensor] = {}
            handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
            try:
                model(inputs)
            finally:
                handle.remove()
            rms = float(seen["out"].pow(2).mean().sqrt())
            if rms > 0 and math.isfinite(rms):
                layer.weight.div_(rms)
                if layer.bias is not None:
                    layer.bias.div_(rms)


def build_network(architecture: Architecture, seed: int = 0) -> Network:
    """The float64 model, a random batch and its targets for ``architecture``, all from ``seed``."""
    arch = architecture
    with torch.random.fork_rng(devices=[]):  # the modules' default init must not move the global RNG
        if arch.kind == "mlp":
            model = mlp(arch.in_features, arch.widths, arch.classes, activation=arch.activation, bias=arch.bias,
                        norm=arch.norm)
        else:
            model = cnn(arch.in_features, arch.widths, arch.classes, arch.input_size, activation=arch.activation,
                        bias=arch.bias, norm=arch.norm)
    model = model.to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    _randomize(model, gen)
    inputs = torch.randn(arch.input_shape, generator=gen, dtype=torch.float64)
    _unit_outputs(model, inputs)
    if arch.loss == "cross_entropy":
        targets = torch.randint(0, arch.classes, (arch.batch,), generator=gen)
    else:
        targets = torch.randn((arch.batch, arch.classes), generator=gen, dtype=torch.float64)
    return Network(model, inputs, targets, arch.loss, arch, int(seed))


def architectures(kinds=KINDS, depth=(1, 4), width=(2, 6), activations=ACTIVATIONS, norms=NORMS,
                  losses=LOSS_NAMES, bias=None, batch=(4, 8)):
    """Hypothesis strategy of :class:`Architecture`.

    Each argument restricts what is drawn: ``kinds`` ⊆ ("mlp", "cnn"); ``depth`` and ``width`` are inclusive
    (min, max) ranges of the number of hidden layers and of each layer's width; ``activations`` ⊆
    :data:`ACTIVATIONS`; ``norms`` ⊆ (None, "batch", "layer") ("layer" is only drawn for MLPs); ``losses`` ⊆
    ("cross_entropy", "mse"); ``bias`` True/False, or None to draw it; ``batch`` an inclusive range (≥ 2).
    The input has 2–4 features (MLP) or 1–2 channels of side ``2**depth`` or ``2·2**depth`` (CNN), and the
    output 2–4 classes. LayerNorm layers are at least 3 wide (when ``width`` allows): over 2 features it
    outputs ±1 up to ε, a degenerate network. Shrinking goes towards small MLPs with ReLU, no norm and
    cross-entropy.
    """
    from hypothesis import strategies as st

    kinds, activations, norms, losses = tuple(kinds), tuple(activations), tuple(norms), tuple(losses)
    for name, given, allowed in (("kinds", kinds, KINDS), ("activations", activations, ACTIVATIONS),
                                 ("norms", norms, NORMS), ("losses", losses, LOSS_NAMES)):
        if not given or not set(given) <= set(allowed):
            raise SymtoolsError(f"{name} must be a non-empty subset of {allowed}, got {given!r}")
    if not 1 <= depth[0] <= depth[1] or not 1 <= width[0] <= width[1] or not 2 <= batch[0] <= batch[1]:
        raise SymtoolsError(f"bad ranges depth={depth}, width={width}, batch={batch} (inclusive (min, max); "
                            f"depth, width ≥ 1, batch ≥ 2)")
    cnn_norms = tuple(n for n in norms if n != "layer")
    if not cnn_norms:  # LayerNorm only: the CNN builder has none
        if "mlp" not in kinds:
            raise SymtoolsError("norms=('layer',) needs kind 'mlp' (the CNN builder has no LayerNorm)")
        kinds = ("mlp",)

    @st.composite
    def draw_architecture(draw):
        kind = draw(st.sampled_from(kinds))
        allowed_norms = norms if kind == "mlp" else cnn_norms
        n_layers = draw(st.integers(*depth))
        norm = draw(st.sampled_from(allowed_norms))
        # a LayerNorm over 2 features outputs ±1 up to ε whatever its input (x − mean = ±d/2): a network that
        # ignores its input, where the identities' round-off is amplified ~1/ε (found by the property test:
        # Hessian residual 3e-14 against a 2e-14 tolerance). LayerNorm layers get ≥ 3 features.
        low = max(width[0], 3) if norm == "layer" and width[1] >= 3 else width[0]
        widths = tuple(draw(st.lists(st.integers(low, width[1]), min_size=n_layers, max_size=n_layers)))
        return Architecture(
            kind=kind,
            widths=widths,
            activation=draw(st.sampled_from(activations)),
            bias=draw(st.booleans()) if bias is None else bool(bias),
            norm=norm,
            loss=draw(st.sampled_from(losses)),
            in_features=draw(st.integers(2, 4)) if kind == "mlp" else draw(st.integers(1, 2)),
            classes=draw(st.integers(2, 4)),
            batch=draw(st.integers(*batch)),
            input_size=(2 ** n_layers) * draw(st.integers(1, 2)),
        )

    return draw_architecture()


def networks(architecture=None, seeds=None):
    """Hypothesis strategy of :class:`Network`: an architecture (default :func:`architectures` ``()``) built by
    :func:`build_network` with a drawn seed (default integers in [0, 2**16)). Pass your own strategies to
    restrict either, e.g. ``networks(architectures(kinds=("cnn",), norms=("batch",)))``."""
    from hypothesis import strategies as st

    arch = architectures() if architecture is None else architecture
    seed = st.integers(0, 2**16 - 1) if seeds is None else seeds
    return st.builds(build_network, arch, seed)
