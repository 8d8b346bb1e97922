"""What the exports show: the slice of a volume drawn in overlays and triptychs, and the
latent-space autoencoder reused by a second `counterfactual --space latent` into one OUT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import causalign.models.autoencoder as ae_mod
import causalign.report.figures as figures
from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset
from causalign.errors import CausalignError
from causalign.explain.counterfactual_export import (
    CounterfactualSettings,
    export_counterfactuals,
    resolve_autoencoder,
)
from causalign.explain.export import display_slice, export_saliency
from causalign.methods import build_method
from causalign.models import build_model

DEPTH, LESION_SLICE = 6, 4


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Two test volumes (1, 6, 16, 16), each slice different: 'masked' has a box and a mask
    on slice 4 only; 'boxed' has a box only (which spans every slice)."""
    root = tmp_path_factory.mktemp("vol") / "data"
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, DatasetMeta("vol", ["a", "b"], ndim=3), image_format="npy")
    vols = {}
    for sid, label in (("masked", 0), ("boxed", 1)):
        vol = rng.random((DEPTH, 16, 16)).astype(np.float32)
        mask = None
        if sid == "masked":
            mask = np.zeros((DEPTH, 16, 16), np.uint8)
            mask[LESION_SLICE, 5:10, 5:10] = 1
        w.add(vol, label=label, split="test", mask=mask, box=(4, 4, 11, 11), sample_id=sid)
        vols[sid] = vol
    w.close()
    torch.manual_seed(0)
    model = build_model("multiview", 1, 2, width=4, image_shape=(1, DEPTH, 16, 16)).eval()
    return LesionDataset(root, "test"), model, vols


def _capture(monkeypatch, name: str) -> list:
    """Record the (image, ...) arguments of figures.<name> and still draw the figure."""
    calls, real = [], getattr(figures, name)

    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, name, recording)
    return calls


def test_display_slice_prefers_annotation_and_falls_back_to_middle():
    region = np.zeros((5, 4, 4))
    assert display_slice(None, 5) == 2
    assert display_slice(region, 5) == 2  # empty
    assert display_slice(region + 1, 5) == 2  # a box: the same area on every slice
    region[3, :2, :2] = 1
    assert display_slice(region, 5) == 3


def test_explain_volume_overlay_shows_the_masked_slice(volumes, tmp_path, monkeypatch):
    ds, model, vols = volumes
    calls = _capture(monkeypatch, "overlay")
    export_saliency(model, build_method("erm"), ds, "gradient", tmp_path)
    shown = {c[3].stem: c[0] for c in calls}  # overlay(image, map, box, path, ...)
    # the lesion's slice, not slice 0: the box spans every slice, so its argmax was 0
    assert np.allclose(shown["masked"][0], vols["masked"][LESION_SLICE], atol=1 / 255)
    # box only: the middle slice (no slice holds more of the box than another)
    assert np.allclose(shown["boxed"][0], vols["boxed"][DEPTH // 2], atol=1 / 255)


def test_counterfactual_volume_triptych_of_a_box_only_sample_is_the_middle_slice(
        volumes, tmp_path, monkeypatch):
    ds, model, vols = volumes
    calls = _capture(monkeypatch, "counterfactual_triptych")
    export_counterfactuals(model, build_method("erm"), ds, CounterfactualSettings(steps=2),
                           tmp_path)
    shown = {c[3].stem: c for c in calls}  # triptych(image, x*, region, path, title)
    assert np.allclose(shown["masked"][0][0], vols["masked"][LESION_SLICE], atol=1 / 255)
    assert np.allclose(shown["boxed"][0][0], vols["boxed"][DEPTH // 2], atol=1 / 255)
    # x* is cut at the same slice as the original
    x_star = np.load(tmp_path / "cf" / "boxed.npy")
    assert np.array_equal(shown["boxed"][1], x_star[:, DEPTH // 2])


def test_latent_autoencoder_in_out_is_reused_for_the_same_training_images(tmp_path,
                                                                          monkeypatch):
    trained = []
    real = ae_mod.train_autoencoder

    def counting(images, **kwargs):
        trained.append(images.shape)
        return real(images, epochs=1, **kwargs)

    monkeypatch.setattr(ae_mod, "train_autoencoder", counting)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    first, _ = resolve_autoencoder(None, images, "cpu", None, tmp_path)
    second, source = resolve_autoencoder(None, images, "cpu", None, tmp_path)
    assert source == str(tmp_path / "autoencoder.pt")
    # the second call loaded OUT/autoencoder.pt; it retrained and overwrote the file before
    assert len(trained) == 1
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # another dataset's training images into the same OUT: trained for them, not reused
    resolve_autoencoder(None, images.flip(-1), "cpu", None, tmp_path)
    assert len(trained) == 2
    resolve_autoencoder(None, images.flip(-1), "cpu", None, tmp_path)
    assert len(trained) == 2


def _no_training(images, **kwargs):
    raise AssertionError("trained an autoencoder it could not have saved")


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_latent_autoencoder_destination_is_refused_before_training(tmp_path, monkeypatch,
                                                                   where):
    # `--autoencoder FILE` is where a trained one is saved: an unusable FILE failed only
    # after the training (35 s for 1000 images on one core), on the save
    monkeypatch.setattr(ae_mod, "train_autoencoder", _no_training)
    (tmp_path / "a_file").write_text("x")
    dest = tmp_path if where == "folder" else tmp_path / "a_file" / "ae.pt"
    images = torch.rand(4, 1, 16, 16)
    with pytest.raises(CausalignError, match="is a folder|cannot create the folder"):
        resolve_autoencoder(None, images, "cpu", dest, tmp_path / "out")


def test_latent_autoencoder_destination_folder_is_created(tmp_path, monkeypatch):
    real = ae_mod.train_autoencoder
    monkeypatch.setattr(ae_mod, "train_autoencoder",
                        lambda images, **kw: real(images, epochs=1, **kw))
    dest = tmp_path / "new" / "dir" / "ae.pt"
    resolve_autoencoder(None, torch.rand(4, 1, 16, 16), "cpu", dest, tmp_path / "out")
    assert dest.is_file() and ae_mod.load_autoencoder(dest) is not None


@pytest.mark.parametrize("limit", [0, -2])
def test_counterfactual_limit_below_one_names_the_limit(volumes, tmp_path, limit):
    ds, model, _ = volumes
    with pytest.raises(CausalignError, match=rf"\(limit {limit}\)"):
        export_counterfactuals(model, build_method("erm"), ds, CounterfactualSettings(steps=1),
                               tmp_path, limit=limit)
    assert not any(tmp_path.iterdir())  # nothing written before the refusal


def test_latent_run_autoencoder_is_saved_to_a_missing_autoencoder_file(tmp_path, monkeypatch):
    """`counterfactual --autoencoder FILE` on a run trained with space=latent: FILE missing,
    the run's own autoencoder (its model's latent space) was used and FILE never written,
    although --autoencoder promises to save it there; summary.json now says which one."""
    import causalign.engine.trainer as trainer_mod

    monkeypatch.setattr(ae_mod, "train_autoencoder", _no_training)
    own = ae_mod.ConvAutoencoder(in_channels=1, width=4, latent_channels=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    real_load = trainer_mod.load_checkpoint
    fake = {"method_state": {"autoencoder": ae_mod.autoencoder_state(own)}}
    monkeypatch.setattr(trainer_mod, "load_checkpoint", lambda path, **kw: (
        fake if Path(path) == run / "checkpoint.pt" else real_load(path, **kw)))
    dest = tmp_path / "ae" / "ae.pt"
    images = torch.rand(4, 1, 16, 16)
    ae, source = resolve_autoencoder(run, images, "cpu", dest, tmp_path / "out")
    assert dest.is_file() and "saved from the run checkpoint" in source
    saved = ae_mod.load_autoencoder(dest)
    for a, b, c in zip(own.state_dict().values(), ae.state_dict().values(),
                       saved.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # without FILE: the run's, named as such
    _, source = resolve_autoencoder(run, images, "cpu", None, tmp_path / "out")
    assert source.startswith("run checkpoint")


def test_volume_figures_name_the_slice_they_show(volumes, tmp_path, monkeypatch):
    """A volume's triptych, overlay and grid rows showed one slice without saying which (the
    report's figures say ", slice k"): slice 4 of the lesion and the middle slice 3 of a
    box-only case looked alike."""
    ds, model, _ = volumes
    titles: dict[str, list[str]] = {}

    def record(name: str, key: str):
        def f(*args, **kwargs):
            value = kwargs.get(key, args[4] if len(args) > 4 else None)
            titles.setdefault(name, []).extend([value] if isinstance(value, str) else value)
        monkeypatch.setattr(figures, name, f)

    record("counterfactual_triptych", "title")
    record("counterfactual_grid", "row_titles")
    record("overlay", "title")
    record("cam_grid", "row_titles")
    export_counterfactuals(model, build_method("erm"), ds, CounterfactualSettings(steps=1),
                           tmp_path / "cf")
    export_saliency(model, build_method("erm"), ds, "gradient", tmp_path / "ex")
    want = {"masked": f"masked, slice {LESION_SLICE} ", "boxed": f"boxed, slice {DEPTH // 2} "}
    assert set(titles) == {"counterfactual_triptych", "counterfactual_grid", "overlay",
                           "cam_grid"}
    for name, shown in titles.items():
        assert sorted(t.split(" ")[0].rstrip(",") for t in shown) == ["boxed", "masked"]
        for t in shown:
            assert t.startswith(want[t.split(" ")[0].rstrip(",")]), (name, t)
