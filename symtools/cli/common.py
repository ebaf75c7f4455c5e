"""Small helpers shared by the subcommands."""

from __future__ import annotations

from symtools.errors import SymtoolsError


def parse_device(name: str):
    """``--device`` as a ``torch.device``; a one-line error for an unknown name or a missing CUDA device."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SymtoolsError("--device cuda requested but no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SymtoolsError(f"unknown device {name!r}; use cpu or cuda") from None


def require(module: str, package: str, needed_for: str) -> None:
    """Fail before any work when ``module`` cannot be imported (a broken install: every one is a dependency)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise SymtoolsError(f"{needed_for} needs {package}, which is not installed: pip install {package}") from None


def check_out_dir(path: str, *, force: bool, option: str = "--out", also: str = "") -> bool:
    """Validate an output folder before anything is written; return whether it has to be created.

    A file, or a non-empty folder this invocation did not create, is refused unless ``force`` (the commands
    never delete what they did not create: reusing a folder is the user's explicit choice). ``also`` names
    another way out for the message (e.g. train's ``--resume``).
    """
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        return True
    if not p.is_dir():
        raise SymtoolsError(f"{option} {path} is a file, not a folder: give a new folder")
    try:
        used = any(p.iterdir())
    except OSError as exc:
        raise SymtoolsError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    if used and not force:
        raise SymtoolsError(f"{option} {path} is not empty and this command did not create it: give a new "
                            f"folder{also}, or add --force to reuse it")
    return False


def make_out_dir(path: str, option: str = "--out") -> None:
    """Create the output folder (and its parents) once every option has been validated; one line on failure."""
    from pathlib import Path

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SymtoolsError(f"{option} {path}: cannot create it ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------- Hugging Face causal LMs

HF_CONFIG_HELP = ("a Hugging Face causal LM built from the config.json in DIR with random weights, or a bundled "
                  "config by name (gpt2, llama, llama-bias, llama-tied, qwen2); needs the 'hf' extra")
HF_CHECKPOINT_HELP = ("a Hugging Face checkpoint folder: config.json and model.safetensors (or sharded, with "
                      "model.safetensors.index.json); needs the 'hf' extra")


def hf_requested(args) -> bool:
    """Whether the command was asked for a Hugging Face causal LM (``--hf-config`` or ``--hf``)."""
    return bool(getattr(args, "hf_config", None) or getattr(args, "hf", None))


def check_hf_options(args, image_only: dict[str, object]) -> str:
    """The ``--hf-config``/``--hf`` flag given (one of them); an error when both are, or when an image-model
    option of ``image_only`` (flag → the value argparse holds) was given with it."""
    given = [flag for flag, value in (("--hf-config", getattr(args, "hf_config", None)),
                                      ("--hf", getattr(args, "hf", None))) if value]
    if len(given) > 1:
        raise SymtoolsError("--hf-config and --hf exclude each other: give one of them")
    clash = [flag for flag, value in image_only.items() if value is not None]
    if clash:
        raise SymtoolsError(f"{given[0]} builds a Hugging Face causal LM: {', '.join(clash)} "
                            f"{'applies' if len(clash) == 1 else 'apply'} to the image models only")
    return given[0]


def hf_model(args, dtype, *, seed: int = 0, empty: bool = False):
    """The :class:`symtools.nn.hf.CausalLM` of ``--hf-config`` (random init from ``seed``; ``empty``: on meta)
    or ``--hf`` (the checkpoint's weights, in ``dtype``; ``dtype`` None: the file's)."""
    from symtools.nn.hf import from_checkpoint_dir, from_config_dir

    if getattr(args, "hf_config", None):
        return from_config_dir(args.hf_config, dtype=dtype, seed=seed, empty=empty)
    return from_checkpoint_dir(args.hf, dtype=dtype)


def hf_label(model, flag: str, value: str) -> str:
    """How reports name a Hugging Face model: its class and where it came from."""
    return f"{type(model.model).__name__} ({flag} {value})"


def text_batch(data: str | None, batch: int, seq_len: int, seed: int, vocab: int):
    """One batch ``(x, y)`` of token ids for a causal LM, both int64 ``(batch, seq_len)``, ``y`` = the next tokens.

    ``data``: ``None``/``"stdlib-text"`` (batch 0 of the seeded ``stdlib-text`` stream: bytes of Python
    standard-library source) or ``"random"`` (uniform ids below ``vocab`` from a generator seeded by ``seed``).
    """
    import torch

    if batch < 1:
        raise SymtoolsError(f"--batch must be at least 1, got {batch}")
    if seq_len < 1:
        raise SymtoolsError(f"--seq-len must be at least 1, got {seq_len}")
    if data in (None, "stdlib-text"):
        from symtools.data.loader import make_loader

        x, y = make_loader("stdlib-text", batch, seed=seed, seq_len=seq_len).batch(0)
    elif data == "random":
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
        x, y = ids[:, :-1], ids[:, 1:]
    else:
        raise SymtoolsError(f"--data {data}: a causal LM reads text, 'stdlib-text' (the default) or 'random' tokens")
    if int(y.max()) >= vocab:
        raise SymtoolsError(f"the data has token ids up to {int(y.max())} but the model's vocabulary has {vocab}")
    return x, y
