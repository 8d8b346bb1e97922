"""Mutation audit of the metrics (classification, localisation, paired tests, evaluate_split):
behaviours the earlier tests let slip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_hotpaths import _model  # cnn7 with BatchNorm statistics that make eval ≠ train

from causalign.errors import InputError
from causalign.metrics import (
    bootstrap_ci,
    cam_precision,
    classification_metrics,
    expected_calibration_error,
    iou_dice,
    reliability_bins,
)

# ----------------------------------------------------------------------------- bootstrap


def _pair_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The AUC over every (positive, negative) pair, ties ½ (Mann–Whitney)."""
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _loop_bootstrap(probs: np.ndarray, labels: np.ndarray, n: int, seed: int) -> dict:
    """The stratified percentile bootstrap written out as a loop: the same draws
    (per class, in class order, a multinomial of the class's size over its samples, as
    `bootstrap_ci` documents), each resample materialised and scored from scratch."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    probs, labels = probs[order], labels[order]
    classes = np.unique(labels)
    w = np.zeros((n, len(labels)), dtype=np.int64)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n)
    stats: dict[str, list[float]] = {k: [] for k in ("accuracy", "balanced_accuracy", "auc",
                                                      "sensitivity", "specificity")}
    for row in w:
        take = np.repeat(np.arange(len(labels)), row)
        p, y = probs[take], labels[take]
        hit = p.argmax(1) == y
        recall = {int(c): hit[y == c].mean() for c in classes}
        stats["accuracy"].append(hit.mean())
        stats["balanced_accuracy"].append(np.mean(list(recall.values())))
        if probs.shape[1] == 2:
            stats["auc"].append(_pair_auc(p[:, 1], y == 1))
            stats["sensitivity"].append(recall[1])
            stats["specificity"].append(recall[0])
        else:
            stats["auc"].append(np.mean([_pair_auc(p[:, c], y == c) for c in classes]))
    return {k: (np.percentile(v, [2.5, 97.5]).tolist() if v else None)
            for k, v in stats.items()}


@pytest.mark.parametrize("n_classes", [2, 3])
def test_bootstrap_ci_is_sklearn_on_the_same_stratified_resamples(n_classes):
    """Each interval is the 2.5/97.5 percentile of scikit-learn's metric over the stratified
    resamples drawn from ``seed``, each scored from scratch (the AUC over every pair, ties
    ½, checked against scikit-learn). Kills: the percentiles
    moved (5/95), a class recall divided by N, ties counted 1 or 0 in the weighted AUC, the
    seed ignored."""
    rng = np.random.default_rng(7)
    n = 40
    y = rng.integers(0, n_classes, n)
    logits = np.round(rng.normal(0, 1, (n, n_classes)) + 1.2 * np.eye(n_classes)[y], 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for c in range(n_classes):  # the pairwise reference is scikit-learn's AUC
        assert _pair_auc(probs[:, c], y == c) == pytest.approx(roc_auc_score(y == c,
                                                                             probs[:, c]))
    got = bootstrap_ci(probs, y, n=120, seed=5)["ci95"]
    want = _loop_bootstrap(probs, y, 120, 5)
    for name, ref in want.items():
        if ref is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(ref, abs=1e-12), name


def test_bootstrap_takes_exactly_min_resamples():
    """Guard of the boundary: 100 resamples (`MIN_BOOTSTRAP`) are enough, 99 are not. Kills
    `n <= MIN_BOOTSTRAP`."""
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y = np.array([0, 1, 1, 1])
    assert bootstrap_ci(probs, y, n=100)["bootstrap"]["n"] == 100
    with pytest.raises(InputError, match="too few"):
        bootstrap_ci(probs, y, n=99)


# --------------------------------------------------------------------- input validation


def test_rows_summing_to_1_05_are_refused():
    """Probabilities in [0, 1] whose rows sum to 1.05 are not a softmax (unnormalised
    scores): refused, where a half-precision softmax (off by ~1e-3) is not. Kills a loosened
    row-sum tolerance (1e-1)."""
    y = np.array([0, 1])
    with pytest.raises(InputError, match="row sums"):
        classification_metrics(np.array([[0.55, 0.5], [0.5, 0.55]]), y)
    ok = classification_metrics(np.array([[0.6, 0.401], [0.3, 0.699]]), y)
    assert ok["accuracy"] == 1.0


def test_a_label_equal_to_the_class_count_is_refused():
    """Guard: label C (one past the last class) is refused, not scored as a positive. Kills
    `labels.max() > C` (no existing test tried label C itself)."""
    with pytest.raises(InputError, match=r"0\.\.1"):
        classification_metrics(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 2]))


# --------------------------------------------------------------------------- calibration


def _guo_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Guo et al.'s binning loop: bins (lo, hi], the first one closed at 0."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def test_ece_bins_are_closed_on_the_right():
    """A confidence exactly on an edge (0.5 with 2 bins) falls in the lower bin (lo, hi], as
    Guo et al.'s loop puts it: ECE 0.7 here, not 0.2. Kills searchsorted side="right"."""
    probs = np.array([[0.5, 0.3, 0.2], [0.05, 0.05, 0.9]])
    y = np.array([0, 0])  # the first correct at confidence .5, the second wrong at .9
    assert expected_calibration_error(probs, y, n_bins=2) == pytest.approx(0.7, abs=1e-12)
    assert _guo_ece(probs, y, 2) == pytest.approx(0.7, abs=1e-12)
    assert reliability_bins(probs, y, n_bins=2)["count"] == [1, 1]


def test_a_probability_just_above_one_stays_in_the_last_bin():
    """A half-precision softmax may give 1.0005 (accepted up to 1 + 1e-3): it belongs to the
    last bin, and the diagram keeps exactly ``n_bins`` bins. Kills a clip to ``n_bins``
    (an extra 16th bin)."""
    probs = np.array([[1.0005, -0.0005], [0.3, 0.7], [0.75, 0.25]])
    y = np.array([0, 1, 1])
    b = reliability_bins(probs, y, n_bins=4)
    assert b["count"] == [0, 0, 2, 1]
    assert len(b["mean_predicted"]) == len(b["observed"]) == 4
    assert b["mean_predicted"][3] == pytest.approx(1.0005)


# -------------------------------------------------------------------------- localisation


def test_a_pixel_exactly_at_the_threshold_is_selected():
    """cam_precision selects {map ≥ threshold} (paper 000 Table 1): a pixel normalised to
    exactly 0.5 counts. Kills `>`."""
    maps = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    ann = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert cam_precision(maps, ann).item() == pytest.approx(0.5)
    iou, dice = iou_dice(maps, ann)
    assert iou.item() == pytest.approx(0.5) and dice.item() == pytest.approx(2 / 3)


def test_a_constant_map_scores_zero_even_at_threshold_zero():
    """An empty (constant) map points at nothing: 0 precision, IoU and Dice even at threshold
    0, where every normalised pixel (all 0) would pass ≥ 0. Kills dropping the empty-map
    override of cam_precision and of iou_dice."""
    maps = torch.full((1, 4, 4), 3.0)
    ann = torch.zeros(1, 4, 4)
    ann[0, :2] = 1  # half the image annotated: a selected-everything map would score 0.5
    assert cam_precision(maps, ann, threshold=0.0).item() == 0.0
    iou, dice = iou_dice(maps, ann, threshold=0.0)
    assert iou.item() == 0.0 and dice.item() == 0.0


def test_thresholds_zero_and_one_are_allowed():
    """Guard of the closed interval [0, 1]: 0 selects every pixel of a non-constant map, 1
    only its peak. Kills `0 < threshold`."""
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    ann = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert cam_precision(maps, ann, threshold=0.0).item() == pytest.approx(0.5)
    assert cam_precision(maps, ann, threshold=1.0).item() == 0.0


def test_brier_of_a_half_precision_softmax_slightly_outside_the_unit_interval():
    """Rows up to 1e-3 outside [0, 1] (a half-precision softmax) are accepted; the binary
    Brier score clips class 1's probability to [0, 1] first (scikit-learn refuses 1.0005).
    Kills dropping the clip (a ValueError from scikit-learn)."""
    from causalign.metrics import brier_score

    probs = np.array([[-0.0005, 1.0005], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([1, 1, 0])
    want = np.mean((np.clip(probs[:, 1], 0, 1) - y) ** 2)  # (0 + .49 + .64) / 3
    assert brier_score(probs, y) == pytest.approx(want, abs=1e-12)
    assert classification_metrics(probs, y)["brier"] == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------ evaluate_split


def test_evaluate_split_scores_the_eval_mode_outputs_of_the_whole_split(tiny_data):
    """metrics.json's loss is the mean cross-entropy over every sample (batches of 5, 5, 5
    and 1 of the 16: not the mean of batch means), and the classification metrics and the
    bootstrap intervals (with the caller's seed) are those of the eval-mode softmax of the
    whole split. Kills: a mean of per-batch means, the bootstrap seed dropped."""
    import torch.nn.functional as F

    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import evaluate_split
    from causalign.methods import build_method

    ds = LesionDataset(tiny_data, "test")
    model = _model(ds).eval()
    batch = ds.batch(torch.arange(len(ds)))
    with torch.no_grad():
        logits = model(batch["image"]).double()
    probs, y = logits.softmax(1).numpy(), batch["label"].numpy()
    out = evaluate_split(model, build_method("erm"), ds, "cpu", saliency="gradient",
                         fractions=(0.1,), batch_size=5,
                         bootstrap=100, bootstrap_seed=3)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, batch["label"]).item(),
                                        rel=1e-5)
    assert out["n"] == 16
    assert out["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    if len(np.unique(y)) == 2:
        assert out["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-9)
    want = bootstrap_ci(probs, y, 100, 3)["ci95"]
    for name, ref in want.items():
        assert out["ci95"][name] == (None if ref is None else pytest.approx(ref, abs=1e-9))
    assert out["bootstrap"]["seed"] == 3


def test_evaluate_split_refuses_a_bad_bootstrap_count_before_running_the_model(tiny_data):
    """Too few resamples fail before the pass over the split (no forward), not after it.
    Kills skipping the up-front `check_bootstrap`."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import evaluate_split
    from causalign.methods import build_method

    ds = LesionDataset(tiny_data, "test")
    model = _model(ds)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError, match="too few"):
        evaluate_split(model, build_method("erm"), ds, "cpu", fractions=(0.1,), bootstrap=5)
    assert calls == []


# ---------------------------------------------------------------------------- paired tests


def test_delong_with_zero_variance_but_different_aucs_gives_no_p_value():
    """A perfect scorer (AUC 1) against a constant one (AUC 0.5): both sets of placement
    values are constant, so the difference has zero variance, yet the AUCs differ; no z or
    p-value then (None), not "p = 1, no difference". Kills reporting (0, 1) for any zero
    variance."""
    from causalign.metrics import delong_test

    y = np.array([0, 0, 0, 1, 1, 1])
    r = delong_test(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.full(6, 0.5), y)
    assert r["auc_a"] == 1.0 and r["auc_b"] == 0.5 and r["se"] == 0.0
    assert r["z"] is None and r["p_value"] is None


def test_attribute_accuracy_thresholds_the_probability_at_one_half(tiny_data):
    """An attribute counts as predicted present when σ(logit) > 0.5, i.e. logit > 0: a model
    whose every attribute logit is 0.3 (σ = 0.57) predicts every attribute present, so its
    accuracy is the share of annotated attributes that are present. Kills `logit > 0.5`."""
    from torch import nn

    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import attribute_accuracy
    from causalign.methods import build_method

    ds = LesionDataset(tiny_data, "test")
    n_attr = len(ds.meta.attributes)

    class Attr(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(len(x), 2) + self.w

        def attributes(self, x):
            return torch.full((len(x), n_attr), 0.3) + self.w

    batch = ds.batch(torch.arange(len(ds)))
    known = batch["attr_known"].bool()
    present = (batch["attributes"] > 0.5) & known
    want = (present.sum(0).double() / known.sum(0).double()).tolist()
    got = attribute_accuracy(Attr(), build_method("erm"), ds, "cpu", batch_size=5)
    assert 0 < min(want) and max(want) < 1  # both kinds present: the threshold matters
    assert list(got["per_attribute"].values()) == pytest.approx(want)
    assert got["mean"] == pytest.approx(np.mean(want))


def test_evaluate_split_counts_box_annotations_and_their_empty_maps(tiny_data):
    """``n_annotated`` and ``cam_empty_fraction`` are over the samples with a box *or* a
    mask, ``n_mask`` over those with a pixel mask. A model whose saliency is empty exactly
    where its class-1 score is ≤ t (a zero gradient of the predicted class 0) gives an
    independent reference. Kills: n_annotated counting the mask subset, the empty fraction
    taken over the mask subset."""
    from torch import nn

    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import evaluate_split
    from causalign.methods import build_method

    ds = LesionDataset(tiny_data, "test")
    ds.has_mask[::3] = False  # box-only samples, so the two subsets differ
    batch = ds.batch(torch.arange(len(ds)))
    pattern = torch.randn(*ds.image_shape, generator=torch.Generator().manual_seed(0))
    score = (batch["image"] * pattern).flatten(1).sum(1)
    t = float(score.quantile(0.3))

    class Thresholded(nn.Module):  # logits (0, relu(<x, pattern> − t))
        def __init__(self):
            super().__init__()
            self.pattern = nn.Parameter(pattern.clone())

        def forward(self, x):
            s = torch.relu((x * self.pattern).flatten(1).sum(1) - t)
            return torch.stack([torch.zeros_like(s), s], 1)

    out = evaluate_split(Thresholded(), build_method("erm"), ds, "cpu", saliency="gradient",
                         fractions=(0.1,), batch_size=5)
    ann, has_mask = batch["has_annotation"], batch["has_mask"]
    empty = (score <= t).double()
    assert out["n_annotated"] == int(ann.sum()) and out["n_mask"] == int(has_mask.sum())
    assert out["n_annotated"] != out["n_mask"]
    want = float(empty[ann].mean())
    assert want != pytest.approx(float(empty[has_mask].mean()))  # the subsets disagree here
    assert out["cam_empty_fraction"] == pytest.approx(want)


def test_read_predictions_refuses_a_duplicate_id(tmp_path):
    """A predictions CSV naming one sample twice (two files concatenated) is refused with
    the line and id: `causalign compare` aligns two runs by id, and a repeated id would pair
    the wrong rows. Kills dropping the duplicate check (no test had one)."""
    from causalign.engine.evaluate import read_predictions

    path = tmp_path / "p.csv"
    path.write_text("id,site,label,predicted,p_neg,p_pos\na,s,0,0,0.8,0.2\n"
                    "b,s,1,1,0.3,0.7\na,s,0,0,0.8,0.2\n")
    with pytest.raises(InputError, match=r"line 4: id 'a' appears twice"):
        read_predictions(path)
    path.write_text("id,site,label,predicted,p_neg,p_pos\na,s,0,0,0.8,0.2\n")
    assert read_predictions(path).ids == ["a"]  # the same row once is fine
