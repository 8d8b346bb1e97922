"""Mutation audit of the dataset format (dataset.yaml, manifest writer/reader, limit), the
synthetic benchmark, the latent autoencoder's file, CDEP's penalty and hier-align's
single-process align_batch cap: behaviours the earlier tests let slip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_audit_mutdata2_1207n import _meta, _two_samples

from causalign.data.format import DatasetWriter, LesionDataset, read_manifest, read_meta
from causalign.errors import DataError


def _volume_pair(root, z: tuple[int, int]) -> str:
    """Two 4-slice volumes, 'a' with box (1, 1, 5, 5, *z); returns its manifest cells."""
    with DatasetWriter(root, _meta(ndim=3), image_format="npy") as w:
        w.add(np.zeros((4, 8, 8), np.float32), label=0, split="train", sample_id="a",
              box=(1, 1, 5, 5, *z))
        w.add(np.zeros((4, 8, 8), np.float32), label=1, split="train", sample_id="b")
    cells = f",1,1,5,5,{z[0]},{z[1]}"
    assert (root / "manifest.csv").read_text().count(cells) == 1
    return cells


# --- dataset.yaml, manifest, limit ----------------------------------------------------


@pytest.mark.parametrize("channels", [0, -1, True, 1.5])
def test_dataset_yaml_channels_must_be_a_positive_integer(tmp_path, channels):
    """Guard: ``channels: 0`` (or negative, a bool, a float) in a hand-edited dataset.yaml is
    refused in one line naming the key (kills `channels < 1` -> `channels < 0`, which let a
    zero-channel dataset through to fail inside the model)."""
    _two_samples(tmp_path)
    meta = yaml.safe_load((tmp_path / "dataset.yaml").read_text())
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**meta, "channels": channels}))
    with pytest.raises(DataError, match="'channels' must be a positive integer"):
        read_meta(tmp_path)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**meta, "channels": 3}))
    assert read_meta(tmp_path).channels == 3


@pytest.mark.parametrize("cells,needle", [
    ("1,", "needs both box_z0 and box_z1"),
    (",3", "needs both box_z0 and box_z1"),
])
def test_a_volume_box_with_only_one_slice_bound_is_refused(tmp_path, cells, needle):
    """Guard: a manifest row giving box_z0 without box_z1 (or the reverse) is refused naming
    both columns (kills the z-cells check `all` -> `any`, which passed half a slice range
    on to the box parser)."""
    _volume_pair(tmp_path, (1, 3))
    path = tmp_path / "manifest.csv"
    text = path.read_text()
    path.write_text(text.replace(",1,1,5,5,1,3", ",1,1,5,5," + cells))
    with pytest.raises(DataError, match=needle):
        read_manifest(tmp_path)
    path.write_text(text)
    assert read_manifest(tmp_path)[0].box == (1, 1, 5, 5, 1, 3)


@pytest.mark.parametrize("limit", [0, -1, True, 2.0])
def test_limit_must_be_a_positive_int(tmp_path, limit):
    """Guard: ``limit=0`` (or negative, a bool, a float) is refused (kills `limit < 1` ->
    `limit < 0`, under which limit=0 gave an empty split instead of the error)."""
    _two_samples(tmp_path)
    with pytest.raises(ValueError, match="limit must be a positive int or None"):
        LesionDataset(tmp_path, "train", limit=limit)
    assert len(LesionDataset(tmp_path, "train", limit=1)) == 1


def test_manifest_cells_with_commas_and_quotes_survive_the_round_trip(tmp_path):
    """Guard: a site, image path or group holding a comma or a double quote is written as a
    quoted CSV cell with its quotes doubled, and read back unchanged (kills dropping the
    quote doubling, and quoting only on quotes/newlines: either misaligns the row). The
    expected line is written out by hand, RFC 4180 style."""
    from causalign.data.format import SampleRecord, write_manifest

    rows = [SampleRecord("a", "train", 0, 'north, "B"', 'images/a, "1".png', group='p,"1"'),
            SampleRecord("b", "train", 1, "s", "images/b.png")]
    write_manifest(tmp_path, _meta(), rows)
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert lines[1] == 'a,train,0,"north, ""B""","images/a, ""1"".png",,,,,,"p,""1"""'
    back = read_manifest(tmp_path)
    assert [(r.site, r.image, r.group) for r in back] == [
        ('north, "B"', 'images/a, "1".png', 'p,"1"'), ("s", "images/b.png", "")]


# --- synthetic benchmark ----------------------------------------------------------------


@pytest.mark.parametrize("depth,ok", [(1, True), (2, False), (3, False), (4, True)])
def test_synth_volumes_need_at_least_four_slices(depth, ok):
    """Guard: --depth 2 or 3 is refused in one line (kills `depth < 4` -> `< 3`, which let a
    3-slice volume through); 1 (2D) and 4 are accepted."""
    from causalign.data.synth import SynthConfig

    cfg = SynthConfig(n_train=4, n_val=2, n_test=2, size=32, depth=depth)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(DataError, match=f"--depth {depth}: volumes need at least 4 slices"):
            cfg.validate()


@pytest.mark.parametrize("depth", [1, 4])
def test_synth_lesion_contrast_scales_with_the_site_gain(depth):
    """Guard: a site's contrast gain multiplies the lesion, in 2D and in volumes: with noise
    and blur off and the same random draws, image(g) = background + g·lesion, so (where no
    pixel is clipped) image(1.5) − image(0.5) = 2·(image(1) − image(0.5)), a lesion that is
    not empty (kills dropping ``site.gain`` in either branch: every site drew one contrast)."""
    from causalign.data.synth import SiteParams, SynthConfig, render_sample

    cfg = SynthConfig(size=32, depth=depth, shortcut="none")
    attrs = np.array([1, 0, 1, 1, 0, 1], np.float64)

    def img(gain: float) -> np.ndarray:
        site = SiteParams(gain=gain, noise=0.0, blur=0.0, attribute_prob=0.5)
        out, mask, _ = render_sample(cfg, attrs, 1, "train", site, np.random.default_rng(3))
        return out, mask

    (i0, mask), (i1, _), (i2, _) = img(0.5), img(1.0), img(1.5)
    lesion = i1 - i0  # 0.5·lesion
    inside = (np.minimum(np.minimum(i0, i1), i2) > 0) & (np.maximum(np.maximum(i0, i1), i2) < 1)
    assert inside[mask].mean() > 0.5  # the image is clipped to [0, 1]: compare the rest
    assert np.abs(lesion[mask & inside]).mean() > 0.02
    np.testing.assert_allclose((i2 - i0)[inside], 2 * lesion[inside], atol=1e-5)


def test_a_slice_range_without_a_box_is_refused(tmp_path):
    """Guard: box_z0/box_z1 given while the four box cells are empty is refused in one line
    (kills dropping the check: the slice range was silently ignored)."""
    _volume_pair(tmp_path, (1, 3))
    path = tmp_path / "manifest.csv"
    text = path.read_text()
    path.write_text(text.replace(",1,1,5,5,1,3", ",,,,,1,3"))
    with pytest.raises(DataError, match=r"manifest.csv:2: box slice range \['1', '3'\] "
                                        r"without a box"):
        read_manifest(tmp_path)



def test_synth_label_threshold_lies_midway_between_two_score_values():
    """Guard: the label threshold t lies midway between the two distinct scores w·a around
    the median, never ON a score, so at label_noise 0 no attribute pattern sits on the
    boundary (kills returning the median itself: for w = (1, 1, 0, …) that is the score 1,
    and half the patterns became label 0 by `>` alone). Reference: all 2^6 scores by hand."""
    import itertools

    from causalign.data.synth import CAUSAL_WEIGHTS, label_threshold

    assert label_threshold([1, 1, 0, 0, 0, 0]) == 0.5  # scores 0, 1, 2; median 1
    scores = sorted({float(np.dot(a, CAUSAL_WEIGHTS))
                     for a in itertools.product([0, 1], repeat=len(CAUSAL_WEIGHTS))})
    t = label_threshold(CAUSAL_WEIGHTS)
    below, above = max(v for v in scores if v < t), min(v for v in scores if v > t)
    assert t not in scores and t == pytest.approx((below + above) / 2)



def test_synth_volume_blur_stays_within_each_slice():
    """Guard: a site's blur is in-plane only (sigma 0 along the slices): with noise off, a
    lesion-free slice of a volume is exactly its background, as rendered with gain 0 from
    the same draws (kills blurring along z too, which smeared the lesion into slices its
    box and mask say are empty)."""
    from causalign.data.synth import SiteParams, SynthConfig, render_sample

    cfg = SynthConfig(size=32, depth=8, shortcut="none")
    attrs = np.array([1, 1, 1, 1, 0, 1], np.float64)

    def img(gain: float):
        site = SiteParams(gain=gain, noise=0.0, blur=1.0, attribute_prob=0.5)
        out, mask, _ = render_sample(cfg, attrs, 1, "train", site, np.random.default_rng(5))
        return out, mask

    (lit, mask), (bg, _) = img(1.0), img(0.0)
    free = ~mask.any(axis=(1, 2))
    assert 0 < free.sum() < len(free)
    np.testing.assert_array_equal(lit[free], bg[free])
    assert np.abs(lit[~free] - bg[~free]).max() > 0.1


# --- the latent autoencoder ------------------------------------------------------------


def test_a_trained_autoencoder_is_frozen_in_eval_mode_and_keeps_its_mse():
    """Guard: `train_autoencoder` returns a fixed generator: eval mode, no parameter
    requiring grad (only the classifier trains), and its final training MSE as a finite
    float, which `autoencoder_state` carries (kills dropping `.eval()`, the
    `requires_grad_(False)` or the `train_mse` assignment)."""
    from causalign.models.autoencoder import autoencoder_state, train_autoencoder

    torch.manual_seed(0)
    images = torch.rand(2, 1, 8, 8)
    ae = train_autoencoder(images, epochs=1, batch_size=2, width=4, latent_channels=2)
    assert not ae.training and not any(m.training for m in ae.modules())
    assert not any(p.requires_grad for p in ae.parameters())
    assert isinstance(ae.train_mse, float) and 0 < ae.train_mse < 1
    assert autoencoder_state(ae)["train_mse"] == ae.train_mse


# --- CDEP: the penalty of the annotated samples only, its weight λ -----------------------


def _cdep_case():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 2))
    x = torch.rand(4, 1, 6, 6)
    mask = torch.zeros(4, 1, 6, 6)
    mask[[0, 2], :, 1:4, 1:4] = 1  # samples 1 and 3 carry no annotation
    annotated = torch.tensor([True, False, True, False])
    batch = {"image": x, "label": torch.tensor([0, 1, 1, 0]), "mask": mask, "box_mask": mask,
             "has_mask": annotated, "has_annotation": annotated}
    return model, batch


def test_cdep_penalises_only_the_annotated_samples_and_counts_them():
    """The penalty is the background share of the CD scores averaged over the ANNOTATED
    samples only (an unannotated sample has no background to blame), reported with its count
    2 for history's weighting and λ·penalty as the data-parallel subset mean (kills
    decomposing the whole batch, weighting train_cdep by the batch size 4, and dropping λ
    from ``means``). Reference: the softmax share computed by hand from
    `contextual_decomposition` of samples 0 and 2."""
    import torch.nn.functional as F

    from causalign.methods import build_method
    from causalign.methods.cdep import contextual_decomposition

    model, batch = _cdep_case()
    x, mask = batch["image"], batch["mask"]
    rel, irrel = contextual_decomposition(model, x[[0, 2]], 1 - mask[[0, 2]])
    share = (torch.exp(rel) / (torch.exp(rel) + torch.exp(irrel))).mean().detach()
    out = build_method("cdep", {"lam": 2.5})(model, batch)
    torch.testing.assert_close(out.total, F.cross_entropy(model(x), batch["label"]) + 2.5 * share)
    assert out.parts["cdep"] == pytest.approx(float(share), abs=1e-6)
    assert out.part_weights["cdep"] == 2
    value, k = out.means["cdep"]
    assert k == 2 and float(value.detach()) == pytest.approx(2.5 * float(share), abs=1e-6)



def test_dataset_yaml_ndim_must_be_2_or_3(tmp_path):
    """Guard: ``ndim: 1`` in dataset.yaml is refused naming the key (kills accepting 1,
    which read 2D images as a "1D" dataset)."""
    _two_samples(tmp_path)
    meta = yaml.safe_load((tmp_path / "dataset.yaml").read_text())
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**meta, "ndim": 1}))
    with pytest.raises(DataError, match=r"'ndim' must be 2 or 3 \(spatial dimensions\), got 1"):
        read_meta(tmp_path)


def test_a_slice_range_one_past_the_last_slice_is_refused(tmp_path):
    """Guard: a 4-slice volume's box may end at slice 4 (z1 exclusive) but not at 5: the
    reader refuses it naming the volume's slice count (kills `z1 > d` -> `z1 > d + 1`,
    which made a box mask spanning slices that do not exist)."""
    _volume_pair(tmp_path, (1, 4))
    assert LesionDataset(tmp_path, "train").box_masks[0, 0].sum(dim=(1, 2)).tolist() == [
        0, 16, 16, 16]
    path = tmp_path / "manifest.csv"
    path.write_text(path.read_text().replace(",1,1,5,5,1,4", ",1,1,5,5,1,5"))
    with pytest.raises(DataError, match=r"sample a: box slice range 1\.\.5 outside the volume "
                                        r"\(4 slices, 0\.\.4\)"):
        LesionDataset(tmp_path, "train")


# --- hier-align: the single-process align_batch cap ---------------------------------------


@pytest.mark.parametrize("cap,expect", [(2, [1, 3]), (3, [1, 3, 4]), (4, [1, 3, 4, 5])])
def test_hier_align_batch_aligns_the_first_annotated_samples(monkeypatch, cap, expect):
    """align_batch = cap of the 4 annotated samples (rows 1, 3, 4, 5): the image level
    searches counterfactuals of exactly the FIRST cap annotated rows (batches are shuffled,
    so the first are a random draw), and both counts reported to history.csv
    (n_align_img, img_n_align) are cap (kills keeping the last rows `[-cap:]`, the
    `<= cap + 1` shortcut that aligned 4 for cap 3, and aligning the uncapped rows while
    reporting the capped count)."""
    from test_audit_muthier_1207m import DT, FAST, _batch, _hier

    from causalign.methods import build_method

    b = _batch()
    # label = attribute 0: CCCE gives every row an r, so the attribute level searches all
    # six rows and the image level must pick its capped rows out of them
    b["attributes"] = torch.tensor([[0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 1, 0],
                                    [1, 0, 0]], dtype=DT)
    annotated = torch.tensor([False, True, False, True, True, True])
    b["mask"] = b["mask"] * annotated.view(-1, 1, 1, 1)
    b["box_mask"] = b["mask"]
    b["has_mask"] = b["has_annotation"] = annotated
    method = build_method("hier-align", dict(FAST, align_batch=cap))
    method.fit_attribution(b["attributes"], b["label"])
    seen = []
    real = method.image_counterfactual

    def spy(model, x, *args, **kw):
        seen.append(x.detach().clone())
        return real(model, x, *args, **kw)

    monkeypatch.setattr(method, "image_counterfactual", spy)
    out = method(_hier().train(), b)
    assert len(seen) == 1 and torch.equal(seen[0], b["image"][expect])
    assert out.parts["n_align_img"] == out.parts["img_n_align"] == len(expect)
    assert out.parts["n_align_attr"] == 6.0
