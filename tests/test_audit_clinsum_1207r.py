"""The clinical table ("Operating points and calibration") gives test PPV and NPV at each
rule's threshold with the test prevalence they depend on, and reaches tables.md (so the
demo's summary.md) as markdown beside report.html; checked against `causalign evaluate
--operating-point RULE [--positive C]` on real runs."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_multiclass
import yaml
from test_audit_repclin_1207q import _random_split, _run
from test_audit_review3_1206 import _SUITE as SUITE  # ERM, seeds 0 and 1, 1 epoch
from test_multiclass import BUSI

from causalign.cli import main
from causalign.engine import benchmark as bm
from causalign.report import clinical
from causalign.report.clinical import clinical_table
from causalign.report.html import _clinical_section

RULES = ("youden", "sensitivity=0.9")
# a benchmark folder with one real 1-epoch ERM run on a 3-class (BUSI-like) dataset
three_class_bench = test_multiclass.three_class_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny two-class benchmark: ERM, seeds 0 and 1, one epoch, no report (~5 s)."""
    tmp = tmp_path_factory.mktemp("clinsum")
    (tmp / "s.yaml").write_text(yaml.safe_dump(SUITE))
    out = tmp / "bench"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = bm.run_suite(bm.load_suite(tmp / "s.yaml"), out, progress=False,
                               report=False, log=lambda s: None)
    return out, results


def _evaluate(run: Path, rule: str, tmp: Path, positive: str | None = None) -> dict:
    """`causalign evaluate RUN --operating-point RULE [--positive C]`'s operating point."""
    js = tmp / f"{run.name}_{re.sub(r'[^a-z0-9]', '_', rule)}_{positive}.json"
    args = ["evaluate", str(run), "--operating-point", rule, "--out", str(js),
            "--no-progress", "--device", "cpu"]
    assert main(args + (["--positive", positive] if positive else [])) in (0, None)
    return json.loads(js.read_text())["operating_point"]


def _cell(values: list[float]) -> str:
    """The table's mean (std, ddof 0) cell, the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({np.std(values):.3f})"


def test_two_class_ppv_npv_equal_evaluate_per_seed(bench, tmp_path):
    """Each rule's PPV and NPV cells are the mean (std) over seeds 0 and 1 of the ppv / npv
    `causalign evaluate RUN --operating-point RULE` writes for each seed's run (sens./spec.
    too, as before); the test prevalence of class 1 is given in the notes."""
    out, results = bench
    t = clinical_table(out, results, "pm")
    assert t.header[2:12] == ["Youden: threshold (val)", "sens. (test)", "spec. (test)",
                              "PPV (test)", "NPV (test)", "sens.=0.9: threshold (val)",
                              "sens. (test)", "spec. (test)", "PPV (test)", "NPV (test)"]
    row = t.rows[0]
    assert row[:2] == ["erm", "2"]
    for i, rule in enumerate(RULES):
        ops = [_evaluate(out / f"runs/pm/erm/seed{s}", rule, tmp_path) for s in (0, 1)]
        want = [_cell([op[k] for op in ops])
                for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")]
        assert row[2 + 5 * i:7 + 5 * i] == want, rule
    n_pos = ops[0]["tp"] + ops[0]["fn"]
    n = n_pos + ops[0]["tn"] + ops[0]["fp"]
    assert f"test prevalence (PPV and NPV depend on it): malignant {n_pos}/{n} = " \
           f"{n_pos / n:.3f}" in t.notes


def test_tables_md_carries_the_table_with_the_report_numbers(bench):
    """tables.md holds the section after the results table, every cell and note of the
    report.html section (the same clinical_table), and the markdown equals a rebuild."""
    out, results = bench
    tables = (out / "tables.md").read_text(encoding="utf-8")
    assert tables.index("### T\n") < tables.index("## Operating points and calibration")
    assert tables.endswith(clinical.clinical_markdown(out, results))
    html = "".join(_clinical_section(out, results, ["pm"], None))
    t = clinical_table(out, results, "pm")
    assert "| " + " | ".join(t.rows[0]) + " |" in tables
    cells = re.findall(r"<td>([^<]*)</td>", html)
    assert cells == t.rows[0][1:]
    assert "PPV and NPV depend on the test split's prevalence" in tables
    assert "- test prevalence (PPV and NPV depend on it): malignant" in tables


def test_three_class_ppv_npv_equal_evaluate_positive(three_class_bench, tmp_path):
    """For 3 classes each class's row gives the ppv / npv of `evaluate --operating-point
    RULE --positive C` (one-vs-rest), and the prevalence of every class is noted."""
    out, results = three_class_bench  # a real 1-epoch ERM run, 3 classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = clinical_table(out, results, "busi")
    assert [r[1] for r in t.rows] == BUSI
    for c, name in enumerate(BUSI):
        for i, rule in enumerate(RULES):
            op = _evaluate(out / "runs/busi/erm/seed0", rule, tmp_path, name)
            want = [_cell([op[k]]) if op[k] is not None else "–"
                    for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")]
            assert t.rows[c][3 + 5 * i:8 + 5 * i] == want, (name, rule)
    assert t.notes[1] == ("test prevalence (PPV and NPV depend on it): normal 3/9 = 0.333, "
                          "benign 3/9 = 0.333, malignant 3/9 = 0.333")


def test_tables_md_of_runs_without_predictions_says_why(tmp_path):
    """A run older than the predictions files: tables.md's section notes it (as report.html
    does), with no crash and no prevalence; a run with CSVs beside it still gets its row."""
    rng = np.random.default_rng(7)
    runs = [_run(tmp_path, "d", "old", 0),
            _run(tmp_path, "d", "new", 0, _random_split(rng, 40), _random_split(rng, 40))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = clinical.clinical_markdown(tmp_path, {"runs": runs})
    assert md.startswith("## Operating points and calibration\n")
    assert "| old | 0 | " + " | ".join(["–"] * 13) + " |" in md
    assert "- old seed 0: no predictions_test.csv (a run older than the predictions files)" \
        in md
    old_only = clinical.clinical_markdown(tmp_path, {"runs": runs[:1]})
    assert "no predictions_test.csv" in old_only and "prevalence (PPV" not in \
        old_only.split("### d")[1]
    assert clinical.clinical_markdown(tmp_path, {"runs": []}) == ""


def test_prevalence_of_runs_on_different_test_splits_is_their_spread(tmp_path):
    """Two seeds whose test splits differ (1/4 and 3/4 positives): the note gives the mean
    (std) of the share, not one run's count."""
    two = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    val = (two, [0, 1, 0, 1])
    runs = [_run(tmp_path, "d", "m", 0, val, (two, [0, 0, 0, 1])),
            _run(tmp_path, "d", "m", 1, val, (two, [0, 1, 1, 1]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = clinical_table(tmp_path, {"runs": runs}, "d")
    assert t.notes[0] == ("test prevalence (PPV and NPV depend on it): malignant "
                          "0.500 (0.250) over the runs' test splits")


def test_a_run_shared_by_two_experiments_keeps_its_first_label(tmp_path):
    """A run that experiment A calls "erm" and B "baseline": its record's label is the last
    selection's ("baseline" after `benchmark --only B`), so the table's row was renamed by a
    rerun that trained nothing (tables.md changed; test_benchmark_subset caught it). The row
    now takes the first experiment's default role: "erm" either way."""
    rng = np.random.default_rng(9)
    r = _run(tmp_path, "d", "baseline", 0, _random_split(rng, 30), _random_split(rng, 30))
    r.update(experiments=["A", "B"], roles={"A": [["erm", "default"]],
                                            "B": [["baseline", "default"]]})
    other = {**r, "key": "d/x/seed0", "label": "x", "setting": "default",
             "roles": {"A": [["x", "lam=5"]]}, "experiments": ["A"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = clinical_table(tmp_path, {"runs": [r, other]}, "d")
    assert [row[0] for row in t.rows] == ["erm"]  # x: no default role, no row


def test_demo_summary_carries_the_table(tmp_path, monkeypatch):
    """`causalign demo` prints and saves summary.md from tables.md: it now holds the
    operating points table (the demo suite swapped for the tiny one, one seed, 1 epoch)."""
    from causalign import demo

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SUITE))
    monkeypatch.setattr(demo, "load_suite", lambda name: bm.load_suite(tmp_path / "s.yaml"))
    # the page's figures run models (~1 min): not what is tested here
    monkeypatch.setattr("causalign.report.html.write_report",
                        lambda *a, **k: tmp_path / "report.html")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = demo.run_demo(tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "summary.md").read_text(encoding="utf-8") == summary
    section = summary[summary.index("## Operating points and calibration"):]
    assert "| erm | 1 | " in section and "PPV (test) | NPV (test)" in section
    assert "- test prevalence (PPV and NPV depend on it): malignant" in section
