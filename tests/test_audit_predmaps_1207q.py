"""`causalign predict --saliency NAME --maps DIR`: with --threshold the maps explain the
called class (the decision at the operating point), and the maps' summary.json says which
class each map explains and where the maps came from (run, weights, inputs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from causalign.cli import main
from causalign.engine import TrainConfig, train


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    """The session's tiny synthetic dataset and a 1-epoch run on it."""
    data = tiny_data
    run = tmp_path_factory.mktemp("predmaps") / "run"
    train(data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    return {"data": data, "run": run}


def _predict(tiny, tmp_path, *extra: str) -> tuple[list[dict], dict, Path]:
    out, maps = tmp_path / "p.csv", tmp_path / "maps"
    assert main(["predict", str(tiny["run"]), str(tiny["data"]), "--out", str(out),
                 "--saliency", "gradient", "--maps", str(maps), "--device", "cpu",
                 "--no-progress", *extra]) in (0, None)
    return _rows(out), json.loads((maps / "summary.json").read_text()), maps


def _direct_maps(tiny, targets: list[int]) -> np.ndarray:
    """The explainer called directly on the test split with one target class per image."""
    from causalign.engine.trainer import load_run
    from causalign.explain import get_explainer
    from causalign.explain.base import saliency_map

    _, model, method, data = load_run(tiny["run"], device="cpu", data=tiny["data"])
    from causalign.data.format import LesionDataset

    ds = LesionDataset(data, "test")
    batch = ds.batch(torch.arange(len(ds)))
    x = method.model_input(batch)
    model.eval()
    expl = get_explainer("gradient", model)
    return saliency_map(expl.attribute(x, target=torch.tensor(targets))).float().numpy()


def _threshold_between(rows: list[dict]) -> float:
    """A threshold on p_1 that calls some images differently from their argmax."""
    p1 = sorted(float(r["p_" + r["predicted_class"]]) if r["predicted"] == "1"
                else 1 - float(r["p_" + r["predicted_class"]]) for r in rows)
    return float(np.median(p1))


def test_threshold_maps_explain_the_called_class(tiny, tmp_path):
    """With --threshold, each map is the called class's (the explainer called directly
    with that target), and summary.json's samples name the class each map explains."""
    rows, _, _ = _predict(tiny, tmp_path / "a")
    t = _threshold_between(rows)
    rows, summary, maps = _predict(tiny, tmp_path / "b", "--threshold", f"{t:.17g}")
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    called = [classes.index(r["called_class"]) for r in rows]
    predicted = [int(r["predicted"]) for r in rows]
    assert any(c != p for c, p in zip(called, predicted, strict=True)), (t, rows)
    direct = _direct_maps(tiny, called)
    for r, ref in zip(rows, direct, strict=True):
        got = np.load(maps / "maps" / f"{r['id']}.npy")
        assert np.allclose(got, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert [(s["id"], s["explained"]) for s in summary["samples"]] == \
        [(r["id"], c) for r, c in zip(rows, called, strict=True)]
    # the argmax stays recorded beside it, as the CSV's `predicted`
    assert [s["prediction"] for s in summary["samples"]] == predicted


def test_without_threshold_maps_explain_the_argmax(tiny, tmp_path):
    """Guard: without --threshold the maps stay the argmax class's (as before); summary.json
    now also names it as each map's ``explained`` class (new, so this fails before)."""
    rows, summary, maps = _predict(tiny, tmp_path)
    predicted = [int(r["predicted"]) for r in rows]
    direct = _direct_maps(tiny, predicted)
    for r, ref in zip(rows, direct, strict=True):
        got = np.load(maps / "maps" / f"{r['id']}.npy")
        assert np.allclose(got, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert [s["prediction"] for s in summary["samples"]] == predicted
    assert [s["explained"] for s in summary["samples"]] == predicted


def test_maps_summary_has_provenance(tiny, tmp_path):
    """The maps' summary.json names the run, the weights' SHA-256 and the inputs, as
    explain's and counterfactual's do."""
    _, summary, _ = _predict(tiny, tmp_path)
    prov = summary["provenance"]
    assert prov["run"] == str(tiny["run"].resolve())
    assert prov["weights"] in ("best.pt", "checkpoint.pt")
    assert len(prov["weights_sha256"]) == 64
    assert prov["inputs"] == [str(tiny["data"].resolve())]
    assert prov["split"] == "test" and len(prov["split_content_digest"]) == 16


def test_plain_files_maps_provenance_names_the_inputs(tiny, tmp_path):
    """Plain image files: the provenance names the files' folder as the input (not the
    temporary import, which is gone), with the run and weights; `split` is null."""
    import shutil

    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted((tiny["data"] / "images").glob("test_*.png"))[:3]:
        shutil.copy(f, raw / f.name)
    out, maps = tmp_path / "p.csv", tmp_path / "maps"
    assert main(["predict", str(tiny["run"]), str(raw), "--out", str(out), "--saliency",
                 "gradient", "--maps", str(maps), "--device", "cpu", "--no-progress",
                 "--threshold", "0.5"]) in (0, None)
    summary = json.loads((maps / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["inputs"] == [str(raw.resolve())] and prov["split"] is None
    assert "data" not in prov and len(prov["weights_sha256"]) == 64
    rows = _rows(out)
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    assert [s["explained"] for s in summary["samples"]] == \
        [classes.index(r["called_class"]) for r in rows]
