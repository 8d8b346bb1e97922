"""Audit (revccce): CCCE against seed 000 §4.3's definition, computed independently.

The reference here does not use the identified formula the code implements: it evaluates
CCCE(S) = E(Y_{A_S=1} − Y_{A_S=0} | A = a, Y = y) directly from potential outcomes of a
monotone, exogenous structural model Y = 1[w·A + U > t] with U a discrete noise independent
of A (exogeneity: Y_a ⊥ A; monotonicity: w ≥ 0), averaging over the U that reproduce the
observed (a, y)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from causalign.causal.ccce import (
    SmoothedFrequency,
    causal_attribution,
    ccce_scores,
    fit_label_model,
    subsets,
)
from causalign.errors import CausalignError


class _SCM:
    """Y = 1[w·A + U > t], U uniform over ``u`` (independent of A)."""

    def __init__(self, w: list[float], t: float, u: np.ndarray) -> None:
        self.w, self.t, self.u = np.asarray(w, float), t, np.asarray(u, float)

    def outcome(self, a: np.ndarray) -> np.ndarray:
        """Y_a for every noise value (one row per U)."""
        return (a @ self.w + self.u > self.t).astype(float)

    def prob(self, a: np.ndarray) -> np.ndarray:  # P(Y=1 | A=a): the label model CCCE gets
        a = np.atleast_2d(np.asarray(a, float))
        return (a @ self.w)[:, None].__add__(self.u[None, :]).__gt__(self.t).mean(1)

    def ccce(self, a: np.ndarray, y: int, s: tuple[int, ...]) -> float:
        """E(Y_{A_S=1} − Y_{A_S=0} | A=a, Y=y) by the definition: the noise values
        consistent with the evidence, and both interventions on S for each."""
        a = np.asarray(a, float)
        consistent = self.outcome(a) == y
        hi, lo = a.copy(), a.copy()
        hi[list(s)], lo[list(s)] = 1.0, 0.0
        diff = self.outcome(hi) - self.outcome(lo)
        return float(diff[consistent].mean())


def _all_rows(p: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array(list(itertools.product([0, 1], repeat=p)), float), np.arange(2 ** p)


def test_ccce_scores_equal_the_counterfactual_definition_for_both_labels() -> None:
    """Guard: for every evidence (a, y) with P(Y=y | a) > 0 and every |S| <= 3 over four
    attributes, the code's 1 − P(Y=y | A_S=1−y, a_-S)/P(Y=y | a) equals the potential-outcome
    expectation (max abs difference 0 up to float rounding) — for y = 1 too, where the
    paper's printed A_S = 1 would give <= 0."""
    scm = _SCM([2.0, 1.5, 1.0, 0.0], t=2.0, u=np.linspace(-1.5, 1.5, 61))
    rows, _ = _all_rows(4)
    sets = subsets(4, 3)
    checked = 0
    for y in (0, 1):
        ok = np.array([scm.prob(r)[0] if y else 1 - scm.prob(r)[0] for r in rows]) > 0
        a, yy = rows[ok], np.full(int(ok.sum()), y)
        got = ccce_scores(scm, a, yy, sets)
        ref = np.array([[scm.ccce(r, y, s) for s in sets] for r in a])
        np.testing.assert_allclose(got, ref, atol=1e-12)
        checked += ref.size
    assert checked > 300
    # the attribute with weight 0 never has an effect of its own
    assert np.allclose(ccce_scores(scm, rows[:1], np.zeros(1), [(3,)]), 0.0)


def test_attribution_picks_a_subset_maximising_the_defined_ccce() -> None:
    """Guard: the chosen S's true CCCE is within tol of the best true CCCE over |S| <= 3,
    no smaller subset reaches that, and the weight-0 attribute is never in S."""
    scm = _SCM([2.0, 1.5, 1.0, 0.7, 0.0], t=2.6, u=np.linspace(-1.2, 1.2, 49))
    rows, _ = _all_rows(5)
    sets = subsets(5, 3)
    a, y = [], []
    for r in rows:
        for lab in (0, 1):
            if (scm.prob(r)[0] if lab else 1 - scm.prob(r)[0]) > 0:
                a.append(r)
                y.append(lab)
    a, y = np.array(a), np.array(y)
    tol = 0.01
    res = causal_attribution(scm, a, y, max_size=3, tol=tol)
    for i in range(len(a)):
        ref = np.array([scm.ccce(a[i], int(y[i]), s) for s in sets])
        if ref.max() <= 0:
            assert res.subset[i] == -1 and not res.r[i].any()
            continue
        chosen = tuple(np.flatnonzero(res.r[i]))
        assert scm.ccce(a[i], int(y[i]), chosen) >= ref.max() - tol - 1e-12
        smaller = [v for s, v in zip(sets, ref, strict=True) if len(s) < len(chosen)]
        assert not smaller or max(smaller) < ref.max() - tol
        assert not res.r[i, 4]


def _table(n: int, rng: np.random.Generator, p: int = 3) -> np.ndarray:
    return (rng.random((n, p)) < 0.5).astype(float)


def test_independent_attribute_scores_zero_and_is_never_attributed() -> None:
    """Guard: y = A_0 (deterministic); A_1, A_2 independent noise. Frequency model without
    smoothing: CCCE({0}) = 1 for every sample, CCCE({1}) = CCCE({2}) = 0, r = {A_0}.
    The logistic model (fitted) attributes A_0 alone in every sample too."""
    rng = np.random.default_rng(0)
    a = _table(400, rng)
    y = a[:, 0].astype(int)
    model = SmoothedFrequency(smoothing=0.0).fit(a, y)
    sc = ccce_scores(model, a, y, [(0,), (1,), (2,)])
    np.testing.assert_allclose(sc[:, 0], 1.0)
    np.testing.assert_allclose(sc[:, 1:], 0.0, atol=1e-12)
    for kind in ("frequency", "logistic"):
        res = causal_attribution(fit_label_model(a, y, kind), a, y)
        assert (res.r == np.array([True, False, False])).all(), kind


def _confounded(n: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A_1 copies A_0 in 85 % of samples (a confounded proxy, corr(A_1, y) ~0.6), A_2 is
    noise; y = A_0 with 10 % flips. Returns (a, y, flipped)."""
    rng = np.random.default_rng(1)
    a0 = (rng.random(n) < 0.5).astype(float)
    a1 = np.where(rng.random(n) < 0.85, a0, 1 - a0)
    a2 = (rng.random(n) < 0.5).astype(float)
    y = np.where(rng.random(n) < 0.9, a0, 1 - a0).astype(int)
    return np.stack([a0, a1, a2], 1), y, y != a0


def test_confounded_proxy_only_with_a_negligible_logistic_effect() -> None:
    """Guard (measured): the clean samples get r = {A_0} (100 %). The monotone logistic fit
    leaves the proxy A_1 a small positive weight (3.4e-5; the penalised gradient is 0 there,
    so it is the L1 optimum, not a stopped optimiser): in the flipped samples, which nothing
    in A explains, its CCCE of 3.0e-5 is the only positive one and A_1 is named the cause
    in 34 of 217 (by design: any positive effect counts, see test_properties'
    near-best regression). Documented here so a change of that rule is seen."""
    a, y, flipped = _confounded()
    res = causal_attribution(fit_label_model(a, y, "logistic"), a, y)
    assert (res.r[~flipped] == np.array([True, False, False])).all()
    proxy = res.r[:, 1]
    assert proxy.sum() == 34 and (proxy <= flipped).all() and not res.r[:, 2].any()
    assert (res.score[proxy] < 1e-4).all()


def test_confounded_proxy_under_the_frequency_model() -> None:
    """Guard (measured): the frequency model needs no residual weight, but its cell
    frequencies are noisy (~250 samples a cell), so larger subsets beat {A_0} by more than
    tol in some clean samples: A_0 is in every clean sample's S, A_1 and A_2 in ~22 % each
    (equal rates: the proxy is treated like the pure-noise attribute, not preferred)."""
    a, y, flipped = _confounded()
    res = causal_attribution(fit_label_model(a, y, "frequency"), a, y)
    clean = res.r[~flipped].mean(0)
    assert clean[0] == 1.0 and clean[1] < 0.3 and clean[2] < 0.3
    assert abs(clean[1] - clean[2]) < 0.05


def test_missing_values_rows_are_unknown_and_do_not_shift_the_fit() -> None:
    """Guard: NaN in a row leaves it without attribution (known False, r empty), and the
    label model is fitted on the complete rows only: the complete rows' r equals the r of
    the same rows without the NaN rows."""
    rng = np.random.default_rng(2)
    a = _table(300, rng)
    y = a[:, 0].astype(int)
    a_nan = a.copy()
    a_nan[::7, 1] = np.nan
    keep = ~np.isnan(a_nan).any(1)
    for kind in ("frequency", "logistic"):
        full = causal_attribution(fit_label_model(a_nan, y, kind), a_nan, y)
        ref = causal_attribution(fit_label_model(a[keep], y[keep], kind), a[keep], y[keep])
        assert not full.known[~keep].any() and not full.r[~keep].any()
        assert (full.subset[~keep] == -1).all()
        assert (full.r[keep] == ref.r).all()


@pytest.mark.parametrize("cols", [np.full((20, 3), np.nan)])
def test_all_nan_attributes_refused_by_fit(cols: np.ndarray) -> None:
    """Guard: every attribute value missing: one clear error, not a fit on nothing."""
    with pytest.raises(CausalignError, match="no fully annotated samples"):
        fit_label_model(cols, np.arange(20) % 2)


def test_readme_cli_table_lists_every_causal_ccce_option() -> None:
    """Regression: the README's command-line table showed `causal ccce DATA [--split train
    --json FILE]`, leaving out --model, --max-size and --tol (the settings that decide r)."""
    import re
    from pathlib import Path

    import typer

    from causalign.cli import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines()
               if line.startswith("| `causalign causal ccce DATA"))
    documented = set(re.findall(r"--[a-z][a-z-]*", row.split("` /")[0]))
    cmd = typer.main.get_command(app).commands["causal"].commands["ccce"]
    options = {o for p in cmd.params for o in p.opts if o.startswith("--")} - {"--help"}
    assert options and options <= documented, sorted(options - documented)


def test_ccce_json_keys_are_the_documented_ones(tmp_path) -> None:
    """Regression: the README named none of the keys `causal ccce --json` writes; now its
    CCCE section names each (checked on a non-synthetic dataset), and a constant attribute
    is never attributed."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_audit_causalcli_1207 import _write

    from causalign.cli import main

    rows = [(y, [float(y), float(i % 3 == 0), 1.0]) for i, y in enumerate([0, 1] * 8)]
    data = _write(tmp_path / "d", ["spiculation", "margin", "texture"], rows)
    assert main(["causal", "ccce", str(data), "--json", str(tmp_path / "c.json")]) == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**CCCE.**"):readme.index("The label rule's weights")]
    assert all(f"`{k}`" in section for k in rep), [k for k in rep if f"`{k}`" not in section]
    assert set(rep["causal_frequency"]) == {"spiculation", "margin", "texture"}
    assert rep["causal_frequency"]["spiculation"] == 1.0
    assert rep["causal_frequency"]["texture"] == 0.0  # constant: no effect
