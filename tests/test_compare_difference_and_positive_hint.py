"""`compare --bootstrap`'s point differences beside their intervals, and `--positive`'s
hint for a near-miss class name."""

from __future__ import annotations

import json

import pytest
from test_audit_compare_1207f import _write_csv
from test_bootstrap_calibration_localisation import _probs

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics import classification_metrics, paired_bootstrap_ci
from causalign.metrics.operating_point import positive_class


@pytest.mark.parametrize("classes", [("benign", "malignant"), ("normal", "benign", "malignant")])
def test_compare_gives_each_difference_it_gives_an_interval_for(tmp_path, capsys, classes):
    """The JSON gave `ci95_difference` but no point difference; a reader subtracted `_a`
    from `_b` by hand. Each `difference` is B − A of the metrics on the split itself."""
    k = len(classes)
    probs_a, y = _probs(90, k, seed=11)
    probs_b, _ = _probs(90, k, seed=12)
    ids = [f"s{i}" for i in range(90)]
    _write_csv(tmp_path / "a.csv", ids, y, probs_a, classes)
    _write_csv(tmp_path / "b.csv", ids, y, probs_b, classes)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--bootstrap",
                 "100", "--n-bins", "7"]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    a = classification_metrics(probs_a, y, 7)
    b = classification_metrics(probs_b, y, 7)
    assert set(result["difference"]) == set(result["ci95_difference"])
    for name, value in result["difference"].items():
        assert value == pytest.approx(b[name] - a[name], abs=1e-12), name
    for name in ("accuracy", "auc", "brier", "ece"):
        assert result["difference"][name] == pytest.approx(
            result[f"{name}_b"] - result[f"{name}_a"], abs=1e-12)
    # identical runs: every difference exactly 0
    same = paired_bootstrap_ci(probs_a, probs_a, y, n=100)
    assert all(v == 0 for v in same["difference"].values())


def test_positive_hint_for_a_near_miss_only():
    classes = ["normal", "benign", "malignant"]
    for given in ("Malignant", "malignnat", " MALIGNANT"):
        with pytest.raises(InputError, match="did you mean 'malignant'"):
            positive_class(given, classes)
    with pytest.raises(InputError) as e:
        positive_class("cancer", classes)
    assert "did you mean" not in str(e.value)
    assert positive_class("malignant", classes) == 2  # exact names only


@pytest.mark.parametrize("given", ["abnormal", "nonmalignant", "Abnormal"])
def test_positive_hint_skips_a_prefixed_class_name(given):
    """A class name after extra leading letters is another word whose prefix may negate it:
    'abnormal' was told "did you mean 'normal'?" (the opposite class; difflib ratio 0.86);
    now no hint, the classes still listed."""
    classes = ["normal", "benign", "malignant"]
    with pytest.raises(InputError) as e:
        positive_class(given, classes)
    assert "did you mean" not in str(e.value)
    assert "normal" in str(e.value) and "malignant" in str(e.value)


def test_positive_hint_keeps_one_letter_slips_at_the_start():
    """Guard: a single stray leading letter or a trailing one is still a typo with a hint."""
    classes = ["normal", "benign", "malignant"]
    for given in ("xmalignant", "malignantt", "benin"):
        with pytest.raises(InputError, match="did you mean"):
            positive_class(given, classes)
