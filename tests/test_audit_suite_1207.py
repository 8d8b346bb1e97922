"""Audit (own benchmark suites): mistakes in a hand-written suite are refused when it is
loaded, with one line, before any dataset is generated or run trained."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

from causalign.cli import main
from causalign.engine import benchmark as bm
from causalign.errors import ConfigError

HEAD = """\
name: mine
defaults: {epochs: 1, width: 4, batch_size: 16, threads: 1}
datasets:
  pm: {synth: {n_train: 8, n_val: 4, n_test: 4, size: 32}}
"""


def _write(tmp_path: Path, body: str, head: str = HEAD) -> Path:
    p = tmp_path / "mine.yaml"
    p.write_text(head + body, encoding="utf-8")
    return p


def _refused(tmp_path: Path, capsys, suite: Path, needle: str) -> None:
    out = tmp_path / "out"
    assert main(["benchmark", str(suite), "--out", str(out), "--no-progress",
                 "--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()  # nothing generated, nothing trained


@pytest.mark.parametrize("body, needle", [
    # a second experiment pasted under the first one's name replaced it silently
    ("experiments:\n  t1: {datasets: [pm], methods: [erm]}\n"
     "  t1: {datasets: [pm], methods: [oracle]}\n",
     "key 't1' given twice (lines 6 and 7)"),
    # ... and so did a repeated key inside a flow mapping (the first setting's value lost)
    ("experiments:\n  t1: {datasets: [pm], methods: [erm], settings: {a: {epochs: 1}, "
     "a: {epochs: 2}}}\n", "key 'a' given twice (line 6)"),
])
def test_a_key_given_twice_is_refused(tmp_path, capsys, body, needle):
    _refused(tmp_path, capsys, _write(tmp_path, body), needle)


def test_yaml_merge_keys_still_override(tmp_path):
    body = ("experiments:\n  t1: &base {datasets: [pm], methods: [erm], seeds: [0]}\n"
            "  t2:\n    <<: *base\n    seeds: [1]\n")
    suite = bm.load_suite(_write(tmp_path, body))
    assert [e.seeds for e in suite.experiments] == [[0], [1]]


EXP = "experiments:\n  t1:\n    datasets: [pm]\n"


@pytest.mark.parametrize("body, needle", [
    # a misspelt metric gave a column of "–" and exit code 0
    (EXP + "    methods: [erm]\n    metrics: [test.acuracy]\n",
     "experiment 't1': unknown metric 'test.acuracy'; valid: <split>.<name>"),
    (EXP + "    methods: [erm]\n    metrics: [test.deletion.0.020]\n",
     "metric 'test.deletion.0.020': write the fraction as metrics.json does, "
     "test.deletion.0.02"),
    (EXP + "    methods: [erm]\n    metrics: [test.deletion.0.05]\n",
     "metric 'test.deletion.0.05': the runs compute deletion at 0.002, 0.01, 0.02, 0.1, 0.2 "
     "only"),
    (EXP + "    methods: [erm]\n    metrics: []\n", "experiment 't1': metrics is empty"),
    # unknown keys in a setting or a method's set: recorded as failed runs after every
    # other run had trained (README: unknown keys fail when the suite is loaded)
    (EXP + "    methods: [erm]\n    settings: {a: {epochz: 2}}\n",
     "experiment 't1': method 'erm', setting 'a': unknown config key 'epochz'; did you mean "
     "'epochs'?"),
    (EXP + "    methods: [{name: rrr, label: R, set: {method.lamb: 3}}]\n",
     "experiment 't1': method 'R': unknown parameter(s) lamb for method 'rrr'"),
    (EXP + "    methods: [erm, rrr]\n    settings: {l2: {method.lam: 1}}\n",
     "experiment 't1': method 'erm', setting 'l2': unknown parameter(s) lam for method 'erm'"),
    # a misspelt method was skipped as "not registered", exit code 0
    (EXP + "    methods: [erm, causal_align]\n",
     "experiment 't1': unknown method 'causal_align'; did you mean 'causal-align'?"),
])
def test_suite_mistakes_fail_at_load(tmp_path, capsys, body, needle):
    _refused(tmp_path, capsys, _write(tmp_path, body), needle)


def test_a_method_parameter_in_defaults_that_a_method_lacks_fails_at_load(tmp_path):
    head = HEAD.replace("threads: 1}", "threads: 1, method.lam: 3}")
    with pytest.raises(ConfigError, match="method 'erm': unknown parameter"):
        bm.load_suite(_write(tmp_path, EXP + "    methods: [rrr, erm]\n", head))
    # the methods that have it are fine, and bad values still wait for plan (recorded)
    suite = bm.load_suite(_write(tmp_path, EXP + "    methods: [rrr, cdep]\n", head))
    assert {s.config.method_args["lam"] for s in bm.plan(suite)} == {3}


def test_an_unknown_method_of_no_close_name_is_still_skipped(tmp_path):
    suite = bm.load_suite(_write(tmp_path, EXP + "    methods: [erm, no-such-method]\n"))
    assert [s.skip_reason is not None for s in bm.plan(suite)] == [False, True]


def test_a_missing_dataset_path_is_refused_before_any_run(tmp_path, capsys, monkeypatch):
    from causalign.data.synth import SynthConfig, generate

    generate(tmp_path / "real", SynthConfig(n_train=8, n_val=4, n_test=4, size=32))
    (tmp_path / "suites").mkdir()
    # relative to the suite file's folder, not the current one: the synthetic dataset's
    # runs trained first, then each run of the missing one failed
    body = ("  real: {path: real}\n" + EXP.replace("[pm]", "[pm, real]")
            + "    methods: [erm]\n")
    suite = tmp_path / "suites" / "mine.yaml"
    suite.write_text(HEAD + body)
    monkeypatch.chdir(tmp_path)
    _refused(tmp_path, capsys, suite,
             f"dataset 'real': {suite.parent / 'real'} does not exist (a relative path is "
             f"taken from the suite file's folder, {suite.parent}); the one under the current "
             f"folder is {tmp_path / 'real'}: write that")
    (tmp_path / "suites" / "real").mkdir()
    _refused(tmp_path, capsys, suite, "real has no dataset.yaml (not a dataset)")
    suite.write_text(HEAD + body.replace("{path: real}", "{path: }"))
    _refused(tmp_path, capsys, suite, "dataset 'real': path must be a folder name, got None")


def test_a_default_given_explicitly_is_the_same_run(tmp_path):
    # Table 1's `set: {method.lam: 10}` (rrr's default) and another table's plain rrr were
    # two runs with one configuration, trained twice (the second into rrr-<hash>)
    body = ("experiments:\n  t1: {datasets: [pm], methods: [{name: rrr, set: {method.lam: 10}}]}"
            "\n  t2: {datasets: [pm], methods: [rrr], settings: {default: {}, l1: "
            "{method.lam: 1}, l10: {method.lam: 10.0}}}\n")
    specs = bm.plan(bm.load_suite(_write(tmp_path, body)))
    assert [s.key for s in specs] == ["pm/rrr/seed0", "pm/rrr@l1/seed0"]
    assert specs[0].roles == {"t1": [("rrr", "default")],
                              "t2": [("rrr", "default"), ("rrr", "l10")]}
    # the paper suite trained causal-align seed 0 at its defaults four times (Tables 1, 7's
    # l1, and the default alpha and lambda of the sensitivity tables)
    paper = [s for s in bm.plan(bm.load_suite("paper")) if s.method == "causal-align"
             and s.dataset == "plus-minus" and s.seed == 0 and not s.config.method_args]
    assert len(bm.plan(bm.load_suite("paper"))) == 42
    assert [s.key for s in paper] == ["plus-minus/Ours-causal-align/seed0"]


def test_a_cell_over_fewer_seeds_is_marked():
    # erm has seeds 0-2 (a `--seeds 2 --methods erm` rerun), rrr only 0-1: the note said
    # "mean (std) over seeds 0, 1, 2" for both rows and nothing told rrr's cell apart
    exp = bm.Experiment("t", "t", ["d"], [bm.MethodSpec("erm", "erm"),
                                          bm.MethodSpec("rrr", "rrr")], [0, 1, 2],
                        {"default": {}}, "method", ["test.accuracy"])

    def rec(method: str, seed: int, acc: float, status: str = "done") -> dict:
        return {"key": f"d/{method}/seed{seed}", "dataset": "d", "method": method,
                "label": method, "setting": "default", "seed": seed, "experiments": ["t"],
                "status": status, "metrics": {"test": {"accuracy": acc}}}

    runs = [rec("erm", 0, 0.5), rec("erm", 1, 0.7), rec("erm", 2, 0.6),
            rec("rrr", 0, 0.4), rec("rrr", 1, 0.8)]
    table = bm.experiment_table(exp, runs)
    assert table.rows == [["erm", "0.600 (0.082)"], ["rrr", "0.600 (0.200)†"]]
    assert "† over fewer seeds, without rrr: seed 2" in table.notes
    # every cell over every seed: no mark, no note
    table = bm.experiment_table(exp, runs + [rec("rrr", 2, 0.6)])
    assert table.rows[1] == ["rrr", "0.600 (0.163)"]
    assert not any("†" in n for n in table.notes)


def _folder_dataset(root: Path, seed: int) -> None:
    import numpy as np

    from causalign.data import DatasetWriter
    from causalign.data.format import DatasetMeta

    rng = np.random.default_rng(seed)
    with DatasetWriter(root, DatasetMeta("toy", ["neg", "pos"], [])) as w:
        for split, n in (("train", 8), ("val", 4), ("test", 4)):
            for i in range(n):
                mask = np.zeros((32, 32), np.uint8)
                mask[8:16, 8:16] = 1
                w.add(rng.random((32, 32)).astype(np.float32), label=i % 2, split=split,
                      mask=mask)


def test_a_finished_run_on_other_data_is_not_collected(tmp_path):
    # `path:` pointed at another dataset (or a second suite with another dataset of that
    # name writing into the same OUT): the run trained on the first was collected as done
    _folder_dataset(tmp_path / "a", seed=0)
    _folder_dataset(tmp_path / "b", seed=1)  # same manifest, other pixels
    shutil.copytree(tmp_path / "a", tmp_path / "a-moved")
    out = tmp_path / "out"

    def run(path: str) -> dict:
        head = ("defaults: {epochs: 1, width: 4, batch_size: 8, threads: 1, "
                "eval_saliency: gradient}\n"
                f"datasets:\n  toy: {{path: {path}}}\n")
        suite = bm.load_suite(_write(tmp_path, "experiments:\n  t: {datasets: [toy], "
                                               "methods: [erm]}\n", head))
        (rec,) = bm.run_suite(suite, out, progress=False, report=False, log=lambda _: None
                              )["runs"]
        return rec

    assert run("a")["trained_now"]
    moved = run("a-moved")  # a moved copy of the same data is the same dataset
    assert moved["status"] == "done" and not moved["trained_now"]
    other = run("b")
    assert other["status"] == "failed", other
    assert "holds a finished run trained on other data than" in other["error"]
    assert "same manifest, but its images, masks or labels differ" in other["error"]


@pytest.mark.parametrize("ref, needle", [
    # each crashed tables.md (AttributeError/TypeError) after every run had trained
    ("see paper", "reference: expected {source, columns, rows}, got str"),
    ("{columns: [acc], rows: [erm]}", "reference: rows must map a row name"),
    ("{columns: acc, rows: {erm: [0.5]}}", "reference: columns must be a list"),
    ("{columns: [acc, auc], rows: {erm: 0.5}}", "row 'erm' must be a list of 2 value(s)"),
    # a misspelt key dropped the header silently
    ("{colums: [acc], rows: {erm: [0.5]}}",
     "reference: unknown key(s) colums; valid: source, columns, rows; did you mean 'columns'?"),
])
def test_a_malformed_reference_table_fails_at_load(tmp_path, ref, needle):
    body = EXP + f"    methods: [erm]\n    reference: {ref}\n"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        bm.load_suite(_write(tmp_path, body))


def test_a_seed_listed_twice_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="experiment 't1': seed '1' is listed twice"):
        bm.load_suite(_write(tmp_path, EXP + "    methods: [erm]\n    seeds: [0, 1, 1]\n"))


def test_a_runs_seconds_leave_out_generating_its_dataset(tmp_path, monkeypatch):
    import time

    def slow_generate(root, cfg, progress=None):  # stands in for the generator
        time.sleep(0.6)
        root.mkdir(parents=True)

    def fake_run(spec, data, run_dir, digests=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"method": spec.method, "test": {"accuracy": 0.5}}

    monkeypatch.setattr("causalign.data.synth.generate", slow_generate)
    monkeypatch.setattr(bm, "run_one", fake_run)
    suite = bm.load_suite(_write(tmp_path, EXP + "    methods: [erm]\n    seeds: [0, 1]\n"))
    runs = bm.run_suite(suite, tmp_path / "out", progress=False, report=False,
                        log=lambda _: None)["runs"]
    assert [r["status"] for r in runs] == ["done", "done"]
    assert runs[0]["seconds"] < 0.3, runs[0]["seconds"]  # was 0.6 s + the run's own


def test_a_second_suite_in_the_same_out_says_it_replaces_the_tables(tmp_path, monkeypatch):
    def fake_run(spec, data, run_dir, digests=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"method": spec.method, "test": {"accuracy": 0.5}}

    monkeypatch.setattr(bm, "run_one", fake_run)
    monkeypatch.setattr("causalign.data.synth.generate",
                        lambda root, cfg, progress=None: root.mkdir(parents=True))
    out = tmp_path / "out"
    first = bm.load_suite(_write(tmp_path, EXP + "    methods: [erm]\n"))
    bm.run_suite(first, out, progress=False, report=False, log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same suite again: nothing to say
        bm.run_suite(first, out, progress=False, report=False, log=lambda _: None)
    second = bm.load_suite(_write(tmp_path, EXP + "    methods: [erm]\n",
                                  HEAD.replace("name: mine", "name: other")))
    with pytest.warns(UserWarning, match=r"held the results of suite 'mine': results.json, "
                                         r"results.csv, tables.md and report.html now show "
                                         r"suite 'other'"):
        bm.run_suite(second, out, progress=False, report=False, log=lambda _: None)


@pytest.mark.parametrize("body, needle", [
    # an empty settings list ran the default setting (an empty seeds list is refused)
    ("experiments:\n  t1: {datasets: [pm], methods: [erm], settings: []}\n",
     "experiment 't1': settings is empty (omit it for one 'default' setting)"),
    ("experiments:\n  t1: {datasets: [pm], methods: [erm], settings: {}}\n",
     "experiment 't1': settings is empty"),
    # `title:` headed the table "None", `label:` named the method's row "None"
    ("experiments:\n  t1: {datasets: [pm], methods: [erm], title: }\n",
     "experiment 't1': title is empty (omit it to use the experiment's name)"),
    ("experiments:\n  t1: {datasets: [pm], methods: [{name: erm, label: }]}\n",
     "experiment 't1': method 'erm': label is empty (omit it to use the method's name)"),
])
def test_an_empty_title_label_or_settings_is_refused(tmp_path, capsys, body, needle):
    _refused(tmp_path, capsys, _write(tmp_path, body), needle)


def test_a_dataset_unreadable_at_first_is_compared_once_readable(tmp_path, monkeypatch):
    # the benchmark's digest cache kept "no digest" for a dataset whose pixels it could not
    # read on first sight (same manifest), so it was never compared again in that benchmark
    from causalign.engine import provenance

    _folder_dataset(tmp_path / "a", seed=0)
    _folder_dataset(tmp_path / "b", seed=1)  # same manifest, other pixels
    out = tmp_path / "out"
    head = ("defaults: {epochs: 1, width: 4, batch_size: 8, threads: 1, "
            "eval_saliency: gradient}\ndatasets:\n  toy: {path: a}\n")
    suite = bm.load_suite(_write(tmp_path, "experiments:\n  t: {datasets: [toy], "
                                           "methods: [erm]}\n", head))
    (rec,) = bm.run_suite(suite, out, progress=False, report=False, log=lambda _: None
                          )["runs"]
    run_dir, digests = out / rec["run_dir"], {}
    real = provenance.content_digest

    def unreadable(*args, **kwargs):
        raise OSError("image being copied")

    monkeypatch.setattr(provenance, "content_digest", unreadable)
    assert bm._data_diff(run_dir, tmp_path / "b", digests) is None  # cannot tell yet
    monkeypatch.setattr(provenance, "content_digest", real)
    assert "images, masks or labels differ" in (
        bm._data_diff(run_dir, tmp_path / "b", digests) or "")


def test_editing_the_first_of_two_colliding_runs_keeps_the_others_finished_run(tmp_path):
    # t1 and t2 shared one erm run (runs/toy/erm/seed0). Editing t1's erm `set:` gave the
    # edited run that folder (first in suite order), where it was refused as "a finished run
    # with other settings", and t2's unchanged erm retrained under runs/toy/erm-<hash>/
    _folder_dataset(tmp_path / "a", seed=0)
    out = tmp_path / "out"
    head = ("defaults: {epochs: 1, width: 4, batch_size: 8, threads: 1, "
            "eval_saliency: gradient}\ndatasets:\n  toy: {path: a}\n")

    def run(t1_method: str) -> dict:
        body = (f"experiments:\n  t1: {{datasets: [toy], methods: [{t1_method}]}}\n"
                "  t2: {datasets: [toy], methods: [erm]}\n")
        suite = bm.load_suite(_write(tmp_path, body, head))
        recs = bm.run_suite(suite, out, progress=False, report=False, log=lambda _: None
                            )["runs"]
        return {tuple(r["experiments"]): r for r in recs}

    first = run("erm")
    (shared,) = first.values()
    assert shared["trained_now"] and shared["run_dir"] == "runs/toy/erm/seed0"
    second = run("{name: erm, set: {lr: 0.002}}")
    assert {k: (r["status"], r["trained_now"]) for k, r in second.items()} == {
        ("t1",): ("done", True), ("t2",): ("done", False)}, second
    assert second[("t2",)]["run_dir"] == "runs/toy/erm/seed0"  # the finished run, reused
    assert second[("t1",)]["run_dir"].startswith("runs/toy/erm-")
