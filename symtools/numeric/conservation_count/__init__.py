"""Counting every conservation law of gradient (and heavy-ball) flow numerically, and comparing the count with
the library's charges (Marcotte, Gribonval, Peyré, NeurIPS 2023; ICML 2024). See docs/commands/laws.md.

- :mod:`.rank` — numerical rank with a stated gap criterion; complements, dense and large-D.
- :mod:`.fields` — the model as a function of flat θ; the flows' vector fields; Lie brackets by JVPs.
- :mod:`.charges` — the library's charges (graph walk + generated densities) and their gradients.
- :mod:`.count` — the level-by-level rank of the generated Lie algebra, and the comparison with the charges.
"""

from .count import (
           ChargeComparison,
           InputsNotSaturated,
           LawCount,
           compare_with_charges,
           count_laws,
)
from .fields import FlatModel
from .rank import MIN_GAP, RankUnclear, decide_rank

__all__ = [
           "MIN_GAP",
           "ChargeComparison",
           "FlatModel",
           "InputsNotSaturated",
           "LawCount",
           "RankUnclear",
           "compare_with_charges",
           "count_laws",
           "decide_rank",
]
