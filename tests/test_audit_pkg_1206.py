"""Packaging audit (2026-12-06): what a non-editable install of the declared dependency
ranges needs at run time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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


def _imported_top_names(folder: Path) -> dict[str, str]:
    """Top-level non-stdlib modules imported anywhere under folder → one file importing it."""
    import ast
    import sys

    root = folder.parent
    local = {p.stem for d in ("tests", "benchmarks") for p in (root / d).glob("*.py")}
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local | {"causalign",
                                                                               "__future__"}:
                    found.setdefault(top, path.name)
    return found


def _dist_name(spec: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_every_third_party_import_is_declared() -> None:
    """A module imported but declared nowhere fails on a clean install (the test suite
    imported pandas, which only came in through causal-learn's own dependencies)."""
    import importlib.metadata as md

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    runtime = {_dist_name(s) for s in project["dependencies"]}
    extras = {name: {_dist_name(s) for s in specs}
              for name, specs in project["optional-dependencies"].items()}
    # click: cli.py's fallback for typer versions that do not vendor it (they depend on it)
    allowed = {"src": runtime | set().union(*extras.values()) | {"click"},
               "tests": runtime | extras["test"], "benchmarks": runtime | extras["test"]}
    dists = md.packages_distributions()
    # import names of distributions not installed here (an optional extra)
    dists = {"causallearn": ["causal-learn"], "PIL": ["pillow"], "sklearn": ["scikit-learn"],
             "yaml": ["pyyaml"], **dists}
    missing = []
    for area, ok in allowed.items():
        for module, where in _imported_top_names(root / area).items():
            names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            if not names & ok:
                missing.append(f"{area}/{where}: {module} ({', '.join(sorted(names))})")
    assert not missing, missing


def test_model_dtype_check_on_a_torch_without_device_autocast_queries(monkeypatch) -> None:
    """torch < 2.4's is_autocast_enabled() takes no device; check_model_dtype called it with
    one, so every explainer, counterfactual search and method batch check raised TypeError
    there (implicit.adjoint already handled both signatures)."""
    from torch import nn

    from causalign.errors import InputError
    from causalign.explain.base import check_model_dtype

    def old_is_autocast_enabled() -> bool:  # torch 2.2's signature: CUDA autocast only
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: False)  # 2.2's, no warning
    model = nn.Linear(3, 2)
    check_model_dtype(model, torch.zeros(1, 3))
    with pytest.raises(InputError, match="float64"):
        check_model_dtype(model, torch.zeros(1, 3, dtype=torch.float64))
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: True)
    check_model_dtype(model, torch.zeros(1, 3, dtype=torch.float64))  # CPU autocast: mixed ok


def test_cg_rescaling_with_torch_2_2s_ldexp(monkeypatch) -> None:
    """torch 2.2's ldexp(x, integer exponent) is x * 2^e with 2^e in float32 (0 below
    2^-149): batched_cg's power-of-two rescaling divided a float64 rhs of 1e-200 by 0 and did
    not converge on torch 2.2.2 (tests/test_torch_habits.py failed there)."""
    from causalign.implicit.cg import batched_cg

    monkeypatch.setattr(torch, "ldexp", lambda x, e: x * torch.pow(2.0, e))
    b = torch.full((2, 3), 1e-200, dtype=torch.float64)
    b[1] = 0
    res = batched_cg(lambda p: 2 * p, b)
    assert res.converged.tolist() == [True, True] and not res.breakdown.any()
    torch.testing.assert_close(res.solution, b / 2, rtol=1e-12, atol=0)


def test_cg_solves_a_rhs_near_the_dtype_maximum() -> None:
    """max |b| in [2^127, 2^128): the power of two just above it is inf in float32, so b/s
    was 0 and CG reported breakdown with the solution 0 (the answer, 1e38, is finite)."""
    from causalign.implicit.cg import batched_cg

    b = torch.full((1, 3), 2e38)
    res = batched_cg(lambda p: 2 * p, b)
    assert res.converged.tolist() == [True] and not res.breakdown.any()
    torch.testing.assert_close(res.solution, b / 2)
