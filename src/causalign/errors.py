"""Error types.

`CausalignError` marks a *user* error (bad path, wrong mask shape, unknown method, NaN input,
empty split...). The command line prints its message as one line and exits non-zero, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# The largest magnitude a weight, rate or threshold setting may take. Beyond it float32
# arithmetic on it overflows (Adam's first step lr / (1 − β₁), α·d(x, x0), λ·L_align): a
# traceback from the optimiser, or a "diverged" report that blames another setting.
MAX_SETTING = 1e30


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


def interrupt_behind(exc: BaseException,
                     before: BaseException | None = None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM raised as one) that ``exc`` is or that was
    being handled when ``exc`` was raised (its ``__context__`` chain), else None.

    ``before``: the exception the caller was handling when the work began
    (``sys.exc_info()[1]`` then); the chain ends there. Work started inside an ``except
    KeyboardInterrupt:`` block (a wrapper running a command after its own Ctrl-C) chains
    every error it raises to that old interrupt, which would pass them all off as one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and current is not before and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__context__
    return None
