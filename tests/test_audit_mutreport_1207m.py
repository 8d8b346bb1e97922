"""Mutation audit of reporting and benchmark aggregation (engine.benchmark, engine.bench,
report.tables/html): behaviours the earlier tests let slip."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from causalign.engine import bench
from causalign.engine import benchmark as bm
from causalign.report import html as report_html
from causalign.report.tables import fmt_mean_std, mean_std, results_table


def _exp(methods=("erm", "rrr"), datasets=("d",), metrics=("test.accuracy",),
         seeds=(0, 1, 2), name="e") -> bm.Experiment:
    return bm.Experiment(name, "T", list(datasets), [bm.MethodSpec(m, m) for m in methods],
                         list(seeds), {"default": {}}, "method", list(metrics))


def _rec(label: str, seed: int, test: dict | None = None, dataset: str = "d",
         status: str = "done", exp: str = "e", roles: list | None = None, **extra) -> dict:
    r = {"key": f"{dataset}/{label}/seed{seed}", "dataset": dataset, "method": label,
         "label": label, "setting": "default", "seed": seed, "status": status,
         "experiments": [exp], "config_hash": f"{label}{seed}", "run_dir": "",
         "metrics": {"test": test or {}} if status == "done" else None, **extra}
    if roles is not None:
        r["roles"] = {exp: roles}
    return r


# ------------------------------------------------------------------ cells: mean (std)


def test_cells_are_numpy_mean_and_population_std_of_the_seeds():
    """A cell is numpy's mean and std with ddof 0 (what the table's note says) of the seeds'
    values, computed here independently. Kills mean -> median and ddof 0 -> 1 in mean_std."""
    accs = [0.10, 0.50, 0.60]  # median 0.5, mean 0.4: the two differ
    e = _exp(methods=("erm",))
    t = bm.experiment_table(e, [_rec("erm", s, {"accuracy": a}) for s, a in enumerate(accs)])
    want = f"{np.mean(accs):.3f} ({np.std(accs, ddof=0):.3f})"
    assert t.rows[0][1] == want == "0.400 (0.216)"
    assert "std with ddof 0" in t.notes[0]
    assert mean_std(accs) == pytest.approx((np.mean(accs), np.std(accs)))
    assert fmt_mean_std([0.1, None, 0.6]) == "0.350 (0.250)"  # None: not a seed


def test_one_value_has_no_std_in_either_formatter():
    """One seed's value (or one and a missing one) shows without "(0.000)": it is not a zero
    spread. Kills `n > 1` -> `n > 0` in fmt_mean_std and `n > 1` -> `n >= 1` in _fmt_cell."""
    assert fmt_mean_std([0.25, None]) == "0.250"
    assert results_table({"erm": [{"test": {"accuracy": 0.25}}]},
                         [("acc", "test.accuracy")]).splitlines()[-1] == "| erm | 0.250 |"
    t = bm.experiment_table(_exp(methods=("erm",), seeds=(0,)),
                            [_rec("erm", 0, {"accuracy": 0.25})])
    assert t.rows[0][1] == "0.250"


def test_results_table_has_every_column():
    """report.tables.results_table: one cell per requested column, in order. Kills dropping
    its last column."""
    runs = [{"test": {"accuracy": 0.5, "auc": 0.75}}, {"test": {"accuracy": 0.7, "auc": 0.25}}]
    text = results_table({"erm": runs}, [("acc", "test.accuracy"), ("AUC", "test.auc")])
    assert text.splitlines()[0] == "| method | acc | AUC |"
    assert text.splitlines()[-1] == "| erm | 0.600 (0.100) | 0.500 (0.250) |"


# ------------------------------------------------------------------ bold: best per column


def _bold_rows(t: bm.Table, j: int) -> list[str]:
    return [row[0] for row, b in zip(t.rows, t.bold, strict=True) if b[j]]


def test_bold_follows_each_metrics_direction_under_several_datasets():
    """With two datasets the columns run metric-major (accuracy d1, accuracy d2, loss d1,
    loss d2): accuracy's best is the largest, loss's the smallest, best_epoch is never bold.
    Kills min/max swapped, `lower = False`, ignoring UNRANKED, and the metric of column j
    taken as metrics[j % n] instead of metrics[j // per_metric]."""
    e = _exp(datasets=("d1", "d2"), metrics=("test.accuracy", "test.loss", "best_epoch"),
             seeds=(0,))
    recs = []
    for lab, acc, loss, ep in (("erm", 0.9, 0.8, 3), ("rrr", 0.6, 0.2, 7)):
        for d in ("d1", "d2"):
            r = _rec(lab, 0, {"accuracy": acc, "loss": loss}, dataset=d)
            r["metrics"]["best_epoch"] = ep
            recs.append(r)
    t = bm.experiment_table(e, recs)
    assert t.header == ["method", "accuracy d1", "accuracy d2", "loss d1", "loss d2",
                        "best_epoch d1", "best_epoch d2"]
    assert [_bold_rows(t, j) for j in range(6)] == [["erm"], ["erm"], ["rrr"], ["rrr"], [], []]


def test_only_ties_within_rounding_share_the_bold():
    """0.700 and 0.690 differ in the table's third digit: only the larger is bold; 0.7001
    and 0.7003 print alike and both are. Kills a wider tie tolerance (5e-2)."""
    e = _exp(methods=("erm", "rrr", "cdep"), seeds=(0,))
    t = bm.experiment_table(e, [_rec("erm", 0, {"accuracy": 0.690}),
                                _rec("rrr", 0, {"accuracy": 0.7001}),
                                _rec("cdep", 0, {"accuracy": 0.7003})])
    assert _bold_rows(t, 0) == ["rrr", "cdep"]


def test_a_lone_competitor_is_not_bold():
    """Bold marks the best of two or more competing rows: ERM beside only the oracle (a
    ceiling, not ranked) is not 'best'. Kills `len(cand) > 1` -> `> 0`."""
    e = _exp(methods=("erm", "oracle"), seeds=(0,))
    t = bm.experiment_table(e, [_rec("erm", 0, {"accuracy": 0.5}),
                                _rec("oracle", 0, {"accuracy": 0.9})])
    assert t.bold == [[False], [False]]


def test_markdown_and_html_bold_the_marked_cell():
    """tables.md and report.html put the bold on the cell Table.bold marks, not its
    neighbour or the unmarked ones. Kills the markdown zip over row[:-1] and the html
    `if not b`."""
    t = bm.Table("T", ["method", "a", "b"], [["erm", "0.1", "0.9"]], [[False, True]], [])
    assert "| erm | 0.1 | **0.9** |" in bm.table_markdown(t)
    html = report_html._table_html(t)
    assert "<td>0.1</td><td><b>0.9</b></td>" in html


# ------------------------------------------------------------------ failed runs and notes


def test_a_failed_seed_is_noted_and_does_not_mark_the_finished_cells():
    """rrr's seed 2 failed: the note lists it with its error, the seeds in the header note are
    those of finished runs (0, 1), and no cell gets a dagger for it; a cell with no value is
    "–" without a dagger. Kills the failed run's seed counted in all_seeds / the note, the
    failed run dropped from the notes, and the dagger on an empty cell."""
    e = _exp(methods=("erm", "rrr", "cdep"), seeds=(0, 1, 2))
    recs = [_rec("erm", s, {"accuracy": 0.5 + s / 10}) for s in (0, 1)]
    recs += [_rec("rrr", s, {"accuracy": 0.6}) for s in (0, 1)]
    recs.append(_rec("rrr", 2, status="failed", error="ValueError: boom"))
    recs.append(_rec("cdep", 0, {"auc": 0.5}))  # done, but no accuracy: its cell is "–"
    t = bm.experiment_table(e, recs)
    assert t.notes[0].startswith("mean (std) over seeds 0, 1 (")
    assert [r[1] for r in t.rows] == ["0.550 (0.050)", "0.600 (0.000)", "–"]
    assert "d/rrr/seed2: failed — ValueError: boom" in t.notes
    assert not any("†" in n for n in t.notes)


def test_a_failed_run_under_two_labels_is_noted_once():
    """A run that appears under two labels of one experiment (roles) is one run: its failure
    is one note. Kills `once = mine` (a note per label)."""
    e = bm.Experiment("e", "T", ["d"], [bm.MethodSpec("rrr", "A"), bm.MethodSpec("rrr", "B")],
                      [0], {"default": {}}, "method", ["test.accuracy"])
    r = _rec("A", 0, status="failed", error="E: x", roles=[["A", "default"],
                                                           ["B", "default"]])
    t = bm.experiment_table(e, [r])
    assert sum("failed" in n for n in t.notes) == 1


def test_one_warning_of_many_runs_is_one_note_naming_how_many():
    """The same warning from three runs on one dataset is one note: the first key "and 2
    other run(s)". Kills the note naming only the first run."""
    e = _exp(methods=("erm",), seeds=(0, 1, 2))
    recs = []
    for s in (0, 1, 2):
        r = _rec("erm", s, {"accuracy": 0.5})
        r["metrics"]["warnings"] = ["val has one class"]
        recs.append(r)
    t = bm.experiment_table(e, recs)
    assert "d/erm/seed0 and 2 other run(s): warning: val has one class" in t.notes


# ------------------------------------------------------------------ results.csv


def test_results_csv_columns_hold_their_own_values(tmp_path):
    """results.csv: val_accuracy is the val split's (not the test's), numbers keep 6
    significant digits. Compared with the record's own values. Kills val_accuracy read from
    test and a shorter number format."""
    e = _exp(methods=("erm",), seeds=(0,))
    suite = bm.Suite("s", "", {}, {"d": {"synth": {}}}, [e], tmp_path)
    r = _rec("erm", 0, {"accuracy": 0.123456789, "deletion": {"0.02": 0.25}})
    r["metrics"]["val"] = {"accuracy": 0.875}
    r["seconds"] = 12.3456789
    bm._write_results(tmp_path, suite, [r], 1.0, final=True)
    with open(tmp_path / "results.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["test_accuracy"] == "0.123457" and row["val_accuracy"] == "0.875"
    assert row["test_deletion@0.02"] == "0.25" and row["seconds"] == "12.3457"
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


# ------------------------------------------------------------------ report.html helpers


def test_report_figures_use_the_lowest_seed_and_default_setting_means(tmp_path, monkeypatch):
    """report.html's CAM grid shows one run per label: default setting, LOWEST seed; the
    deletion curve is the mean over seeds of the default setting only (numpy mean here).
    Kills the highest seed picked, one seed plotted instead of the mean, and the
    non-default settings averaged in."""
    from matplotlib.axes import Axes

    recs = [_rec("erm", s, {"deletion": {"0.1": v}}) for s, v in ((2, 0.3), (0, 0.1), (1, 0.2))]
    other = _rec("erm", 0, {"deletion": {"0.1": 0.9}})
    other["setting"], other["key"] = "big", "d/erm@big/seed0"
    results = {"runs": [*recs, other]}
    assert report_html._pick_runs(results, "d")["erm"]["seed"] == 0
    seen, plot = {}, Axes.plot

    def recording(self, xs, ys, *a, **kw):  # the curve's points, then the real plot
        seen[kw.get("label")] = list(ys)
        return plot(self, xs, ys, *a, **kw)

    monkeypatch.setattr(Axes, "plot", recording)
    assert report_html.deletion_figure(results, tmp_path / "deletion.png")
    assert seen == {"erm": pytest.approx([np.mean([0.3, 0.1, 0.2])])}


# ------------------------------------------------------------------ bench step


class _FakeStep:
    """A _TimedStep whose k-th call takes TIMES[name][k] seconds (no model, no clock)."""

    TIMES: dict[str, list[float]] = {}
    built: list[str] = []

    def __init__(self, method_name, batch, cfg, info, device, method_args=None):
        self.name, self.k = method_name, 0
        _FakeStep.built.append(method_name)

    def __call__(self) -> float:
        self.k += 1
        return _FakeStep.TIMES[self.name][self.k - 1]


def test_bench_ratio_is_median_method_over_median_erm_after_untimed_warmup(monkeypatch):
    """`bench step`: seconds_per_step is the median of the method's timed steps, ratio_to_erm
    method / ERM, and the warm-up steps (here 100 s each) are not timed; the ERM steps are
    ERM's own. Compared with statistics computed here. Kills the ratio inverted, median ->
    mean, the medians swapped, warm-up timed, ERM timed as the method, and warmup not
    recorded."""
    _FakeStep.built = []
    _FakeStep.TIMES = {"erm": [100.0, 1.0, 1.0, 4.0], "rrr": [100.0, 3.0, 3.0, 9.0]}
    monkeypatch.setattr(bench, "_TimedStep", _FakeStep)
    r = bench.bench_step("rrr", size=16, batch_size=2, steps=3, warmup=1, device="cpu")
    assert _FakeStep.built == ["erm", "rrr"]
    assert r["seconds_per_step"] == float(np.median([3.0, 3.0, 9.0])) == 3.0
    assert r["erm_seconds_per_step"] == 1.0
    assert r["ratio_to_erm"] == pytest.approx(3.0)
    assert r["warmup"] == 1 and r["steps"] == 3


def test_profiled_part_times_are_per_step(monkeypatch):
    """profile_ms_per_step divides each part's profiled total by the number of timed steps.
    Kills the division by steps dropped."""
    class Event:
        key, cpu_time_total = "causalign.implicit.cg", 6000.0  # µs over all steps

    class Prof:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def key_averages(self):
            return [Event()]

    monkeypatch.setattr(torch.profiler, "profile", lambda **k: Prof())
    _FakeStep.TIMES = {"erm": [0.5] * 10}
    monkeypatch.setattr(bench, "_TimedStep", _FakeStep)
    parts: dict = {}
    bench.time_steps("erm", {}, None, None, torch.device("cpu"), steps=3, warmup=0,
                     profile=parts)
    assert parts == {"implicit.cg": pytest.approx(2.0)}  # 6 ms over 3 steps


def test_bold_ties_are_the_cells_that_print_alike():
    """Regression: bold ties were |v - best| < 5e-4, not what the table prints: 0.7006 and
    0.7002 (shown 0.701 and 0.700) were both bold, and 0.7004 beside 0.6996 (both shown
    0.700) only one of them. Cells that print alike now share the bold, others do not."""
    def bold(a: float, b: float) -> list[str]:
        e = _exp(methods=("erm", "rrr"), seeds=(0,))
        t = bm.experiment_table(e, [_rec("erm", 0, {"accuracy": a}),
                                    _rec("rrr", 0, {"accuracy": b})])
        assert [r[1] for r in t.rows] == [f"{a:.3f}", f"{b:.3f}"]
        return _bold_rows(t, 0)

    assert bold(0.7006, 0.7002) == ["erm"]  # 0.701 vs 0.700
    assert bold(0.7004, 0.6996) == ["erm", "rrr"]  # both 0.700
    assert bold(0.25, 0.25) == ["erm", "rrr"]


def test_results_written_after_each_run_say_incomplete_until_the_last(tmp_path, monkeypatch):
    """results.json is rewritten after every run with complete: false (a killed benchmark
    shows what finished, marked unfinished), and true only at the end. Runs are stubbed
    (no training). Kills the per-run write marked final."""
    data = tmp_path / "data"
    data.mkdir()
    (data / bm.META).write_text("{}\n")
    e = _exp(methods=("erm", "rrr"), seeds=(0,))
    suite = bm.Suite("s", "", {"epochs": 1}, {"d": {"path": str(data)}}, [e], tmp_path)
    seen: list[tuple[bool, list[str]]] = []

    def fake_run(spec, data_dir, run_dir, digests=None):
        before = json.loads((tmp_path / "out" / "results.json").read_text()) \
            if (tmp_path / "out" / "results.json").exists() else None
        if before is not None:
            seen.append((before["complete"], [r["key"] for r in before["runs"]]))
        return {"test": {"accuracy": 0.5}}

    monkeypatch.setattr(bm, "run_one", fake_run)
    res = bm.run_suite(suite, tmp_path / "out", progress=False, report=False,
                       log=lambda s: None)
    assert seen == [(False, ["d/erm/seed0"])]
    assert res["complete"] is True
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is True


def test_a_resumed_runs_seconds_add_the_epochs_before_the_interruption(tmp_path,
                                                                       monkeypatch):
    """A run resumed from its checkpoint counts the seconds of its history.csv epochs
    (100 + 20.5 s here) on top of this invocation's part. Runs are stubbed. Kills `+ before`
    dropped."""
    from causalign.engine.trainer import CHECKPOINT

    data = tmp_path / "data"
    data.mkdir()
    (data / bm.META).write_text("{}\n")
    suite = bm.Suite("s", "", {"epochs": 1}, {"d": {"path": str(data)}},
                     [_exp(methods=("erm",), seeds=(0,))], tmp_path)
    run_dir = tmp_path / "out" / "runs" / "d" / "erm" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / CHECKPOINT).write_bytes(b"")
    (run_dir / "history.csv").write_text("epoch,seconds\n1,100\n2,20.5\n")
    monkeypatch.setattr(bm, "run_one", lambda *a, **k: {"test": {"accuracy": 0.5}})
    res = bm.run_suite(suite, tmp_path / "out", progress=False, report=False,
                       log=lambda s: None)
    seconds = res["runs"][0]["seconds"]
    assert 120.5 <= seconds < 150
    stored = json.loads((run_dir / "benchmark_run.json").read_text())
    assert stored["resumed_after_seconds"] == 120.5 and stored["seconds"] == seconds


def test_results_csv_deletion_columns_are_sorted_by_fraction(tmp_path):
    """Runs deleting other fractions: the columns ascend by fraction whatever run came first
    (before: first-met order, test_deletion@0.1 before @0.02 and @0.5)."""
    e = _exp(methods=("erm",), seeds=(0, 1))
    suite = bm.Suite("s", "", {}, {"d": {"synth": {}}}, [e], tmp_path)
    first = _rec("erm", 0, {"deletion": {"0.1": 0.3}})
    second = _rec("erm", 1, {"deletion": {"0.5": 0.6, "0.02": 0.1, "0.1": 0.2}})
    bm._write_results(tmp_path, suite, [first, second], 1.0, final=True)
    with open(tmp_path / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    columns = [c for c in reader.fieldnames if c.startswith("test_deletion@")]
    assert columns == ["test_deletion@0.02", "test_deletion@0.1", "test_deletion@0.5"]
    assert [r["test_deletion@0.02"] for r in rows] == ["", "0.1"]
    assert [r["test_deletion@0.1"] for r in rows] == ["0.3", "0.2"]
