"""A BUSI user's journey (3 classes: normal, benign, malignant): what the report and the
figures say about more than two classes. Written from a run on a BUSI-format fixture (220
images, 40 / 120 / 60) where report.html's ROC legend read "erm · class 2" and its
clinical note said operating points were for two-class datasets only."""

from __future__ import annotations

import numpy as np
import test_audit_mcop_1207q
from test_audit_repclin_1207q import _random_split, _run

from causalign.report import figures
from causalign.report import html as report_html
from causalign.report.clinical import clinical_table

BUSI = ["normal", "benign", "malignant"]

# a real 1-epoch ERM run on a 3-class (BUSI-like) dataset, shared with that file
run3 = test_audit_mcop_1207q.run3


def _legend_texts(monkeypatch, draw) -> list[str]:
    """The legend entries of the figure ``draw()`` saves (the save itself skipped)."""
    seen: list[list[str]] = []

    def capture(fig, path, **kw):
        # the legend wraps long entries (_fit): compared as one line each
        seen.append([" ".join(t.get_text().split())
                     for t in fig.axes[0].get_legend().get_texts()])

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    draw()
    assert len(seen) == 1
    return seen[0]


def test_report_roc_legend_names_each_class(tmp_path, monkeypatch):
    """report.html's ROC figure of a 3-class dataset labels each one-vs-rest curve by the
    class name the predictions CSV holds (p_malignant → "malignant"), as `evaluate --roc
    --positive malignant` titles it, not by its index ("class 2")."""
    rng = np.random.default_rng(0)
    run = _run(tmp_path, "busi", "erm", 0, _random_split(rng, 60, 3),
               _random_split(rng, 60, 3))
    # _run's CSVs name the classes benign, malignant, other (its own fixture's names)
    texts = _legend_texts(monkeypatch, lambda: report_html.roc_figure_of(
        tmp_path, {"runs": [run]}, "busi", tmp_path / "roc.png"))
    curves = [t for t in texts if t.startswith("erm")]
    assert [t.split(" (AUC")[0] for t in curves] == [
        "erm · benign vs rest", "erm · malignant vs rest", "erm · other vs rest"]


def test_roc_figure_without_names_keeps_class_indices(monkeypatch):
    """Guard: a caller giving no class names still gets "class k" (Python API unchanged)."""
    rng = np.random.default_rng(1)
    p, y = _random_split(rng, 45, 3)
    texts = _legend_texts(monkeypatch, lambda: figures.roc_figure({"m": (p, y)}, "x.png"))
    assert [t.split(" (AUC")[0] for t in texts[1:]] == ["m · class 0", "m · class 1",
                                                        "m · class 2"]


def test_clinical_note_points_a_three_class_reader_to_positive(tmp_path):
    """The clinical section's note on a 3-class dataset said "(two-class datasets only)",
    though `evaluate --operating-point RULE --positive CLASS` gives one class's operating
    point against the rest; the note now names that route (and still starts as before)."""
    rng = np.random.default_rng(2)
    res = {"runs": [_run(tmp_path, "busi", "erm", 0, _random_split(rng, 60, 3),
                         _random_split(rng, 60, 3))]}
    note = clinical_table(tmp_path, res, "busi").notes[0]
    assert note.startswith("3 classes: no positive class")
    assert "two-class datasets only" not in note
    assert "--positive CLASS" in note and "one-vs-rest" in note


def test_compare_roc_of_three_classes_names_each_class(tmp_path, monkeypatch, capsys):
    """`compare A B --roc` on two 3-class CSVs (no --positive: every class against the rest)
    labels the curves "A · malignant vs rest", not "A · class 2"."""
    from test_audit_compare_1207f import _write_csv

    from causalign.cli import main

    rng = np.random.default_rng(3)
    p, y = _random_split(rng, 45, 3)
    ids = [f"s{i}" for i in range(45)]
    for name, probs in (("a.csv", p), ("b.csv", p[:, [1, 2, 0]])):
        _write_csv(tmp_path / name, ids, y, probs, classes=BUSI)
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    texts = _legend_texts(monkeypatch, lambda: main(
        ["compare", a, b, "--roc", str(tmp_path / "roc.png")]))
    capsys.readouterr()
    assert [t.split(" (AUC")[0].rsplit(" · ", 1)[1] for t in texts[1:]] == [
        f"{c} vs rest" for c in BUSI] * 2


def test_evaluate_roc_of_three_classes_names_each_class(run3, tmp_path, monkeypatch, capsys):
    """`evaluate RUN --roc` on a 3-class run without --positive draws each class against
    the rest, labelled by the dataset's class names."""
    from causalign.cli import main

    _, run = run3
    texts = _legend_texts(monkeypatch, lambda: main(
        ["evaluate", str(run), "--roc", str(tmp_path / "roc.png"), "--no-progress"]))
    capsys.readouterr()
    assert [t.split(" (AUC")[0].rsplit(" · ", 1)[1] for t in texts[1:]] == [
        f"{c} vs rest" for c in BUSI]


def test_compare_gives_balanced_accuracy_beside_its_interval(tmp_path, capsys):
    """`compare --bootstrap` gave ci95_difference.balanced_accuracy (the metric an imbalanced
    BUSI reader compares `sampler: balanced` by) but not the two runs' balanced accuracies:
    an interval without its point. Now balanced_accuracy_a / _b, equal to scikit-learn's,
    beside accuracy_a / _b (also without --bootstrap)."""
    import json

    from sklearn.metrics import balanced_accuracy_score
    from test_audit_compare_1207f import _write_csv

    from causalign.cli import main

    rng = np.random.default_rng(4)
    p, y = _random_split(rng, 60, 3)
    q = _random_split(rng, 60, 3)[0]
    ids = [f"s{i}" for i in range(60)]
    _write_csv(tmp_path / "a.csv", ids, y, p, classes=BUSI)
    _write_csv(tmp_path / "b.csv", ids, y, q, classes=BUSI)
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["balanced_accuracy_a"] == balanced_accuracy_score(y, p.argmax(1))
    assert r["balanced_accuracy_b"] == balanced_accuracy_score(y, q.argmax(1))
    keys = list(r)
    assert keys.index("balanced_accuracy_a") == keys.index("accuracy_b") + 1
