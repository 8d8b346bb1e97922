"""What every importer shares: its options, the units of work it plans, the samples it yields.

An importer reads a dataset in its own on-disk layout (SRC) and yields `Sample`s that the
runner (`run.py`) writes in causalign's dataset format. It works in two steps:

1. `plan()` lists the *units* of work (one image, one CT series, one MRI subject, one
   mammogram…) in a deterministic order, and decides every split there, before any pixel of
   the output is written, so an interrupted import resumes with the same splits.
2. `process(unit)` yields the unit's samples (and `Skipped` records for parts it cannot use).
   A unit that cannot be used at all raises `SkipItem(reason, detail)`.

Problems with single items never stop an import: they are recorded with a reason and counted
in the summary. Problems with the whole source (SRC missing, no annotation files, a corrupt
index file that everything depends on) raise `DataError`, printed as one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ...errors import DataError, did_you_mean, not_one_of
from ..format import DatasetMeta
from .util import IntensityScale, SkipItem

if TYPE_CHECKING:
    from rich.progress import TaskID

SHORTCUTS = ("none", "plus-minus", "intensity")
IMAGE_FORMATS = ("png", "npy")


@dataclass
class CommonOptions:
    """Options every importer accepts (CLI flags of the same name, `_` → `-`).

    size: output side in pixels (images are made square). seed: split/randomness seed.
    shortcut: add the paper's synthetic shortcut to training images (see `run.add_shortcut`).
    image_format: png (8-bit; 16-bit when a source image has more than 8 bits, see
    `util.IntensityScale`) or npy (float32) for 2D images. limit: import at most this many
    units (images, series, subjects…) per split, for a quick look at a big dataset.
    """

    size: int = 128
    seed: int = 0
    shortcut: str = "none"
    image_format: str = "png"
    limit: int | None = None

    def validate(self) -> None:
        if self.size < 8:
            raise DataError(f"--size must be >= 8, got {self.size}")
        if self.shortcut not in SHORTCUTS:
            raise DataError(f"unknown shortcut '{self.shortcut}'; valid: {', '.join(SHORTCUTS)}"
                            + did_you_mean(self.shortcut, SHORTCUTS))
        if self.image_format not in IMAGE_FORMATS:
            raise DataError(not_one_of("--image-format", self.image_format, IMAGE_FORMATS))
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit must be >= 1, got {self.limit}")
        for name in ("val_frac", "test_frac"):
            v = getattr(self, name, None)
            if v is not None and not 0.0 <= v < 1.0:
                raise DataError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if getattr(self, "val_frac", 0.0) + getattr(self, "test_frac", 0.0) >= 1.0:
            raise DataError("--val-frac + --test-frac must leave some training data (< 1)")

    def flag_use(self) -> list[tuple[str, bool, str]]:
        """(option, whether this combination reads it, where it is read) for the options
        read in some combinations only; `build_options` refuses one given where unread."""
        return []

    def fractions(self) -> dict[str, float]:
        val = getattr(self, "val_frac", 0.0)
        test = getattr(self, "test_frac", 0.0)
        return {"train": 1.0 - val - test, "val": val, "test": test}


@dataclass
class Unit:
    """One unit of work: `key` is stable across runs (resume), `payload` is importer data."""

    key: str
    split: str
    source: str
    payload: Any = None


@dataclass
class Sample:
    """One output sample. `image` is float in [0, 1]: (H,W), (C,H,W), (D,H,W) or (C,D,H,W);
    `mask` has the image's spatial shape (nonzero = annotated); `box` is (x0, y0, x1, y1), for
    a volume optionally with its slice range (x0, y0, x1, y1, z0, z1), z1 exclusive.
    `group` is the patient (subject…) the sample comes from, recorded in the manifest so that
    `causalign data check` can verify that no patient sits in two splits ("" unknown)."""

    id: str
    split: str
    label: int
    image: np.ndarray
    mask: np.ndarray | None = None
    box: tuple[int, ...] | None = None
    attributes: list[float] | None = None
    site: str = "0"
    group: str = ""


@dataclass
class Skipped:
    """A source item left out, with a short reason category and the detail."""

    source: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


class Importer:
    """Base class: subclasses set `kind`, `Options`, `layout` and implement plan/meta/process."""

    kind: ClassVar[str] = ""
    Options: ClassVar[type[CommonOptions]] = CommonOptions
    layout: ClassVar[str] = ""  # one line: the SRC layout it expects (README / --help)

    def __init__(self, src: Path, opts: CommonOptions, progress: Any = None) -> None:
        self.src = Path(src)
        self.opts = opts
        self.progress = progress
        self.skipped: list[Skipped] = []  # problems found while planning
        self.notes: dict[str, int] = {}  # counted remarks (not skips), e.g. "mask resized"
        self.unit_notes: dict[str, int] | None = None  # set by the runner around process()
        self.details: dict[str, Any] = {}  # importer-specific summary entries
        # the import's one rule for pixel values that are not 8-bit (set by plan() when the
        # importer reads such files; see util.IntensityScale). None: 8-bit sources only.
        self.scale: IntensityScale | None = None

    # -- to implement
    def plan(self) -> list[Unit]:
        raise NotImplementedError

    def meta(self) -> DatasetMeta:
        raise NotImplementedError

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        raise NotImplementedError

    # -- helpers
    def skip(self, source: str, reason: str, detail: str = "") -> None:
        self.skipped.append(Skipped(source, reason, detail))

    def note(self, what: str, n: int = 1) -> None:
        """Count a remark for the summary (journaled with the unit being processed)."""
        target = self.unit_notes if self.unit_notes is not None else self.notes
        target[what] = target.get(what, 0) + n

    def task(self, description: str, total: int | None) -> TaskID | None:
        """A progress-bar task (or None without a progress display)."""
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total)

    def advance(self, task: TaskID | None) -> None:
        if task is not None:
            self.progress.advance(task)

    def limit_units(self, units: list[Unit]) -> list[Unit]:
        """Apply --limit: the first N units of each split, in plan order."""
        if self.opts.limit is None:
            return units
        seen: dict[str, int] = {}
        out = []
        for u in units:
            if seen.get(u.split, 0) < self.opts.limit:
                out.append(u)
                seen[u.split] = seen.get(u.split, 0) + 1
        return out


def build_options(cls: type[CommonOptions], kind: str, given: dict[str, Any]) -> CommonOptions:
    """Options dataclass from the flags a user gave; a flag the kind does not use is an error
    (it would otherwise be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in given if k not in names)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        valid = ", ".join("--" + n.replace("_", "-") for n in sorted(names))
        raise DataError(f"{flags} not used by the {kind} importer (its options: {valid})")
    opts = cls(**given)
    opts.validate()
    # a flag this combination never reads wrote the same files as without it, yet was
    # recorded in .import/state.json as if it acted (e.g. brats --depth under --mode slices)
    for key, used, where in opts.flag_use():
        if key in given and not used:
            raise DataError(f"--{key.replace('_', '-')} not used by the {kind} importer "
                            f"here: it is read only {where}")
    return opts


def wrap_skip(source: str, exc: SkipItem) -> Skipped:
    return Skipped(source, exc.reason, exc.detail)


def parse_list(text: str | None) -> list[str]:
    """'a, b,c' → ['a', 'b', 'c'] (empty entries dropped)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]
