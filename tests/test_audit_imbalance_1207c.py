"""Audit: class imbalance and partial annotation (few masks, rare classes, one-class splits).

* history.csv's train_rrr / train_cdep / train_cf / train_factual were weighted by the batch
  size, and RRR and CDEP logged 0 on steps without an annotated sample: with masks on 2 % of
  the training split, train_rrr read 0.093 and train_cdep 0.270 where their mean over the
  annotated samples was 0.166 and 0.482 (diluted by the 6 of 13 steps with none); likewise
  hier-align's train_bce_attr (known attributes) and PPI's train_con / train_ad.
* A one-class val split (AUC undefined: selection on one class's recall), a one-class
  training split and a declared class without a training sample trained without a word.
* metrics.json gave no count for the mask-only localisation metrics (n_mask); the train
  summary line showed accuracy alone (0.852 for a majority-class model); benchmark tables
  did not say their std is ddof 0.
"""

from __future__ import annotations

import pytest
import torch

from causalign.data.format import LesionDataset
from causalign.engine.trainer import _accumulate, _epoch_means
from causalign.methods import build_method
from causalign.models.cnn import SevenLayerCNN


def _annotate_only(batch: dict, keep: list[int]) -> dict:
    """The batch with every annotation removed except the samples ``keep``."""
    on = torch.zeros(len(batch["label"]), dtype=torch.bool)
    on[keep] = True
    out = dict(batch)
    out["has_annotation"] = batch["has_annotation"].bool() & on
    out["has_mask"] = batch["has_mask"].bool() & on
    shape = (-1, *[1] * (batch["mask"].dim() - 1))
    out["mask"] = batch["mask"] * on.view(shape)
    out["box_mask"] = batch["box_mask"] * on.view(shape)
    return out


@pytest.mark.parametrize("name,parts,kwargs", [
    ("rrr", ("rrr",), {}),
    ("cdep", ("cdep",), {}),
    ("chang", ("cf", "factual"), {}),
])
def test_subset_parts_are_means_over_the_annotated_samples(tiny_data, name, parts, kwargs):
    """The epoch's history value of an annotation term is its mean over the epoch's
    annotated samples: steps without one add nothing, a step with 4 weighs twice one with 2."""
    torch.manual_seed(0)
    ds = LesionDataset(tiny_data, "train")
    model = SevenLayerCNN(1, 2, width=4)
    method = build_method(name, kwargs)
    if hasattr(method, "generator"):
        method.generator.manual_seed(0)
    steps = [(torch.arange(0, 8), []), (torch.arange(8, 16), [0, 1]),
             (torch.arange(16, 24), []), (torch.arange(24, 32), [0, 1, 2, 3])]
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    seen: dict[str, list[tuple[float, int]]] = {p: [] for p in parts}
    for idx, keep in steps:
        batch = _annotate_only(ds.batch(idx), keep)
        out = method(model, batch)
        _accumulate(sums, weights, out.total, out.parts, len(idx), out.part_weights)
        for p in parts:
            if keep and p in out.parts:
                seen[p].append((out.parts[p], len(keep)))
    epoch = _epoch_means(sums, weights)
    for p in parts:
        assert len(seen[p]) == 2, (p, seen[p])
        want = sum(v * k for v, k in seen[p]) / sum(k for _, k in seen[p])
        assert epoch[f"train_{p}"] == pytest.approx(want, rel=1e-6), (p, seen[p], epoch)


# ---------------------------------------------------------------- one-class splits

def _drop_class(src, dst, split: str, label: int) -> None:
    """A copy of dataset ``src`` whose ``split`` has lost its samples labelled ``label``."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if not (r["split"] == split and int(r["label"]) == label)]
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)


def _cfg(**kw):
    from causalign.engine import TrainConfig

    return TrainConfig(**{"method": "erm", "epochs": 2, "batch_size": 16, "width": 4,
                          "threads": 1, "device": "cpu", "eval_saliency": "gradient",
                          "deletion_fractions": [0.1], **kw})


def test_one_class_val_split_says_selection_is_degenerate(tiny_data, tmp_path):
    """With one class in val, AUC is undefined and the best epoch was picked on balanced
    accuracy (= that class's recall) without a word: now a warning and metrics.json say so."""
    from causalign.engine import train

    data = tmp_path / "data"
    _drop_class(tiny_data, data, "val", 1)
    with pytest.warns(UserWarning, match=r"val split holds only class 0"):
        metrics = train(data, _cfg(), tmp_path / "run", progress=False)
    assert metrics["val"]["auc"] is None
    assert any("val split holds only class 0" in w for w in metrics.get("warnings", []))


def test_one_class_training_split_is_warned_about(tiny_data, tmp_path):
    from causalign.engine import train

    data = tmp_path / "data"
    _drop_class(tiny_data, data, "train", 0)
    with pytest.warns(UserWarning, match=r"training split holds only class 1"):
        metrics = train(data, _cfg(epochs=1), tmp_path / "run", progress=False)
    assert any("training split holds only class 1" in w for w in metrics.get("warnings", []))


def test_two_class_splits_get_no_class_warning(tiny_data, tmp_path):
    import warnings

    from causalign.engine import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(tiny_data, _cfg(epochs=1), tmp_path / "run", progress=False)
    assert not [w for w in caught if "split holds only class" in str(w.message)]
    assert not any("holds only class" in w for w in metrics.get("warnings", []))


def test_hier_align_bce_attr_is_the_mean_over_known_attributes():
    """hier-align's train_bce_attr (a mean over the known attribute entries) was weighted by
    the batch size and took a 0 from every step without a known attribute: with attributes
    on a few samples only it read a fraction of the epoch's mean BCE."""
    from causalign.engine.config import TrainConfig
    from causalign.methods.base import DataInfo

    p = 4
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32),
                    attributes=[f"a{i}" for i in range(p)])
    method = build_method("hier-align", {"lam1": 0.0, "lam2": 0.0})
    torch.manual_seed(0)
    model = method.build_model(TrainConfig(width=4), info)
    g = torch.Generator().manual_seed(0)
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    seen = []
    for known_rows in ([], [0, 1], [], [0, 1, 2, 3]):
        n = 8
        mask = torch.zeros(n, 1, 32, 32)
        mask[:, :, 10:22, 10:22] = 1
        known = torch.zeros(n, p, dtype=torch.bool)
        known[known_rows] = True
        batch = {"image": torch.rand(n, 1, 32, 32, generator=g),
                 "label": torch.tensor([0, 1] * (n // 2)), "mask": mask,
                 "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
                 "has_annotation": torch.ones(n, dtype=torch.bool),
                 "attributes": (torch.rand(n, p, generator=g) > 0.5).float(),
                 "attr_known": known, "index": torch.arange(n)}
        out = method(model, batch)
        _accumulate(sums, weights, out.total, out.parts, n, out.part_weights)
        if known_rows:
            seen.append((out.parts["bce_attr"], len(known_rows) * p))
    want = sum(v * k for v, k in seen) / sum(k for _, k in seen)
    assert _epoch_means(sums, weights)["train_bce_attr"] == pytest.approx(want, rel=1e-6)


def test_ppi_positive_contrast_is_the_mean_over_contrasted_samples(tiny_data):
    """PPI with contrast_on=positive: L_con is a mean over the batch's positives (rare on
    imbalanced data); history's train_con weighted it by the batch size, so a step with one
    positive counted as much as one with four."""
    torch.manual_seed(0)
    ds = LesionDataset(tiny_data, "train")
    model = SevenLayerCNN(1, 2, width=4)
    method = build_method("ppi", {"contrast_on": "positive", "ad_weight": 0.0})
    method.on_epoch_start(1)
    labels = ds.labels
    neg = (labels == 0).nonzero().flatten()
    pos = (labels == 1).nonzero().flatten()
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    seen = []
    for k in (1, 4):
        idx = torch.cat([pos[:k], neg[:8 - k]]) if k == 1 else torch.cat([pos[4:4 + k],
                                                                          neg[8:12]])
        out = method(model, ds.batch(idx))
        _accumulate(sums, weights, out.total, out.parts, len(idx), out.part_weights)
        assert "con" in out.parts, out.parts
        seen.append((out.parts["con"], out.means["con"][1]))
    assert seen[0][1] != seen[1][1]  # the two steps contrasted different numbers of samples
    want = sum(v * c for v, c in seen) / sum(c for _, c in seen)
    assert _epoch_means(sums, weights)["train_con"] == pytest.approx(want, rel=1e-6)


def test_evaluate_reports_how_many_samples_the_mask_metrics_average(tiny_data):
    """cam_precision averages the annotated samples (box or mask; counted in n_annotated),
    but cam_precision_mask, cam_mass_in_mask and IoU/Dice only those with a pixel mask: on a
    split with boxes everywhere and masks on some (LIDC-like) their sample count was
    nowhere."""
    from causalign.engine.evaluate import evaluate_split
    from causalign.models import build_model

    torch.manual_seed(0)
    ds = LesionDataset(tiny_data, "test")
    ds.has_mask[::4] = False  # a box but no mask: still annotated
    model = build_model("cnn7", ds.image_shape[0], ds.num_classes, width=4).eval()
    out = evaluate_split(model, build_method("erm"), ds, "cpu", saliency="gradient",
                         fractions=(0.1,), batch_size=5)
    assert out["n_annotated"] == len(ds)
    assert out["n_mask"] == len(ds) - len(range(0, len(ds), 4))


def test_train_summary_line_shows_balanced_accuracy_and_auc(tiny_data, tmp_path, capsys):
    """On imbalanced data the summary's accuracy alone reads well for a constant model (85 %
    negatives: 'test accuracy 0.852' at balanced accuracy 0.500): the line also gives the
    balanced accuracy and AUC (n/a where undefined)."""
    import json

    from causalign.cli import main

    run = tmp_path / "run"
    rc = main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
               "--set", "width=4", "--set", "threads=1", "--set", "eval_saliency=gradient",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert out.startswith(f"erm: test accuracy {test['accuracy']:.3f}, balanced accuracy "
                          f"{test['balanced_accuracy']:.3f}, AUC "), out


def test_benchmark_table_note_states_the_std_convention():
    """tables.md / report.html cells are mean (std) over seeds with numpy's population std
    (ddof 0); the note said only 'mean (std)', so a reader could not tell it from the sample
    std (ddof 1, √2 larger over two seeds)."""
    from causalign.engine import benchmark as bm

    e = bm.Experiment("t", "T", ["pm"], [bm.MethodSpec("erm", "erm")], [0, 1], {"default": {}},
                      "method", ["test.accuracy"])
    records = [{"key": f"pm/erm/seed{s}", "experiments": ["t"], "label": "erm",
                "setting": "default", "dataset": "pm", "seed": s, "status": "done",
                "metrics": {"test": {"accuracy": acc}}} for s, acc in ((0, 0.5), (1, 0.7))]
    table = bm.experiment_table(e, records)
    assert table.rows[0][1] == "0.600 (0.100)"  # ddof 0: ddof 1 would be 0.141
    assert "ddof 0" in table.notes[0] and "mean (std) over seeds 0, 1" in table.notes[0]


def test_a_class_absent_from_the_training_split_is_warned_about(tiny_data, tmp_path):
    """Three declared classes, none of the training samples in class 2: the model's third
    output is never trained, silently (val/test AUC still averaged the classes present)."""
    import shutil

    import yaml

    from causalign.engine.trainer import one_class_notes

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = yaml.safe_load((data / "dataset.yaml").read_text())
    meta["classes"] = [*meta["classes"], "rare"]
    (data / "dataset.yaml").write_text(yaml.safe_dump(meta))
    train_set, val_set = LesionDataset(data, "train"), LesionDataset(data, "val")
    notes = one_class_notes(train_set, val_set, "auc")
    assert len(notes) == 1 and "no sample of class 2 (rare)" in notes[0], notes
    assert one_class_notes(LesionDataset(tiny_data, "train"), LesionDataset(tiny_data, "val"),
                           "auc") == []
