"""Mutation audit of the late 3-class / compare / predict-maps changes (ROC class names,
compare's balanced accuracy and point differences, --positive's hint, the clinical table's
per-class rows, predict --maps' targets and provenance, the calibrated-threshold refusal):
behaviours the earlier tests let slip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_audit_predmaps_1207q
import torch

# the 1-epoch run on the session's tiny dataset, shared with that file (module scope there)
tiny = test_audit_predmaps_1207q.tiny


def _model_and_split(tiny):
    from causalign.data.format import LesionDataset
    from causalign.engine.trainer import load_run

    _, model, method, data = load_run(tiny["run"], device="cpu", data=tiny["data"])
    return model, method, LesionDataset(data, "test")


def test_export_targets_follow_each_batch(tiny, tmp_path, monkeypatch):
    """export_saliency(targets=...) explains sample i's own target in every batch, not the
    first batch's targets again: with batch_size 3 over the first 8 images (limit 8) and
    targets 0, 0, 1, 1, ... by index, each map equals the explainer called on that image
    with its target.
    Each overlay's title adds " map=<class name>" exactly where the map is not the argmax's.
    Kills indexing the targets by position within the batch (targets[:len(idx)]) and a
    dropped map=CLASS title."""
    from causalign.explain import get_explainer
    from causalign.explain.base import saliency_map
    from causalign.explain.export import export_saliency
    from causalign.report import figures

    titles: dict[str, str] = {}
    real_overlay = figures.overlay

    def record(image, saliency, box, path, title=""):
        titles[Path(path).stem] = title
        real_overlay(image, saliency, box, path, title=title)

    monkeypatch.setattr(figures, "overlay", record)
    model, method, ds = _model_and_split(tiny)
    targets = [(i // 2) % 2 for i in range(len(ds))]  # 0,0,1,1,...: batches of 3 differ
    summary = export_saliency(model, method, ds, "gradient", tmp_path / "m", limit=8,
                              batch_size=3, targets=targets)
    x = method.model_input(ds.batch(torch.arange(8)))
    model.eval()
    ref = saliency_map(get_explainer("gradient", model).attribute(
        x, target=torch.tensor(targets[:8]))).float().numpy()
    for s, r in zip(summary["samples"], ref, strict=True):
        got = np.load(tmp_path / "m" / "maps" / f"{s['id']}.npy")
        assert np.allclose(got, r, atol=1e-5 * max(1.0, float(np.abs(r).max()))), s["id"]
    assert [s["explained"] for s in summary["samples"]] == targets[:8]
    names = list(ds.meta.classes)
    for s in summary["samples"]:
        tail = f" map={names[s['explained']]}"
        assert titles[s["id"]].endswith(tail) == (s["explained"] != s["prediction"]), titles
        assert "map=" not in titles[s["id"]] or titles[s["id"]].endswith(tail)
    # 0s and 1s among the targets: some maps are the argmax's, some are not
    assert len({s["explained"] == s["prediction"] for s in summary["samples"]}) == 2


def test_export_refuses_targets_of_another_length(tiny, tmp_path):
    """One target per sample of the split, else an error before anything is written (one
    short list explained the wrong images or failed half-way). Kills a dropped length check."""
    from causalign.explain.export import export_saliency

    model, method, ds = _model_and_split(tiny)
    with pytest.raises(ValueError, match=f"{len(ds) - 1} targets for {len(ds)} samples"):
        export_saliency(model, method, ds, "gradient", tmp_path / "m",
                        targets=[0] * (len(ds) - 1))
    assert not (tmp_path / "m" / "summary.json").exists()


def test_maps_provenance_resolves_a_relative_input(tiny, tmp_path, monkeypatch):
    """predict --maps' provenance names the input as an absolute path even when it was given
    relative to the working directory (a summary.json read from elsewhere must find it).
    Kills recording str(input) as typed."""
    from causalign.cli import main

    monkeypatch.chdir(tiny["data"].parent)
    maps = tmp_path / "maps"
    assert main(["predict", str(tiny["run"]), tiny["data"].name, "--out",
                 str(tmp_path / "p.csv"), "--saliency", "gradient", "--maps", str(maps),
                 "--device", "cpu", "--no-progress"]) in (0, None)
    prov = json.loads((maps / "summary.json").read_text())["provenance"]
    assert prov["inputs"] == [str(tiny["data"].resolve())]
    assert prov["data"] == str(tiny["data"].resolve())


def test_paired_difference_of_a_single_class_split_has_no_auc():
    """compare --bootstrap's point ``difference`` (paired_bootstrap_ci) on a split holding
    one class: AUC has no value, so its difference is None (as its interval), not 0.0 (which
    reads "the runs rank equally well"); the other differences stay b − a. Kills a 0.0
    filler for a missing metric."""
    from causalign.metrics import classification_metrics, paired_bootstrap_ci

    rng = np.random.default_rng(4)
    pa, pb = rng.dirichlet([1, 1], 20), rng.dirichlet([1, 1], 20)
    y = np.ones(20, dtype=np.int64)
    out = paired_bootstrap_ci(pa, pb, y, n=100, seed=0)
    assert out["difference"]["auc"] is None and out["ci95_difference"]["auc"] is None
    a, b = classification_metrics(pa, y), classification_metrics(pb, y)
    for name in ("accuracy", "brier", "ece"):
        assert out["difference"][name] == pytest.approx(b[name] - a[name], abs=1e-12)


def test_three_class_note_comes_before_run_notes(tmp_path):
    """The clinical table of a 3-class dataset opens its notes with the one saying how to read
    the per-class rows (one-vs-rest), before any run's own note (here a seed without
    predictions_val.csv). Kills appending the layout note after the run notes."""
    from test_audit_repclin_1207q import _random_split, _run

    from causalign.report.clinical import clinical_table

    rng = np.random.default_rng(2)
    runs = [_run(tmp_path, "busi", "erm", 0, _random_split(rng, 40, 3),
                 _random_split(rng, 40, 3)),
            _run(tmp_path, "busi", "erm", 1, None, _random_split(rng, 40, 3))]
    t = clinical_table(tmp_path, {"runs": runs}, "busi")
    assert t.notes[0].startswith("3 classes: no positive class by convention")
    assert any(n.startswith("erm seed 1: no predictions_val.csv") for n in t.notes[1:])
