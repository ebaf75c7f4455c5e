"""symtools: symmetries of neural-network losses, derived with SymPy and checked with autograd.

Layers (imports point one way): ``symtools.symbolic`` → ``symtools.codegen`` → ``symtools.nn`` /
``symtools.numeric`` → ``symtools.cli``.
"""

__version__ = "0.1.0"
