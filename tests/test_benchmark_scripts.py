"""Smoke and regression tests of the measuring scripts in benchmarks/ at tiny sizes.

Scripts already covered elsewhere: bench_gpu / bench_memory (test_speed_paths.py),
causal_align_grad_in_training (test_causal_align.py), cf_localisation and
counterfactual_solvers (test_counterfactual.py), benchmarks/suites (test_benchmark.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from causalign.data.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _strict_json(path: Path):
    """Parse as standard JSON: NaN/Infinity (Python's json extension) fail the test."""
    def refuse(const: str):
        raise AssertionError(f"{path.name} holds the non-standard JSON constant {const}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _cross_site_result(seed: int, auc: list[list[float | None]], figures: dict) -> dict:
    return {"seed": seed, "sites": 2, "epochs": 1, "ppi_overrides": {},
            "erm": {"auc": auc, **figures}, "ppi": {"auc": auc, **figures}}


def test_cross_site_seeds_leaves_undefined_cells_out(tmp_path, monkeypatch):
    """A cross_site result with a null cell (a one-class test split has no AUC) used to crash
    the seed summary (None in a float array); the cell is now left out of the mean, and a
    cell undefined in every seed stays null instead of becoming NaN."""
    seeds_mod = _load("cross_site_seeds")
    figs0 = {"mean": 0.6, "in_site_mean": 0.7, "cross_site_mean": 0.5, "gap_in_minus_cross": 0.2}
    figs1 = {"mean": 0.8, "in_site_mean": 0.9, "cross_site_mean": 0.7, "gap_in_minus_cross": 0.2}
    r0 = _cross_site_result(0, [[0.7, None], [0.5, None]], figs0)
    r1 = _cross_site_result(1, [[0.9, 0.6], [0.7, None]], figs1)
    paths = []
    for r in (r0, r1):
        p = tmp_path / f"cross_site_seed{r['seed']}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    out = tmp_path / "out" / "seeds.json"
    monkeypatch.setattr("sys.argv", ["cross_site_seeds.py", *paths, "--out", str(out)])
    seeds_mod.main()
    s = _strict_json(out)
    for method in ("erm", "ppi"):
        mean = s[method]["auc_mean"]
        assert mean[0][0] == pytest.approx(0.8) and mean[1][0] == pytest.approx(0.6)
        assert mean[0][1] == pytest.approx(0.6)  # the one seed that has it
        assert mean[1][1] is None  # undefined in every seed
        assert s[method]["mean"]["mean"] == pytest.approx(0.7)
    assert "n/a" not in out.with_suffix(".md").read_text()


def test_cross_site_writes_no_nan_for_one_class_test_sites(tmp_path, monkeypatch):
    """At 2 sites × 16 test images one site's test split holds one class (AUC undefined):
    cross_site.json used to hold NaN (not valid JSON) and every summary figure was NaN; now
    the cell is null, the figures average the defined cells and the count is reported.
    Rerun on the same --work with other options, it refuses the stale data and runs."""
    cs = _load("cross_site")
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", [
        "cross_site.py", "--sites", "2", "--n-train", "32", "--n-val", "16", "--n-test", "16",
        "--size", "32", "--epochs", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    # at this size one site's val split holds one class too, which training now says
    with pytest.warns(UserWarning, match="the val split holds only class"):
        cs.main()
    r = _strict_json(out / "cross_site.json")
    assert r["sizes"]["per_site_test"] == [9, 7]
    # the matrices' rows and columns name their manifest site and their letter in the table
    assert r["site_ids"] == ["0", "1"] and r["site_names"] == ["A", "B"]
    assert "| A | B | Mean | STD |" in (out / "cross_site.md").read_text()
    undefined = 0
    for method in ("erm", "ppi"):
        s = r[method]
        cells = [v for row in s["auc"] for v in row]
        undefined = sum(v is None for v in cells)
        assert all(v is None or 0.0 <= v <= 1.0 for v in cells), cells
        assert s["undefined_cells"] == undefined
        for key in ("mean", "in_site_mean", "cross_site_mean", "gap_in_minus_cross"):
            assert _finite(s[key]), (method, key, s[key])
    assert undefined > 0, "the setup no longer yields a one-class test site"
    assert "n/a" in (out / "cross_site.md").read_text()
    assert (out / "cross_site.png").stat().st_size > 0

    # the same --work with other options: its data and runs used to be reused silently and
    # reported under the new options; now the script stops and names the difference
    args = ["cross_site.py", "--sites", "2", "--n-val", "16", "--n-test", "16", "--size", "32",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "other")]
    monkeypatch.setattr("sys.argv", [*args, "--n-train", "40", "--epochs", "1"])
    with pytest.raises(SystemExit, match="n_train: 32 there, 40 asked"):
        cs.main()
    monkeypatch.setattr("sys.argv", [*args, "--n-train", "32", "--epochs", "2"])
    with pytest.raises(SystemExit, match="finished with other settings .*epochs 1 -> 2"):
        cs.main()
    assert not (tmp_path / "other").exists()


def test_ppi_vs_erm_reports_the_data_it_used(tiny_data, tmp_path, monkeypatch):
    """With --data the table used to state the --n-* defaults (1000/300/500 images, 64 px)
    instead of the dataset's own split sizes and image size."""
    mod = _load("ppi_vs_erm")
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", [
        "ppi_vs_erm.py", "--data", str(tiny_data), "--runs", str(tmp_path / "runs"),
        "--seeds", "1", "--epochs", "1", "--out", str(out)])
    mod.main()
    r = _strict_json(out / "ppi_vs_erm.json")
    assert r["sizes"] == {"train": 48, "val": 16, "test": 16}
    assert r["image_shape"] == [1, 32, 32]
    for label, row in r["table"].items():
        for method in ("erm", "ppi"):
            assert _finite(row[method]["mean"]), (label, method)
    header = (out / "ppi_vs_erm.md").read_text().splitlines()[0]
    assert "48/16/16 images, 32×32 px" in header, header
    # the kept runs are reused only for the same settings and data
    base = ["ppi_vs_erm.py", "--runs", str(tmp_path / "runs"), "--seeds", "1",
            "--out", str(tmp_path / "other")]
    monkeypatch.setattr("sys.argv", [*base, "--data", str(tiny_data), "--epochs", "2"])
    with pytest.raises(SystemExit, match="finished with other settings .*epochs 1 -> 2"):
        mod.main()
    other = tmp_path / "other_data"
    generate(other, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=9))
    monkeypatch.setattr("sys.argv", [*base, "--data", str(other), "--epochs", "1"])
    with pytest.raises(SystemExit, match=f"data .* -> {other}"):
        mod.main()
    assert not (tmp_path / "other").exists()


def test_bench_saliency_wbp_smoke(tmp_path):
    mod = _load("bench_saliency_wbp")
    out = tmp_path / "wbp.json"
    mod.main(["--batch-size", "2", "--size", "32", "--repeats", "1", "--warmup", "1",
              "--out", str(out)])
    r = _strict_json(out)
    assert set(r["models"]) == {"small_cnn_relu", "small_cnn_gelu", "resnet18"}
    for m in r["models"].values():
        assert m["gradient_seconds"] > 0 and m["wbp_seconds"] > 0
        assert _finite(m["ratio_to_gradient"]) and m["ratio_to_gradient"] > 0
    assert r["max_ratio_to_gradient"] == max(m["ratio_to_gradient"] for m in r["models"].values())


def test_bench_saliency_smoke(tmp_path, monkeypatch):
    from causalign.explain import explainer_names

    mod = _load("bench_saliency")
    monkeypatch.setattr("sys.argv", [
        "bench_saliency.py", "--models", "cnn7", "--batch-size", "2", "--size", "32",
        "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    mod.main()
    r = _strict_json(tmp_path / "saliency_cost.json")
    rows = r["models"]["cnn7"]
    assert set(explainer_names()) <= set(rows)
    assert rows["gradient_map (unit)"]["ratio_to_gradient_map"] == 1.0
    for name, row in rows.items():
        assert row["seconds_per_image"] > 0 and _finite(row["ratio_to_gradient_map"]), name


def test_bench_erm_smoke(tmp_path, monkeypatch):
    mod = _load("bench_erm")
    out = tmp_path / "erm.json"
    monkeypatch.setattr("sys.argv", ["bench_erm.py", "--out", str(out), "--size", "32",
                                     "--batch-size", "4", "--repeats", "1", "--device", "cpu"])
    mod.main()
    r = _strict_json(out)
    assert r["erm_step"]["seconds_per_step"] > 0 and r["erm_step"]["ratio_to_erm"] == 1.0
    for key in ("predict_seconds", "full_eval_seconds", "full_eval_ms_per_image",
                "full_eval_over_predict"):
        assert _finite(r[key]) and r[key] > 0, key


def test_bench_dataset_memory_smoke(tmp_path, monkeypatch):
    """`all` writes a dataset of CUB-like crops, reads its training split in a fresh process
    and times compact batches against a float32 copy: every figure present and positive."""
    mod = _load("bench_dataset_memory")
    out = tmp_path / "dataset_memory.json"
    monkeypatch.setattr("sys.argv", ["bench_dataset_memory.py", "all", str(tmp_path / "d"),
                                     "--n-train", "64", "--n-eval", "2", "--size", "64",
                                     "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    mod.main()
    r = _strict_json(out)
    assert r["construct"]["n"] == 64 and r["construct"]["image_shape"] == [3, 64, 64]
    # 64 RGB 64 px crops are 0.75 MiB as stored uint8 (+ bool masks for half of them), 3 MiB
    # as float32: the cache holds the stored bytes
    assert 0.75 <= r["construct"]["cached_tensors_mib"] < 1.5
    assert r["construct"]["peak_rss_mib"] >= r["construct"]["rss_before_mib"] > 0
    assert r["batches"]["new_ms_per_batch"] > 0 and r["batches"]["old_ms_per_batch"] > 0


def test_bench_import_smoke(tmp_path, monkeypatch):
    """At a tiny scale every series is timed at N, 2N, 4N and gets its growth ratios; the
    LIDC scan with the XMLs apart reports its own header-indexing progress."""
    mod = _load("bench_import")
    out = tmp_path / "import_speed.json"
    monkeypatch.setattr("sys.argv", ["bench_import.py", "--scale", "0.002", "--out", str(out)])
    mod.main()
    r = _strict_json(out)
    for name in ("lidc", "lidc_xml_apart", "folder", "folder_colliding_ids",
                 "summary_many_classes"):
        n = r[name]["n"]
        assert n == [n[0], 2 * n[0], 4 * n[0]], name
        assert all(t >= 0 for t in r[name]["seconds"]) and len(r[name]["ratio_2n_over_n"]) == 2
    scans = r["lidc_xml_apart_progress"]
    assert any("indexing DICOM headers" in str(v) for v in scans.values())


def test_bench_causal_align_smoke(tmp_path, monkeypatch):
    mod = _load("bench_causal_align")
    out = tmp_path / "sweep.json"
    monkeypatch.setattr("sys.argv", [
        "bench_causal_align.py", "--out", str(out), "--ks", "1", "--cgs", "3,gn", "--size", "32",
        "--batch-size", "8", "--align-batch", "2", "--repeats", "1", "--erm-steps", "1",
        "--warm-visits", "1", "--ref-steps", "5", "--ref-polish", "1", "--skip-paper",
        "--optimizers", "adam", "--own-newton-steps", "2"])
    mod.main()
    r = _strict_json(out)
    row, gn = r["sweep"]
    assert (row["optimizer"], row["steps"], row["cg_iters"], row["hvp"]) == ("adam", 1, 3, "exact")
    assert (gn["cg_iters"], gn["hvp"]) == (None, "gauss-newton")  # the direct solve
    for one in (row, gn):
        assert one["cg_converged_warm"] == 1.0
        for key in ("cosine_cold", "cosine_warm", "cosine_cold_newton_ref",
                    "cosine_warm_own_ref", "own_ref_cosine_to_reference",
                    "cosine_warm_own_newton_ref", "own_newton_ref_cosine_to_reference"):
            assert -1.0 <= one[key] <= 1.0 and one[key] != 0.0, (key, one[key])
        assert one["ratio_to_erm"] > 0
    assert _finite(r["reference"]["align"])


def test_bench_causal_align_interrupted_sweep_keeps_and_continues_its_rows(tmp_path,
                                                                            monkeypatch):
    mod = _load("bench_causal_align")
    out = tmp_path / "sweep.json"
    argv = ["bench_causal_align.py", "--out", str(out), "--ks", "1", "--cgs", "3,gn",
            "--size", "32", "--batch-size", "8", "--align-batch", "2", "--repeats", "1",
            "--erm-steps", "1", "--warm-visits", "1", "--ref-steps", "5", "--ref-polish", "1",
            "--skip-paper", "--optimizers", "adam", "--no-own-ref"]
    monkeypatch.setattr("sys.argv", argv)
    real, solved = mod.config_grad, []

    def interrupted_at_gn(args, *rest, **kw):
        if args.get("hvp") == "gauss-newton":
            raise KeyboardInterrupt
        solved.append(args.get("cg_iters"))
        return real(args, *rest, **kw)

    monkeypatch.setattr(mod, "config_grad", interrupted_at_gn)
    with pytest.raises(KeyboardInterrupt):
        mod.main()
    partial = _strict_json(out)
    assert partial["complete"] is False and len(partial["sweep"]) == 1
    first = partial["sweep"][0]
    assert (first["cg_iters"], first["hvp"]) == (3, "exact")

    solved.clear()
    monkeypatch.setattr(mod, "config_grad", lambda args, *rest, **kw:
                        solved.append(args.get("hvp", "exact")) or real(args, *rest, **kw))
    mod.main()
    r = _strict_json(out)
    assert r["complete"] is True and r["rows_kept_from_an_interrupted_run"] == 1
    assert r["sweep"][0] == first  # kept, not measured again
    assert r["sweep"][1]["hvp"] == "gauss-newton"
    assert solved == ["gauss-newton", "gauss-newton"]  # only the missing row (cold, warm)

    # other options: nothing reused; a finished sweep is measured again
    assert mod.finished_rows(out, {"ks": "2"}) == {}
    assert mod.finished_rows(out, r["settings"]) == {}  # complete


def test_warm_cosine_probe_adam_is_the_method_adam(tmp_path, monkeypatch):
    """The probe's own Adam loop, with no decay and no carry-over, gives the method's Adam
    iterates bit for bit (so its variants differ from the default only in what they name);
    carry-over continues the moments: two visits of K equal one search of 2K steps."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("warm_cosine_probes")
    import torch

    import causalign.explain.counterfactual as cf
    from causalign.models import SevenLayerCNN

    torch.manual_seed(0)
    model = SevenLayerCNN(in_channels=1, num_outputs=2, width=4).eval()
    x0 = torch.rand(3, 1, 16, 16)
    gen = cf.CounterfactualGenerator(model, steps=5, lr=0.05)
    prob = gen.problem(x0, torch.tensor([1, 0, 1]))
    builtin = cf._adam(prob, x0, 5, 0.05)
    assert torch.equal(mod.probe_adam(1.0, False)(prob, x0, 5, 0.05), builtin)
    carry = mod.probe_adam(1.0, True)
    two = carry(prob, carry(prob, x0, 3, 0.05), 2, 0.05)
    assert torch.equal(two, builtin)
    assert not torch.equal(mod.probe_adam(0.1, False)(prob, x0, 5, 0.05), builtin)
    for item in ("momentum=0.5", "lr=abc", "decay=-1"):  # lr=abc was a ValueError traceback
        with pytest.raises(SystemExit, match=f"error: variant item '{item}'"):
            mod.parse_variant(item)


def test_warm_cosine_probes_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("warm_cosine_probes")
    monkeypatch.setattr(mod.sweep, "REF_STAGES", mod.sweep.REF_STAGES)  # main() rescales it
    out = tmp_path / "probes.json"
    mod.main(["--k", "2", "--warm-visits", "1", "--size", "32", "--align-batch", "2",
              "--erm-steps", "1", "--ref-steps", "3", "--ref-polish", "1", "--variants",
              "default;carry", "--out", str(out)])
    r = _strict_json(out)
    assert [row["variant"] for row in r["rows"]] == ["default", "carry"]
    for row in r["rows"]:
        for key in ("cosine_warm", "cosine_warm_own_ref", "own_ref_cosine_to_reference"):
            assert -1.0 <= row[key] <= 1.0 and row[key] != 0.0, (key, row[key])
        assert _finite(row["align_warm"]) and _finite(row["own_ref_align"])


def test_fd_hvp_probe_reports_products_and_steps(tmp_path, monkeypatch):
    """The probe's figures are what they say: the exact-product step drops nothing, product
    errors and shares are numbers in range, and the fallback step's cosine is a cosine."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("fd_hvp_probe")
    out = tmp_path / "fd.json"
    mod.main(["--size", "32", "--align-batch", "4", "--erm-steps", "2", "--warm-visits", "1",
              "--fd-eps", "1e-2,1e-4", "--caps", "3", "--directions", "2", "--out", str(out)])
    r = _strict_json(out)
    assert r["exact"]["cg_dropped"] == 0.0 and r["exact"]["gn_fallback"] == 0.0
    assert [row["fd_eps"] for row in r["rows"]] == [0.01, 1e-4]
    for row in r["rows"]:
        assert row["relative_error_max"] >= row["relative_error_median"] > 0
        assert 0.0 <= row["share_nonpositive_curvature"] <= 1.0
        step = row["cap3"]
        assert -1.0 <= step["default"]["cosine_to_exact"] <= 1.0
        assert 0.0 <= step["default"]["gn_fallback"] <= 1.0
        assert 0.0 <= step["damping_fixed"]["cg_dropped"] <= 1.0


def test_hier_ablation_refuses_stale_work(tmp_path):
    """hier_ablation reuses WORK/data and finished WORK/runs; with other options it used to
    reuse them silently (old results under the new settings); now it names the difference."""
    mod = _load("hier_ablation")
    base = ["--work", str(tmp_path / "work"), "--seeds", "1", "--size", "32", "--n-val", "16",
            "--n-test", "16", "--no-sweep", "--variants", "none"]
    out = tmp_path / "out" / "hier.json"
    mod.main([*base, "--n-train", "32", "--epochs", "1", "--out", str(out)])
    r = _strict_json(out)
    assert r["data"]["n_train"] == 32 and r["epochs"] == 1
    for key in ("cam_precision", "accuracy"):
        assert _finite(r["ablation"]["none"][key]["mean"]), key
    # same options: the finished run is reused without training
    mod.main([*base, "--n-train", "32", "--epochs", "1", "--out", str(out)])
    other = tmp_path / "other.json"
    with pytest.raises(SystemExit, match="finished with other settings .*epochs 1 -> 2"):
        mod.main([*base, "--n-train", "32", "--epochs", "2", "--out", str(other)])
    with pytest.raises(SystemExit, match="n_train: 32 there, 40 asked"):
        mod.main([*base, "--n-train", "40", "--epochs", "1", "--out", str(other)])
    assert not other.exists()


def test_bench_faithfulness_refuses_stale_runs_and_data(tiny_data, tmp_path, monkeypatch):
    """bench_faithfulness reuses --synth-dir and finished RUNS/<method>_seed<k>; with other
    options (or another --data) it used to explain the old models on the old data silently,
    under the new labels; now it names the folder and the difference."""
    mod = _load("bench_faithfulness")
    base = ["bench_faithfulness.py", "--synth-dir", str(tmp_path / "data"), "--runs",
            str(tmp_path / "runs"), "--seeds", "1", "--size", "32", "--n-val", "16",
            "--n-test", "16", "--threads", "1"]
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", [*base, "--n-train", "48", "--epochs", "1",
                                     "--out", str(out)])
    mod.main()
    r = _strict_json(out / "faithfulness.json")
    assert r["epochs"] == 1 and r["image_shape"] == [1, 32, 32] and r["n_test"] == 16
    assert _finite(r["drop"]["wbp"]["0.002"]["mean"])
    run = tmp_path / "runs" / "erm_seed0"
    other = tmp_path / "other"
    monkeypatch.setattr("sys.argv", [*base, "--n-train", "48", "--epochs", "2",
                                     "--out", str(other)])
    with pytest.raises(SystemExit, match=re.escape(
            f"{run}: finished with other settings (epochs 1 -> 2); use another --runs")):
        mod.main()
    monkeypatch.setattr("sys.argv", [*base, "--n-train", "40", "--epochs", "1",
                                     "--out", str(other)])
    with pytest.raises(SystemExit, match="n_train: 48 there, 40 asked.*use another --synth-dir"):
        mod.main()
    # a run trained on the synthesised data is not the model of another --data
    monkeypatch.setattr("sys.argv", [*base, "--data", str(tiny_data), "--epochs", "1",
                                     "--out", str(other)])
    with pytest.raises(SystemExit, match=r"finished with other settings \(data .* -> "
                                         + re.escape(f"{tiny_data})")):
        mod.main()
    assert not other.exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--ks", "abc"], "--ks must be integers >= 1"),
    (["--cgs", "0"], "--cgs must be integers >= 1 or gn"),
    (["--optimizers", "adam,bogus"], "--optimizers: unknown 'bogus'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--cache-dtype", "float8"], "--cache-dtype must be one of float32, float16, bfloat16"),
])
def test_bench_causal_align_refuses_bad_options_before_any_setup(argv, needle, tmp_path,
                                                                 monkeypatch, capsys):
    """A typo was a traceback; a bad --optimizers or --repeats 0 failed only after the
    minutes-long reference solves."""
    mod = _load("bench_causal_align")
    monkeypatch.setattr(mod, "setup", lambda *a, **k: pytest.fail("setup ran"))
    monkeypatch.setattr("sys.argv", ["bench_causal_align.py", "--out",
                                     str(tmp_path / "r.json"), *argv])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_causal_align_step_table_smoke(tmp_path, monkeypatch):
    """Every configuration run in every round, ratios positive and their range right; the
    profiled default names the step's parts."""
    mod = _load("causal_align_step_table")
    out = tmp_path / "table.json"
    mod.main(["--threads", "1", "--rounds", "2", "--steps", "1", "--size", "16",
              "--batch-size", "4", "--configs", "default,newton3", "--profile-threads", "1",
              "--out", str(out)])
    r = _strict_json(out)
    assert [(x["config"], x["round"]) for x in r["runs"]] == [
        ("default", 0), ("newton3", 0), ("default", 1), ("newton3", 1)]
    assert r["runs"][1]["method_args"] == {"inner_optimizer": "newton", "steps": 3}
    for name, row in r["summary"].items():
        assert len(row["ratios"]) == 2 and all(x > 0 for x in row["ratios"]), name
        assert row["min"] == min(row["ratios"]) and row["max"] == max(row["ratios"])
        assert row["min"] <= row["median"] <= row["max"]
    assert r["profiles"][0]["profile_ms_per_step"]["counterfactual.search"] > 0
    with pytest.raises(SystemExit):
        mod.main(["--configs", "bogus", "--out", str(out)])
    # volumes, settings common to every configuration, every configuration profiled
    mod.main(["--threads", "1", "--rounds", "1", "--steps", "1", "--warmup", "0", "--size",
              "16", "--batch-size", "4", "--model", "multiview", "--depth", "4", "--configs",
              "no_switch,gn_direct", "--set", "method.steps=2", "--profile-threads", "1",
              "--profile-all", "--out", str(out)])
    r = _strict_json(out)
    assert r["model"] == "multiview" and r["depth"] == 4 and r["set"] == {"steps": 2}
    assert r["summary"]["gn_direct"]["method_args"] == {"steps": 2, "hvp": "gauss-newton"}
    assert [p["config"] for p in r["profiles"]] == ["no_switch", "gn_direct"]
    assert "implicit.cg" in r["profiles"][0]["profile_ms_per_step"]  # CG ran, then the
    assert "implicit.cg" not in r["profiles"][1]["profile_ms_per_step"]  # direct solve only
    with pytest.raises(SystemExit):  # a 2D model on volumes, before any timing
        mod.main(["--model", "cnn7", "--depth", "8", "--out", str(out)])
    with pytest.raises(SystemExit):  # --set steps=20 would silently lose to newton5's 5
        mod.main(["--set", "steps=20", "--configs", "newton5", "--out", str(out)])


@pytest.mark.parametrize(("argv", "needle"), [
    (["--profile-threads", "0"], "--profile-threads must be integers >= 1"),
    (["--profile-threads", "-1"], "--profile-threads must be integers >= 1"),
    (["--size", "4"], "--size must be >= 8, got 4"),
    (["--out", "{tmp}"], "is a folder; give a file path"),
])
def test_causal_align_step_table_refuses_bad_options_before_timing(argv, needle, tmp_path,
                                                                   monkeypatch, capsys):
    """--profile-threads 0 failed in torch.set_num_threads after every round had run,
    --size 4 was bench_step's ConfigError traceback, and --out FOLDER failed at the write
    after all the timings."""
    mod = _load("causal_align_step_table")
    monkeypatch.setattr(mod, "bench_step", lambda *a, **k: pytest.fail("timed"))
    argv = [v.replace("{tmp}", str(tmp_path)) for v in argv]
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--out", str(tmp_path / "t.json"), *argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_causal_align_step_table_keeps_finished_runs_when_interrupted(tmp_path, monkeypatch):
    """The JSON was written only at the end: an interrupt lost every finished run."""
    mod = _load("causal_align_step_table")
    calls = []

    def fake_bench(*a, **k):
        calls.append(k["method_args"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"ratio_to_erm": 3.0, "method_args": k["method_args"]}

    monkeypatch.setattr(mod, "bench_step", fake_bench)
    out = tmp_path / "table.json"
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--configs", "default,newton3", "--profile-threads", "", "--out", str(out)])
    r = _strict_json(out)
    assert r["complete"] is False and [x["config"] for x in r["runs"]] == ["default"]
    assert r["runs"][0]["ratio_to_erm"] == 3.0 and r["size"] == 64


@pytest.mark.parametrize("name", ["bench_causal_align", "fd_hvp_probe", "warm_cosine_probes"])
def test_fixed_theta_scripts_refuse_a_size_below_the_synthetic_minimum(name, tmp_path,
                                                                       monkeypatch):
    """--size 16 was the synthetic generator's DataError traceback (from the shared
    `setup`), leaving its temporary folder behind."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load(name)
    argv = ["--size", "16", "--out", str(tmp_path / "r.json")]
    if name == "bench_causal_align":
        monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
        argv = None
    monkeypatch.setattr("tempfile.mkdtemp", lambda **k: pytest.fail("temporary folder made"))
    with pytest.raises(SystemExit, match="error: --size 16 too small"):
        mod.main() if argv is None else mod.main(argv)


def test_bench_causal_align_setup_removes_its_temporary_data_when_the_process_ends(tmp_path):
    """The shared `setup` of the fixed-θ scripts wrote its synthetic split to a temporary
    folder and never removed it (~1 MB a run piled up in the temp dir)."""
    import os
    import subprocess
    import sys

    code = ("import bench_causal_align as b; ds, _ = b.setup(32, 8, 1, 0); "
            f"print(len(ds), len(list(__import__('pathlib').Path(r'{tmp_path}')"
            ".glob('bench_ca_*'))))")
    env = {**os.environ, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"),
                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "1"]  # the data is there while the process runs
    assert not list(tmp_path.glob("bench_ca_*"))


@pytest.mark.parametrize(("name", "argv", "needle"), [
    ("fd_hvp_probe", ["--fd-eps", "abc"], "--fd-eps must be numbers > 0"),
    ("fd_hvp_probe", ["--fd-eps", "1e-3,0"], "--fd-eps must be numbers > 0"),
    ("fd_hvp_probe", ["--caps", "3,x"], "--caps must be integers >= 1"),
    ("fd_hvp_probe", ["--directions", "0"], "--directions must be >= 1, got 0"),
    ("fd_hvp_probe", ["--out", "{tmp}"], "is a folder"),
    ("warm_cosine_probes", ["--k", "0"], "--k must be >= 1, got 0"),
    ("warm_cosine_probes", ["--ref-polish", "-1"], "--ref-polish must be >= 0, got -1"),
    ("warm_cosine_probes", ["--out", "{tmp}"], "is a folder"),
    ("warm_cosine_probes", ["--variants", "default;lr=abc"], "variant item 'lr=abc'"),
])
def test_fixed_theta_probes_refuse_bad_options_before_setup(name, argv, needle, tmp_path,
                                                           monkeypatch, capsys):
    """Each of these failed after `setup` and the reference solves, most with a traceback
    (--fd-eps abc: ValueError; --k 0: ConfigError; a folder as --out: IsADirectoryError)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load(name)
    monkeypatch.setattr(mod, "setup", lambda *a, **k: pytest.fail("setup ran"))
    with pytest.raises(SystemExit) as exit_:
        mod.main([arg.format(tmp=tmp_path) for arg in argv])
    said = f"{exit_.value.code} {capsys.readouterr().err}"
    assert needle in said


def test_bench_causal_align_refuses_a_folder_as_out(tmp_path, monkeypatch, capsys):
    """--out FOLDER failed at the first row's write, after the reference solves."""
    mod = _load("bench_causal_align")
    monkeypatch.setattr(mod, "setup", lambda *a, **k: pytest.fail("setup ran"))
    monkeypatch.setattr("sys.argv", ["bench_causal_align.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2 and "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--setting", "foo:adam:0.01"], "SPACE one of pixel, latent, smooth"),
    (["{tmp}/missing"], "error: {tmp}/missing: run folder does not exist"),
])
def test_cf_localisation_refuses_bad_options_in_one_line(argv, needle, tmp_path, capsys):
    """--steps 0 wrote NaN shares into the JSON; --n 0 (IndexError), --threads 0, an unknown
    space and a missing run folder were tracebacks."""
    mod = _load("cf_localisation")
    argv = [v.replace("{tmp}", str(tmp_path)) for v in argv]
    runs = [] if any(v.startswith(str(tmp_path)) for v in argv) else [str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        mod.main([*runs, *argv, "--out", str(tmp_path / "cfl.json")])
    text = str(exit_.value.code) + capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in text
    assert not (tmp_path / "cfl.json").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--solvers", "bogus:3"], "solver 'bogus:3' is not OPTIMIZER:STEPS"),
    (["--solvers", "adam:0"], "solver 'adam:0' is not OPTIMIZER:STEPS"),
    ([], "error: {tmp}/missing: run folder does not exist"),
])
def test_counterfactual_solvers_refuses_bad_options_in_one_line(argv, needle, tmp_path,
                                                                monkeypatch, capsys):
    """--n 0 was a RuntimeError traceback, an unknown optimizer a ConfigError one at its
    turn, and a missing run folder a CausalignError one."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("counterfactual_solvers")
    with pytest.raises(SystemExit) as exit_:
        mod.main([str(tmp_path / "missing"), *argv, "--out", str(tmp_path / "s.json")])
    text = str(exit_.value.code) + capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in text
    assert not (tmp_path / "s.json").exists()


def test_cf_localisation_writes_null_not_nan_for_an_empty_group():
    """A sample with no positive (or no annotated) image wrote NaN shares into the JSON."""
    import torch

    mod = _load("cf_localisation")
    assert mod._stat(torch.tensor([]), torch.nanmean) is None
    assert mod._stat(torch.tensor([float("nan")]), torch.nanmean) is None
    assert mod._stat(torch.tensor([float("nan"), 0.25, 0.75]), torch.nanmean) == 0.5
    assert mod._stat(torch.tensor([1.0, 3.0, 2.0]), torch.median) == 2.0
    row = {"space": "pixel", "optimizer": "adam", "alpha": 0.01, "eps": 0.01, "flip_rate": 1.0,
           "mask": None, "box": 0.5, "corner": 0.1, "mask_positive": None}
    table = mod.markdown([{"run": "r", "method": "erm", "weights": "best", "symbol_present": True,
                           "train_accuracy": 1.0, "symbol_swap_changes": 0.5,
                           "area": {"mask": 0.05, "box": 0.15, "corner": 0.06},
                           "counterfactuals": [row]}])
    assert "| 1.00 | – | 0.500 | 0.100 | – |" in table


def test_warm_cache_dtype_smoke(tmp_path, monkeypatch):
    """Bytes per row exact (offsets halve, index tables 25 B a row), one seed's cosines."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("warm_cache_dtype")
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", [
        "warm_cache_dtype.py", "--seeds", "0", "--size", "32", "--ref-steps", "2",
        "--ref-polish", "0", "--warm-visits", "1", "--erm-steps", "1", "--rows", "2",
        "--shape", "3,8,8", "--out", str(out)])
    mod.main()
    r = _strict_json(out)
    assert r["complete"] is True
    assert r["bytes"]["float32"]["bytes_per_row"] == 3 * 8 * 8 * 4 + 25
    for d in ("float16", "bfloat16"):
        assert r["bytes"][d]["bytes_per_row"] == 3 * 8 * 8 * 2 + 25
        assert r["bytes"][d]["stored_dtype"] == f"torch.{d}"
        assert 0 < r["bytes"][d]["rel_l2_error_randn"] < 1e-2
        assert -1 <= r["seeds"][0][d]["cosine_warm"] <= 1
    assert r["bytes"]["float32"]["rel_l2_error_randn"] == 0


def test_roc_band_coverage_smoke(tmp_path, capsys):
    """The coverage simulation at a tiny size: standard JSON, coverages are shares of the
    data sets, the true curve is the binormal one, and a bad option is one line."""
    from scipy.stats import norm

    mod = _load("roc_band_coverage")
    out = tmp_path / "cov.json"
    mod.main(["--out", str(out), "--n", "40", "--datasets", "4", "--resamples", "100",
              "--d", "1.0"])
    r = _strict_json(out)
    fpr = r["fpr"]
    assert r["true_tpr"] == pytest.approx([1 - norm.cdf(norm.ppf(1 - f) - 1.0) for f in fpr])
    assert all(c * 4 == round(c * 4) and 0 <= c <= 1 for c in r["coverage"])
    assert 0 <= r["whole_curve_coverage_0.05_0.95"] <= r["mean_coverage_0.05_0.95"] <= 1
    assert "band holds it in" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--out", str(out), "--resamples", "10"])
