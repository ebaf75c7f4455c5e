"""Numeric core: side-effect-free loss evaluation, gradients and Hessian-vector products, BatchNorm ε breaking.

Public API (see each module's docstring for the math):

- :mod:`symtools.numeric.evaluation` — :func:`evaluation_mode`, :func:`loss_closure`, :func:`parameter_dict`.
- :mod:`symtools.numeric.hvp` — :func:`gradient`, :func:`hvp`, :func:`grad_and_hvp`,
  :func:`hvp_finite_difference`, :func:`roundoff_floor`, :func:`relative_difference`.
- :mod:`symtools.numeric.bn_epsilon` — :func:`bn_epsilon_gradients`, :func:`predicted_scale_breaking`,
  :func:`batch_norm_batch_stats`.
- :mod:`symtools.numeric.conv_hessian` — :func:`fast_second_order`: convolutions differentiated twice with the
  standard kernels (used by the HVPs).
- :mod:`symtools.numeric.precision` — :func:`ieee_float32`: TensorFloat-32 off on CUDA (used by the checker).
"""

from symtools.numeric.bn_epsilon import batch_norm_batch_stats, bn_epsilon_gradients, predicted_scale_breaking
from symtools.numeric.conv_hessian import fast_second_order
from symtools.numeric.evaluation import batchnorm_modules, evaluation_mode, loss_closure, parameter_dict
from symtools.numeric.hvp import (
    default_fd_step,
    grad_and_hvp,
    gradient,
    hvp,
    hvp_finite_difference,
    relative_difference,
    roundoff_floor,
)
from symtools.numeric.precision import ieee_float32

__all__ = [
    "batch_norm_batch_stats",
    "batchnorm_modules",
    "bn_epsilon_gradients",
    "default_fd_step",
    "evaluation_mode",
    "fast_second_order",
    "grad_and_hvp",
    "gradient",
    "hvp",
    "hvp_finite_difference",
    "ieee_float32",
    "loss_closure",
    "parameter_dict",
    "predicted_scale_breaking",
    "relative_difference",
    "roundoff_floor",
]
