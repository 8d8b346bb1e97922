"""Review of a trained three-class (BUSI-like) run end to end: what a user reads after
`causalign benchmark`, `evaluate`, `compare`, `predict`, `explain` and `counterfactual`."""

from __future__ import annotations

import json

import test_audit_mcop_1207q
from test_multiclass import BUSI

from causalign.cli import main

# the 1-epoch ERM run on a 3-class (normal / benign / malignant) dataset, trained once
run3 = test_audit_mcop_1207q.run3


def test_counterfactual_pairs_line_names_the_classes(run3, tmp_path, capsys, monkeypatch):
    """`counterfactual` on a 3-class BUSI-format run printed "flip rate by
    prediction→target: 0→1 1.000 (n 12), 1→0 1.000 (n 3), 1→2 …" — class indices where
    the dataset names its classes; the line now reads "normal→benign"; summary.json keeps its
    documented index keys. (A 1-epoch run predicts one class: the searched pairs are
    widened to three, as tests/test_counterfactual.py does.)"""
    from causalign.explain import counterfactual_export as export

    real = export.export_counterfactuals

    def three_pairs(*args, **kwargs):
        summary = real(*args, **kwargs)
        summary["by_transition"] = {k: {"n": 1, "flip_rate": r}
                                    for k, r in (("0→1", 1.0), ("2→1", 0.5), ("1→2", 0.0))}
        return summary

    monkeypatch.setattr(export, "export_counterfactuals", three_pairs)
    _, run = run3
    assert main(["counterfactual", str(run), "--out", str(tmp_path / "cf"), "--limit", "2",
                 "--steps", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("flip rate by prediction→target: "))
    assert line == ("flip rate by prediction→target: benign→malignant 0.000 (n 1), "
                    "malignant→benign 0.500 (n 1), normal→benign 1.000 (n 1)"), line
    assert BUSI == ["normal", "benign", "malignant"]


def _record(dataset: str, method: str, auc: float, n_classes: int) -> dict:
    """One finished run's results.json entry as `causalign benchmark` stores it."""
    return {"key": f"{dataset}/{method}/seed0", "dataset": dataset, "method": method,
            "label": method, "setting": "default", "seed": 0, "experiments": ["t"],
            "status": "done",
            "metrics": {"test": {"auc": auc, "accuracy": 0.5,
                                 "recall_per_class": [0.5] * n_classes}}}


def test_results_table_says_three_class_auc_is_the_macro_one_vs_rest():
    """A BUSI-format 3-class suite's results table showed "AUC 0.899 (0.009)" beside a ROC
    figure whose legend gives one AUC per class (0.967, 0.702, 1.000): nothing said the
    table's AUC is their macro average (metrics.json's); a note now says so, naming the
    datasets, and a two-class table has no such note."""
    from causalign.engine.benchmark import Experiment, MethodSpec, experiment_table

    exp = Experiment("t", "t", ["busi", "pm"], [MethodSpec("erm", "erm")], [0],
                     {"default": {}}, "dataset", ["test.auc", "test.accuracy"])
    t = experiment_table(exp, [_record("busi", "erm", 0.899, 3), _record("pm", "erm", 0.8, 2)])
    notes = [n for n in t.notes if "macro" in n]
    assert notes == ["AUC on busi (more than two classes): the macro average of each "
                     "class's one-vs-rest AUC (metrics.json's auc)"], t.notes
    two = experiment_table(exp, [_record("pm", "erm", 0.8, 2)])
    assert not [n for n in two.notes if "macro" in n], two.notes  # guard: two classes
    no_auc = Experiment("t", "t", ["busi"], [MethodSpec("erm", "erm")], [0],
                        {"default": {}}, "method", ["test.accuracy"])
    assert not [n for n in experiment_table(no_auc, [_record("busi", "erm", 0.9, 3)]).notes
                if "macro" in n]  # no AUC column, no note


def test_deletion_caption_says_it_averages_the_seeds(tmp_path):
    """report.html's deletion curves are the mean over seeds (the 3-class suite's erm at
    2 ‰: seeds 0.108 and 0.018, drawn 0.063) while the captions beside it (CAM grid, curves,
    calibration, ROC) say "lowest seed": the deletion caption said neither, so a reader
    took the curve for seed 0's. It now names the split, the setting and the seeds."""
    import re

    from causalign.report.html import write_report

    runs = [{"key": f"busi/erm/seed{s}", "status": "done", "dataset": "busi", "label": "erm",
             "method": "erm", "setting": "default", "seed": s, "run_dir": f"runs/s{s}",
             "metrics": {"test": {"deletion": {"0.002": v, "0.2": 2 * v}}}}
            for s, v in ((0, 0.108), (1, 0.018))]
    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": runs}))
    page = write_report(tmp_path).read_text()
    caption = re.search(r"<h2>Deletion curves</h2><p>(.*?)</p>", page).group(1)
    assert "test split" in caption and "default setting" in caption, caption
    assert "then the seeds" in caption, caption
