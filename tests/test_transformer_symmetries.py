"""Transformers' symmetries found from the graph: attention heads, rotary embeddings, key biases, random configs.

Every group found passes the float64 check; each control that breaks one (a rotary embedding on the keys, a
full GL claimed where only the rotary commutant holds) fails exactly it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from symtools.nn.graph import find_symmetries
from symtools.nn.groups import MatrixGroupSet, SymmetryMap
from symtools.nn.hf import BUNDLED, CausalLM, bundled_config_dir, from_config_dir
from symtools.nn.rotary_commutant import commutant
from symtools.numeric.checker import check


class Attention(nn.Module):
    """One self-attention layer (separate q/k/v/o with biases, optional rotate-half RoPE) and a classifier."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 5, rope: bool = False, positions: int = 6):
        super().__init__()
        self.h, self.dh, self.rope = heads, d // heads, rope
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)
        freq = 1.0 / (10.0 ** (torch.arange(0, self.dh, 2, dtype=torch.float64) / self.dh))
        angle = torch.arange(positions, dtype=torch.float64)[:, None] * freq[None, :]
        self.register_buffer("cos", torch.cat([angle.cos(), angle.cos()], -1))
        self.register_buffer("sin", torch.cat([angle.sin(), angle.sin()], -1))

    def rotate(self, t):
        if not self.rope:
            return t
        half = self.dh // 2
        return t * self.cos + torch.cat([-t[..., half:], t[..., :half]], -1) * self.sin

    def forward(self, x):
        n, t, d = x.shape
        split = lambda z: z.view(n, t, self.h, self.dh).transpose(1, 2)
        q, k, v = self.rotate(split(self.q(x))), self.rotate(split(self.k(x))), split(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(self.o(a.transpose(1, 2).reshape(n, t, d))).transpose(1, 2)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 6, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (3, 6), generator=g)


def verdicts(model, found, x, y) -> dict[str, str]:
    return {name: fam.verdict for name, fam in check(model, x, y, found, dtype=torch.float64).families.items()}


def test_key_bias_is_a_translation_only_without_a_rotary_embedding() -> None:
    torch.manual_seed(0)
    plain = Attention().double()
    rope = Attention(rope=True).double()
    rope.load_state_dict(plain.state_dict())
    probe = torch.zeros(1, 6, 8, dtype=torch.float64)
    found_plain, found_rope = find_symmetries(plain, probe), find_symmetries(rope, probe)
    key_bias = [gs for gs in found_plain.of_family("translation") if gs.params() == ["k.bias"]]
    assert len(key_bias) == 1 and key_bias[0].count == 8  # every entry: q·(k + s) shifts all scores of a query
    assert not [gs for gs in found_rope.of_family("translation") if "k.bias" in gs.params()]
    x, y = data()
    assert verdicts(plain, SymmetryMap(key_bias), x, y) == {"translation": "pass"}
    assert verdicts(rope, SymmetryMap(key_bias), x, y) == {"translation": "fail"}  # the rotated bias breaks it


def test_rotary_embedding_restricts_the_qk_group_to_its_commutant() -> None:
    torch.manual_seed(1)
    plain, rope = Attention().double(), Attention(rope=True).double()
    rope.load_state_dict(plain.state_dict())
    probe = torch.zeros(1, 6, 8, dtype=torch.float64)
    qk_plain = next(ms for ms in find_symmetries(plain, probe).matrix_sets if ms.family == "attention_qk")
    qk_rope = next(ms for ms in find_symmetries(rope, probe).matrix_sets if ms.family == "attention_qk")
    assert qk_plain.algebra is None and qk_rope.algebra.shape == (4, 4, 4)  # dh = 4: 2 pairs × (a·I + b·J)
    for basis in qk_rope.algebra:  # each element commutes with the rotations the model applies
        for t in range(6):
            c, s = rope.cos[t], rope.sin[t]
            rot = torch.diag(c) + torch.diag(s[:2], 2) - torch.diag(s[2:], -2)  # rows: what e_i becomes
            assert torch.allclose(basis @ rot, rot @ basis, atol=1e-12)
    x, y = data(1)
    assert set(verdicts(rope, SymmetryMap(matrix_sets=[qk_rope]), x, y).values()) == {"pass"}
    claimed = MatrixGroupSet("attention_qk", qk_rope.layer, qk_rope.groups, qk_rope.stack, None)  # all of gl
    assert verdicts(rope, SymmetryMap(matrix_sets=[claimed]), x, y) == {"attention_qk": "fail"}
    assert set(verdicts(plain, SymmetryMap(matrix_sets=[qk_plain]), x, y).values()) == {"pass"}


def test_commutant_of_rotations_with_equal_frequencies_is_larger() -> None:
    def rot(theta: float) -> torch.Tensor:
        return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                            dtype=torch.float64)
    distinct = torch.stack([torch.block_diag(rot(0.3 * t), rot(0.7 * t)) for t in range(4)])
    equal = torch.stack([torch.block_diag(rot(0.3 * t), rot(0.3 * t)) for t in range(4)])
    assert commutant(distinct).shape[0] == 4  # a·I + b·J on each plane
    assert commutant(equal).shape[0] == 8  # GL(2, ℂ) acting on the two equal planes: 2·2² real dimensions
    assert commutant(torch.eye(3, dtype=torch.float64)[None]).shape[0] == 9


def test_every_bundled_config_passes_the_float64_check() -> None:
    for name in BUNDLED:
        model = from_config_dir(bundled_config_dir(name)).double()
        found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
        assert found.matrix_sets and found.group_sets
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (2, 10), generator=g), torch.randint(0, 256, (2, 10), generator=g)
        assert check(model, x, y, found, dtype=torch.float64).verdict == "pass", name


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(1, 2), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       dh=st.sampled_from([2, 4]), ff=st.integers(3, 9), bias=st.booleans(), tied=st.booleans(),
       norm=st.sampled_from(["llama", "gpt2"]))
def test_random_transformer_configs_pass(layers, kv, group, dh, ff, bias, tied, norm) -> None:
    heads = kv * group
    d = heads * dh
    torch.manual_seed(layers * 100 + heads * 10 + dh)
    if norm == "llama":
        cfg = transformers.LlamaConfig(vocab_size=20, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv, attention_bias=bias,
                                       mlp_bias=bias, tie_word_embeddings=tied, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=20, n_embd=d, n_layer=layers, n_head=heads, n_positions=32,
                                      n_inner=ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    lm = CausalLM(model).double()
    found = find_symmetries(lm, torch.zeros(1, 6, dtype=torch.long))
    qk = [ms for ms in found.matrix_sets if ms.family == "attention_qk"]
    assert len(qk) == layers and all(ms.count == (kv if norm == "llama" else heads) for ms in qk)
    if norm == "llama":
        assert all(ms.algebra is not None and ms.algebra.shape[0] == dh for ms in qk)  # rotary: derived
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (2, 6), generator=g), torch.randint(0, 20, (2, 6), generator=g)
    assert check(lm, x, y, found, dtype=torch.float64).verdict == "pass"


def test_trained_transformers_pass_in_float64_and_do_not_fail_in_float32(tmp_path) -> None:
    """Verdicts on trained weights, not only at initialisation: 40 SGD steps (momentum 0.9) on stdlib text move
    the weights well away from their init; every group still passes in float64, and float32 round-off (the
    other machine's arithmetic) is never called a broken symmetry."""
    from symtools.data.loader import make_loader
    from symtools.training import train

    for name in ("llama", "gpt2"):
        model = from_config_dir(bundled_config_dir(name))
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        summary = train(model, opt, make_loader("stdlib-text", 8, seq_len=32, seed=0), steps=40,
                        out_dir=tmp_path / name, progress=False)
        assert summary["final_loss"] < 5.0  # learnt something from log(256) = 5.55
        moved = max(float((p - start[k]).norm() / start[k].norm().clamp_min(1e-12))
                    for k, p in model.named_parameters() if start[k].norm() > 0)
        assert moved > 0.05
        found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
        x, y = next(iter(make_loader("stdlib-text", 4, seq_len=32, seed=1)))
        assert check(model, x, y, found, dtype=torch.float64).verdict == "pass", name
        assert check(model, x, y, found, dtype=torch.float32).verdict in ("pass", "inconclusive"), name


def test_attention_written_out_with_matmuls_gives_the_same_groups() -> None:
    """HF's eager attention (matmul, softmax, matmul) instead of one SDPA op: the same heads, the same rotary
    commutant, the same elementwise groups; and they pass."""
    from symtools.nn.hf import load_config

    for name in ("llama", "gpt2"):
        found = {}
        for impl in ("sdpa", "eager"):
            cfg = load_config(name)
            cfg._attn_implementation = impl
            torch.manual_seed(0)
            model = CausalLM(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)).double()
            found[impl] = (model, find_symmetries(model, torch.zeros(1, 8, dtype=torch.long)))
        (_, a), (eager, b) = found["sdpa"], found["eager"]
        assert a.families() == b.families()
        assert [(m.family, m.layer, m.groups) for m in a.matrix_sets] == [(m.family, m.layer, m.groups)
                                                                          for m in b.matrix_sets]
        assert all((m.algebra is None and n.algebra is None) or torch.equal(m.algebra, n.algebra)
                   for m, n in zip(a.matrix_sets, b.matrix_sets))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (2, 10), generator=g), torch.randint(0, 256, (2, 10), generator=g)
        assert check(eager, x, y, b, dtype=torch.float64).verdict == "pass", name
