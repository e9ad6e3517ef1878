"""User-facing error type, and warnings said once.

Every error caused by the user's input (a parameter file, a data file, a command-line
value) is raised as :class:`NfjaxError` with a one-line message naming the file, the key or
line, what was expected and what was found. The CLI prints that line and exits non-zero,
without a traceback. Programming errors keep their ordinary exception types. A warning
about how work runs (a budget too small, frames decoded whole) is said once per process
(:func:`warn_once`).
"""
from __future__ import annotations


class NfjaxError(Exception):
    """An error in the user's input, with a one-line, self-explanatory message."""


class ParamError(NfjaxError):
    """A problem in a MIDAS parameter file (missing key, wrong count, bad value)."""


class InputFileError(NfjaxError):
    """A data file that is missing, unreadable, or has the wrong size or format."""


def check_fraction(value: float, what: str) -> float:
    """``value`` if it is a number in [0, 1] (a confidence or fraction option), else an
    :class:`NfjaxError` naming ``what``."""
    import math

    if not (math.isfinite(value) and 0 <= value <= 1):
        raise NfjaxError(f"{what}: expected a number between 0 and 1, found {value!r}")
    return value


_said: set[str] = set()


def warn_once(key: str, line: str) -> None:
    """Print ``line`` on stderr the first time a warning of ``key`` is given in this
    process; later ones of the same ``key`` are dropped."""
    import sys

    if key not in _said:
        _said.add(key)
        print(line, file=sys.stderr)
