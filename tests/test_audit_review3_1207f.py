"""Review of predict / compare / export (review3): regression tests of the defects found by
running them, and guards of what was checked and found right."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from causalign.cli import main


def _write_csv(path, ids, labels, probs, classes=("benign", "malignant")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "site", "label", "predicted", *(f"p_{c}" for c in classes)])
        for i, y, p in zip(ids, labels, probs, strict=True):
            w.writerow([i, 0, y, int(np.argmax(p)), *(f"{v:.17g}" for v in p)])


def _error_line(capsys, argv):
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    return lines[0]


def _pair(tmp_path, classes_b):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(20)]
    y = np.array([0, 1] * 10)
    _write_csv(tmp_path / "a.csv", ids, y, rng.dirichlet([1, 1], 20))
    p = rng.dirichlet([1, 1], 20)
    _write_csv(tmp_path / "b.csv", ids, y, p, classes_b)
    return tmp_path / "a.csv", tmp_path / "b.csv"


@pytest.mark.parametrize("classes_b", [("malignant", "benign"), ("normal", "tumour")])
def test_compare_refuses_predictions_of_other_class_names_or_order(tmp_path, capsys,
                                                                   classes_b):
    """Only the number of classes was compared: a CSV whose columns read p_malignant,
    p_benign (another class order: its label 0 means malignant) or other class names was
    compared position by position, the AUC of B read off the wrong column."""
    a, b = _pair(tmp_path, classes_b)
    line = _error_line(capsys, ["compare", str(a), str(b)])
    assert "classes" in line and "benign" in line and classes_b[0] in line


def test_compare_same_classes_still_compares(tmp_path, capsys):
    """Guard: the same class names in the same order compare as before."""
    a, b = _pair(tmp_path, ("benign", "malignant"))
    assert main(["compare", str(a), str(b)]) in (0, None)
    assert json.loads(capsys.readouterr().out)["classes"] == ["benign", "malignant"]


def _run_dir(path, digest, ids, y, p):
    _write_csv(path / "predictions_test.csv", ids, y, p)
    (path / "config.yaml").write_text(f"method: erm\ndata: /x/{path.name}\n"
                                      f"data_content_digest: {digest}\n")
    return path


def test_compare_warns_when_run_folders_trained_on_different_datasets(tmp_path, capsys):
    """Two runs of different datasets (two `data synth` seeds: ids test_00000… in both) were
    compared sample by sample whenever their labels happened to agree, with nothing said; a
    label disagreement did not say why. Their config.yaml's data_content_digest tells."""
    rng = np.random.default_rng(0)
    ids = [f"test_{i:05d}" for i in range(12)]
    y = np.array([0, 1] * 6)
    a = _run_dir(tmp_path / "a", "1111", ids, y, rng.dirichlet([1, 1], 12))
    b = _run_dir(tmp_path / "b", "2222", ids, y, rng.dirichlet([1, 1], 12))
    assert main(["compare", str(a), str(b)]) in (0, None)
    err = capsys.readouterr().err
    assert "warning:" in err and "different datasets" in err, err
    y2 = y.copy()
    y2[0] = 1
    c = _run_dir(tmp_path / "c", "3333", ids, y2, rng.dirichlet([1, 1], 12))
    line = _error_line(capsys, ["compare", str(a), str(c)])
    assert "disagree on the label" in line and "different datasets" in line
    # guard: the same digest (the same dataset) says nothing of the kind
    d = _run_dir(tmp_path / "d", "1111", ids, y, rng.dirichlet([1, 1], 12))
    assert main(["compare", str(a), str(d)]) in (0, None)
    assert "different datasets" not in capsys.readouterr().err
