"""Bootstrap intervals of the Brier score, the ECE and the localisation and deletion means
(`bootstrap_ci(..., per_sample=...)`, `causalign evaluate --bootstrap N`): CAM precision is
the number paper 000's tables compare, and it had no interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import InputError
from causalign.metrics import bootstrap_ci, classification_metrics
from causalign.metrics.classification import _resample_counts


def _probs(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1, (n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p, y


def _per_resample_reference(probs, labels, per_sample, n, seed):
    """Each resample expanded into its drawn samples (np.repeat of the draw counts) and its
    metrics computed by `classification_metrics` and a plain mean: the reference the
    vectorised weighted sums must reproduce."""
    order = np.argsort(labels, kind="stable")
    p, y = probs[order], labels[order]
    extra = {k: v[order] for k, v in per_sample.items()}
    ref = {name: [] for name in ("brier", "ece", "accuracy", *extra)}
    for w in _resample_counts(y, n, seed):
        for row in w.astype(np.int64):
            idx = np.repeat(np.arange(len(y)), row)
            m = classification_metrics(p[idx], y[idx])
            for name in ("brier", "ece", "accuracy"):
                ref[name].append(m[name])
            for name, v in extra.items():
                drawn = v[idx][~np.isnan(v[idx])]
                ref[name].append(drawn.mean() if len(drawn) else np.nan)
    return {k: np.array(v) for k, v in ref.items()}


@pytest.mark.parametrize("n_classes", [2, 3])
def test_bootstrap_calibration_and_per_sample_intervals_match_expanded_resamples(n_classes):
    """Brier, ECE and a per-sample mean counted on a subset: the percentiles of the same
    resamples computed one by one on the drawn samples (a weighted-sum slip, e.g. the ECE
    gap's absolute value taken per sample rather than per bin, or a subset mean divided by
    all draws, fails here)."""
    probs, y = _probs(120, n_classes, seed=n_classes)
    rng = np.random.default_rng(5)
    cam = np.where(rng.random(120) < 0.3, rng.random(120), np.nan)  # 30 % annotated
    dele = rng.normal(0.2, 0.1, 120)
    got = bootstrap_ci(probs, y, n=150, seed=11, per_sample={"cam": cam, "del": dele})
    ref = _per_resample_reference(probs, y, {"cam": cam, "del": dele}, 150, 11)
    for name in ("brier", "ece", "accuracy", "cam", "del"):
        vals = ref[name][~np.isnan(ref[name])]
        want = np.percentile(vals, [2.5, 97.5])
        np.testing.assert_allclose(got["ci95"][name], want, rtol=0, atol=1e-12,
                                   err_msg=name)
    assert "undefined" not in got["bootstrap"]  # 36 annotated: every resample draws one


def test_resamples_without_a_counted_sample_are_counted_and_left_out():
    """A metric counted on one sample of a 5-sample class: the resamples that miss it have
    no mean; they are left out of the percentiles and their number is reported."""
    probs, y = _probs(60, 2, seed=0)
    y[:5], y[5:] = 0, 1
    only = np.full(60, np.nan)
    only[2] = 0.75
    got = bootstrap_ci(probs, y, n=200, seed=1, per_sample={"one": only})
    ref = _per_resample_reference(probs, y, {"one": only}, 200, 1)["one"]
    missed = int(np.isnan(ref).sum())
    assert 30 < missed < 110  # (4/5)^5 = 0.33 of 200
    assert got["bootstrap"]["undefined"] == {"one": missed}
    assert got["ci95"]["one"] == [0.75, 0.75]
    nothing = bootstrap_ci(probs, y, n=100, per_sample={"none": np.full(60, np.nan)})
    assert nothing["ci95"]["none"] is None
    assert nothing["bootstrap"]["undefined"] == {"none": 100}


def test_classification_intervals_unchanged_by_per_sample_metrics():
    """The per-sample metrics use the same draws without consuming random numbers: the
    classification intervals are the same with and without them."""
    probs, y = _probs(200, 2, seed=4)
    plain = bootstrap_ci(probs, y, n=300, seed=2)["ci95"]
    more = bootstrap_ci(probs, y, n=300, seed=2, per_sample={"x": np.linspace(0, 1, 200)})
    assert {k: more["ci95"][k] for k in plain} == plain


@pytest.mark.parametrize("bad, words", [
    ({"accuracy": np.zeros(50)}, "clashes"),
    ({"cam": np.zeros(49)}, "expected (50,)"),
    ({"cam": np.full(50, np.inf)}, "inf"),
])
def test_bad_per_sample_metrics_are_refused(bad, words):
    probs, y = _probs(50, 2, seed=0)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        bootstrap_ci(probs, y, n=100, per_sample=bad)


def test_cli_evaluate_bootstrap_gives_localisation_and_deletion_intervals(tiny_data, tmp_path,
                                                                         capsys):
    """`evaluate --bootstrap` also gives CAM precision's, the mask metrics' and each
    deletion fraction's interval, each around its point estimate, and the point estimates
    are those of an evaluation without --bootstrap."""
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="oracle", epochs=1, batch_size=16, width=4, seed=0),
          run, progress=False)
    capsys.readouterr()
    plain, boot = tmp_path / "plain.json", tmp_path / "boot.json"
    for out, extra in ((plain, []), (boot, ["--bootstrap", "200"])):
        rc = main(["evaluate", str(run), "--out", str(out), "--no-progress", *extra])
        assert rc in (0, None), capsys.readouterr().err
    a, b = json.loads(plain.read_text()), json.loads(boot.read_text())
    assert {k: v for k, v in b.items() if k not in ("ci95", "bootstrap")} == a
    ci = b["ci95"]
    for name in ("cam_precision", "cam_precision_mask", "cam_mass_in_mask", "saliency_iou",
                 "saliency_dice"):
        lo, hi = ci[name]
        assert lo <= a[name] <= hi and hi - lo > 0, name
    assert set(ci["deletion"]) == set(a["deletion"])
    for frac, (lo, hi) in ci["deletion"].items():
        assert lo <= a["deletion"][frac] <= hi, frac
