"""Generated torch modules of the built-in symmetries (see symtools.codegen.regenerate)."""

NAMES = ('translation', 'scale', 'rescale', 'rescale2', 'gl_linear_pair', 'attention_qk', 'attention_vo', 'rotation_pair')
