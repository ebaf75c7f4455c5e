"""Code generation: SymPy results → readable modules of torch functions."""
