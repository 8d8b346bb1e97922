"""Review audit (part B) of the cross-site commits: a run used on another site (--data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from causalign.cli import main
from causalign.engine import TrainConfig, train


def _float_site(src: Path, dst: Path, factor: float, splits: tuple[str, ...]) -> Path:
    """`src`'s rows of `splits`, every image saved as a float32 .npy array times `factor`
    (a site storing raw values, so x*'s bounds are the data's min..max, not [0, 1])."""
    import numpy as np

    from causalign.data.format import load_array, to_float_image

    shutil.copytree(src, dst)
    with open(dst / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] in splits]
    for r in rows:
        img = to_float_image(load_array(dst / r["image"]), 2, dst / r["image"])[0]
        r["image"] = f"images/{r['id']}.npy"
        np.save(dst / r["image"], (img * factor).astype(np.float32))
    with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_counterfactual_bounds_do_not_depend_on_the_distance_under_data(tiny_data, tmp_path,
                                                                        capsys):
    """With --data OTHER a scaled search read the run's own training split for its per-pixel
    scale, and that split's range went into x*'s bounds too: the same 4 float test images
    were bounded to [44.7, 1000] under scaled-l1 and [44.7, 600] under l1 (measured). The
    bounds are --data's own, whatever the distance."""
    own = _float_site(tiny_data, tmp_path / "own", 1000.0, ("train", "val", "test"))
    other = _float_site(tiny_data, tmp_path / "other", 600.0, ("test",))
    run = tmp_path / "run"
    train(own, TrainConfig(method="erm", epochs=1, width=4, device="cpu"), run,
          progress=False)
    ranges = {}
    for distance in ("l1", "scaled-l1"):
        out = tmp_path / f"cf_{distance}"
        rc = main(["counterfactual", str(run), "--data", str(other), "--out", str(out),
                   "--limit", "2", "--steps", "2", "--distance", distance, "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        ranges[distance] = json.loads((out / "summary.json").read_text())["valid_range"]
    assert ranges["l1"] == ranges["scaled-l1"], ranges
    assert ranges["l1"][1] <= 600.0 + 1e-3, ranges


def test_erm_template_run_whose_data_folder_moved_is_accepted(tiny_data, tmp_path):
    """check_template_run compared only the folder config.yaml names: a finished ERM run
    whose dataset was moved since (--data names the new place, same dataset.yaml and
    manifest.csv, as its data_digest says) was refused as 'data ... -> ...'."""
    import importlib.util
    import sys

    from causalign.engine.trainer import dataset_digest

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("reviewB_reuse", bench / "_reuse.py")
        reuse = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reuse)
    finally:
        sys.path.remove(str(bench))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    run = tmp_path / "erm_seed0"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": str(tmp_path / "gone"), "data_digest": dataset_digest(tiny_data),
         "method": "erm", "epochs": 12, "seed": 0}))
    reuse.check_template_run(run, "erm", 12, moved, "--erm-run")  # no SystemExit
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "dataset.yaml").write_text((other / "dataset.yaml").read_text() + "\n# x\n")
    with pytest.raises(SystemExit, match="data "):
        reuse.check_template_run(run, "erm", 12, other, "--erm-run")


def test_scaled_search_on_a_site_of_another_image_size(tiny_data, tmp_path, capsys):
    """Since the scaled distance's per-pixel scale came from the run's own training split,
    a 32 px run's search on a 48 px site (--data) was refused: 'distance scale (1, 32, 32)
    must have the shape of one image of x0 (1, 48, 48)', where --data's own training split
    had served before. The run's scale is used only for images of its shape."""
    from causalign.data.synth import SynthConfig, generate

    other = tmp_path / "d48"
    generate(other, SynthConfig(n_train=8, n_val=4, n_test=4, size=48, seed=5))
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, width=4, device="cpu"), run,
          progress=False)
    rc = main(["counterfactual", str(run), "--data", str(other), "--out", str(tmp_path / "cf"),
               "--limit", "2", "--steps", "2", "--distance", "scaled-l1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "cf" / "cf").glob("*.npy"))) == 2


def test_hier_ablation_refuses_a_sweep_typo_before_training(tmp_path, capsys):
    """--alpha1/--lam were parsed only when the sweep began: '--alpha1 0.005,abc' trained
    every ablation run, then stopped with a ValueError traceback. Now argparse refuses it
    first, in one line, and nothing is made."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("reviewB_hier_ablation",
                                                      bench / "hier_ablation.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--work", str(work), "--out", str(tmp_path / "o.json"), "--seeds", "1",
                  "--epochs", "1", "--size", "32", "--n-train", "16", "--n-val", "8",
                  "--n-test", "8", "--variants", "none", "--alpha1", "0.005,abc"])
    assert exit_.value.code == 2
    assert "--alpha1" in capsys.readouterr().err
    assert not work.exists() and not (tmp_path / "o.json").exists()


def test_faithfulness_template_runs_checked_before_any_is_explained(tiny_data, tmp_path,
                                                                    monkeypatch, capsys):
    """bench_faithfulness --run-template compared seed 1's run with seed 0's only after seed
    0's deletion table (every explainer over the test split: minutes at the defaults). Now
    every run is checked first: refused before any table is computed."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("reviewB_faith",
                                                      bench / "bench_faithfulness.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    for seed, epochs in ((0, 1), (1, 2)):
        train(tiny_data, TrainConfig(method="erm", epochs=epochs, width=4, device="cpu",
                                     seed=seed), tmp_path / f"erm_seed{seed}", progress=False)
    tables = []
    monkeypatch.setattr(mod, "deletion_table", lambda *a, **k: tables.append(a) or {"wbp": 0.0})
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--run-template", str(tmp_path / "erm_seed{seed}"), "--seeds", "2",
                  "--out", str(tmp_path / "out"), "--threads", "1"])
    assert "epochs 1 -> 2" in str(exit_.value.code) + capsys.readouterr().err
    assert tables == []
    assert not (tmp_path / "out").exists()


def _bench_module(name: str):
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"reviewB_{name}", bench / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod


def test_cross_site_seeds_refuses_results_of_another_image_size():
    """cross_site.py recorded no --size, so cross_site_seeds.py averaged a seed run at 32 px
    with one at 64 px under one label (exit 0). Results now record image_size and it is
    compared; results from before (no key) still combine with each other."""
    mod = _bench_module("cross_site_seeds")
    figs = {"mean": 0.6, "in_site_mean": 0.7, "cross_site_mean": 0.5, "gap_in_minus_cross": 0.2}

    def result(seed: int, **changes) -> dict:
        r = {"benchmark": "cross_site", "seed": seed, "sites": 2, "epochs": 1,
             "shortcut": "none", "ppi_overrides": {}, "sizes": {"train": 8}, **changes}
        auc = [[0.7] * 2 for _ in range(2)]
        return {**r, "erm": {"auc": auc, **figs}, "ppi": {"auc": auc, **figs}}

    assert mod.summarize([result(0), result(1)])["epochs"] == 1  # older results
    assert mod.summarize([result(0, image_size=32), result(1, image_size=32)])
    with pytest.raises(SystemExit, match="seed 1 was run with other settings .*image_size"):
        mod.summarize([result(0, image_size=32), result(1, image_size=64)])


@pytest.mark.slow
def test_cross_site_records_its_image_size(tmp_path):
    mod = _bench_module("cross_site")
    mod.main(["--sites", "2", "--n-train", "32", "--n-val", "16", "--n-test", "16",
              "--size", "32", "--epochs", "1", "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "cross_site.json").read_text())["image_size"] == 32
