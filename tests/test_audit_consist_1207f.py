"""Entry points agree about one run: `train`'s metrics.json and predictions CSVs, `evaluate`,
`counterfactual`, `explain`, `load_run` + forward, history.csv, and which weights file each
reads (best.pt, never the last epoch's checkpoint.pt in its place).

One tiny ERM run is shared by the module; its selection score is patched so that epoch 1 of
2 is the best one, so best.pt and checkpoint.pt hold different weights and an entry point
reading the wrong one shows.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.engine.evaluate import predict
from causalign.engine.trainer import Trainer, load_checkpoint, load_run
from causalign.errors import CausalignError


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """2 epochs, epoch 1 selected (its score patched to win), so best.pt != checkpoint.pt."""
    out = tmp_path_factory.mktemp("consist") / "run"
    with pytest.MonkeyPatch.context() as mp:
        # the epoch about to be recorded is state.epoch + 1: epoch 1 scores 1, later ones 0
        mp.setattr(Trainer, "_score", lambda self, val: 1.0 if self.state.epoch == 0 else 0.0)
        assert main(["train", str(tiny_data), "--method", "erm", "--out", str(out),
                     "--epochs", "2", "--set", "width=4", "--set", "threads=1",
                     "--set", "deletion_fractions=[0.1]", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["epochs"]) == (1, 2)
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _probs(rows: list[dict]) -> np.ndarray:
    keys = [k for k in rows[0] if k.startswith("p_")]
    return np.array([[float(r[k]) for k in keys] for r in rows])


def _weights_probs(run: Path, name: str, split: str) -> np.ndarray:
    _, model, method, data = load_run(run, device="cpu")
    model.load_state_dict(load_checkpoint(run / name)["model"])
    return predict(model, method, LesionDataset(data, split), "cpu")[0]


def _without_best(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "nobest"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".causalign.lock"))
    (copy / "best.pt").unlink()
    (copy / "best.pt.sha256").unlink()
    return copy


def test_best_and_last_epoch_differ(run):
    """Guard (of the fixture): the two weights files predict differently, so the checks
    below can tell which one an entry point read."""
    best = _weights_probs(run, "best.pt", "val")
    last = _weights_probs(run, "checkpoint.pt", "val")
    assert np.abs(best - last).max() > 1e-4
    assert np.abs(best - _probs(_rows(run / "predictions_val.csv"))).max() <= 1e-12


def test_evaluate_without_best_pt_refuses_instead_of_scoring_the_last_epoch(run, tmp_path,
                                                                             capsys):
    """Regression: with best.pt gone, `evaluate` (and explain, counterfactual, load_run) read
    checkpoint.pt, the last epoch's weights, and reported them as the run's best model:
    measured val accuracy 0.625 / AUC 0.603 for a PPI run whose metrics.json (best epoch 1
    of 3) says 0.5625 / 0.651, without a word. Now one error line naming both epochs."""
    copy = _without_best(run, tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(copy), "--split", "val", "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt" in err[0] and "epoch 2" in err[0] \
        and "best epoch 1" in err[0], err
    with pytest.raises(CausalignError, match="best epoch 1"):
        load_run(copy, device="cpu")


def test_init_without_best_pt_refuses_the_last_epoch(run, tmp_path, tiny_data):
    """Regression: `--set init=RUN` starts from the run's best weights (README); without
    best.pt it took checkpoint.pt's last epoch silently. Now refused, as load_run."""
    from causalign.engine.trainer import init_weights

    copy = _without_best(run, tmp_path)
    model = load_run(run, device="cpu")[1]
    with pytest.raises(CausalignError, match="best epoch 1"):
        init_weights(model, copy)


def test_checkpoint_of_the_best_epoch_still_stands_in_for_a_missing_best_pt(run, tmp_path):
    """Guard: a run killed between checkpoint.pt and best.pt of an improving epoch has a
    checkpoint whose own weights are the best ones; those are still read (no error)."""
    copy = _without_best(run, tmp_path)
    state = load_checkpoint(copy / "checkpoint.pt")
    from causalign.io import atomic_torch_save

    atomic_torch_save(copy / "checkpoint.pt", {**state, "best_epoch": state["epoch"]})
    _, model, _, _ = load_run(copy, device="cpu")
    assert model.causalign_weights["weights"] == "checkpoint.pt"


def test_metrics_json_val_equals_evaluate_split_val_and_its_predictions(run, tmp_path, capsys):
    """Guard: metrics.json's `val` is what `evaluate --split val` prints (and writes with
    --out), and predictions_val.csv is its --predictions CSV: same ids, order, classes and
    probabilities (both from best.pt)."""
    out, pred = tmp_path / "ev.json", tmp_path / "pred.csv"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--device", "cpu", "--no-progress",
                 "--out", str(out), "--predictions", str(pred)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    stored = json.loads((run / "metrics.json").read_text())["val"]
    assert {k: written[k] for k in stored} == stored
    assert _rows(pred) == _rows(run / "predictions_val.csv")


def test_history_best_row_and_train_block_match_metrics_json(run):
    """Guard: history.csv's row of the best epoch holds the validation numbers metrics.json
    reports (rounded to 6 digits there), and its train_accuracy the `train` block's."""
    metrics = json.loads((run / "metrics.json").read_text())
    row = next(r for r in _rows(run / "history.csv")
               if int(r["epoch"]) == metrics["best_epoch"])
    for key in ("accuracy", "balanced_accuracy", "auc", "loss"):
        assert float(row[f"val_{key}"]) == pytest.approx(metrics["val"][key], abs=1e-6)
    assert float(row["train_accuracy"]) == pytest.approx(metrics["train"]["accuracy"],
                                                         abs=1e-6)


def _no_figures(monkeypatch) -> list[str]:
    """Figures stubbed out (matplotlib is most of an export's time); the overlay titles,
    which carry explain's per-image prediction, recorded."""
    import causalign.report.figures as figures

    titles: list[str] = []
    monkeypatch.setattr(figures, "overlay", lambda *a, title=None, **k: titles.append(title))
    for name in ("cam_grid", "counterfactual_grid", "counterfactual_triptych"):
        monkeypatch.setattr(figures, name, lambda *a, **k: None)
    return titles


def test_api_predicts_as_predictions_test_csv(run):
    """Guard: load_run (best.pt, eval mode) + forward gives predictions_test.csv's ids in
    its order and its probabilities."""
    rows = _rows(run / "predictions_test.csv")
    _, model, method, data = load_run(run, device="cpu")
    assert model.causalign_weights["weights"] == "best.pt" and not model.training
    ds = LesionDataset(data, "test")
    probs = predict(model, method, ds, "cpu")[0]
    assert [r.id for r in ds.records] == [r["id"] for r in rows]
    assert np.abs(probs - _probs(rows)).max() <= 1e-12


def test_counterfactual_and_explain_predict_as_predictions_test_csv(run, tiny_data, tmp_path,
                                                                    monkeypatch):
    """Guard: `counterfactual`'s summary.json samples (read from best.pt, says its
    provenance) and `explain`'s overlay titles name predictions_test.csv's ids in its order
    and its predicted classes."""
    from causalign.report.figures import class_name

    titles = _no_figures(monkeypatch)
    rows = _rows(run / "predictions_test.csv")[:8]
    cf = tmp_path / "cf"
    assert main(["counterfactual", str(run), "--out", str(cf), "--steps", "1", "--limit", "8",
                 "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((cf / "summary.json").read_text())
    assert [(s["id"], s["prediction"]) for s in summary["samples"]] == \
        [(r["id"], int(r["predicted"])) for r in rows]
    assert summary["provenance"]["weights"] == "best.pt"

    assert main(["explain", str(run), "--out", str(tmp_path / "ex"), "--limit", "8",
                 "--saliency", "gradient", "--device", "cpu", "--no-progress"]) == 0
    ds = LesionDataset(tiny_data, "test")
    assert [t.split()[0] for t in titles] == [r["id"] for r in rows]
    assert [t.split("pred=")[1] for t in titles] == \
        [class_name(ds, int(r["predicted"])) for r in rows]

def test_init_from_a_named_checkpoint_file_is_taken_as_is(run, tmp_path):
    """Guard: `init=RUN/checkpoint.pt` names the last epoch's weights on purpose: loaded."""
    from causalign.engine.trainer import init_weights

    copy = _without_best(run, tmp_path)
    model = load_run(run, device="cpu")[1]
    init_weights(model, copy / "checkpoint.pt")
    last = load_checkpoint(run / "checkpoint.pt")["model"]
    assert all(bool((v == last[k]).all()) for k, v in model.state_dict().items())


def test_benchmark_table_bolds_the_lowest_brier_and_ece_and_no_count_column():
    """Regression: the tables' "best per column in bold" took the largest Brier score and ECE
    (both lower-is-better) as the best, so a suite listing `test.brier` or `test.ece` marked
    the worse-calibrated method; counts (`best_epoch`, `epochs`, `test.n`, `n_annotated`,
    `n_mask`) have no better direction but were bolded too. The cells themselves are
    metrics.json's numbers (guarded by the other tests of tables)."""
    from causalign.engine.benchmark import Experiment, MethodSpec, experiment_table

    metrics = ["test.brier", "test.ece", "best_epoch", "epochs", "test.n", "test.n_annotated",
               "test.n_mask", "test.accuracy"]

    def rec(method: str, brier: float, acc: float, best: int) -> dict:
        return {"key": f"d/{method}/seed0", "dataset": "d", "method": method, "label": method,
                "setting": "default", "seed": 0, "experiments": ["t"], "status": "done",
                "metrics": {"best_epoch": best, "epochs": 3 + best,
                            "test": {"brier": brier, "ece": brier / 2, "accuracy": acc,
                                     "n": 10 + best, "n_annotated": best, "n_mask": best}}}

    exp = Experiment("t", "t", ["d"], [MethodSpec("erm", "erm"), MethodSpec("rrr", "rrr")],
                     [0], {"default": {}}, "method", metrics)
    t = experiment_table(exp, [rec("erm", 0.1, 0.9, 1), rec("rrr", 0.3, 0.6, 3)])
    # erm: better calibrated and more accurate; no count column is anyone's "best"
    assert t.bold == [[True, True, False, False, False, False, False, True],
                      [False] * 8]


def test_explain_summary_lists_each_samples_prediction_as_predictions_test_csv(
        run, tmp_path, monkeypatch):
    """New: `explain`'s summary.json lists each explained sample's id, label and predicted
    class (the class its map explains), as `counterfactual`'s does; they were only in the
    overlay PNGs' titles, so explain could not be checked against predictions_test.csv."""
    _no_figures(monkeypatch)
    rows = _rows(run / "predictions_test.csv")[:6]
    out = tmp_path / "ex"
    assert main(["explain", str(run), "--out", str(out), "--limit", "6",
                 "--saliency", "gradient", "--device", "cpu", "--no-progress"]) == 0
    samples = json.loads((out / "summary.json").read_text())["samples"]
    assert samples == [{"id": r["id"], "label": int(r["label"]), "prediction": int(r["predicted"])}
                       for r in rows]


def test_init_from_a_run_folder_starts_from_its_best_pt(run):
    """Guard: `--set init=RUN` loads RUN's best.pt (README: "another run's best weights"),
    not its last epoch's checkpoint.pt."""
    from causalign.engine.trainer import init_weights

    model = load_run(run, device="cpu")[1]
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    init_weights(model, run)
    best = load_checkpoint(run / "best.pt")["model"]
    assert all(bool((v == best[k]).all()) for k, v in model.state_dict().items())


def test_curves_draw_history_csv_rows(run, tmp_path, monkeypatch):
    """Guard: `curves RUN` draws RUN's history.csv rows as they are."""
    import causalign.report.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "training_curves",
                        lambda histories, path, **k: drawn.update(histories))
    assert main(["curves", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert drawn == {run.name: _rows(run / "history.csv")}


def test_benchmark_table_cells_are_the_runs_metrics_json(run):
    """Guard: a benchmark table's cell of one run is its metrics.json value at 3 decimals."""
    from causalign.engine.benchmark import Experiment, MethodSpec, experiment_table

    metrics = json.loads((run / "metrics.json").read_text())
    names = ["test.accuracy", "test.auc", "test.cam_precision", "test.deletion.0.1",
             "val.balanced_accuracy", "best_epoch"]
    record = {"key": "d/erm/seed0", "dataset": "d", "method": "erm", "label": "erm",
              "setting": "default", "seed": 0, "experiments": ["t"], "status": "done",
              "metrics": metrics}
    exp = Experiment("t", "t", ["d"], [MethodSpec("erm", "erm")], [0], {"default": {}},
                     "method", names)
    t = experiment_table(exp, [record])
    want = [metrics["test"]["accuracy"], metrics["test"]["auc"],
            metrics["test"]["cam_precision"], metrics["test"]["deletion"]["0.1"],
            metrics["val"]["balanced_accuracy"], metrics["best_epoch"]]
    assert t.rows == [["erm", *(f"{v:.3f}" for v in want)]]


def test_explain_maps_give_metrics_json_cam_precision(run, tmp_path, monkeypatch):
    """Guard: `explain`'s saved maps (the run's eval_saliency, Grad-CAM) reproduce the test
    CAM precision metrics.json reports for the same samples."""
    from causalign.metrics import cam_precision

    _no_figures(monkeypatch)
    out = tmp_path / "ex"
    assert main(["explain", str(run), "--out", str(out), "--limit", "100", "--device", "cpu",
                 "--no-progress"]) == 0
    samples = json.loads((out / "summary.json").read_text())["samples"]
    _, _, _, data = load_run(run, device="cpu")
    ds = LesionDataset(data, "test")
    assert [s["id"] for s in samples] == [r.id for r in ds.records]
    batch = ds.batch(torch.arange(len(ds)))
    maps = torch.stack([torch.from_numpy(np.load(out / "maps" / f"{s['id']}.npy"))
                        for s in samples])
    ann = batch["has_annotation"]
    got = float(cam_precision(maps[ann], batch["box_mask"][:, 0][ann]).float().mean())
    want = json.loads((run / "metrics.json").read_text())["test"]["cam_precision"]
    assert got == pytest.approx(want, abs=1e-6)


def test_a_checkpoint_from_before_the_first_epoch_is_no_stand_in(run, tmp_path):
    """Regression: a space=latent run killed in its first epoch leaves checkpoint.pt of
    epoch 0 (its autoencoder; the classifier untrained) and no best.pt; load_run read it
    and `evaluate` scored the random initialisation. Now one error line."""
    from causalign.io import atomic_torch_save

    copy = _without_best(run, tmp_path)
    state = load_checkpoint(copy / "checkpoint.pt")
    atomic_torch_save(copy / "checkpoint.pt", {**state, "epoch": 0, "best_epoch": 0})
    with pytest.raises(CausalignError, match="first epoch"):
        load_run(copy, device="cpu")
