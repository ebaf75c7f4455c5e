"""The ATen-graph walk (symtools.nn.aten_walk): residual streams, transformers, and negative controls.

Every group found must pass the float64 check (gradient and Hessian identities); every control that breaks a
symmetry must remove exactly the groups it breaks from the walk, and those groups must FAIL the check on the
broken model. Counts are derived here from the configuration, not tabulated.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from symtools.nn.graph import find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.nn.models import build_model
from symtools.numeric.checker import check

VOCAB, D, FF, LAYERS, HEADS, KV = 48, 16, 24, 2, 4, 2


class LM(nn.Module):
    """A transformers causal LM with logits laid out (N, V, T) for the cross-entropy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits.transpose(1, 2)


def llama(tied: bool = False, bias: bool = True, act: str = "silu", seed: int = 0) -> LM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, tie_word_embeddings=tied,
                                   attention_bias=bias, hidden_act=act, max_position_embeddings=64)
    return LM(transformers.LlamaForCausalLM(cfg)).double()


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 6), generator=g), torch.randint(0, VOCAB, (2, 6), generator=g)


def keys(found: SymmetryMap) -> set[tuple[str, str, int]]:
    return {(gs.family, gs.layer, gs.count) for gs in found.group_sets}


def only(found: SymmetryMap, wanted: set[tuple[str, str, int]]) -> SymmetryMap:
    return SymmetryMap([gs for gs in found.group_sets if (gs.family, gs.layer, gs.count) in wanted])


def verdicts(model, found, x, y) -> dict[str, str]:
    return {name: fam.verdict for name, fam in check(model, x, y, found, dtype=torch.float64).families.items()}


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_aten_walk_finds_what_the_fx_walk_finds_on_vgg(name: str) -> None:
    model = build_model(name, input_size=32, classes=10)
    x = torch.zeros(1, 3, 32, 32)
    fx_groups = find_symmetries(model, x, walk="fx").group_sets
    aten_groups = find_symmetries(model, x, walk="aten").group_sets

    def as_set(sets):
        return {(gs.family, gs.count, tuple((s, tuple(ts)) for s, ts in gs.slots.items()), gs.epsilon_of,
                 gs.epsilon_factor) for gs in sets}
    assert as_set(aten_groups) == as_set(fx_groups) and len(aten_groups) == len(fx_groups)


def test_llama_groups_counts_and_float64_check() -> None:
    model = llama()
    found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
    # derived from the architecture: the residual stream is read only by RMSNorms (one scale group for all its
    # writers); each norm's γ against the projections reading it (D units per norm: 2 per layer + the final
    # one); SwiGLU: each up-projection unit against its down-projection column (the gate's SiLU blocks the
    # gate); softmax: the lm_head's input columns (no lm_head bias)
    assert found.families() == {"scale": 1, "rescale": LAYERS * 2 * D + LAYERS * FF + D, "translation": D}
    stream = found.of_family("scale")[0]
    assert len(stream.epsilon_of) == 2 * LAYERS + 1  # every norm reading the stream
    assert {p.split(".")[-2] for p in stream.params()} == {"embed_tokens", "o_proj", "down_proj"}
    vo = [ms for ms in found.matrix_sets if ms.family == "attention_vo"]
    assert len(vo) == LAYERS and all(ms.count == KV and len(ms.groups[0]["W_O"]) == HEADS // KV for ms in vo)
    qk = [ms for ms in found.matrix_sets if ms.family == "attention_qk"]  # rotary: the commutant, derived
    assert len(qk) == LAYERS and all(ms.count == KV and ms.algebra.shape == (D // HEADS,) * 3 for ms in qk)
    x, y = tokens()
    assert verdicts(model, found, x, y) == {"scale": "pass", "rescale": "pass", "translation": "pass",
                                            "attention_vo": "pass", "attention_qk": "pass"}


def test_tying_the_embeddings_removes_exactly_the_groups_it_breaks() -> None:
    untied, tied = llama(tied=False), llama(tied=False)
    tied.model.lm_head.weight = tied.model.model.embed_tokens.weight  # the same tensor at both places
    probe = torch.zeros(1, 8, dtype=torch.long)
    before, after = find_symmetries(untied, probe), find_symmetries(tied, probe)
    lost = keys(before) - keys(after)
    assert keys(after) <= keys(before)
    # the stream scale (the embedding writes the stream), the final norm ↔ lm_head rescale, the lm_head columns
    assert {(f, c) for f, _, c in lost} == {("scale", 1), ("rescale", D), ("translation", D)}
    # those groups hold on the untied model and fail on the tied one (same weights: the embedding copied)
    with torch.no_grad():
        untied.model.lm_head.weight.copy_(tied.model.lm_head.weight)
    x, y = tokens()
    broken = only(before, lost)
    assert set(verdicts(untied, broken, x, y).values()) == {"pass"}
    # the same function tied: lm_head.weight is no longer a tensor of its own, so the groups naming it cannot
    # be written on the tied model; the stream scale (on the embedding, the projections) can, and fails there
    tied_view = copy.deepcopy(untied)
    tied_view.model.lm_head.weight = tied_view.model.model.embed_tokens.weight
    stream = {g for g in lost if g[0] == "scale"}
    assert verdicts(tied_view, only(before, stream), x, y) == {"scale": "fail"}


def test_switching_swiglu_up_and_gate_fails_exactly_the_swiglu_groups() -> None:
    model = llama(bias=False)
    found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long))
    swiglu = {k for k in keys(found) if "mlp.up_proj →" in k[1] and k[0] == "rescale"}
    assert len(swiglu) == LAYERS
    switched = copy.deepcopy(model)
    def switched_forward(m):
        return lambda h: m.down_proj(m.act_fn(m.up_proj(h)) * m.gate_proj(h))  # SiLU on up, gate linear

    for layer in switched.model.model.layers:
        layer.mlp.forward = switched_forward(layer.mlp)
    x, y = tokens()
    assert verdicts(switched, only(found, swiglu), x, y) == {"rescale": "fail"}
    assert verdicts(switched, only(found, keys(found) - swiglu), x, y) == {"scale": "pass", "rescale": "pass",
                                                                          "translation": "pass"}
    refound = keys(find_symmetries(switched, torch.zeros(1, 8, dtype=torch.long)))
    assert not refound & swiglu and sum("mlp.gate_proj →" in k[1] for k in refound) == LAYERS


def test_gelu_gate_keeps_the_up_projection_rescale_and_a_gelu_mlp_has_none() -> None:
    # a GeGLU gate: the gate's GELU blocks the gate's units, the product is still linear in the up projection
    found = find_symmetries(llama(act="gelu"), torch.zeros(1, 8, dtype=torch.long))
    layers = [gs.layer for gs in found.of_family("rescale")]
    assert sum("mlp.up_proj →" in k for k in layers) == LAYERS and not any("mlp.gate_proj →" in k for k in layers)
    assert any("not positively homogeneous" in b.reason and "gate_proj" in b.reason for b in found.blocked)
    # a plain GELU MLP (GPT-2): no rescale between c_fc and c_proj
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    gpt2 = LM(transformers.GPT2LMHeadModel(cfg)).double()
    found = find_symmetries(gpt2, torch.zeros(1, 8, dtype=torch.long))
    assert not any("c_fc →" in gs.layer for gs in found.of_family("rescale"))
    assert sum("c_fc's units" in b.reason for b in found.blocked) == LAYERS


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity shortcut, twice, then pooling and a classifier (a tiny ResNet)."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.act = act
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(4))
        self.b = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.bn0(self.stem(x)))
        for i in (0, 2):
            y = self.act(self.b[i](self.c[i](h)))
            h = self.act(self.b[i + 1](self.c[i + 1](y)) + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_residual_stream_is_one_rescale_group_per_channel_and_passes() -> None:
    torch.manual_seed(0)
    model = _Block().double()
    found = find_symmetries(model, torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    stream = [gs for gs in found.of_family("rescale") if "bn0" in gs.layer]
    assert len(stream) == 1 and stream[0].count == 4
    assert {t.param for t in stream[0].slots["x_in"]} == {"bn0.weight", "bn0.bias", "b.1.weight", "b.1.bias",
                                                          "b.3.weight", "b.3.bias"}
    assert {t.param for t in stream[0].slots["x_out"]} == {"c.0.weight", "c.2.weight", "fc.weight"}
    # 5 convs feed BatchNorms (scale), 2 in-block BN → ReLU → conv (rescale), fc columns + bias (translation)
    assert found.families() == {"scale": 5 * 4, "rescale": 4 + 2 * 4, "translation": 4 + 1}
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    assert set(verdicts(model, found, x, y).values()) == {"pass"}
    gelu = _Block(act=F.gelu).double()
    gelu.load_state_dict(model.state_dict())
    assert not find_symmetries(gelu, torch.zeros(2, 3, 8, 8, dtype=torch.float64)).of_family("rescale")
    assert verdicts(gelu, SymmetryMap(found.of_family("rescale")), x, y) == {"rescale": "fail"}


@pytest.mark.parametrize("affine", [True, False])
def test_torch_rmsnorm_scale_group_and_its_epsilon_law(affine: bool) -> None:
    """torch's nn.RMSNorm (one aten.rms_norm op, ε None → the input dtype's machine epsilon): the layer feeding it is one
    scale group whose ε law the checker evaluates exactly; its γ (when affine) against the next layer's columns."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.norm, self.out = nn.Linear(5, 6), nn.RMSNorm(6, elementwise_affine=affine), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.relu(self.norm(self.fc0(x))))

    torch.manual_seed(0)
    model = Net().double()
    found = find_symmetries(model, torch.zeros(2, 5, dtype=torch.float64))
    assert found.families() == ({"scale": 1, "rescale": 6, "translation": 7} if affine else
                                {"scale": 1, "translation": 7})
    assert found.of_family("scale")[0].epsilon_of == "norm"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    assert check(model, x, y, found, dtype=torch.float64).verdict == "pass"
