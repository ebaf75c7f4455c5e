"""Helpers for property-testing symmetries in your own test suite.

``symtools.testing.actions``: hypothesis strategies of random one-parameter elementwise actions, random
losses that have (or lack) a declared symmetry, and the identity residuals of a generated module.
Everything public there is re-exported here. Needs ``hypothesis`` (the ``test`` extra): without it the
import fails at once with a message saying what to install, rather than deep inside a strategy later.
"""

try:
    import hypothesis  # noqa: F401
except ImportError:
    raise ImportError("symtools.testing needs hypothesis, which is not installed: pip install 'symtools[test]' "
                      "(or pip install hypothesis)") from None

from symtools.testing.actions import *  # noqa: F401,F403
from symtools.testing.actions import __all__ as _actions_all

__all__ = list(_actions_all)
from symtools.testing.networks import *  # noqa: E402,F401,F403  (random networks: networks(), architectures())
__all__ += __import__("symtools.testing.networks", fromlist=["__all__"]).__all__
