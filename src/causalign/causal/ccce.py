"""CCCE causal attribution of binary attributes to a label (seed 000 §4.3, Zhao et al. 2023).

Given a sample's attribute evidence A = a and label Y = y, the *conditional counterfactual
causal effect* of a subset S of attributes is

    CCCE(S) := E(Y_{A_S=1} − Y_{A_S=0} | A = a, Y = y).

Under exogeneity (Y_a ⊥ A) and monotonicity (Y_a ≤ Y_a' for a ⪯ a'), it is identified from
P(Y | A) alone (Zhao et al. 2023, Thm. 2). Working both cases out:

* y = 1: Y_{A_S=1} = 1 (monotone from Y_a = 1), and
  P(Y_{A_S=0} = 1 | a, y=1) = P(Y=1 | A_S=0, a_-S) / P(Y=1 | a), so
  CCCE(S) = 1 − P(Y=1 | A_S=0, A_-S=a_-S) / P(Y=1 | A=a);
* y = 0: Y_{A_S=0} = 0, and CCCE(S) = 1 − P(Y=0 | A_S=1, A_-S=a_-S) / P(Y=0 | A=a).

One formula covers both: **CCCE(S) = 1 − P(Y=y | A_S=1−y, A_-S=a_-S) / P(Y=y | A=a)**: the
share of the evidence for y that disappears when the attributes in S are switched to the
value that argues against y. The paper prints the y = 0 case (A_S = 1) for both labels;
taken literally for y = 1 it would give CCCE ≤ 0 for every subset and no attribution.

The subset with the highest CCCE over all 1 ≤ |S| ≤ ``max_size`` (paper: 3) gives the
per-sample annotation vector r with r_S = 1 (the attributes that causally determined the
label). Among subsets whose score is within ``tol`` of the best, the smallest (and of that
size the highest-scoring) is taken: adding an attribute that does not move P(Y | A) (one
already at 1 − y, or one with no effect) never changes the score, and should not be
attributed; and P(Y | A) fitted on annotations is often nearly deterministic, so many
subsets score 1 − 10⁻⁴ against a maximum of 1 − 10⁻⁶ (default tol 0.01). A sample for which
no subset has a positive effect (every CCCE ≤ 0: y = 1 with every attribute already 0, or a
P(Y | A) fitted on a single class, which is constant) gets no attribution (r all False,
``subset`` −1) rather than the first subset of an all-way tie.

P(Y | A) comes from the training annotations, by one of two models:

* `MonotoneLogistic` — logistic regression with non-negative weights (the monotonicity
  assumption built in), fitted by L-BFGS-B with a small L1 penalty (linear on the
  non-negative orthant, so it is exact and smooth there);
* `SmoothedFrequency` — per-configuration frequencies of Y = 1 shrunk towards the overall
  rate (Laplace-style, ``smoothing`` pseudo-counts); assumption-free but needs data in every
  cell it is asked about.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import norm

from ..errors import CausalignError, ConfigError

__all__ = [
    "CCCEResult", "MonotoneLogistic", "SmoothedFrequency", "Subsets", "TrueProbit",
    "attribution_report", "causal_attribution", "ccce_scores", "fit_label_model",
    "monotonicity_check", "subsets",
]


# --------------------------------------------------------------------------- P(Y | A) models


class LabelModel(Protocol):
    """What CCCE needs of a label model: P(Y=1 | a) for rows of binary attributes."""

    def prob(self, a: np.ndarray) -> np.ndarray: ...


@dataclass
class MonotoneLogistic:
    """P(Y=1 | a) = σ(b + w·a) with w ≥ 0, fitted by penalised maximum likelihood."""

    l1: float = 1e-3  # L1 on w (mean log-loss units): sends useless attributes to exactly 0
    l2: float = 0.0
    weights: np.ndarray | None = None
    bias: float = 0.0

    def fit(self, a: np.ndarray, y: np.ndarray) -> MonotoneLogistic:
        """Fit w ≥ 0 and b on rows of binary attributes ``a`` (n, p) and labels ``y`` ∈ {0,1}
        (L-BFGS-B); returns self."""
        a = np.asarray(a, np.float64)
        y = np.asarray(y, np.float64)
        n, p = a.shape
        if n == 0:
            raise CausalignError("CCCE: no fully annotated samples to fit P(Y | A) on")

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:p], theta[p]
            z = a @ w + b
            # log(1 + e^z) − y z, stable
            nll = np.logaddexp(0.0, z) - y * z
            r = expit(z) - y
            f = nll.mean() + self.l1 * w.sum() + 0.5 * self.l2 * (w @ w)
            g = np.concatenate([a.T @ r / n + self.l1 + self.l2 * w, [r.mean()]])
            return float(f), g

        bounds = [(0.0, None)] * p + [(None, None)]
        res = minimize(loss, np.zeros(p + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
        self.weights = res.x[:p]
        self.bias = float(res.x[p])
        return self

    def prob(self, a: np.ndarray) -> np.ndarray:
        """P(Y=1 | a) for each row of ``a`` (n, p)."""
        if self.weights is None:
            raise RuntimeError("MonotoneLogistic: call fit() first")
        return expit(np.asarray(a, np.float64) @ self.weights + self.bias)

    def index_weights(self) -> np.ndarray | None:
        """w ≥ 0 with P(Y=1 | a) increasing in w·a alone (`causal_attribution`'s top-k
        search); None before fit (or for weights set by hand with a negative entry)."""
        if self.weights is None or (np.asarray(self.weights) < 0).any():
            return None
        return self.weights


@dataclass
class SmoothedFrequency:
    """P(Y=1 | a) = (n₁(a) + k·π) / (n(a) + k): the configuration's frequency shrunk towards
    the overall rate π with k = ``smoothing`` pseudo-counts (unseen configurations get π)."""

    smoothing: float = 1.0
    table: dict[tuple[int, ...], tuple[float, float]] = field(default_factory=dict)
    prior: float = 0.5

    def fit(self, a: np.ndarray, y: np.ndarray) -> SmoothedFrequency:
        """Count each attribute configuration of ``a`` (n, p) and its labels ``y`` ∈ {0,1};
        returns self."""
        a = np.asarray(a)
        y = np.asarray(y, np.float64)
        if len(a) == 0:
            raise CausalignError("CCCE: no fully annotated samples to fit P(Y | A) on")
        self.prior = float(y.mean())
        table: dict[tuple[int, ...], list[float]] = {}
        for row, label in zip(_binary(a), y, strict=True):
            cell = table.setdefault(tuple(int(v) for v in row), [0.0, 0.0])
            cell[0] += label
            cell[1] += 1.0
        self.table = {k: (v[0], v[1]) for k, v in table.items()}
        return self

    # packed-bytes view of ``table`` for one width p: (the table it was built from, p, lut)
    _lut: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def prob(self, a: np.ndarray) -> np.ndarray:
        """P(Y=1 | a) for each row of ``a`` (n, p); unseen configurations get the prior."""
        k, pi = self.smoothing, self.prior
        rows = _binary(np.asarray(a))
        if not len(rows):  # reshape(0, -1) raised: no rows scored as nothing, as before
            return np.empty(0)
        rows = rows.reshape(len(rows), -1)
        p = rows.shape[1]
        # rows looked up by their packed bytes: a tuple of p Python ints per row cost ~10 µs
        # (p = 20) to ~50 µs (p = 100), and CCCE's enumeration calls this for every subset
        # (160 s for 20 samples over 100 attributes; the 5e7-evaluation cap allowed hours)
        if self._lut is None or self._lut[0] is not self.table or self._lut[1] != p:
            lut = {np.packbits(np.array(key, np.uint8)).tobytes(): cell
                   for key, cell in self.table.items() if len(key) == p}
            self._lut = (self.table, p, lut)
        lut = self._lut[2]
        packed = np.packbits(rows.astype(np.uint8), axis=1)
        buf, width = packed.tobytes(), packed.shape[1]
        cells = np.array([lut.get(buf[i * width:(i + 1) * width], (0.0, 0.0))
                          for i in range(len(rows))], np.float64).reshape(len(rows), 2)
        n1, n = cells[:, 0], cells[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n + k > 0, (n1 + k * pi) / (n + k), pi)


@dataclass
class TrueProbit:
    """The synthetic benchmark's own rule P(Y=1 | a) = Φ((w·a − t)/σ) (ground truth)."""

    weights: np.ndarray
    threshold: float
    noise: float

    def prob(self, a: np.ndarray) -> np.ndarray:
        return norm.cdf((np.asarray(a, np.float64) @ self.weights - self.threshold) / self.noise)

    def index_weights(self) -> np.ndarray | None:
        """w (P(Y=1 | a) increases in w·a) where w ≥ 0, else None (not monotone)."""
        w = np.asarray(self.weights, np.float64)
        return w if self.noise > 0 and (w >= 0).all() else None


LABEL_MODELS = ("logistic", "frequency")


def _check_data(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a (n, p) float64, y (n,) int64 in {0, 1}) or one clear error."""
    a = np.asarray(a, np.float64)
    y = np.asarray(y)
    if a.ndim != 2 or a.shape[1] == 0:
        raise CausalignError(f"CCCE needs attributes shaped (samples, attributes) with at "
                             f"least one attribute, got shape {a.shape}")
    if y.shape != (a.shape[0],):
        raise CausalignError(f"CCCE needs one label per row of attributes ({a.shape[0]}), got "
                             f"shape {y.shape}")
    with np.errstate(invalid="ignore"):
        binary = np.isin(y, (0, 1)) if y.dtype.kind in "biuf" else np.zeros(y.shape, bool)
    if not binary.all():
        raise CausalignError("CCCE needs a binary label (0/1)")
    return a, y.astype(np.int64)


def fit_label_model(a: np.ndarray, y: np.ndarray, kind: str = "logistic",
                    **kw: Any) -> MonotoneLogistic | SmoothedFrequency:
    """Fit P(Y | A) on fully annotated rows (rows with a NaN are dropped); ``kw`` go to the
    model (`MonotoneLogistic`'s l1, l2; `SmoothedFrequency`'s smoothing)."""
    a, y = _check_data(a, y)
    keep = ~np.isnan(a).any(1)
    a, y = _binary(a[keep]), np.asarray(y)[keep]
    if kind == "logistic":
        return MonotoneLogistic(**kw).fit(a, y)
    if kind == "frequency":
        return SmoothedFrequency(**kw).fit(a, y)
    raise CausalignError(f"unknown CCCE label model '{kind}'; valid: {', '.join(LABEL_MODELS)}")


def _penalised_logistic(a: np.ndarray, y: np.ndarray, nonneg: np.ndarray,
                        l2: float = 1e-3) -> tuple[float, np.ndarray]:
    """(mean log-loss without the penalty, w) at the penalised logistic fit with w_j ≥ 0
    where ``nonneg``. The likelihood-ratio tests compare log-likelihoods: the penalised
    losses differ by the L2 term alone where the constraint costs no fit (an attribute
    coded as the complement of another), and times 2n that read as a violation."""
    n, p = a.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:p], theta[p]
        z = a @ w + b
        r = expit(z) - y
        f = (np.logaddexp(0.0, z) - y * z).mean() + 0.5 * l2 * (w @ w)
        return float(f), np.concatenate([a.T @ r / n + l2 * w, [r.mean()]])

    bounds = [(0.0, None) if c else (None, None) for c in nonneg] + [(None, None)]
    res = minimize(loss, np.zeros(p + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
    w, b = res.x[:p], res.x[p]
    z = a @ w + b
    return float((np.logaddexp(0.0, z) - y * z).mean()), w


def monotonicity_check(a: np.ndarray, y: np.ndarray, names: list[str],
                       level: float = 0.05, max_tested: int = 20) -> dict:
    """Do the annotations contradict CCCE's monotonicity (seed 000 §4.3: switching any
    attribute from 0 to 1 never lowers P(Y=1))? Likelihood-ratio tests of logistic models
    (small L2, so a separable label stays finite): all weights ≥ 0 against unconstrained
    (``p_value``); where that is rejected at ``level``, each attribute with a negative
    unconstrained weight (the ``max_tested`` most negative) by itself (its weight ≥ 0
    against free, the others free, one degree of freedom; Holm's step-down at ``level`` over
    the negatively weighted attributes, family-wise). ``violating``: those rejected,
    name → unconstrained weight. Their CCCE is ≤ 0 by construction, so they are never
    attributed however strongly they predict the label (LIDC's calcification, a benign
    sign, as imported: 1 = calcified); recode them as 1 − a."""
    from scipy.stats import chi2

    a, y = _check_data(a, y)
    keep = ~np.isnan(a).any(1)
    ab, yk = _binary(a[keep]).astype(np.float64), y[keep].astype(np.float64)
    out: dict = {"p_value": None, "violating": {}}
    n, p = ab.shape
    if n < 2 or len(np.unique(yk)) < 2:
        return out
    free_loss, w = _penalised_logistic(ab, yk, np.zeros(p, bool))
    neg = np.flatnonzero(w < 0)
    if not len(neg):
        return out
    mono_loss, _ = _penalised_logistic(ab, yk, np.ones(p, bool))
    out["p_value"] = float(chi2.sf(max(2.0 * n * (mono_loss - free_loss), 0.0), len(neg)))
    if out["p_value"] >= level:
        return out
    tested = []
    for j in neg[np.argsort(w[neg], kind="stable")][:max_tested]:
        one = np.zeros(p, bool)
        one[j] = True
        loss_j, _ = _penalised_logistic(ab, yk, one)
        tested.append((float(chi2.sf(max(2.0 * n * (loss_j - free_loss), 0.0), 1)), int(j)))
    # Holm's step-down over every negatively weighted attribute (the untested ones count):
    # each at `level` alone flagged 0.59 null attributes per run beside one true violator
    # (30 attributes, n 400), every one a recoding suggestion the user would act on
    for rank, (pv, j) in enumerate(sorted(tested)):
        if pv >= level / (len(neg) - rank):
            break
        out["violating"][names[j]] = float(w[j])
    return out


# --------------------------------------------------------------------------- CCCE


def subsets(p: int, max_size: int = 3) -> list[tuple[int, ...]]:
    """All non-empty subsets of range(p) with at most ``max_size`` elements, by size."""
    # an integer: 2.5 failed in range() with a TypeError naming no option
    if isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral) or max_size < 1:
        raise ConfigError(f"CCCE max subset size must be an integer >= 1, got {max_size!r}")
    return [s for k in range(1, min(max_size, p) + 1) for s in itertools.combinations(range(p), k)]


class Subsets(Sequence):
    """`subsets(p, max_size)` without building the list: the same order (by size, then
    lexicographic), indexable, with `rank` its inverse. CUB's 312 attributes have 5·10⁶
    subsets of size ≤ 3; listing them took seconds and ~0.5 GB for an index table."""

    def __init__(self, p: int, max_size: int = 3) -> None:
        subsets(0, max_size)  # the same check of max_size
        self.p, self.k = int(p), min(int(max_size), int(p))
        # offsets[s]: index of the first subset of size s
        self.offsets = [0]
        for size in range(1, self.k + 1):
            self.offsets.append(self.offsets[-1] + math.comb(self.p, size))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for size in range(1, self.k + 1):
            yield from itertools.combinations(range(self.p), size)

    @overload
    def __getitem__(self, j: int) -> tuple[int, ...]: ...
    @overload
    def __getitem__(self, j: slice) -> list[tuple[int, ...]]: ...

    def __getitem__(self, j: int | slice) -> tuple[int, ...] | list[tuple[int, ...]]:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = int(j)
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(f"subset index {j} out of range ({len(self)} subsets)")
        size = next(s for s in range(1, self.k + 1) if j < self.offsets[s])
        j -= self.offsets[size - 1]
        out, v = [], 0
        for left in range(size, 0, -1):  # unrank: the lexicographic rank j of the combination
            while (c := math.comb(self.p - 1 - v, left - 1)) <= j:
                j -= c
                v += 1
            out.append(v)
            v += 1
        return tuple(out)

    def __eq__(self, other: object) -> bool:
        # CCCEResult.sets was a list: `res.sets == subsets(p, k)` turned False silently
        if isinstance(other, Subsets):
            return (self.p, self.k) == (other.p, other.k)
        if isinstance(other, list | tuple):
            return len(other) == len(self) and all(
                x == y for x, y in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"Subsets(p={self.p}, max_size={self.k})"

    def rank(self, comb: Sequence[int]) -> int:
        """Index of the sorted combination ``comb`` (1 ≤ len ≤ max_size)."""
        c = sorted(int(v) for v in comb)
        size = len(c)
        # an empty, repeated, out-of-range or too large combination returned another
        # subset's index (or len(self)) without a word
        if not 1 <= size <= self.k or len(set(c)) != size or c[0] < 0 or c[-1] >= self.p:
            raise ValueError(f"not a subset of range({self.p}) with 1..{self.k} distinct "
                             f"elements: {tuple(comb)!r}")
        j, prev = self.offsets[size - 1], -1
        for i, v in enumerate(c):
            j += sum(math.comb(self.p - 1 - u, size - 1 - i) for u in range(prev + 1, v))
            prev = v
        return j


# past this many (sample, subset) evaluations a label model without the index form is refused
# (`causal_attribution`): ~1e8 took minutes and GBs of scores
_MAX_EVALUATIONS = 50_000_000


def ccce_scores(model: LabelModel, a: np.ndarray, y: np.ndarray,
                sets: list[tuple[int, ...]]) -> np.ndarray:
    """CCCE(S) for each sample (rows of binary ``a``, labels ``y`` ∈ {0,1}) and each S in
    ``sets``: 1 − P(Y=y | A_S=1−y, A_-S=a_-S) / P(Y=y | A=a). Shape (n, len(sets)).

    NaN for a sample whose label the model deems impossible (P(Y=y | A=a) = 0): the
    conditional effect is undefined there. It used to divide by the smallest float instead,
    giving every subset CCCE 1 and naming the first attribute the cause (a frequency model
    with ``smoothing=0``, a single-class fit, or Φ underflowing in the true probit)."""
    a, y = _check_data(a, y)
    a = _binary(a).astype(np.float64)
    p1 = model.prob(a)
    base = np.where(y == 1, p1, 1.0 - p1)
    defined = base > 0
    n, p = a.shape
    sets = list(sets)
    out = np.empty((n, len(sets)))
    flip = (1 - y).astype(np.float64)
    # subsets scored a chunk at a time, one model.prob call per chunk: one call per subset
    # spent ~100 µs of call overhead on a few rows (the frequency model over CUB's subsets)
    chunk = max(1, 1_000_000 // max(1, n * p))
    for start in range(0, len(sets), chunk):
        part = sets[start:start + chunk]
        a2 = np.repeat(a[None], len(part), axis=0)  # (subsets, n, p)
        for j, s in enumerate(part):
            a2[j][:, list(s)] = flip[:, None]
        q1 = model.prob(a2.reshape(-1, p)).reshape(len(part), n).T
        q = np.where(y[:, None] == 1, q1, 1.0 - q1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, start:start + len(part)] = np.where(
                defined[:, None], 1.0 - q / np.where(defined, base, 1.0)[:, None], np.nan)
    return out


@dataclass
class CCCEResult:
    """Per-sample attribution: ``r`` (n, p) bool (r_S = 1 for the chosen S), ``subset``
    index into ``sets`` (−1: none; missing evidence, no subset with a positive effect, or a
    label the model deems impossible), ``score`` the chosen CCCE (the best, ≤ 0, where none
    has an effect; NaN without evidence or where P(Y=y | A=a) = 0, as CCCE is undefined
    there), ``known`` rows that had full evidence."""

    r: np.ndarray
    subset: np.ndarray
    score: np.ndarray
    known: np.ndarray
    sets: Sequence[tuple[int, ...]]  # `Subsets` (lazy, in `subsets`' order)


def causal_attribution(model: LabelModel, a: np.ndarray, y: np.ndarray, max_size: int = 3,
                       tol: float = 0.01) -> CCCEResult:
    """argmax_S CCCE(S) per sample (the smallest S among those within ``tol`` of the best,
    highest score among those) → r. ``tol`` defaults to 0.01 as in the CLI and hier-align
    (it was 1e-6 here: on 60 synthetic samples 55 rows got another, larger S than
    `causalign causal ccce` reported for the same data). Rows with any missing
    (NaN) attribute have no evidence A = a: r is all False and ``known`` False there. Rows
    where every CCCE is ≤ 0 (no subset has an effect) get r all False and ``subset`` −1."""
    # a negative (or NaN) tol admits no subset at all, and argmax over nothing silently named
    # the first attribute as every sample's cause; the CLI checked --tol, the API did not
    if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"CCCE tol must be a finite number >= 0, got {tol!r}")
    a, y = _check_data(a, y)
    n, p = a.shape
    sets = Subsets(p, max_size)  # checks max_size
    known = ~np.isnan(a).any(1)
    r = np.zeros((n, p), bool)
    subset = np.full(n, -1)
    score = np.full(n, np.nan)
    weights = getattr(model, "index_weights", lambda: None)()
    if known.any() and weights is not None:
        _top_k_attribution(model, np.asarray(weights, np.float64), a, y, known, sets, tol,
                           r, subset, score)
    elif known.any():
        if int(known.sum()) * len(sets) > _MAX_EVALUATIONS:
            raise CausalignError(
                f"CCCE over {p} attributes enumerates {len(sets)} subsets of size <= "
                f"{sets.k} for {int(known.sum())} samples: too many for a label model "
                f"without the logistic form; use the logistic model (exact top-k search) "
                f"or a smaller max subset size")
        scores = ccce_scores(model, a[known], y[known], list(sets))
        best = scores.max(1, keepdims=True)
        # smallest size with a subset within tol of the best; the best score of that size
        size = np.array([len(s) for s in sets])
        # only subsets with an effect (> 0) qualify: with tol above the best score a
        # smaller subset with CCCE 0 (or < 0) was "near" and named the cause (a frequency
        # model where each attribute alone is redundant and only the pair matters)
        near = (scores >= best - tol) & (scores > 0)
        smallest = np.where(near, size[None, :], np.iinfo(np.int64).max).min(1, keepdims=True)
        pick = np.argmax(np.where(near & (size[None, :] == smallest), scores, -np.inf), axis=1)
        # all scores ≤ 0: every subset ties (typically at exactly 0), and argmax would name
        # the first attribute as the cause of a label nothing in A moves
        effect = best[:, 0] > 0
        rows = np.flatnonzero(known)
        subset[rows] = np.where(effect, pick, -1)
        score[rows] = np.where(effect, scores[np.arange(len(rows)), pick], best[:, 0])
        for i, j in zip(rows[effect], pick[effect], strict=True):
            r[i, list(sets[j])] = True
    return CCCEResult(r=r, subset=subset, score=score, known=known, sets=sets)


def _top_k_attribution(model: LabelModel, w: np.ndarray, a: np.ndarray, y: np.ndarray,
                       known: np.ndarray, sets: Subsets, tol: float, r: np.ndarray,
                       subset: np.ndarray, score: np.ndarray) -> None:
    """`causal_attribution`'s choice without enumerating subsets, for P(Y=1 | a) increasing
    in w·a alone (w ≥ 0: the monotone logistic model, the true probit). Switching S to 1 − y
    moves w·a by Σ_{i∈S} c_i with c_i = w_i·a_i (y = 1) or w_i·(1 − a_i) (y = 0), c ≥ 0, and
    CCCE grows with that shift: the best subset of each size s is the s largest c_i (ties:
    lowest index, as the enumeration's order), so only max_size candidates per sample are
    scored, each by the model itself (the same numbers as `ccce_scores`). Fills r, subset,
    score in place."""
    rows = np.flatnonzero(known)
    ab = _binary(a[rows]).astype(np.float64)
    yk = y[rows]
    c = np.where(yk[:, None] == 1, ab, 1.0 - ab) * w[None, :]
    order = np.argsort(-c, axis=1, kind="stable")  # ties: the lower index first
    p1 = model.prob(ab)
    base = np.where(yk == 1, p1, 1.0 - p1)
    defined = base > 0
    flip = (1 - yk).astype(np.float64)
    k = sets.k
    scores = np.empty((len(rows), k))
    for s in range(1, k + 1):
        a2 = ab.copy()
        top = order[:, :s]
        np.put_along_axis(a2, top, np.repeat(flip[:, None], s, 1), axis=1)
        q1 = model.prob(a2)
        q = np.where(yk == 1, q1, 1.0 - q1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores[:, s - 1] = np.where(defined, 1.0 - q / np.where(defined, base, 1.0),
                                        np.nan)
    # a model deeming the label impossible (NaN rows): no attribution, score NaN, as before
    best = np.nanmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
    near = (scores >= best[:, None] - tol) & (scores > 0)
    effect = best > 0
    for i in np.flatnonzero(effect):
        s = int(np.flatnonzero(near[i])[0]) + 1  # smallest near size; its best = top-s
        comb = sorted(int(v) for v in order[i, :s])
        subset[rows[i]] = sets.rank(comb)
        score[rows[i]] = scores[i, s - 1]
        r[rows[i], comb] = True
    score[rows[~effect]] = np.where(defined[~effect], best[~effect], np.nan)


def _binary(a: np.ndarray) -> np.ndarray:
    """Attributes as 0/1 (values > 0.5 count as present)."""
    return (np.asarray(a, np.float64) > 0.5).astype(np.int64)


# --------------------------------------------------------------------------- report


def attribution_report(attributes: np.ndarray, labels: np.ndarray, names: list[str], *,
                       kind: str = "logistic", max_size: int = 3, tol: float = 0.01,
                       truth: dict | None = None) -> dict:
    """How often each attribute is attributed as causal; with ``truth`` (the synthetic
    benchmark's ``causal_weights``, ``threshold``, ``noise``) also how often the chosen S
    holds only truly causal attributes and how often it equals the argmax under the true
    P(Y | A)."""
    attributes, labels = _check_data(attributes, labels)
    if len(names) != attributes.shape[1]:
        raise CausalignError(f"CCCE: {len(names)} attribute names for "
                             f"{attributes.shape[1]} attribute columns")
    model = fit_label_model(attributes, labels, kind)
    res = causal_attribution(model, attributes, labels, max_size=max_size, tol=tol)
    k = res.known
    n_known = int(k.sum())
    rk, yk = res.r[k], labels[k]
    out: dict = {
        "label_model": kind, "max_size": max_size, "n": int(len(labels)), "n_known": n_known,
        "mean_subset_size": float(rk.sum(1).mean()) if n_known else None,
        "n_no_effect": int((res.subset[k] < 0).sum()),  # no subset moves P(Y | A)
        "mean_score": float(np.nanmean(res.score)) if n_known else None,
        "causal_frequency": {nm: float(rk[:, j].mean()) if n_known else None
                             for j, nm in enumerate(names)},
        "causal_frequency_by_label": {
            str(c): {nm: float(rk[yk == c, j].mean()) for j, nm in enumerate(names)}
            for c in (0, 1) if (yk == c).any()},
    }
    if isinstance(model, MonotoneLogistic):
        out["fitted_weights"] = {nm: float(w) for nm, w in zip(names, model.weights,
                                                               strict=True)}
        out["fitted_bias"] = model.bias
    mono = monotonicity_check(attributes, labels, names)
    out["monotonicity_p_value"] = mono["p_value"]
    out["monotonicity_violating"] = mono["violating"]
    if truth is not None and n_known:
        w = np.array([float(truth["causal_weights"][nm]) for nm in names])
        causal = w > 0
        out["truly_causal"] = [nm for nm, c in zip(names, causal, strict=True) if c]
        # over the samples that got a subset: an empty S (no effect) holds nothing, so it
        # would count as "only truly causal" without saying anything
        only_causal = ~(rk & ~causal).any(1)[res.subset[k] >= 0]
        out["fraction_subset_only_truly_causal"] = (float(only_causal.mean())
                                                    if len(only_causal) else None)
        true_model = TrueProbit(w, float(truth["threshold"]), float(truth["noise"]))
        ref = causal_attribution(true_model, attributes[k], yk, max_size=max_size, tol=tol)
        out["fraction_equal_to_true_model_argmax"] = float((ref.r == rk).all(1).mean())
        out["fraction_true_model_subset_contained"] = float(
            (~(ref.r & ~rk)).all(1).mean())
        out["true_model_causal_frequency"] = {nm: float(ref.r[:, j].mean())
                                              for j, nm in enumerate(names)}
    return out


def dataset_attribution_report(data: str | Path, split: str = "train", *, kind: str = "logistic",
                               max_size: int = 3, tol: float = 0.01) -> dict:
    """`attribution_report` for a dataset folder's split; the synthetic benchmark's
    dataset.yaml supplies the true causal weights, threshold and noise of its label rule."""
    from ..data.format import read_manifest, read_meta

    meta = read_meta(data)
    if not meta.attributes:
        raise CausalignError(f"{data}: the dataset declares no attributes")
    if len(meta.classes) != 2:
        raise CausalignError(f"CCCE needs a binary label; {data} has {len(meta.classes)} "
                             f"classes")
    recs = [r for r in read_manifest(data, meta) if r.split == split]
    if not recs:
        raise CausalignError(f"{data}: split '{split}' is empty")
    a = np.array([r.attributes for r in recs], np.float64).reshape(len(recs), -1)
    y = np.array([r.label for r in recs])
    info = meta.info or {}
    truth = None
    if "causal_weights" in info and "threshold" in info:
        truth = {"causal_weights": info["causal_weights"], "threshold": info["threshold"],
                 "noise": (info.get("config") or {}).get("label_noise", 0.3)}
    rep = attribution_report(a, y, list(meta.attributes), kind=kind, max_size=max_size,
                             tol=tol, truth=truth)
    rep.update(data=str(data), split=split, tol=tol)
    return rep


def format_attribution_report(rep: dict) -> str:
    """Markdown: per attribute how often CCCE attributes it (by label), fitted and true
    weights; then the recovery fractions on the synthetic benchmark."""
    names = list(rep["causal_frequency"])
    weights = rep.get("fitted_weights", {})
    truth = rep.get("true_model_causal_frequency")
    head = ["attribute", "causal (all)", "causal (y=0)", "causal (y=1)"]
    if weights:
        head.append("fitted weight")
    if truth is not None:
        head.append("causal under the true rule")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = rep.get("causal_frequency_by_label", {})
    def freq(value: float | None) -> str:  # a label absent from the split has no frequency
        return "–" if value is None else f"{value:.3f}"

    for nm in names:
        cells = [nm, freq(rep["causal_frequency"][nm]), freq(by.get("0", {}).get(nm)),
                 freq(by.get("1", {}).get(nm))]
        if weights:
            cells.append(f"{weights[nm]:.2f}")
        if truth is not None:
            cells.append(f"{truth[nm]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    size = rep["mean_subset_size"]
    text = (f"CCCE attribution ({rep['label_model']} P(Y|A), |S| <= {rep['max_size']}) on "
            f"{rep['n_known']}/{rep['n']} fully annotated samples; mean |S| = "
            f"{'–' if size is None else f'{size:.2f}'}\n\n" + "\n".join(lines) + "\n")
    if len(by) == 1 and rep["n_known"]:
        # P(Y | A) fitted on one class is constant: "no subset has an effect" said no why
        text += (f"\nevery fully annotated sample has label {next(iter(by))}: P(Y|A) fitted "
                 f"on one class is constant, so CCCE attributes nothing here\n")
    if rep.get("monotonicity_violating"):
        bad = ", ".join(f"{nm} (unconstrained weight {w:.2f})"
                        for nm, w in rep["monotonicity_violating"].items())
        text += (f"\nwarning: the labels contradict CCCE's monotonicity assumption (p = "
                 f"{rep['monotonicity_p_value']:.2g}); present, these attributes lower "
                 f"P(Y=1), so CCCE never attributes them: {bad}; recode each as 1 - value if "
                 f"it is a protective sign\n")
    if rep.get("n_no_effect"):
        text += (f"\n{rep['n_no_effect']} sample(s) where no subset has an effect on P(Y|A) "
                 f"got no attribution\n")
    if "fraction_subset_only_truly_causal" in rep:
        only = rep["fraction_subset_only_truly_causal"]
        text += (f"\ntruly causal: {', '.join(rep['truly_causal'])}\n"
                 f"chosen S holds only truly causal attributes: "
                 f"{'–' if only is None else f'{only:.3f}'} of the attributed samples\n"
                 f"chosen S equals the argmax under the true P(Y|A): "
                 f"{rep['fraction_equal_to_true_model_argmax']:.3f} of samples\n")
    return text
