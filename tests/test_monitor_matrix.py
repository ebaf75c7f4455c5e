"""The monitor's per-step laws of the matrix families (symtools.numeric.monitor_matrix).

With every measured term the law of a quadratic charge is an identity of the optimizer's step (float64
round-off on any model); with the gradient identity's terms set to 0 it is the symmetry's prediction: round-off
where the group is a symmetry, large where it is not (a full GL claimed through a rotary embedding).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from symtools.nn.graph import find_symmetries
from symtools.nn.groups import MatrixGroupSet, SymmetryMap
from symtools.nn.hf import bundled_config_dir, from_config_dir
from symtools.numeric.monitor import Monitor
from symtools.numeric.monitor_matrix import quadratic_terms
from symtools.numeric.monitor_plan import law_module
from symtools.training import train

sys.path.insert(0, str(Path(__file__).parent))
from test_transformer_symmetries import Attention

ROUND_OFF = 1e-12  # float64: the residuals are sums of a few hundred products, relative to their sizes


def batches(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(n, 6, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n, 6), generator=g)


def run(model, symmetries, optimizer, tmp_path, steps=5, data=None):
    monitor = Monitor(symmetries, stride=2)
    train(model, optimizer, data if data is not None else batches(), steps=steps, out_dir=tmp_path,
          callbacks=[monitor], progress=False)
    return monitor


@pytest.mark.parametrize("law", ["sgd", "momentum", "nesterov"])
def test_the_laws_read_as_laws_of_a_quadratic_charge(law: str) -> None:
    terms = quadratic_terms(law_module("rescale", law))
    assert terms is not None and terms["Q"] == (1.0, "theta", "theta")
    assert all(set(pair) <= {"theta", "g", "b"} for _, *pair in terms.values())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_attention_charges_follow_their_law_and_the_symmetry(momentum: float, tmp_path) -> None:
    torch.manual_seed(0)
    model = Attention().double()
    found = find_symmetries(model, torch.zeros(1, 6, 8, dtype=torch.float64))
    assert {ms.family for ms in found.matrix_sets} == {"attention_qk", "attention_vo"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3)
    summary = run(model, found, opt, tmp_path).on_end(None)["matrix_families"]
    for fam in ("attention_qk", "attention_vo"):
        assert summary[fam]["max_rel_residual_discrete"] < ROUND_OFF
        assert summary[fam]["max_rel_residual_symmetry"] < ROUND_OFF
    assert summary["attention_qk"]["components"] == 2 * 10  # 2 heads × symmetric 4×4 (10 components)


def test_a_group_claimed_through_a_rotary_embedding_fails_the_symmetry_law(tmp_path) -> None:
    torch.manual_seed(1)
    model = Attention(rope=True).double()
    found = find_symmetries(model, torch.zeros(1, 6, 8, dtype=torch.float64))
    qk = next(ms for ms in found.matrix_sets if ms.family == "attention_qk")
    claimed = MatrixGroupSet("attention_qk", qk.layer, qk.groups, qk.stack, None)  # all of gl: not a symmetry
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = run(model, SymmetryMap(matrix_sets=[claimed]), opt, tmp_path)
    summary = monitor.on_end(None)["matrix_families"]["attention_qk"]
    assert summary["max_rel_residual_discrete"] < ROUND_OFF  # the step itself is as declared
    assert summary["max_rel_residual_symmetry"] > 1e-6  # but the charge is not conserved
    right = run(from_scratch := Attention(rope=True).double(), SymmetryMap(matrix_sets=[qk]),
                torch.optim.SGD(from_scratch.parameters(), lr=0.05), tmp_path / "right")
    assert right.on_end(None)["matrix_families"]["attention_qk"]["max_rel_residual_symmetry"] < ROUND_OFF


def test_a_set_across_param_groups_is_not_followed(tmp_path) -> None:
    model = from_config_dir(bundled_config_dir("gpt2")).double()
    found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.01)
    from symtools.data.loader import make_loader

    with pytest.warns(UserWarning, match="param groups"):
        monitor = run(model, SymmetryMap(matrix_sets=found.matrix_sets), opt, tmp_path, steps=2,
                      data=make_loader("stdlib-text", 2, seq_len=8, seed=0))
    assert monitor.on_end(None)["matrix_families"] == {}


def test_layers_share_one_batched_pass_and_keep_their_own_columns(tmp_path) -> None:
    """The two layers of the bundled llama: one pass per family (not per layer), one residual column per layer."""
    from symtools.data.loader import make_loader
    from symtools.numeric.records import read_stream

    model = from_config_dir(bundled_config_dir("llama")).double()
    found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = run(model, found, opt, tmp_path, steps=3, data=make_loader("stdlib-text", 2, seq_len=8, seed=0))
    assert sorted((s.ms.family, len(s.members)) for s in monitor._matrix.sets) == [("attention_qk", 2),
                                                                                  ("attention_vo", 2)]
    cols, rows = read_stream(tmp_path / "records", "matrix_laws")
    assert len(cols) == 1 + 4 * 2 and rows.shape == (3, 9)
    assert float(rows[:, 1:].max()) < ROUND_OFF
