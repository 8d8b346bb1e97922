"""The defaults and allowed values that README.md and `--help` state for causal alignment are the
code's: causal-align's and hier-align's `--set method.<key>` lists against their Params
dataclasses, the automatic CG cap, `causalign counterfactual`'s option defaults (and which of
them a causal-align run lends) against `CounterfactualSettings` / `CounterfactualGenerator`,
and `bench step --classes`. Static: no training, a few seconds.

A settings list is read as "`key` VALUE" pairs outside parentheses: VALUE is the default
(`steps` K = 10 reads 10, `cg_iters` 0 = auto reads 0), or a|b|c, the allowed values with the
default first. A key named without a value (`autoencoder`) only has to exist.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import typer.main

from causalign.errors import ConfigError
from causalign.explain.counterfactual import MIN_L1_EPS, CounterfactualGenerator
from causalign.explain.counterfactual_export import CounterfactualSettings, settings_for_run
from causalign.methods import build_method
from causalign.methods.causal_align import CausalAlignTrainingParams, auto_cg_iters
from causalign.methods.hier_align import HierAlignParams

README = Path(__file__).resolve().parents[1] / "README.md"

# (marker that opens the list, text that ends it)
CAUSAL_LIST = ("Settings (`--set method.<key>=…`):", "`normalize=none` is Eq. 3 as printed")
HIER_LIST = ("Its settings (`--set method.…`):", "Causal-align's other keys")


def _readme() -> str:
    return README.read_text()


def _segment(start: str, end: str) -> str:
    text = _readme()
    assert text.count(start) == 1, f"README: expected one {start!r}"
    i = text.index(start) + len(start)
    j = text.index(end, i)
    return text[i:j]


def _outside_parentheses(text: str) -> str:
    """``text`` with every parenthesised part blanked (backticked code kept whole)."""
    out, depth, code = [], 0, False
    for ch in text:
        if ch == "`":
            code = not code
        elif not code and ch == "(":
            depth += 1
        elif not code and ch == ")":
            depth = max(depth - 1, 0)
            out.append(" ")
            continue
        out.append(ch if depth == 0 else " ")
    return re.sub(r"\s+", " ", "".join(out))


def documented(segment: str, fields: set[str]) -> dict[str, str | None]:
    """{key: documented value or None} for every field named outside parentheses (first
    mention); "`lam1` / `lam2` 1" gives both keys the value."""
    text = _outside_parentheses(segment)
    found: dict[str, str | None] = {}
    pattern = (r"((?:`[a-z_0-9]+` / )*`[a-z_0-9]+`)"
               r"(?: ([^\s,;`]+(?: = [^\s,;`]+)?))?")
    for keys, value in re.findall(pattern, text):
        for key in re.findall(r"`([a-z_0-9]+)`", keys):
            if key in fields and key not in found:
                found[key] = value.rstrip(".") or None  # a list's last item ends a sentence
    return found


def _typed(value: str, default: object) -> object:
    """The documented VALUE in the type of the field's default."""
    parts = value.split(" = ")
    for part in (parts[0], parts[-1]):  # `cg_iters` 0 = auto; `steps` K = 10
        try:
            if isinstance(default, bool):
                if part in ("true", "false"):
                    return part == "true"
                raise ValueError(part)
            return type(default)(part)
        except ValueError:
            continue
    raise AssertionError(f"README value {value!r} does not read as a {type(default).__name__}")


def _allowed(method: str, key: str) -> set[str]:
    """The values the method accepts for a string setting, from its refusal of a bad one."""
    with pytest.raises(ConfigError) as info:
        build_method(method, {key: "no-such-value"})
    msg = str(info.value)
    m = re.search(rf"method\.{key} must be (?:one of )?(.*), got", msg)
    assert m, f"method.{key}: no list of values in {msg!r}"
    return {v.strip().strip("'") for v in re.split(r", | or ", m[1])}


def _check_list(method: str, params: object, found: dict[str, str | None]) -> list[str]:
    problems = []
    for key, value in found.items():
        default = getattr(params, key)
        if value is None:
            continue
        if "|" in value:
            alts = value.split("|")
            if alts[0] != str(default):
                problems.append(f"`{key}`: README lists {alts[0]!r} first (the default), the "
                                f"code's default is {default!r}")
            allowed = _allowed(method, key)
            if key == "target":  # 'other', 'predicted' or a class index (README: k)
                allowed = allowed - {"a class index"} | {"k"}
            if set(alts) != allowed:
                problems.append(f"`{key}`: README allows {sorted(alts)}, the code "
                                f"{sorted(allowed)}")
        elif _typed(value, default) != default:
            problems.append(f"`{key}`: README default {value!r}, the code's {default!r}")
    return problems


def test_causal_align_settings_list_matches_its_params():
    params = CausalAlignTrainingParams()
    fields = {f.name for f in dataclasses.fields(params)}
    found = documented(_segment(*CAUSAL_LIST), fields)
    assert set(found) == fields, f"README's causal-align list lacks {sorted(fields - set(found))}"
    problems = _check_list("causal-align", params, found)
    assert not problems, "\n".join(problems)
    # the Python default is the training one (`build_method` without settings)
    assert dataclasses.asdict(build_method("causal-align").params) == dataclasses.asdict(params)


def test_hier_align_settings_list_matches_its_params():
    params = HierAlignParams()
    fields = {f.name for f in dataclasses.fields(params)}
    found = documented(_segment(*HIER_LIST), fields)
    assert set(found) == fields, f"README's hier-align list lacks {sorted(fields - set(found))}"
    problems = _check_list("hier-align", params, found)
    assert not problems, "\n".join(problems)
    # the causal-align keys it says hier-align does not have
    text = _readme()
    m = re.search(r"Causal-align's other keys \(([^)]*)\) are not hier-align's", text)
    assert m, "README: the list of causal-align keys hier-align lacks"
    said = set(re.findall(r"`([a-z_0-9]+)`", m[1]))
    causal = {f.name for f in dataclasses.fields(CausalAlignTrainingParams)}
    assert said == causal - fields - {"alpha", "lam"}  # those two are alpha1 / lam1


def test_auto_cg_cap_is_what_the_readme_says():
    seg = re.sub(r"\s+", " ", _segment(*CAUSAL_LIST))
    binary = re.search(r"`cg_iters` 0 = auto \((\d+) on binary data", seg)
    slack = re.search(r"C \+ (\d+) for C > 2 classes", seg)
    latent = re.search(r"at least (\d+) in `space=latent`", seg)
    assert binary and slack and latent, "README: the auto CG cap's three cases"
    assert auto_cg_iters(2, soft=False) == int(binary[1])
    for c in (3, 10, 200):
        assert auto_cg_iters(c, soft=False) == c + int(slack[1])
    assert auto_cg_iters(2, soft=False, curved_map=True) == int(latent[1])
    eps_floor = re.search(r"`eps` 0\.01 \(the l1's smoothing ε, ≥ ([0-9.e-]+)", seg)
    assert eps_floor and float(eps_floor[1]) == MIN_L1_EPS


# ------------------------------------------------------------------- counterfactual CLI

# option -> CounterfactualSettings field
CF_OPTIONS = {"alpha": "alpha", "steps": "steps", "lr": "lr", "optimizer": "optimizer",
              "distance": "distance", "space": "space", "smooth_sigma": "smooth_sigma",
              "eps": "eps"}
# CounterfactualGenerator keyword of a settings field, where the names differ
GENERATOR_NAME = {"optimizer": "optimizer"}


def _command(*path: str):
    from causalign.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _help_default(text: str) -> str:
    m = re.search(r"\(default ([^,)]+)", text)
    assert m, f"no '(default …)' in {text!r}"
    return m[1]


def test_counterfactual_help_defaults_are_the_settings_and_generator_defaults():
    helps = {p.name: p.help or "" for p in _command("counterfactual").params}
    base = CounterfactualSettings()
    signature = inspect.signature(CounterfactualGenerator.__init__).parameters
    for option, field in CF_OPTIONS.items():
        default = getattr(base, field)
        said = _typed(_help_default(helps[option]), default)
        assert said == default, (option, helps[option], default)
        assert signature[GENERATOR_NAME.get(field, field)].default == default, field


def test_counterfactual_help_says_which_settings_a_run_lends():
    """A causal-align run whose every search setting differs from the defaults: the fields it
    changes are the ones --help says "or the run's" for, and the docstring lists."""
    run = build_method("causal-align", {
        "alpha": 0.5, "distance": "l2", "eps": 0.5, "space": "smooth", "smooth_sigma": 2.0,
        "inner_optimizer": "newton", "newton_polish": 2, "target": "predicted", "steps": 7,
        "inner_lr": 0.5})
    lent = {k for k, v in dataclasses.asdict(settings_for_run(run)).items()
            if v != getattr(CounterfactualSettings(), k)}
    assert lent == {"alpha", "distance", "eps", "space", "smooth_sigma", "target",
                    "optimizer", "polish"}
    cmd = _command("counterfactual")
    helps = {p.name: p.help or "" for p in cmd.params}
    for option, field in CF_OPTIONS.items():
        assert ("or the run's" in helps[option]) == (field in lent), (option, helps[option])
    doc = " ".join(cmd.help.split())
    assert ("lends its α, distance, ε, space, smooth σ, target rule and inner optimizer "
            "(with its Gauss-Newton polish steps), not its steps or step size") in doc


def test_readme_counterfactual_defaults():
    text = " ".join(_readme().split())
    m = re.search(r"\(defaults α ([\d.]+), (\d+) steps, lr ([\d.]+), ([\w-]+), ε ([\d.]+), "
                  r"(\w+), (\w+), σ ([\d.]+);", text)
    assert m, "README: the counterfactual options' defaults"
    base = CounterfactualSettings()
    assert (float(m[1]), int(m[2]), float(m[3]), m[4], float(m[5]), m[6], m[7],
            float(m[8])) == (base.alpha, base.steps, base.lr, base.distance, base.eps,
                             base.optimizer, base.space, base.smooth_sigma)
    eps = re.search(r"`--eps` is the l1's smoothing ε \(default ([\d.]+), or the run's\)", text)
    assert eps and float(eps[1]) == base.eps
    bounds = re.search(r"`--bounds data\|none\|LO,HI` \(default `(\w+)`\)", text)
    params = {p.name: p for p in _command("counterfactual").params}
    assert bounds and params["bounds"].default == bounds[1]


def test_readme_bench_step_defaults():
    text = " ".join(_readme().split())
    params = {p.name: p for p in _command("bench", "step").params}
    m = re.search(r"`--classes` sets the model's outputs and the labels' range \(default "
                  r"(\d+)\)", text)
    assert m and params["classes"].default == int(m[1])
    m = re.search(r"`--steps` timed steps \(default (\d+)\) after `--warmup` untimed ones "
                  r"\(default (\d+)\)", text)
    assert m and (params["steps"].default, params["warmup"].default) == (int(m[1]), int(m[2]))


def test_no_help_paragraph_breaks_mid_sentence():
    """Typer prints a docstring's line breaks after its first paragraph as they are:
    `counterfactual --help` broke "… those of its" / "image level (α₁)"."""
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    broken = [" ".join(path) for path, cmd in walk(_command(), [])
              if any("\n" in p.strip() and not p.startswith("\b")
                     for p in (cmd.help or "").split("\n\n")[1:])]
    assert not broken, f"help paragraphs with hard line breaks: {broken}"
