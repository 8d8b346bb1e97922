"""Error types.

`CausalignError` marks a *user* error (bad path, wrong mask shape, unknown method, NaN input,
empty split...). The command line prints its message as one line and exits non-zero, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CausalignError(Exception):
    """A problem with the user's input or configuration, reported as one clear line."""


class DataError(CausalignError):
    """The dataset on disk is missing, malformed or inconsistent."""


class ConfigError(CausalignError):
    """A configuration key or value is invalid."""


class InputError(CausalignError, ValueError):
    """A tensor given to the Python API is unusable (NaN/inf, wrong shape, bad target).

    Also a ValueError, so `except ValueError` works as it does around torch calls."""


class NumericalError(CausalignError):
    """Numerical trouble that could not be handled (e.g. NaN loss, diverging solve)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> CausalignError:
    """Uniform message for an unknown registry entry, listing the valid names."""
    return CausalignError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}")
