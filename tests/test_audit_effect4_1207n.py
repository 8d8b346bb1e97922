"""Audit (part 4): do the options the first three audits (test_audit_effect_1207f.py,
test_audit_effect2_1207m.py, test_audit_effect3_1207m.py) left unchecked act? `benchmark
--settings`, `bench step`'s flags, the cbis-ddsm / busi / decoy-mnist `data import` flags, and
the compare / evaluate / predict / curves / export / causal ccce / causal pc flags.

Each guard: changing the option from its default changes an observable (what `bench step`'s
timed step sees, the suite's run configs, imported files, a written JSON or figure). An option
accepted but unread in a combination is refused in one line.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from causalign.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_real import write_busi, write_cbis, write_mnist  # noqa: E402
from test_audit_effect2_1207m import _import_digest, _suite_seen  # noqa: E402


def _err_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect a user error: its one stderr line."""
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ runs shared below


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Two 1-epoch ERM runs (seeds 0, 1) on the tiny split."""
    base = tmp_path_factory.mktemp("effect4")
    out = []
    for seed in (0, 1):
        run = base / f"erm{seed}"
        assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run),
                     "--epochs", "1", "--seed", str(seed), "--set", "width=4",
                     "--set", "threads=1", "--no-progress"]) == 0
        out.append(run)
    return out


# ------------------------------------------------------------------ compare


def test_compare_split_with_two_csv_files_is_refused(runs, tmp_path, capsys):
    """Regression: `compare A.csv B.csv --split val` read the two files as they are and
    printed the comparison, exit 0: --split was accepted and unread (the JSON was that of
    the files, whatever split they hold). Now refused in one line naming --split."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    shutil.copy(runs[0] / "predictions_test.csv", a)
    shutil.copy(runs[1] / "predictions_test.csv", b)
    line = _err_line(capsys, ["compare", str(a), str(b), "--split", "val"])
    assert "--split" in line and "CSV" in line
    assert main(["compare", str(a), str(b)]) == 0  # without it: as before


def test_compare_split_reads_the_run_folders_split(runs, capsys):
    """Guard: with run folders (or one folder and a CSV), --split picks the predictions file
    (val and test accuracies, files named in the JSON)."""
    def cmp(*extra):
        capsys.readouterr()
        assert main(["compare", str(runs[0]), str(runs[1]), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    test, val = cmp(), cmp("--split", "val")
    assert test["predictions_a"].endswith("predictions_test.csv")
    assert val["predictions_a"].endswith("predictions_val.csv")
    assert (test["accuracy_a"], test["auc_a"]) != (val["accuracy_a"], val["auc_a"])
    capsys.readouterr()
    assert main(["compare", str(runs[0]), str(runs[1] / "predictions_val.csv"),
                 "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["auc_a"] == val["auc_a"]


# ------------------------------------------------------------------ bench step


def _bench_seen(monkeypatch, capsys, *flags: str) -> tuple[dict, list[dict]]:
    """`bench step`'s JSON, and per step call (warm-up and timed, ERM's and the method's)
    what the timed step saw: the method, input shape, labels' range, model class and
    outputs, torch's CPU threads."""
    from causalign.engine import bench

    calls: list[dict] = []
    real = bench._TimedStep.__call__

    def spy(self):
        with torch.no_grad():
            outputs = self.model(self.batch["image"]).shape[-1]
        calls.append({"method": self.method_name, "shape": tuple(self.batch["image"].shape),
                      "labels": int(self.batch["label"].max()) + 1,
                      "model": type(self.model).__name__, "outputs": outputs,
                      "threads": torch.get_num_threads(),
                      "lam": getattr(self.method.params, "lam", None)})
        return real(self)

    capsys.readouterr()
    with monkeypatch.context() as mp:  # one spy at a time: a second call's wraps the first
        mp.setattr(bench._TimedStep, "__call__", spy)
        assert main(["bench", "step", "--size", "16", "--batch-size", "4", "--steps", "1",
                     "--warmup", "0", "--threads", "1", *flags]) == 0
    return json.loads(capsys.readouterr().out), calls


BENCH = [
    (["--size", "24"], lambda c: c["shape"][-2:] == (24, 24), "size", 24),
    (["--batch-size", "6"], lambda c: c["shape"][0] == 6, "batch_size", 6),
    (["--classes", "3"], lambda c: c["outputs"] == 3 and c["labels"] <= 3, "classes", 3),
    (["--model", "resnet18"], lambda c: c["model"] == "ResNet", "model", "resnet18"),
    (["--threads", "2"], lambda c: c["threads"] == 2, "threads", 2),
    (["--depth", "4", "--model", "multiview"], lambda c: c["shape"][2:] == (4, 16, 16),
     "depth", 4),
]


@pytest.mark.parametrize("flags,seen,key,want", BENCH, ids=[f[0] for f, *_ in BENCH])
def test_bench_step_flag_changes_what_is_timed(monkeypatch, capsys, flags, seen, key, want):
    """Guard: each `bench step` flag changes what the timed step runs on (input shape, label
    range and model outputs, the network built, torch's threads during the steps), and the
    JSON records the value used."""
    base, base_calls = _bench_seen(monkeypatch, capsys)
    got, calls = _bench_seen(monkeypatch, capsys, *flags)
    assert calls and all(seen(c) for c in calls), calls
    assert not all(seen(c) for c in base_calls), base_calls
    assert got[key] == want and base[key] != want


def test_bench_step_steps_and_warmup_count_the_step_calls(monkeypatch, capsys):
    """Guard: --steps and --warmup set how many steps run (ERM alone: one each); --method
    rrr alternates ERM and RRR steps, the same count each."""
    for flags, n in (([], 1), (["--steps", "3"], 3), (["--warmup", "2"], 3),
                     (["--steps", "2", "--warmup", "1"], 3)):
        got, calls = _bench_seen(monkeypatch, capsys, *flags)
        assert len(calls) == n, (flags, len(calls))
        assert got["steps"] == (int(flags[1]) if flags[:1] == ["--steps"] else 1)
    got, calls = _bench_seen(monkeypatch, capsys, "--method", "rrr", "--steps", "2")
    assert [c["method"] for c in calls] == ["erm", "rrr", "erm", "rrr"]
    assert got["method"] == "rrr"


def test_bench_step_set_reaches_the_method(monkeypatch, capsys):
    """Guard: --set method.lam=7 builds the timed RRR with lam 7 (recorded in method_args)."""
    got, calls = _bench_seen(monkeypatch, capsys, "--method", "rrr", "--set", "method.lam=7")
    assert [c["lam"] for c in calls if c["method"] == "rrr"] == [7.0]
    _, calls = _bench_seen(monkeypatch, capsys, "--method", "rrr")
    assert [c["lam"] for c in calls if c["method"] == "rrr"] == [10.0]
    assert got["method_args"] == {"lam": 7}


def test_bench_step_profile_adds_the_profile(monkeypatch, capsys):
    """Guard: --profile adds profile_ms_per_step and profiled_step_ms (a second run)."""
    base, calls = _bench_seen(monkeypatch, capsys)
    got, more = _bench_seen(monkeypatch, capsys, "--profile")
    assert "profile_ms_per_step" not in base and "profiled_step_ms" in got
    assert len(more) == 2 * len(calls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_bench_step_cuda_without_a_gpu_fails_in_one_line(capsys, device):
    """Guard: --device cuda on a machine without CUDA stops in one line before timing."""
    line = _err_line(capsys, ["bench", "step", "--device", device, "--size", "16",
                              "--batch-size", "2", "--steps", "1", "--warmup", "0"])
    assert "CUDA is not available" in line


# ------------------------------------------------------------------ benchmark --settings


def test_benchmark_settings_selects_the_runs_overrides(tmp_path, monkeypatch):
    """Guard: `benchmark paper --only table7 --settings l1,l2` keeps those two settings, and
    the planned runs' configs carry their override (method.distance) and nothing else."""
    from causalign.engine import benchmark as B

    suites = []
    seen = _suite_seen(monkeypatch)
    fake = B.run_suite

    def keep(suite, *a, **k):
        suites.append(suite)
        return fake(suite, *a, **k)

    monkeypatch.setattr(B, "run_suite", keep)
    with pytest.raises(SystemExit):
        main(["benchmark", "paper", "--out", str(tmp_path), "--only", "table7",
              "--settings", "l1,l2", "--seeds", "0"])
    assert seen["settings"] == ["l1", "l2"]
    specs = B.plan(suites[0])
    specs = list(specs.values()) if isinstance(specs, dict) else list(specs)
    assert sorted(s.config.method_args["distance"] for s in specs) == ["l1", "l2"]
    assert "--settings l1,l2" in suites[0].selection


# ------------------------------------------------------------------ data import flags


@pytest.fixture(scope="module")
def src3(tmp_path_factory):
    """The real-format fixtures of the three importers; MNIST with 100 training digits (10 a
    class: with 2 a class the stratified split gives each split one whatever --val-frac)."""
    base = tmp_path_factory.mktemp("effect4_real")
    return {"busi": write_busi(base / "busi")["root"],
            "cbis-ddsm": write_cbis(base / "cbis")["root"],
            "decoy-mnist": write_mnist(base / "mnist", n_train=100)["root"]}


_BASE = {"busi": {"size": 16}, "cbis-ddsm": {"size": 16}, "decoy-mnist": {}}
IMPORT_ACTS = [
    ("busi", {"classes": "benign,malignant,normal"}), ("busi", {"val_frac": 0.3}),
    ("busi", {"test_frac": 0.3}), ("busi", {"dup_threshold": 0}),
    ("busi", {"dup_threshold": 32}), ("busi", {"drop_duplicates": True}),
    ("busi", {"seed": 3}), ("busi", {"size": 24}), ("busi", {"shortcut": "intensity"}),
    ("busi", {"image_format": "npy"}), ("busi", {"limit": 1}),
    ("cbis-ddsm", {"abnormality": "calc"}), ("cbis-ddsm", {"abnormality": "both"}),
    ("cbis-ddsm", {"context": 1.0}), ("cbis-ddsm", {"val_frac": 0.0}),
    ("cbis-ddsm", {"seed": 3}), ("cbis-ddsm", {"size": 24}),
    ("cbis-ddsm", {"shortcut": "intensity"}), ("cbis-ddsm", {"image_format": "npy"}),
    ("cbis-ddsm", {"limit": 1}),
    ("decoy-mnist", {"val_frac": 0.4}), ("decoy-mnist", {"mask_dilate": 0}),
    ("decoy-mnist", {"shade_step": 5}), ("decoy-mnist", {"seed": 3}),
    ("decoy-mnist", {"size": 32}), ("decoy-mnist", {"shortcut": "intensity"}),
    ("decoy-mnist", {"image_format": "npy"}), ("decoy-mnist", {"limit": 1}),
]


@pytest.mark.parametrize("kind,flag", IMPORT_ACTS,
                         ids=[f"{k}-{next(iter(f))}={next(iter(f.values()))}"
                              for k, f in IMPORT_ACTS])
def test_import_flag_changes_the_files(src3, tmp_path, kind, flag):
    """Guard: each cbis-ddsm / busi / decoy-mnist flag, changed from its default, changes
    the files written (manifest, images, masks) and is recorded in .import/state.json."""
    a = _import_digest(kind, src3[kind], tmp_path / "a", _BASE[kind])
    b = _import_digest(kind, src3[kind], tmp_path / "b", {**_BASE[kind], **flag})
    assert a != b, f"{kind} {flag} wrote the same files"
    state = json.loads((tmp_path / "b" / ".import" / "state.json").read_text())
    (key, value), = flag.items()
    assert state["options"][key] == value


# ------------------------------------------------------------------ causal ccce / pc


CCCE = [["--split", "test"], ["--model", "frequency"], ["--max-size", "1"], ["--tol", "0.5"]]


@pytest.mark.parametrize("flags", CCCE, ids=[f[0] for f in CCCE])
def test_ccce_flag_changes_the_report(tiny_data, tmp_path, flags):
    """Guard: each `causal ccce` flag changes the JSON report, which records the value."""
    def report(path, *extra):
        assert main(["causal", "ccce", str(tiny_data), "--json", str(path), *extra]) == 0
        return json.loads(path.read_text())

    base, other = report(tmp_path / "a.json"), report(tmp_path / "b.json", *flags)
    strip = ("split", "label_model", "max_size", "tol", "data")
    assert {k: v for k, v in base.items() if k not in strip} != \
        {k: v for k, v in other.items() if k not in strip}
    key = {"--model": "label_model", "--max-size": "max_size"}.get(flags[0], flags[0][2:])
    assert str(other[key]) == flags[1] and str(base[key]) != flags[1]


PC = [["--components", "2"], ["--alpha", "0.3"],
      ["--attributes", "subtlety,margin,spiculation"]]


@pytest.mark.parametrize("flags", PC, ids=[f[0] for f in PC])
def test_pc_flag_changes_the_check(runs, tmp_path, flags):
    """Guard: each `causal pc` flag changes pc_check.json (the figure path aside)."""
    def check(out, *extra):
        assert main(["causal", "pc", str(runs[0]), "--split", "train", "--out", str(out),
                     *extra]) == 0
        rec = json.loads((out / "pc_check.json").read_text())
        rec.pop("figure", None)
        return rec

    assert check(tmp_path / "a") != check(tmp_path / "b", *flags)


# ------------------------------------------------------------------ predict / evaluate / ...


def test_predict_flags_act(runs, tiny_data, tmp_path, monkeypatch, capsys):
    """Guard: predict's --split picks the dataset's split (other ids), --batch-size the
    forward passes (16 images: 1 of 256, 6 of 3; the probabilities equal to 1e-6), and
    --saliency with --maps writes that method's maps."""
    from causalign.models.cnn import SevenLayerCNN

    forwards = []
    real = SevenLayerCNN.forward
    monkeypatch.setattr(SevenLayerCNN, "forward",
                        lambda self, x, *a, **k: forwards.append(len(x)) or real(self, x, *a, **k))

    def run(name, *extra):
        forwards.clear()
        assert main(["predict", str(runs[0]), str(tiny_data), "--out", str(tmp_path / name),
                     "--no-progress", *extra]) == 0
        with open(tmp_path / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return rows, list(forwards)

    (base, fb), (val, _), (small, fs) = run("a.csv"), run("v.csv", "--split", "val"), \
        run("s.csv", "--batch-size", "3")
    assert {r["id"] for r in base}.isdisjoint(r["id"] for r in val)
    assert fb == [16] and fs == [3] * 5 + [1]
    assert max(abs(float(a["p_benign"]) - float(b["p_benign"]))
               for a, b in zip(base, small, strict=True)) < 1e-6
    maps = {}
    for sal in ("gradient", "wbp"):
        run(f"{sal}.csv", "--saliency", sal, "--maps", str(tmp_path / sal))
        maps[sal] = (tmp_path / sal / "maps" / "test_00000.npy").read_bytes()
    assert maps["gradient"] != maps["wbp"]


def test_evaluate_output_flags_write_what_they_name(runs, tmp_path, capsys):
    """Guard: evaluate's --out (the printed JSON), --predictions (one row a sample of the
    split) and --reliability (a PNG) write their files; --data another dataset changes the
    metrics and is recorded."""
    from causalign.data.synth import SynthConfig, generate

    out, preds, fig = tmp_path / "m.json", tmp_path / "p.csv", tmp_path / "r.png"
    capsys.readouterr()
    assert main(["evaluate", str(runs[0]), "--device", "cpu", "--no-progress", "--out",
                 str(out), "--predictions", str(preds), "--reliability", str(fig)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert len(preds.read_text().strip().splitlines()) == 1 + 16
    assert fig.read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "other"
    generate(other, SynthConfig(n_train=8, n_val=4, n_test=16, size=32, seed=9))
    assert main(["evaluate", str(runs[0]), "--device", "cpu", "--no-progress", "--data",
                 str(other)]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["data"] == str(other) and moved["loss"] != printed["loss"]


def test_curves_out_and_export_data_act(runs, tiny_data, tmp_path, capsys):
    """Guard: curves --out writes the figure there (default RUN/curves.png); export --data
    loads a run whose dataset has moved (refused in one line without it)."""
    fig = tmp_path / "c.png"
    assert main(["curves", str(runs[0]), "--out", str(fig)]) == 0
    assert fig.read_bytes()[:4] == b"\x89PNG" and not (runs[0] / "curves.png").exists()
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace(str(tiny_data), str(tmp_path / "gone")))
    line = _err_line(capsys, ["export", str(run), "--out", str(tmp_path / "m.pt2")])
    assert "--data" in line
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt2"), "--data",
                 str(tiny_data)]) == 0
    assert (tmp_path / "m.pt2").is_file()


def test_pc_check_json_records_the_data_and_attributes_used(runs, tiny_data, tmp_path):
    """Regression: pc_check.json recorded run, split, alpha and n_components but not the
    dataset (`--data` another one gave a record that read as the run's own) nor the
    attributes that entered the graph (`--attributes`). Both are recorded now."""
    from causalign.data.format import LesionDataset
    from causalign.data.synth import SynthConfig, generate

    other = tmp_path / "other"
    generate(other, SynthConfig(n_train=40, n_val=4, n_test=4, size=32, seed=9))
    every = list(LesionDataset(tiny_data, "train").meta.attributes)
    for out, extra, data, attrs in (
            (tmp_path / "a", [], tiny_data, None),
            (tmp_path / "b", ["--data", str(other), "--attributes", "subtlety,margin"], other,
             ["subtlety", "margin"])):
        assert main(["causal", "pc", str(runs[0]), "--split", "train", "--out", str(out),
                     *extra]) == 0
        rec = json.loads((out / "pc_check.json").read_text())
        assert rec["data"] == str(data)
        want = attrs or [a for a in every if a not in rec["constant_attributes"]]
        assert rec["attributes"] == want


def test_cbis_context_at_the_crop_floor_is_said(src3, tmp_path):
    """Regression: on lesions small enough that the crop side (box × (1 + 2·context)) stays
    under the 32 px floor, `--context` changes nothing: the fixture's calcifications gave
    byte-identical images at --context 0.5 and 1.0, and the import said nothing. The summary
    now counts those crops in its notes (data-dependent, so a note, not a refusal)."""
    from causalign.data.importers import run_import

    summaries, digests = [], []
    for c in (0.5, 1.0):
        out = tmp_path / f"c{c}"
        digests.append(_import_digest("cbis-ddsm", src3["cbis-ddsm"], out,
                                      {"size": 16, "abnormality": "calc", "context": c}))
        summaries.append(json.loads((out / "import_summary.json").read_text()))
    assert digests[0] == digests[1]
    for s in summaries:
        said = [n for w, n in s["notes"].items() if "--context" in w]
        assert said == [s["n"]], s["notes"]
    mass = run_import("cbis-ddsm", src3["cbis-ddsm"], tmp_path / "m", {"size": 16,
                                                                       "context": 3.0})
    assert not any("--context" in w for w in mass["notes"])
