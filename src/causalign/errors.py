"""Error types.

`CausalignError` marks a *user* error (bad path, wrong mask shape, unknown method, NaN input,
empty split...). The command line prints its message as one line and exits non-zero, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


class TrainingTroubleWarning(UserWarning):
    """Numerical trouble found while training (a failure counter such as
    `train_cg_dropped` reaching 0.5 in an epoch, or an exploding loss), warned at the first
    epoch it appears, after that epoch's checkpoint is written.

    A warning category of its own so that a script can act on it:
    ``warnings.simplefilter("error", TrainingTroubleWarning)`` stops a run there (resume it
    with other settings), ``"ignore"`` silences it; `metrics.json`'s `warnings` still lists
    it at the end."""


def did_you_mean(name: object, valid: Iterable[str], prefix: str = "",
                 shown: Mapping[str, str] | None = None) -> str:
    """"; did you mean 'x'?" naming the valid names closest to a misspelt ``name`` (case
    ignored: `--distance L1` means l1), or "" when none is close. A list of 30 method
    settings named the right one nowhere near the typo (`method.lamm` -> `method.lam`).
    ``prefix`` is shown before each name, not compared (every `method.` key shares it);
    ``shown`` maps a name to what is shown for it (names of several levels at once)."""
    import difflib

    text = str(name).strip().lower()
    shown = shown or {}
    names = {str(v).lower(): str(shown.get(v, v)) for v in valid}
    starts = [v for k, v in names.items() if text and k.startswith(text)]
    if text in names:  # another case, or stray blanks: that name
        close = [names[text]]
    elif 0 < len(starts) <= 6:  # a stem: `--saliency lrp` means one of the lrp-… rules
        close = starts
    else:
        close = [names[c] for c in difflib.get_close_matches(text, list(names), n=3,
                                                             cutoff=0.6)]
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?"


def not_one_of(key: str, value: object, choices: Iterable[str]) -> str:
    """"KEY must be a or b, got 'v'" (or "one of a, b, c" for more), plus the closest choice:
    `--set method.distance=L1` named the four distances but not which one was meant."""
    names = [str(c) for c in choices]
    listed = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
    return f"{key} must be {listed}, got '{value}'" + did_you_mean(value, names)


def wrong_level(key: str, owner: str) -> str:
    """"; epochs is a training setting, not the method's" when a `method.`/`model.` key is a
    training setting (`--set method.epochs=3`, `--set model.width=8`): the list of the
    method's settings, or "it takes none", left the user to guess; "" otherwise. (Not
    "use --set epochs=…": `bench step --set` takes no training settings.)"""
    from .engine.config import valid_keys

    if key in valid_keys():
        return f"; {key} is a training setting, not the {owner}'s"
    return ""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> CausalignError:
    """Uniform message for an unknown registry entry, listing the valid names (and the
    closest ones, `did_you_mean`)."""
    return CausalignError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}"
                          + did_you_mean(name, valid))


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
