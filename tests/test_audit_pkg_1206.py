"""Packaging audit (2026-12-06): what a non-editable install of the declared dependency
ranges needs at run time."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_every_package_data_pattern_names_a_file() -> None:
    """pyproject's package-data listed py.typed, which did not exist: the wheel had no
    py.typed, so type checkers ignored the package's annotations after `pip install`."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    where = config["tool"]["setuptools"]["packages"]["find"]["where"][0]
    for package, patterns in config["tool"]["setuptools"]["package-data"].items():
        folder = root / where / package.replace(".", "/")
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: nothing matches {pattern!r}"


# The oldest release of each dependency the code works with, with what needs it and where
# (the premise is checked in the source, so the row goes when the code stops needing it).
# typer: `str | None` options fail at CLI import before 0.12.4 ("Type not yet supported");
# 0.12.4-0.15.3 allow click >= 8.2, under which `--help` and option parsing raise TypeError;
# 0.15.4 pins click < 8.2 and 0.16 supports it (each checked on 2026-12-06 with the CLI).
_FLOORS = {
    "typer": ((0, 15, 4), "cli.py", "str | None"),
    "pillow": ((9, 1), "data/importers/util.py", "Image.Resampling"),  # new in Pillow 9.1
}


@pytest.mark.parametrize("name", sorted(_FLOORS))
def test_declared_floor_covers_what_the_code_uses(name: str) -> None:
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    floor, module, premise = _FLOORS[name]
    assert premise in (root / "src" / "causalign" / module).read_text()
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.split(">")[0].split("<")[0].strip().lower() == name)
    declared = spec.split(">=")[1].split(",")[0].strip()
    assert tuple(int(p) for p in declared.split(".")) >= floor, spec
