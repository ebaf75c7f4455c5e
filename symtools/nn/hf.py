"""Hugging Face causal language models as models of symtools (needs the ``hf`` extra: ``pip install 'symtools[hf]'``).

:class:`CausalLM` wraps a ``transformers`` causal LM so that it looks like the image models to every part of
symtools: ``forward(input_ids)`` returns the logits as ``(N, V, T)`` — the class (vocabulary) axis second — so the
standard loss ``F.cross_entropy(outputs, targets)`` with ``targets`` of shape ``(N, T)`` (the next tokens) is the
language-model loss, and the checker, the training loop and the monitor use it unchanged.

Building one, never downloading anything:

* :func:`from_config_dir` — a folder holding a ``config.json`` (or a bundled name, :func:`bundled_config_dir`)
  → a randomly initialised model, seeded without touching the global torch RNG;
* :func:`from_checkpoint_dir` — ``config.json`` plus ``model.safetensors``, or a sharded
  ``model.safetensors.index.json`` with its shards (or, failing those, ``pytorch_model.bin`` read with
  ``torch.load(weights_only=True)``: nothing is ever unpickled), through the one safe loader
  :func:`symtools.checkpoints.load_checkpoint_file`; missing, unexpected and mis-shaped keys are one error;
* :func:`from_config` — a ``transformers`` config object; ``empty=True`` (or the :func:`empty_weights` context)
  puts every parameter on the ``meta`` device and keeps buffers real, so a Llama-7B-sized config costs no memory.

Attention is always built with ``attn_implementation="sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``):
one op in the graph, so the symmetry walk finds the heads at it, and computed in the model's dtype (HF's eager
attention takes its softmax in float32 even in a float64 model). The identity checks take Hessian-vector products
(a double backward), which the fused SDPA kernels do not have: the checker runs attention through SDPA's math
kernel (:class:`symtools.numeric.second_order.SecondOrder`).

Precision: the loss is computed by symtools from the logits in the model's dtype (HF's own ``labels=`` loss casts
the logits to float32 first), so a float64 model has a float64 loss. HF's RMSNorm (Llama, Qwen2) computes the
normalisation in float32 whatever the model's dtype and casts back, so a float64 model is float64 everywhere except
inside its RMSNorms (see ``docs/architectures/transformers.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symtools.errors import SymtoolsError

__all__ = [
    "ATTENTION",
    "BUNDLED",
    "EXAMPLE_INPUT_SHAPE",
    "INSTALL",
    "CausalLM",
    "bundled_config_dir",
    "empty_weights",
    "from_checkpoint_dir",
    "from_config",
    "from_config_dir",
    "load_config",
    "resolve_config_dir",
    "symmetries_or_blocked",
    "weight_files",
]

#: the bundled tiny configs (``symtools/data/hf_configs/<name>/config.json``): vocabulary 256 (bytes), 2 layers
BUNDLED: tuple[str, ...] = ("gpt2", "llama", "llama-bias", "llama-tied", "qwen2")
INSTALL = "pip install 'symtools[hf]'"
#: the attention implementation of every model built here (double backward for the Hessian-vector products)
ATTENTION = "sdpa"
#: the shape of the example input the CLI traces a causal LM on: one sequence of 8 tokens
EXAMPLE_INPUT_SHAPE = (1, 8)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SymtoolsError(f"Hugging Face models need the transformers package, which is not installed: "
                            f"{INSTALL}") from None
    return transformers


class CausalLM(nn.Module):
    """A ``transformers`` causal LM (attribute ``model``) whose ``forward(input_ids)`` returns ``(N, V, T)`` logits.

    Parameter names read ``model.<HF name>``, e.g. ``model.model.layers.0.self_attn.q_proj.weight``.
    The HF model is called with ``use_cache=False`` and only its ``.logits`` are used: the loss is
    ``F.cross_entropy(outputs, targets)`` with ``targets`` the next tokens, shape ``(N, T)``, computed in the
    model's dtype (a float64 model has a float64 loss; HF's own loss would cast the logits to float32). HF's
    RMSNorm still normalises in float32 inside a float64 model (module docstring).

    Floating ``input_ids`` (a tool that casts every input to the weights' dtype) are rounded back to token ids:
    exact for ids below 2²⁴ in float32 and 2⁵³ in float64, so only for half-precision models is it lossy
    (above 2048 in float16, 256 in bfloat16) — give such models int64 ids. On the ``meta`` device an all-ones
    attention mask (the same causal attention) is passed, because HF's check for packed sequences reads a value.

    ``notes``: what loading said (keys remapped, tied weights, ignored keys); ``source``: the folder or None.
    """

    def __init__(self, model: nn.Module, *, notes: list[str] | None = None, source: str | None = None):
        super().__init__()
        self.model = model
        self.notes: list[str] = list(notes or [])
        self.source = source

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.is_floating_point():
            input_ids = input_ids.round().long()
        kwargs: dict[str, Any] = {}
        if input_ids.device.type == "meta":
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, use_cache=False, **kwargs)
        return out.logits.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- configs

def bundled_config_dir(name: str) -> Path:
    """The folder of the bundled config ``name`` (one of :data:`BUNDLED`)."""
    if name not in BUNDLED:
        raise SymtoolsError(f"unknown bundled Hugging Face config {name!r}; bundled: {', '.join(BUNDLED)}")
    ref = resources.files("symtools.data").joinpath("hf_configs", name, "config.json")
    path = Path(str(ref))
    if not path.is_file():
        raise SymtoolsError(f"the bundled config symtools/data/hf_configs/{name}/config.json is missing: reinstall "
                            f"symtools (its package data includes symtools/data/**)")
    return path.parent


def resolve_config_dir(path_or_name: str | os.PathLike) -> Path:
    """A folder with a ``config.json``: ``path_or_name`` itself if it exists, else the bundled config of that name."""
    p = Path(os.path.expanduser(os.fspath(path_or_name)))
    if p.exists():
        if not p.is_dir():
            raise SymtoolsError(f"{p} is a file: give the folder that holds config.json")
        if not (p / "config.json").is_file():
            raise SymtoolsError(f"{p} has no config.json (a Hugging Face model folder holds one)")
        return p
    if os.fspath(path_or_name) in BUNDLED:
        return bundled_config_dir(os.fspath(path_or_name))
    raise SymtoolsError(f"no such folder: {p} (give a folder with a config.json, or a bundled config: "
                        f"{', '.join(BUNDLED)})")


def load_config(path: str | os.PathLike):
    """``transformers.AutoConfig`` of the folder ``path`` (read locally; nothing is downloaded)."""
    transformers = _transformers()
    folder = resolve_config_dir(path)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SymtoolsError(f"{folder / 'config.json'} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise SymtoolsError(f"{folder / 'config.json'} has no 'model_type': not a Hugging Face model config")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise SymtoolsError(f"{folder / 'config.json'}: transformers cannot read it ({first})") from None


def _causal_lm_class(config):
    transformers = _transformers()
    mapping = transformers.AutoModelForCausalLM._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        raise SymtoolsError(f"a {type(config).__name__} (model_type {config.model_type!r}) is not a causal language "
                            f"model: transformers has no AutoModelForCausalLM for it") from None


# ---------------------------------------------------------------------------------------------- building

@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """While active, every new parameter is put on the ``meta`` device (no memory); buffers stay real.

    Works like ``accelerate.init_empty_weights(include_buffers=False)``, by patching
    :meth:`torch.nn.Module.register_parameter` (which ``module.weight = nn.Parameter(...)`` goes through). Each
    parameter is created where its module creates it and moved to ``meta`` at once, so the peak memory is the
    largest single parameter. Buffers computed at construction (a rotary embedding's ``inv_freq``) keep their
    values. Not thread-safe: the patch is global while the context is active.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            attrs = dict(p.__dict__)
            if type(p) is nn.Parameter:
                moved = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            else:  # a Parameter subclass: rebuilt as accelerate does
                moved = type(p)(p.to("meta"), **{**attrs, "requires_grad": p.requires_grad})
            moved.__dict__.update(attrs)
            module._parameters[name] = moved

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def from_config(config, dtype: torch.dtype | None = torch.float32, empty: bool = False, seed: int = 0) -> CausalLM:
    """A :class:`CausalLM` of the ``transformers`` config ``config``, SDPA attention (module docstring).

    ``empty``: parameters on ``meta`` (:func:`empty_weights`), for architecture-only work on large configs;
    otherwise a random initialisation drawn from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
    (the global RNG is left as it was). ``dtype`` None keeps transformers' default (float32).
    """
    transformers = _transformers()
    if not isinstance(config, transformers.PretrainedConfig):
        raise SymtoolsError(f"expected a transformers config, got {type(config).__name__}")
    _causal_lm_class(config)  # a clear error for a config that is not a causal LM
    config._attn_implementation = ATTENTION
    build = lambda: transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    try:
        if empty:
            with empty_weights():
                model = build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build()
    except (ValueError, TypeError, KeyError) as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise SymtoolsError(f"transformers cannot build a causal LM from this {type(config).__name__}: {first}") from None
    if dtype is not None:
        model = model.to(dtype)
    return CausalLM(model)


def from_config_dir(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, seed: int = 0,
                    empty: bool = False) -> CausalLM:
    """A randomly initialised :class:`CausalLM` from the ``config.json`` in ``path`` (or a bundled name)."""
    folder = resolve_config_dir(path)
    model = from_config(load_config(folder), dtype=dtype, empty=empty, seed=seed)
    model.source = str(folder)
    return model


# ---------------------------------------------------------------------------------------------- checkpoints

def weight_files(folder: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a HF checkpoint folder, in the order they are read, and the index's weight map.

    ``model.safetensors``; else ``model.safetensors.index.json`` and its shards; else ``pytorch_model.bin`` (read
    with ``weights_only=True``); else ``pytorch_model.bin.index.json`` and its shards.
    """
    d = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / single).is_file():
            return [d / single], None
        if (d / index).is_file():
            try:
                spec = json.loads((d / index).read_text())
                weight_map = dict(spec["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SymtoolsError(f"{d / index} is not a valid index (a JSON object with a 'weight_map'): "
                                    f"{exc}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise SymtoolsError(f"{d / index} names shards that are not in {d}: {', '.join(missing[:6])}"
                                    + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""))
            if not shards:
                raise SymtoolsError(f"{d / index} lists no weights")
            return [d / s for s in shards], weight_map
    raise SymtoolsError(f"{d} holds no weights: expected model.safetensors, model.safetensors.index.json with its "
                        f"shards, or pytorch_model.bin")


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], list[str]]:
    from symtools.checkpoints import load_checkpoint_file

    files, weight_map = weight_files(folder)
    state: dict[str, Tensor] = {}
    notes: list[str] = []
    for f in files:
        ckpt = load_checkpoint_file(f)  # safetensors, or torch.load(weights_only=True); CRC, nan/inf checked
        notes += [f"{f.name}: {n}" for n in ckpt.notes]
        twice = sorted(set(state) & set(ckpt.state_dict))
        if twice:
            raise SymtoolsError(f"{f} repeats tensors of an earlier shard: {', '.join(twice[:6])}")
        state.update(ckpt.state_dict)
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in state)
        if absent:
            raise SymtoolsError(f"the index of {folder} lists tensors that its shards do not hold "
                                f"({len(absent)}): {', '.join(absent[:6])}")
    return state, notes


def _tied_keys(hf_model: nn.Module) -> set[str]:
    """Names of the parameters tied to the input embedding (e.g. ``lm_head.weight``) when the config ties them."""
    if not getattr(hf_model.config, "tie_word_embeddings", False):
        return set()
    emb = hf_model.get_input_embeddings()
    own = next((f"{n}.weight" if n else "weight" for n, m in hf_model.named_modules() if m is emb), None)
    shared = {n for n, p in hf_model.named_parameters(remove_duplicate=False) if p is emb.weight}
    declared = getattr(hf_model, "_tied_weights_keys", None) or {}
    declared = set(declared) if isinstance(declared, (dict, list, tuple, set)) else set()
    return (shared | declared) - {own}


def _listing(what: str, keys: list[str]) -> str:
    return f"{what} ({len(keys)}): {', '.join(keys[:6])}" + (" …" if len(keys) > 6 else "")


def from_checkpoint_dir(path: str | os.PathLike, dtype: torch.dtype | None = None) -> CausalLM:
    """A :class:`CausalLM` holding the weights of the HF checkpoint folder ``path`` (module docstring).

    The model is built on ``meta`` (no initialisation, no memory) and the file's tensors are assigned to it.
    ``dtype`` None keeps the file's dtype. A key of the file that the model lacks, a parameter the file lacks
    (except a tied ``lm_head.weight`` when ``config.tie_word_embeddings``), or a shape mismatch is one
    :class:`SymtoolsError` listing them; keys the model class declares ignorable (``_keys_to_ignore_on_load_
    unexpected``, e.g. GPT-2's ``attn.bias``) and old rotary ``inv_freq`` buffers are dropped, with a note.
    Keys saved without the base model's prefix (``transformer.`` of GPT-2) are accepted with a note.
    """
    folder = Path(os.path.expanduser(os.fspath(path)))
    if not folder.exists():
        raise SymtoolsError(f"no such checkpoint folder: {folder}")
    if not folder.is_dir():
        raise SymtoolsError(f"{folder} is a file: a Hugging Face checkpoint is a folder with config.json and "
                            f"model.safetensors")
    if not (folder / "config.json").is_file():
        raise SymtoolsError(f"{folder} has no config.json (a Hugging Face checkpoint folder holds config.json and "
                            f"model.safetensors)")
    config = load_config(folder)
    files_state, notes = _read_weights(folder)
    wrapper = from_config(config, dtype=None, empty=True)
    hf = wrapper.model
    expected = hf.state_dict()
    state = dict(files_state)

    prefix = getattr(hf, "base_model_prefix", "")
    if prefix and not any(k.startswith(prefix + ".") for k in state):
        fits = {k: f"{prefix}.{k}" for k in state if f"{prefix}.{k}" in expected}
        if fits:
            state = {fits.get(k, k): v for k, v in state.items()}
            notes.append(f"keys saved without the base model prefix {prefix!r}: prefixed")

    ignore = [re.compile(p) for p in (getattr(hf, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
    unexpected = sorted(k for k in state if k not in expected)
    dropped = [k for k in unexpected if any(p.search(k) for p in ignore)]
    unexpected = [k for k in unexpected if k not in dropped]
    for k in dropped:
        state.pop(k)
    if dropped:
        notes.append(_listing("ignored keys the model class declares unused", dropped))

    params = dict(hf.named_parameters(remove_duplicate=False))
    tied = _tied_keys(hf)
    missing_params = sorted(k for k in params if k not in state and k not in tied)
    missing_buffers = sorted(k for k in expected if k not in params and k not in state)
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(state)
             if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if unexpected or missing_params or wrong:
        parts = ([_listing("missing parameters", missing_params)] if missing_params else []) \
            + ([_listing("unexpected keys", unexpected)] if unexpected else []) \
            + ([_listing("shape mismatches", wrong)] if wrong else [])
        raise SymtoolsError(f"the weights in {folder} do not fit its config.json ({type(hf).__name__}): "
                            + "; ".join(parts))
    if missing_buffers:
        notes.append(_listing("buffers not in the file, kept as built", missing_buffers))
    for k in sorted(tied):
        if k in state:
            state.pop(k)
            notes.append(f"{k} is tied to the input embedding (config.tie_word_embeddings): the file's copy is not used")
        else:
            notes.append(f"{k} is tied to the input embedding (config.tie_word_embeddings): not in the file, as expected")
    hf.load_state_dict(state, strict=False, assign=True)
    if tied:
        hf.tie_weights()
    still = [n for n, p in hf.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if still:
        raise SymtoolsError(f"the weights in {folder} leave parameters unset: " + _listing("parameters", still))
    for p in hf.parameters():
        p.requires_grad_(True)
    if dtype is None:
        dtype = next((t.dtype for t in files_state.values() if t.is_floating_point()), torch.float32)
    hf.to(dtype)
    hf.eval()
    out = CausalLM(hf, notes=notes, source=str(folder))
    return out


# ---------------------------------------------------------------------------------------------- symmetries

def symmetries_or_blocked(model: nn.Module, example_input: Tensor, loss: str = "cross_entropy"):
    """:func:`symtools.nn.graph.find_symmetries` of ``model``; for a :class:`CausalLM` whose graph the walk cannot
    take (a :class:`SymtoolsError` of the walk, e.g. a graph torch.fx cannot trace), a map with no groups and one
    :class:`~symtools.nn.groups.Blocked` entry saying why, so that the commands report it the way they report any
    place the walk stopped. Other models, and any other exception, raise as usual.
    """
    from symtools.nn.graph import find_symmetries
    from symtools.nn.groups import Blocked, SymmetryMap

    try:
        return find_symmetries(model, example_input, loss=loss)
    except SymtoolsError as exc:
        if not isinstance(model, CausalLM):
            raise
        return SymmetryMap(blocked=[Blocked(type(model.model).__name__,
                                            f"the graph walk cannot take this model: {exc}")])
