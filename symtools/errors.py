"""Errors that the command line turns into one-line messages with exit code 2."""


class SymtoolsError(Exception):
    """A user-facing error: bad input, not a bug. The CLI prints ``symtools: <message>`` and exits 2."""

    exit_code = 2


class SpecError(SymtoolsError):
    """A symmetry declaration that cannot be parsed or has no usable group structure."""
