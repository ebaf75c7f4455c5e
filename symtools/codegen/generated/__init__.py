"""Generated torch modules of the built-in symmetries (see symtools.codegen.regenerate)."""

NAMES = ('translation', 'scale', 'rescale', 'rescale2', 'gl_linear_pair', 'attention_qk', 'attention_vo', 'rotation_pair')
LAWS = ('law_translation_sgd', 'law_translation_momentum', 'law_translation_nesterov', 'law_translation_adam', 'law_translation_adamw', 'law_scale_sgd', 'law_scale_momentum', 'law_scale_nesterov', 'law_scale_adam', 'law_scale_adamw', 'law_rescale_sgd', 'law_rescale_momentum', 'law_rescale_nesterov', 'law_rescale_adam', 'law_rescale_adamw', 'law_rescale2_sgd', 'law_rescale2_momentum', 'law_rescale2_nesterov', 'law_rescale2_adam', 'law_rescale2_adamw')
