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
