"""symtools.integrations.hf with the real transformers + accelerate (the ``hf`` extra).

A tiny Llama built from a config (no download), trained by ``transformers.Trainer`` on the bytes of a standard-library
source file, float32, CPU, with gradient accumulation, ``max_grad_norm`` clipping, a linear schedule and the Trainer's
decay / no-decay param groups. Symmetries: the SwiGLU rescale (up_proj row × a, down_proj column / a), bound by hand
(``swiglu_rescale``) and checked with the identity checker first. Tolerance 1e-6 on the per-step law residual: float32
round-off is ~2⁻²⁴·Σ|terms| per step (docs/monitor.md, "Precision").

transformers and accelerate are imported plainly: the README's test install (extra ``hf``) declares them, and a
missing one must fail, not skip (tests/test_cli_errors.py::test_no_test_skips_for_a_package).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import accelerate  # noqa: F401
import numpy as np
import pytest
import torch
import transformers

from symtools.integrations.hf import attach, swiglu_rescale
from symtools.numeric.records import read_stream

LAW_TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
LR = 0.5  # SGD: large enough that the gradient's second-order term η²·G shows when clipping is ignored


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, attn_implementation="eager")  # double backward
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _data(n: int = 64):
    raw = np.frombuffer(Path(json.__file__).read_bytes(), dtype=np.uint8)[: n * SEQ].astype(np.int64)
    return [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in raw.reshape(n, SEQ)]


def _trainer(out: Path, model, *, steps: int, optimizer: str = "momentum", callbacks=(), **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=0.1, learning_rate=LR if optimizer == "momentum" else 1e-2, weight_decay=0.01,
        lr_scheduler_type="linear", logging_steps=4, save_steps=6, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, **kw)
    opts = (None, None)
    if optimizer == "momentum":  # the Trainer's own decay / no-decay split, with SGD + momentum
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
                  {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
        sched = transformers.get_linear_schedule_with_warmup(opt, 2, steps)
        opts = (opt, sched)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=opts,
                                callbacks=list(callbacks))


def _train(trainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kw)


def _worst(run: Path) -> np.ndarray:
    cols, a = read_stream(run / "records", "laws")
    return np.nanmax(a[1:, [i for i, c in enumerate(cols) if c.endswith("|residual_step")]], axis=1)


def test_swiglu_rescale_passes_the_identity_checker_and_a_gate_row_does_not():
    from symtools.nn.graph import bind
    from symtools.nn.groups import SymmetryMap
    from symtools.numeric.checker import check

    model = _model(torch.float64)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits.to(torch.float64)

    def lm_loss(logits, ids):  # next-token cross-entropy, in float64
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    wrapped = Logits(model)
    ids = torch.stack([d["input_ids"] for d in _data(4)])
    good = swiglu_rescale(wrapped)
    assert [gs.count for gs in good.group_sets] == [64, 64]
    report = check(wrapped, ids, ids, good, loss=lm_loss)
    assert report.families["rescale"].passed, report.families["rescale"].gradient
    # negative control: the gate row against the down column is no symmetry (SiLU is not homogeneous)
    bad = SymmetryMap([bind(wrapped, "rescale", "gate → down", {"x_in": [("m.model.layers.0.mlp.gate_proj.weight", 0)],
                                                               "x_out": [("m.model.layers.0.mlp.down_proj.weight", 1)]},
                            count=64)])
    assert not check(wrapped, ids, ids, bad, loss=lm_loss).families["rescale"].passed


def test_momentum_law_closes_under_the_trainer(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, steps=12)
    cb = attach(trainer, swiglu_rescale(model), stride=3)
    _train(trainer)
    run = tmp_path / "symtools"
    worst = _worst(run)
    assert len(worst) == 12 and worst.max() <= LAW_TOL, worst
    assert cb.summary["optimizer_law"] == "momentum"
    assert read_stream(run / "records", "optimizer_steps")[1][:, 1].tolist() == [1.0] * 12
    logged = [h for h in trainer.state.log_history if "symtools/law_residual" in h]
    assert [h["step"] for h in logged] == [4, 8, 12] and all(h["symtools/law_residual"] <= LAW_TOL for h in logged)
    assert (tmp_path / "checkpoint-6" / "symtools_monitor.pt").is_file()
    from symtools.plots import plot_run

    assert plot_run(run, tmp_path / "plots")[0]


def test_negative_control_law_of_another_weight_decay_misses(tmp_path, monkeypatch):
    """The monitor reading a weight decay the optimizer did not apply (the no-decay groups read as decayed)."""
    from symtools.numeric import optimizer_laws

    real = optimizer_laws.hyper_of_group

    def wrong(pg, name):
        h = real(pg, name)
        return {**h, "weight_decay": 0.5}

    monkeypatch.setattr("symtools.numeric.monitor_laws.optimizer_laws.hyper_of_group", wrong)
    model = _model()
    trainer = _trainer(tmp_path, model, steps=4)
    attach(trainer, swiglu_rescale(model))
    _train(trainer)
    assert _worst(tmp_path / "symtools")[1:].min() > 1e3 * LAW_TOL  # step 1 has lr = 0 (warm-up): nothing to miss


def test_negative_control_monitor_fed_the_unclipped_gradient_misses(tmp_path, monkeypatch):
    """The monitor measuring just before the Trainer clips (max_grad_norm 0.1) instead of in optimizer.step()."""
    from symtools.integrations.driver import MonitorDriver

    monkeypatch.setattr(MonitorDriver, "_pre_hook", lambda self, opt, args, kwargs: None)
    model = _model()
    trainer = _trainer(tmp_path, model, steps=6)
    cb = attach(trainer, swiglu_rescale(model))
    clip = trainer._clip_grad_norm

    def measure_then_clip(m):
        cb.driver._before()
        return clip(m)

    monkeypatch.setattr(trainer, "_clip_grad_norm", measure_then_clip)
    _train(trainer)
    worst = _worst(tmp_path / "symtools")
    # measured 7.8e-5 to 2.3e-3 (the rescale's η²·G is a difference of two squared norms): every step with lr > 0
    # misses by > 50× the tolerance the positive test holds, the worst by > 1000×; step 1 has lr = 0 (warm-up)
    assert (worst[1:] > 50 * LAW_TOL).all() and worst.max() > 1e3 * LAW_TOL, worst


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adamw_breaking_term_recorded(tmp_path, optim):
    model = _model()
    trainer = _trainer(tmp_path, model, steps=6, optimizer="adamw", optim=optim)
    cb = attach(trainer, swiglu_rescale(model))
    _train(trainer)
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == "AdamW" and bool(inner.defaults.get("fused")) == (optim == "adamw_torch_fused")
    assert [g["weight_decay"] for g in inner.param_groups] == [0.01, 0.0]   # the Trainer's no-decay group
    assert cb.summary["optimizer_law"] is None
    cols, a = read_stream(tmp_path / "symtools" / "records", "breaking")
    with_b = a[:, [i for i, c in enumerate(cols) if c.endswith("|residual_with_breaking")]]
    without = a[:, [i for i, c in enumerate(cols) if c.endswith("|residual_without_breaking")]]
    assert np.nanmax(with_b) <= 1e-12            # fed the measured U1, U2 the law is an identity (float64)
    assert np.nanmin(without) > 1e3 * LAW_TOL    # negative control: U1 = 0 misses by far


def test_resume_from_the_trainers_checkpoint_gives_the_same_records(tmp_path):
    model = _model()
    full = _trainer(tmp_path / "full", model, steps=12)
    attach(full, swiglu_rescale(model), stride=3)
    _train(full)

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                control.should_training_stop = True

    model = _model()
    part = _trainer(tmp_path / "part", model, steps=12, callbacks=[Stop()])
    attach(part, swiglu_rescale(model), stride=3)
    _train(part)
    model = _model()
    again = _trainer(tmp_path / "part", model, steps=12)
    attach(again, swiglu_rescale(model), stride=3)
    _train(again, resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    for stream in ("laws", "groups_rescale", "optimizer_steps"):
        ca, a = read_stream(tmp_path / "full" / "symtools" / "records", stream)
        cb_, b = read_stream(tmp_path / "part" / "symtools" / "records", stream)
        assert ca == cb_ and a.shape == b.shape, stream
        np.testing.assert_allclose(b, a, rtol=0, atol=0, err_msg=stream)


def test_without_symmetries_it_warns_instead_of_failing(tmp_path, monkeypatch):
    import symtools.nn.graph
    from symtools.nn.groups import SymmetryMap

    model = _model()  # the walk finds Llama's groups; a model with none is simulated by an empty map
    monkeypatch.setattr(symtools.nn.graph, "find_symmetries", lambda *a, **k: SymmetryMap())
    trainer = _trainer(tmp_path, model, steps=2)
    cb = attach(trainer)
    with pytest.warns(UserWarning, match="found no symmetry groups"):
        trainer.train()
    assert cb.summary["status"] == "completed"


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "integrations" / "hf.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/integrations/hf.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "runs" / "tiny-llama" / "symtools" / "records" / "laws.json").is_file()
