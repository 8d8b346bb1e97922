"""Mutation audit of this session's new code (evaluate --temperature / pcal_ columns, the
clinical table's PPV/NPV and prevalence in tables.md, the ROC-over-seeds figure and
`roc_at`, `predict_and_attribute(target=)`, `read_manifest(limit=)`, `causal pc
--progress`): behaviours the earlier tests let slip."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import test_operating_point
from sklearn.metrics import roc_auc_score, roc_curve
from test_audit_repclin_1207q import _random_split, _run
from test_roc_band import _polyline

from causalign.metrics import roc_at
from causalign.report import clinical
from causalign.report.figures import roc_seeds_figure

GRID = np.linspace(0.0, 1.0, 101)


def _sk_at_grid(p: np.ndarray, y: np.ndarray, positive: int) -> np.ndarray:
    """Class ``positive``'s one-vs-rest curve at the grid, by scikit-learn's points and by
    hand (no causalign code)."""
    fpr, tpr, _ = roc_curve(y == positive, p[:, positive], drop_intermediate=False)
    return np.array([_polyline(fpr, tpr, g) for g in GRID])


@pytest.mark.parametrize("classes, positive", [(2, 0), (3, 0), (3, 2)])
def test_roc_at_draws_the_class_asked_for(classes, positive):
    """`roc_at(p, y, positive=c)` is class c's curve against the rest, not class 1's (every
    caller so far used the default). Kills `roc_at` passing class 1 to `_grid_curves`
    whatever ``positive`` says."""
    p, y = _random_split(np.random.default_rng(11), 80, classes)
    y = np.asarray(y)
    got = roc_at(p, y, positive=positive)
    np.testing.assert_allclose(got, _sk_at_grid(p, y, positive), atol=1e-12)
    # and it is not class 1's curve (the data make them differ)
    assert not np.allclose(got, _sk_at_grid(p, y, 1))


def test_two_seeds_are_averaged_not_bootstrapped(tmp_path):
    """A method with two seeds gets the vertical mean of its two curves on the 0.01 grid
    and their min–max band ("seeds"), the one-seed bootstrap only for exactly one seed.
    Kills `roc_seeds_figure` treating two seeds as one (`len(checked) <= 2`: the first seed's
    curve and bootstrap band, the second seed dropped from the curve)."""
    rng = np.random.default_rng(4)
    seeds = [tuple(np.asarray(a) for a in _random_split(rng, 60)) for _ in range(2)]
    drawn = roc_seeds_figure({"m": seeds}, tmp_path / "roc.png")["m"]
    at = np.stack([_sk_at_grid(p, y, 1) for p, y in seeds])
    assert drawn["band"] == "seeds"
    np.testing.assert_array_equal(drawn["fpr"], GRID)
    np.testing.assert_allclose(drawn["tpr"], at.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(drawn["lo"], at.min(axis=0), atol=1e-12)
    np.testing.assert_allclose(drawn["hi"], at.max(axis=0), atol=1e-12)
    assert drawn["aucs"] == pytest.approx([roc_auc_score(y == 1, p[:, 1]) for p, y in seeds],
                                          abs=1e-12)
    assert (tmp_path / "roc.png").stat().st_size > 5000


def test_a_failing_dataset_table_does_not_sink_the_markdown(tmp_path, monkeypatch):
    """One dataset whose table raises (any error, here a ValueError): tables.md's section
    says so in one line and still carries the other dataset's table. Kills the guard in
    `clinical_markdown` catching less than every exception (the ValueError escaped and the
    benchmark lost tables.md)."""
    rng = np.random.default_rng(2)
    runs = [_run(tmp_path, d, "erm", 0, _random_split(rng, 40), _random_split(rng, 40))
            for d in ("bad", "good")]
    real = clinical.clinical_table

    def table(out, results, dataset):
        if dataset == "bad":
            raise ValueError("boom")
        return real(out, results, dataset)

    monkeypatch.setattr(clinical, "clinical_table", table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = clinical.clinical_markdown(tmp_path, {"runs": runs})
    assert "operating points for bad failed: boom" in md
    assert "### good" in md and "| erm | 1 | " in md.split("### good")[1]


def test_write_predictions_refuses_a_zero_temperature(tiny_data, tmp_path):
    """`write_predictions(..., temperature=0.0)` is refused (InputError, no file), not read
    as "no temperature" (a CSV without pcal_ columns, exit 0); T = 1 writes pcal_ equal to
    p_. Kills the check `if temperature:` in place of `if temperature is not None:`."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import read_predictions, write_predictions
    from causalign.errors import InputError

    ds = LesionDataset(tiny_data, "test")
    p, _ = _random_split(np.random.default_rng(8), len(ds.records))
    with pytest.raises(InputError, match="temperature"):
        write_predictions(tmp_path / "zero.csv", ds, p, temperature=0.0)
    assert not (tmp_path / "zero.csv").exists()
    write_predictions(tmp_path / "one.csv", ds, p, temperature=1.0)
    with open(tmp_path / "one.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cal = np.array([[float(r["pcal_benign"]), float(r["pcal_malignant"])] for r in rows])
    np.testing.assert_array_equal(cal, read_predictions(tmp_path / "one.csv").probs)
    np.testing.assert_allclose(cal, p, rtol=0, atol=1e-15)
    assert {r["calibration_temperature"] for r in rows} == {"1.0"}


erm_run = test_operating_point.erm_run  # the 2-epoch ERM run on tiny_data (shared fixture)


def test_evaluate_split_refuses_a_bad_temperature_before_any_pass(tiny_data, erm_run):
    """`evaluate_split(..., temperature=0)` raises InputError before the model runs (its
    docstring: checked before the pass), not after a whole evaluation. Kills dropping the
    up-front `check_temperature` (the error then came from `apply_temperature` after every
    batch had been mapped and deleted)."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import evaluate_split
    from causalign.engine.trainer import load_run
    from causalign.errors import InputError

    _, model, method, _ = load_run(erm_run, device="cpu")
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError, match="temperature"):
        evaluate_split(model, method, LesionDataset(tiny_data, "test"), "cpu",
                       temperature=0.0)
    assert calls == []


def test_a_dataset_without_a_default_run_gets_no_failure_line(tmp_path):
    """A dataset whose finished runs are all non-default settings has no table: the
    markdown skips it quietly, and the other dataset's table is there. Kills
    `clinical_markdown` rendering the None table (an AttributeError turned into a bogus
    "operating points for x failed" line by the guard)."""
    rng = np.random.default_rng(5)
    good = _run(tmp_path, "d", "erm", 0, _random_split(rng, 40), _random_split(rng, 40))
    swept = dict(_run(tmp_path, "x", "erm", 0, _random_split(rng, 40),
                      _random_split(rng, 40)), setting="lam=5", key="x/erm/lam/seed0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = clinical.clinical_markdown(tmp_path, {"runs": [swept, good]})
    assert "failed" not in md and "### x" not in md
    assert "| erm | 1 | " in md.split("### d")[1]
