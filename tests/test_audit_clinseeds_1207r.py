"""The clinical table's "seeds" cell says how many runs chose a threshold on val: with one
seed of three without predictions_val.csv it said "3" while the threshold and rate columns
averaged 2 seeds (found by the review of this session's features)."""

from __future__ import annotations

import numpy as np
from test_audit_repclin_1207q import _random_split, _run

from causalign.metrics.classification import classification_metrics
from causalign.metrics.operating_point import OperatingPoint, choose_threshold
from causalign.report.clinical import clinical_table
from causalign.report.tables import fmt_mean_std


def test_seeds_cell_names_the_runs_that_chose_a_threshold(tmp_path):
    """erm: seeds 0 and 1 with val, seed 2 without; the cell says so, the Youden threshold
    is the two seeds' mean (std), the test ECE all three's; rrr (one seed, with val) "1"."""
    rng = np.random.default_rng(7)
    splits = [(_random_split(rng, 40), _random_split(rng, 40)) for _ in range(3)]
    runs = [_run(tmp_path, "d", "erm", s, val if s != 2 else None, test)
            for s, (val, test) in enumerate(splits)]
    runs.append(_run(tmp_path, "d", "rrr", 0, _random_split(rng, 40), _random_split(rng, 40)))
    t = clinical_table(tmp_path, {"runs": runs}, "d")
    erm, rrr = t.rows
    assert erm[1] == "3 (2 with val thresholds)" and rrr[1] == "1"
    youden = [choose_threshold(OperatingPoint.parse("youden"), np.asarray(val[0]),
                               np.asarray(val[1])) for val, _ in splits[:2]]
    assert erm[2] == fmt_mean_std(youden)
    eces = [classification_metrics(np.asarray(test[0]), np.asarray(test[1]))["ece"]
            for _, test in splits]
    assert erm[12] == fmt_mean_std(eces)
    assert "erm seed 2: no predictions_val.csv: no threshold chosen, no temperature fitted" \
        in t.notes


def test_seeds_cell_of_a_three_class_method(tmp_path):
    """Three classes: each class's row carries the same count."""
    rng = np.random.default_rng(8)
    runs = [_run(tmp_path, "d3", "erm", 0, _random_split(rng, 60, 3),
                 _random_split(rng, 60, 3)),
            _run(tmp_path, "d3", "erm", 1, None, _random_split(rng, 60, 3))]
    t = clinical_table(tmp_path, {"runs": runs}, "d3")
    assert [r[2] for r in t.rows] == ["2 (1 with val thresholds)"] * 3
