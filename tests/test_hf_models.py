"""Hugging Face causal LMs as models of symtools (``symtools.nn.hf``), the ``stdlib-text`` data and the CLI options
``--hf-config`` / ``--hf`` of ``symmetries``, ``check``, ``train`` and ``audit CHECKPOINT_DIR``.

Models are the bundled tiny configs (vocabulary 256, hidden 32, 2 layers), built from a config, never downloaded.
The symmetry finder for transformers is someone else's work in progress: the CLI tests check that each command runs
and that its JSON has the documented keys, never group counts. Where identities are checked, the symmetry is bound
by hand (``swiglu_rescale``: each SwiGLU unit's up_proj row × a, down_proj column / a), so that the checker, the
training loop and the monitor are exercised on the (N, V, T) logits whatever the finder finds.

transformers is imported plainly: the README's test install (extra ``hf``) declares it, and a missing package must
fail, not skip (tests/test_cli_errors.py::test_no_test_skips_for_a_package).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from symtools.errors import SymtoolsError
from symtools.nn import hf
from symtools.nn.groups import (
    GroupSet,
    MatrixGroupSet,
    MatrixPiece,
    SymmetryMap,
    TensorSlice,
)
from symtools.testing.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


run = run_cli  # symtools.testing.cli: (exit code, stdout, stderr) of an in-process command


def tokens(n: int = 2, t: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from symtools.data.loader import make_loader

    return make_loader("stdlib-text", n, seed=seed, seq_len=t).batch(0)


def save_checkpoint(model: hf.CausalLM, folder, shards: int = 1, drop: tuple[str, ...] = ()) -> dict:
    """``model`` as a HF checkpoint folder: config.json and one safetensors file, or ``shards`` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    model.model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.model.state_dict().items() if k not in drop}
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return state
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in keys[i::shards]}, folder / name)
        weight_map.update({k: name for k in keys[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


# ------------------------------------------------------------------------------------------ models and configs

@pytest.mark.parametrize("name", hf.BUNDLED)
def test_bundled_config_builds_gives_nvt_logits_and_a_float64_loss(name):
    model = hf.from_config_dir(name, dtype=torch.float64)
    cfg = model.config
    assert cfg.vocab_size == 256 and model.vocab_size == 256
    assert getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 0)) >= 128
    assert cfg._attn_implementation == "sdpa"  # one op in the graph; the checker takes its math kernel
    x, y = tokens(2, 8)
    logits = model(x)
    assert logits.shape == (2, 256, 8) and logits.dtype == torch.float64  # class axis 1, as for images
    loss = F.cross_entropy(logits, y)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    # the same numbers as HF's own causal-LM loss (which shifts the labels itself and computes in float32)
    full = torch.cat([x, y[:, -1:]], dim=1)
    with torch.no_grad():
        theirs = model.model(input_ids=full, labels=full, use_cache=False).loss
    assert float(theirs) == pytest.approx(float(loss.detach()), rel=1e-6)  # float32 round-off of HF's cast


def test_bundled_configs_have_the_stated_properties():
    """GQA in llama/qwen2, the tie in llama-tied and gpt2 (a real property of GPT-2), biases where stated."""
    p = {name: dict(hf.from_config_dir(name, empty=True).named_parameters()) for name in hf.BUNDLED}
    llama = "model.model.layers.0.self_attn."
    assert p["llama"][llama + "q_proj.weight"].shape == (32, 32)
    assert p["llama"][llama + "k_proj.weight"].shape == (16, 32)  # 2 kv heads of 8 for 4 query heads
    assert "model.lm_head.weight" in p["llama"] and not any(k.endswith("bias") for k in p["llama"])
    assert "model.lm_head.weight" not in p["llama-tied"]  # one tensor, named once (the input embedding)
    assert {llama + f"{n}_proj.bias" for n in "qkvo"} <= set(p["llama-bias"])
    assert "model.model.layers.0.mlp.down_proj.bias" in p["llama-bias"]
    assert {llama + f"{n}_proj.bias" for n in "qkv"} <= set(p["qwen2"]) and llama + "o_proj.bias" not in p["qwen2"]
    assert p["qwen2"][llama + "v_proj.weight"].shape == (16, 32)
    assert "model.lm_head.weight" not in p["gpt2"] and "model.transformer.wte.weight" in p["gpt2"]
    for name in ("llama-tied", "gpt2"):
        m = hf.from_config_dir(name).model
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_parameter_names_and_seeded_init():
    model = hf.from_config_dir("llama", seed=3)
    names = [n for n, _ in model.named_parameters()]
    assert "model.model.layers.0.self_attn.q_proj.weight" in names
    assert all(n.startswith("model.") for n in names)
    assert "model.transformer.h.0.attn.c_attn.weight" in dict(hf.from_config_dir("gpt2").named_parameters())
    before = torch.random.get_rng_state()
    again, other = hf.from_config_dir("llama", seed=3), hf.from_config_dir("llama", seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is not touched
    w = "model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_floating_input_ids_are_the_same_tokens():
    """A tool that casts inputs to the weights' dtype (the audit's loss) still reads the same token ids."""
    model = hf.from_config_dir("llama", dtype=torch.float64)
    x, _ = tokens(2, 8)
    assert torch.equal(model(x), model(x.to(torch.float64)))


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("shards", [1, 2])
def test_checkpoint_round_trip(tmp_path, shards):
    model = hf.from_config_dir("qwen2", seed=1)
    save_checkpoint(model, tmp_path / "ckpt", shards=shards)
    loaded = hf.from_checkpoint_dir(tmp_path / "ckpt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    x, _ = tokens(2, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    as64 = hf.from_checkpoint_dir(tmp_path / "ckpt", dtype=torch.float64)
    assert {p.dtype for p in as64.parameters()} == {torch.float64}


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_tied_model_loads_from_a_file_without_lm_head(tmp_path, name):
    model = hf.from_config_dir(name, seed=2)
    save_checkpoint(model, tmp_path / "ckpt", drop=("lm_head.weight",))
    loaded = hf.from_checkpoint_dir(tmp_path / "ckpt")
    inner = loaded.model
    assert inner.get_output_embeddings().weight is inner.get_input_embeddings().weight
    assert torch.equal(inner.get_output_embeddings().weight, model.model.get_input_embeddings().weight)
    assert any("tied" in n for n in loaded.notes)
    x, _ = tokens(1, 8)
    assert torch.equal(model.eval()(x), loaded(x))


def test_untied_model_without_lm_head_is_an_error_naming_it(tmp_path):
    model = hf.from_config_dir("llama")
    state = save_checkpoint(model, tmp_path / "ckpt", drop=("lm_head.weight",))
    with pytest.raises(SymtoolsError, match=r"missing parameters \(1\): lm_head\.weight"):
        hf.from_checkpoint_dir(tmp_path / "ckpt")
    bad = dict(state, **{"lm_head.weight": model.model.lm_head.weight.detach(), "extra.weight": torch.zeros(2),
                         "model.norm.weight": torch.zeros(3)})
    save_file(bad, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(SymtoolsError, match=r"unexpected keys \(1\): extra\.weight.*shape mismatches \(1\): "
                                            r"model\.norm\.weight: file \(3,\) vs model \(32,\)"):
        hf.from_checkpoint_dir(tmp_path / "ckpt")


def test_checkpoint_folder_errors(tmp_path):
    with pytest.raises(SymtoolsError, match="no such checkpoint folder"):
        hf.from_checkpoint_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SymtoolsError, match="has no config.json"):
        hf.from_checkpoint_dir(tmp_path / "empty")
    hf.load_config("llama").save_pretrained(tmp_path / "noweights")
    with pytest.raises(SymtoolsError, match="holds no weights"):
        hf.from_checkpoint_dir(tmp_path / "noweights")
    save_checkpoint(hf.from_config_dir("llama"), tmp_path / "sharded", shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SymtoolsError, match="names shards that are not in"):
        hf.from_checkpoint_dir(tmp_path / "sharded")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(SymtoolsError, match="not a causal language model"):
        hf.from_config_dir(tmp_path / "vit")
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(SymtoolsError, match="no 'model_type'"):
        hf.from_config_dir(tmp_path / "vit")
    with pytest.raises(SymtoolsError, match="no such folder.*bundled config: gpt2, llama"):
        hf.from_config_dir(tmp_path / "nowhere")


def test_pytorch_model_bin_is_read_without_unpickling_code(tmp_path):
    model = hf.from_config_dir("llama", seed=5)
    folder = tmp_path / "bin"
    folder.mkdir()
    model.model.config.save_pretrained(folder)
    torch.save(model.model.state_dict(), folder / "pytorch_model.bin")
    loaded = hf.from_checkpoint_dir(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({"model.norm.weight": nn.Linear(2, 2)}, folder / "pytorch_model.bin")  # a pickled module
    with pytest.raises(SymtoolsError, match="refusing to load"):
        hf.from_checkpoint_dir(folder)


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(SymtoolsError, match=r"pip install 'symtools\[hf\]'"):
        hf.from_config_dir("llama")


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers():
    real = hf.from_config_dir("llama")
    original = nn.Module.register_parameter
    with hf.empty_weights():
        empty = hf.from_config(hf.load_config("llama"))
        assert nn.Linear(2, 2).weight.device.type == "meta"
    assert nn.Module.register_parameter is original and nn.Linear(2, 2).weight.device.type == "cpu"
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    buffers = dict(empty.named_buffers())
    inv_freq = buffers["model.model.rotary_emb.inv_freq"]
    assert inv_freq.device.type == "cpu" and torch.equal(inv_freq, dict(real.named_buffers())[
        "model.model.rotary_emb.inv_freq"])
    # a meta model traces (torch.export runs on fake tensors; what the symmetry walk needs), meta input
    ep = torch.export.export(empty, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), strict=False)
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0][0]
    assert tuple(out.meta["val"].shape) == (1, 256, 8)


def test_a_llama_7b_sized_config_costs_no_memory():
    big = hf.from_config(transformers.LlamaConfig(), empty=True)  # hidden 4096, 32 layers, vocab 32000
    assert sum(p.numel() for p in big.parameters()) > 6_000_000_000
    assert {p.device.type for p in big.parameters()} == {"meta"}


# ------------------------------------------------------------------------------------------ text data

def test_stdlib_text_is_deterministic_and_shifted_by_one_byte():
    from symtools.data.loader import make_loader
    from symtools.data.text import (
        MODULES,
        TextDataset,
        corpus_info,
        load_stdlib_text,
        stdlib_bytes,
    )

    info = corpus_info()
    assert len(info["files"]) == len(MODULES) and info["bytes"] > 500_000
    ds = load_stdlib_text(seq_len=16, split="all")
    assert ds.classes == 256 and ds.input_shape == (16,) and len(ds) == (info["bytes"] - 17) // 16 + 1
    x, y = ds.batch(torch.tensor([0, 3]))
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    raw = stdlib_bytes()
    assert bytes(x[1].tolist()) == raw[48:64] and y[1, -1] == raw[64]
    s1, s2 = make_loader("stdlib-text", 4, seed=7, seq_len=12), make_loader("stdlib-text", 4, seed=7, seq_len=12)
    (a, b), (c, d) = s1.batch(5), s2.batch(5)
    assert torch.equal(a, c) and torch.equal(b, d) and a.shape == (4, 12) and s1.classes == 256
    assert not torch.equal(make_loader("stdlib-text", 4, seed=8, seq_len=12).batch(5)[0], a)
    assert s1.config["data"] == "stdlib-text" and s1.config["sha256"] == info["sha256"]
    train, test = load_stdlib_text(8, "train"), load_stdlib_text(8, "test")
    assert train.tokens.numel() + test.tokens.numel() == info["bytes"]
    with pytest.raises(SymtoolsError, match="fewer than one window"):
        TextDataset(b"abc", seq_len=8)


# ------------------------------------------------------------------------------------------ symmetry dimensions

def test_dimensions_count_the_lie_algebra_of_every_family():
    from symtools.cli.symmetries import dimensions

    shapes = {"q.weight": (32, 32), "k.weight": (16, 32), "q.bias": (32,), "u.weight": (6, 4), "v.weight": (4, 5)}
    elementwise = GroupSet("rescale", "u → v", 4, {"x_in": (TensorSlice("u.weight", 1),),
                                                    "x_out": (TensorSlice("v.weight", 0),)})
    # attention_qk per kv head: W_Q of the two query heads sharing it (d_head 8 columns, stacked with the bias
    # row), W_K of the head: h = 8, gl → 64 per group
    qk = MatrixGroupSet("attention_qk", "attn", tuple(
        {"W_Q": (MatrixPiece("q.weight", rows=(16 * g, 16 * g + 8), transpose=True),
                 MatrixPiece("q.bias", cols=(16 * g, 16 * g + 8)),
                 MatrixPiece("q.weight", rows=(16 * g + 8, 16 * g + 16), transpose=True)),
         "W_K": (MatrixPiece("k.weight", rows=(8 * g, 8 * g + 8), transpose=True),)} for g in range(2)),
        stack={"W_Q": "rows", "W_K": "rows"})
    rot = MatrixGroupSet("rotation_pair", "u → v", ({"U": (MatrixPiece("u.weight"),),
                                                     "V": (MatrixPiece("v.weight"),)},), stack={"U": "rows", "V": "rows"})
    sub = MatrixGroupSet("attention_qk", "attn'", qk.groups, qk.stack, algebra=torch.zeros(4, 8, 8))
    found = SymmetryMap([elementwise], matrix_sets=[qk, rot, sub])
    assert dimensions(found, shapes) == {"rescale": 4, "attention_qk": 2 * 64 + 2 * 4, "rotation_pair": 4 * 3 // 2}


# ------------------------------------------------------------------------------------------ checker, loop, monitor

def test_checker_on_nvt_logits_with_a_hand_bound_symmetry():
    """The identity checker takes the (N, V, T) logits and int64 inputs unchanged: the SwiGLU rescale passes in
    float64, and weight decay (which breaks it: λ(‖θ_in‖² − ‖θ_out‖²) per unit) fails it (negative control)."""
    from symtools.integrations.hf import swiglu_rescale
    from symtools.numeric.checker import check

    model = hf.from_config_dir("llama", dtype=torch.float64)
    x, y = tokens(2, 8)
    groups = swiglu_rescale(model)
    assert check(model, x, y, groups, seed=0).verdict == "pass"
    assert check(model, x, y, groups, seed=0, weight_decay=1e-2).verdict == "fail"


def test_training_loop_and_monitor_on_stdlib_text(tmp_path):
    """symtools.training.train with the monitor on a causal LM: the per-step law of the hand-bound SwiGLU rescale
    holds to float32 round-off (docs/monitor.md, "Precision": ~2⁻²⁴ relative per step)."""
    from symtools.data.loader import make_loader
    from symtools.integrations.hf import swiglu_rescale
    from symtools.numeric.monitor import Monitor
    from symtools.training import train

    model = hf.from_config_dir("llama", seed=0)
    monitor = Monitor(swiglu_rescale(model), stride=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    summary = train(model, opt, make_loader("stdlib-text", 4, seq_len=16), 3, out_dir=tmp_path / "run",
                    callbacks=[monitor], progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["max_rel_residual_discrete"] < 1e-5


# ------------------------------------------------------------------------------------------ command line

LAYER_KEYS = {"layer", "family", "groups", "params", "note"}


def test_cli_symmetries_hf_config_json_and_table():
    code, out, err = run(["symmetries", "--hf-config", "llama", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert {"parameters", "families", "dimensions", "groups", "layers", "blocked", "model", "input",
            "classes"} <= set(rep)
    assert rep["parameters"] == sum(p.numel() for p in hf.from_config_dir("llama").parameters())
    assert set(rep["dimensions"]) == set(rep["families"]) and rep["classes"] == 256
    assert all(set(layer) == LAYER_KEYS for layer in rep["layers"])
    assert rep["groups"] == sum(rep["families"].values())
    code, out, err = run(["symmetries", "--hf-config", "gpt2"])
    assert code == 0 and "GPT2LMHeadModel" in out, err


def test_cli_symmetries_dimensions_of_an_image_model_and_exclusive_options():
    code, out, _ = run(["symmetries", "--model", "vgg11", "--input", "32", "--classes", "10", "--json"])
    rep = json.loads(out)
    assert code == 0 and rep["dimensions"] == rep["families"]  # elementwise families: 1 per group
    code, _, err = run(["symmetries", "--model", "vgg11", "--hf-config", "llama"])
    assert code == 2 and "not allowed with" in err
    code, _, err = run(["symmetries"])
    assert code == 2 and "one of the arguments" in err


def test_cli_check_hf_config(tmp_path):
    code, out, err = run(["check", "--hf-config", "llama", "--batch", "2", "--seq-len", "8", "--json"])
    assert code in (0, 1, 3, 4), err
    rep = json.loads(out)
    assert {"verdict", "families", "tolerance", "settings", "model", "blocked"} <= set(rep)
    assert rep["settings"]["batch"] == 2 and rep["tolerance"]["dtype"] == "float64"
    assert "LlamaForCausalLM" in rep["model"]
    code, _, err = run(["check", "--hf-config", "llama", "--weights", str(tmp_path / "w.pt")])
    assert code == 2 and "--weights applies to the image models only" in err
    code, _, err = run(["check", "--hf-config", "llama", "--data", "digits"])
    assert code == 2 and "a causal LM reads text" in err


def test_cli_train_hf_config(tmp_path):
    out_dir = tmp_path / "run"
    code, _, err = run(["train", "--hf-config", "llama", "--steps", "3", "--seq-len", "16", "--batch", "4",
                        "--checkpoint-every", "0", "--out", str(out_dir), "--quiet"])
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["config"]["hf_config"] == "llama" and summary["config"]["seq_len"] == 16
    assert summary["config"]["data"] == "stdlib-text"
    assert (out_dir / "checkpoints" / "step_000003.pt").is_file()


def test_cli_audit_of_a_checkpoint_folder(tmp_path):
    from symtools.cli.audit import prepare
    from symtools.cli.main import build_parser

    model = hf.from_config_dir("llama-tied", seed=2)
    save_checkpoint(model, tmp_path / "ckpt", drop=("lm_head.weight",))
    args = build_parser("audit").parse_args(["audit", str(tmp_path / "ckpt"), "--batch", "2", "--seq-len", "8"])
    kwargs = prepare(args)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), kwargs["model"].state_dict().values()))
    x, y = kwargs["inputs"], kwargs["targets"]
    assert x.dtype == torch.long and x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert kwargs["checkpoint"].kind == "state_dict" and kwargs["info"]["classes"] == 256
    code, out, err = run(["audit", str(tmp_path / "ckpt"), "--batch", "2", "--seq-len", "8", "--json", "-"])
    if code == 2:  # only while the finder finds no group in a causal LM: "nothing to audit"
        assert "no symmetry groups" in err
    else:
        assert code in (0, 1), err
        rep = json.loads(out)
        assert {"format", "model", "layers", "families", "identities", "pass"} <= set(rep)
        assert rep["model"]["name"] == "LlamaForCausalLM" and rep["checkpoint"]["path"] == str(tmp_path / "ckpt")
    code, _, err = run(["audit", str(tmp_path / "ckpt"), "--model", "vgg11"])
    assert code == 2 and "names an image model" in err
