"""Mutation audit of the dataset format's manifest/yaml handling, the synthetic benchmark's
rules, the training-curve and reliability figures and the autoencoder's save/load:
behaviours the earlier tests let slip."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from test_audit_mutfig_1207n import _saved  # noqa: E402  (figures captured, not saved)

from causalign.data.format import (  # noqa: E402
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    read_manifest,
    read_meta,
)
from causalign.errors import DataError  # noqa: E402


def _meta(**kw) -> DatasetMeta:
    return DatasetMeta("toy", ["benign", "malignant"], **kw)


def _edit_manifest(root, old: str, new: str) -> None:
    path = root / "manifest.csv"
    text = path.read_text()
    assert text.count(old) == 1, text
    path.write_text(text.replace(old, new))


def _two_samples(root, **add) -> None:
    """Two gray 8x8 training samples 'a' and 'b' (with ``add`` given to both)."""
    with DatasetWriter(root, _meta(**add.pop("meta", {}))) as w:
        for k, sid in enumerate("ab"):
            w.add(np.full((8, 8), k / 4, np.float32), label=k, split="train", sample_id=sid,
                  **add)


# --- dataset.yaml and manifest parsing ------------------------------------------------


def test_dataset_yaml_with_one_class_is_refused(tmp_path):
    """Guard: dataset.yaml must list at least two classes (a classifier of one class is no
    task); one class is refused in one line (kills `< 2` -> `< 1`)."""
    _two_samples(tmp_path)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({"name": "x", "classes": ["a"]}))
    with pytest.raises(DataError, match="'classes' must list at least two class names"):
        read_meta(tmp_path)
    assert DatasetMeta.from_dict({"name": "x", "classes": ["a", "b"]}, "w").classes == ["a", "b"]


def test_trailing_empty_cells_are_ignored_but_an_extra_value_is_refused(tmp_path):
    """Guard: a row ending in extra EMPTY cells ("…,0,,") as spreadsheets write them reads
    as the header's cells, values unchanged; an extra cell with a value is a misaligned row
    (kills dropping the trailing-empty trim, which refused every such manifest)."""
    _two_samples(tmp_path)
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    (tmp_path / "manifest.csv").write_text("\n".join([text[0]] + [t + ",," for t in text[1:]])
                                           + "\n")
    recs = read_manifest(tmp_path)
    assert [(r.id, r.label, r.image) for r in recs] == [("a", 0, "images/a.png"),
                                                        ("b", 1, "images/b.png")]
    (tmp_path / "manifest.csv").write_text("\n".join([text[0], text[1] + ",x"]) + "\n")
    with pytest.raises(DataError, match=r"manifest.csv:2: 11 cells, the header has 10"):
        read_manifest(tmp_path)


def test_a_duplicate_id_in_the_manifest_is_refused_with_both_lines(tmp_path):
    """Guard: two rows with one id would write one per-sample output file over the other;
    the second is refused naming the first's line (kills dropping the repeated-id check)."""
    _two_samples(tmp_path)
    _edit_manifest(tmp_path, "\nb,train,", "\na,train,")
    with pytest.raises(DataError, match=r"manifest.csv:3: id 'a' already used on line 2"):
        read_manifest(tmp_path)


def test_a_windows_mask_path_and_an_escaping_one(tmp_path):
    """Guard: a mask path written with backslashes (a Windows manifest) names the same file
    (kills converting only the image path: its mask was "file not found"); a mask path
    climbing out of the folder with '..' is refused (kills dropping the ``../`` test)."""
    _two_samples(tmp_path, mask=np.eye(8, dtype=np.uint8))
    _edit_manifest(tmp_path, "masks/a.png", "masks\\a.png")
    assert read_manifest(tmp_path)[0].mask == "masks/a.png"
    assert LesionDataset(tmp_path, "train").masks[0, 0].numpy().tolist() == np.eye(8).tolist()
    _edit_manifest(tmp_path, "masks\\a.png", "../outside/a.png")
    with pytest.raises(DataError, match=r"mask path '../outside/a.png' is outside the dataset"):
        read_manifest(tmp_path)


def test_groups_and_fractional_attributes_survive_the_round_trip(tmp_path):
    """Guard: `write_manifest` keeps the patient group (kills writing no group column) and
    an attribute of 0.5 (a soft rating) as 0.5 (kills a format rounding it to 0 or 1); an
    unrated attribute stays NaN."""
    with DatasetWriter(tmp_path, _meta(attributes=["m", "s"])) as w:
        w.add(np.zeros((8, 8), np.float32), label=0, split="train", sample_id="a",
              attributes=[0.5, float("nan")], group="p1")
        w.add(np.zeros((8, 8), np.float32), label=1, split="val", sample_id="b",
              attributes=[0.25, 1.0])
    recs = read_manifest(tmp_path)
    assert [r.group for r in recs] == ["p1", ""]
    assert recs[0].attributes[0] == 0.5 and np.isnan(recs[0].attributes[1])
    assert recs[1].attributes == [0.25, 1.0]


def test_site_indices_are_shared_by_every_split_and_sorted_numerically(tmp_path):
    """Guard: a split's `sites` list every site of the DATASET, so site k is the same index
    in train and test (kills collecting the split's own sites: test's site "10" became
    index 0), numbered sites sorted as numbers ("2" before "10"; kills a text sort)."""
    with DatasetWriter(tmp_path, _meta()) as w:
        w.add(np.zeros((8, 8), np.float32), label=0, split="train", sample_id="a", site="10")
        w.add(np.zeros((8, 8), np.float32), label=1, split="train", sample_id="b", site="2")
        w.add(np.zeros((8, 8), np.float32), label=0, split="test", sample_id="c", site="x")
        w.add(np.zeros((8, 8), np.float32), label=0, split="test", sample_id="d", site="10")
    train, test = LesionDataset(tmp_path, "train"), LesionDataset(tmp_path, "test")
    assert train.sites == test.sites == ["2", "10", "x"]
    assert train.site_index.tolist() == [1, 0]
    assert test.site_index.tolist() == [2, 1]


def test_limit_keeps_the_first_samples_of_the_split_in_manifest_order(tmp_path):
    """Guard: ``limit`` keeps the split's FIRST samples (kills the last ones)."""
    with DatasetWriter(tmp_path, _meta()) as w:
        for k in range(5):
            w.add(np.full((8, 8), k / 8, np.float32), label=k % 2, split="train",
                  sample_id=f"s{k}")
            w.add(np.zeros((8, 8), np.float32), label=0, split="val", sample_id=f"v{k}")
    ds = LesionDataset(tmp_path, "train", limit=2)
    assert [r.id for r in ds.records] == ["s0", "s1"]
    assert ds.labels.tolist() == [0, 1]
    assert LesionDataset(tmp_path, "train", limit=9).labels.tolist() == [0, 1, 0, 1, 0]


# --- synthetic benchmark ----------------------------------------------------------------


def _render(split: str, label: int, shortcut: str, seed: int) -> np.ndarray:
    from causalign.data.synth import SynthConfig, render_sample, site_params

    cfg = SynthConfig(size=32, shortcut=shortcut)
    attrs = np.array([1, 0, 1, 1, 0, 1], np.float64)
    img, _, _ = render_sample(cfg, attrs, label, split, site_params(0, 1, 0.5),
                              np.random.default_rng(seed))
    return img


@pytest.mark.parametrize("shortcut", ["plus-minus", "intensity"])
def test_the_shortcut_follows_the_label_in_training_only(shortcut):
    """Guard: the shortcut is tied to the label in the TRAINING split only: there label 1
    and label 0 images from one random stream differ by the symbol / +0.12 brightness; in
    val and test the image does not depend on the label at all (kills a shortcut in val,
    `split != "test"`, and an intensity offset following the label in every split)."""
    for seed in range(3):
        one, zero = _render("train", 1, shortcut, seed), _render("train", 0, shortcut, seed)
        if shortcut == "intensity":  # +0.12 wherever the clip to [0, 1] leaves room
            inside = (zero > 0) & (one < 1)
            assert np.allclose((one - zero)[inside], 0.12, atol=1e-6)
        else:  # the vertical arm of the "+" (rows 2..8, columns 4..5 at 32 px)
            assert np.all(one[2:9, 4:6] == np.float32(0.9)) and zero[2, 4] != np.float32(0.9)
        for split in ("val", "test"):
            assert np.array_equal(_render(split, 1, shortcut, seed),
                                  _render(split, 0, shortcut, seed)), (split, seed)
    # …and in val the symbol is random: some label-1 images show "−"
    plus = [_render("val", 1, "plus-minus", s)[2, 4] == np.float32(0.9) for s in range(12)]
    assert 0 < sum(plus) < 12


def test_site_prevalence_rises_with_the_site_index_and_is_used_per_sample(tmp_path):
    """Guard: site k of K has attribute prevalence p − 0.2 + 0.4·k/(K−1) (kills the
    reversed direction), and each sample is drawn with its OWN site's parameters (kills
    every sample drawn with site 0's, whose prevalence 0.3 then held for all sites)."""
    from causalign.data.synth import SynthConfig, generate, site_params

    assert [site_params(k, 3, 0.5).attribute_prob for k in range(3)] == \
        pytest.approx([0.3, 0.5, 0.7])
    assert [site_params(k, 3, 0.5).gain for k in range(3)] == pytest.approx([0.75, 1.0, 1.25])
    generate(tmp_path, SynthConfig(n_train=48, n_val=1, n_test=1, size=32, sites=3, seed=0))
    recs = [r for r in read_manifest(tmp_path) if r.split == "train"]
    mean = {s: np.mean([r.attributes for r in recs if r.site == s]) for s in "02"}
    assert mean["2"] - mean["0"] > 0.2, mean


def test_spikes_are_part_of_the_lesion_mask():
    """Guard: the annotation covers the spikes of a spiculated lesion, not only its body
    (kills ``mask = body > 0.5``: evidence outside the mask was then penalised)."""
    from causalign.data.synth import render_lesion, sample_lesion

    p = sample_lesion(64, np.random.default_rng(0))
    plain = np.array([0, 0, 0, 0, 0, 1], np.float64)
    spiky = np.array([0, 0, 0, 1, 0, 1], np.float64)
    _, m0 = render_lesion(64, p, plain)
    _, m1 = render_lesion(64, p, spiky)
    assert np.all(m1[m0])  # the body is inside…
    assert m1.sum() > m0.sum() + 20  # …and the spikes add to it
    yy, xx = np.nonzero(m1 & ~m0)
    assert np.hypot(xx - p.cx, yy - p.cy).max() > 1.3 * p.radius  # reaching beyond the body


def test_attributes_that_causal_weights_leave_out_weigh_nothing():
    """Guard: ``causal_weights`` names the attributes that cause the label; the others
    weigh 0 (kills a default weight of 1, which made every attribute causal)."""
    from causalign.data.synth import ATTRIBUTES, SynthConfig

    w = SynthConfig(causal_weights={"calcification": 2.0, "texture": 1.5}).weights()
    assert dict(zip(ATTRIBUTES, w.tolist(), strict=True)) == {
        "subtlety": 0.0, "calcification": 2.0, "margin": 0.0, "spiculation": 0.0,
        "lobulation": 0.0, "texture": 1.5}


def test_regenerating_prunes_only_the_generators_own_stale_files(tmp_path):
    """Guard: `data synth` over an earlier, larger generation deletes the sample files the
    new manifest does not list, and only names it writes (split_NNNNN): a user's file in
    images/ survives (kills a pattern matching any name, which deleted it)."""
    from causalign.data.synth import SynthConfig, generate

    generate(tmp_path, SynthConfig(n_train=3, n_val=1, n_test=1, size=32))
    (tmp_path / "images" / "notes.png").write_bytes(b"mine")
    generate(tmp_path, SynthConfig(n_train=2, n_val=1, n_test=1, size=32))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "notes.png", "test_00000.png", "train_00000.png", "train_00001.png", "val_00000.png"]
    assert (tmp_path / "images" / "notes.png").read_bytes() == b"mine"


# --- figures: the arrays handed to matplotlib -------------------------------------------


def test_training_curves_draw_each_panels_own_column(monkeypatch, tmp_path):
    """The AUC panel plots ``val_auc`` (kills plotting val_accuracy there), the accuracy
    panel val accuracy solid and train accuracy dashed (kills a solid train line), and two
    epochs get ticks at the epochs with half an epoch of room (kills `span < 1`)."""
    from causalign.report.figures import training_curves

    figs = _saved(monkeypatch)
    rows = [{"epoch": e, "train_loss": 1 / e, "val_auc": 0.6 + e / 10,
             "val_accuracy": 0.5 + e / 100, "train_accuracy": 0.7 + e / 100}
            for e in (1, 2)]
    training_curves({"run": rows}, tmp_path / "c.png")
    loss, auc, acc = figs[0].axes[:3]
    assert loss.lines[0].get_ydata().tolist() == pytest.approx([1.0, 0.5])
    assert auc.lines[0].get_ydata().tolist() == pytest.approx([0.7, 0.8])
    solid, dashed = acc.lines[:2]
    assert solid.get_ydata().tolist() == pytest.approx([0.51, 0.52])
    assert solid.get_linestyle() == "-"
    assert dashed.get_ydata().tolist() == pytest.approx([0.71, 0.72])
    assert dashed.get_linestyle() == "--"
    for ax in (loss, auc, acc):
        assert ax.get_xlim() == pytest.approx((0.5, 2.5))
        assert ax.get_xticks().tolist() == [1, 2]


def test_reliability_diagram_bars_points_and_counts_against_a_hand_computed_binning(
        monkeypatch, tmp_path):
    """class-1 probabilities 0.1, 0.2 (labels 0, 1) and 0.8, 0.9 (both 1) in 4 bins: bars
    only over the two non-empty bins at heights 0.5 and 1 (kills drawing empty bins), the
    points at the bins' MEAN predicted probability 0.15 and 0.85 (kills points at the bin
    centres), the count histogram from each bin's left edge (kills edges[1:]); the default
    is 15 bins (kills 10)."""
    from causalign.report.figures import reliability_diagram

    figs = _saved(monkeypatch)
    p1 = np.array([0.1, 0.2, 0.8, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    labels = np.array([0, 1, 1, 1])
    reliability_diagram({"m": (probs, labels)}, tmp_path / "r.png", n_bins=4, kind="positive")
    top, bottom = figs[0].axes[:2]
    bars = [(r.get_x(), r.get_width(), r.get_height()) for r in top.patches]
    assert np.allclose(bars, [(0.0, 0.25, 0.5), (0.75, 0.25, 1.0)])
    points = top.lines[0]
    assert points.get_xdata().tolist() == pytest.approx([0.15, 0.85])
    assert points.get_ydata().tolist() == pytest.approx([0.5, 1.0])
    counts = [(r.get_x(), r.get_height()) for r in bottom.patches]
    assert np.allclose(counts, [(0.0, 2), (0.25, 0), (0.5, 0), (0.75, 2)])
    bins = reliability_diagram({"m": (probs, labels)}, tmp_path / "r.png")
    assert len(bins[0]["edges"]) == 16 and len(figs[1].axes[1].patches) == 15


# --- the latent autoencoder's file ------------------------------------------------------


def test_autoencoder_file_round_trip_keeps_weights_dtype_and_training_mse(tmp_path):
    """Guard: `save_autoencoder` → `load_autoencoder` gives the same float64 weights (kills
    skipping the dtype restoration, which rounded them to float32), the stored training
    MSE (kills dropping it on either side) and a frozen model (only the classifier trains)."""
    from causalign.models.autoencoder import ConvAutoencoder, load_autoencoder, save_autoencoder

    torch.manual_seed(0)
    ae = ConvAutoencoder(1, width=4, latent_channels=2).double()
    with torch.no_grad():  # values float32 cannot hold, so a rounding shows
        for p in ae.parameters():
            p.add_(1e-12)
    ae.train_mse = 0.0123
    save_autoencoder(tmp_path / "ae.pt", ae)
    back = load_autoencoder(tmp_path / "ae.pt")
    assert back.config == {"in_channels": 1, "width": 4, "latent_channels": 2}
    assert back.train_mse == 0.0123
    for (k, v), (k2, v2) in zip(ae.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and v2.dtype == torch.float64 and torch.equal(v, v2), k
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.equal(back(x), ae.eval()(x))


def test_a_checkpoint_of_another_kind_is_not_loaded_as_an_autoencoder(tmp_path):
    """Guard: a state whose ``kind`` is not "causalign-autoencoder" (a model checkpoint
    given as method.autoencoder) is refused in one line naming the file (kills accepting
    any dict that happens to hold ``config`` and ``state``)."""
    from causalign.errors import CausalignError
    from causalign.io import atomic_torch_save
    from causalign.models.autoencoder import ConvAutoencoder, autoencoder_state, load_autoencoder

    state = {**autoencoder_state(ConvAutoencoder(1, 4, 2)), "kind": "causalign-checkpoint"}
    atomic_torch_save(tmp_path / "x.pt", state)
    with pytest.raises(CausalignError, match=r"x\.pt: not a causalign autoencoder file"):
        load_autoencoder(tmp_path / "x.pt")


def test_causal_align_saves_the_autoencoder_it_trains_and_checks_the_one_it_loads(
        tmp_path, monkeypatch):
    """Guard: method.autoencoder naming a missing file: the autoencoder trained in setup is
    saved there (kills skipping the save: the next run trained again); naming an existing
    file of other channels: refused before any use, naming both counts (kills dropping the
    channel check, which left the refusal to a conv deep inside the first step)."""
    import causalign.models.autoencoder as ae_mod
    from causalign.errors import CausalignError
    from causalign.methods import build_method

    trained = ae_mod.ConvAutoencoder(1, width=4, latent_channels=2)
    monkeypatch.setattr(ae_mod, "train_autoencoder", lambda images, **kw: trained)
    path = tmp_path / "sub" / "ae.pt"
    method = build_method("causal-align", {"steps": 1, "space": "latent",
                                           "autoencoder": str(path)})
    assert method._load_or_train_autoencoder(torch.rand(4, 1, 16, 16), "cpu") is trained
    saved = ae_mod.load_autoencoder(path)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                 saved.state_dict().values(), strict=True))
    with pytest.raises(CausalignError, match=r"ae\.pt: autoencoder takes 1-channel images; "
                                             r"this data has 3 channel\(s\)"):
        method._load_or_train_autoencoder(torch.rand(4, 3, 16, 16), "cpu")
