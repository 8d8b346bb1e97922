"""3D boxes for volumes and the slice a volume's figure shows.

A volume's box was (x0, y0, x1, y1) only and spanned every slice, so cam_precision counted
saliency on lesion-free slices inside the rectangle as "on the lesion" (0.217 against 0.046
with the lesion's slices on a 1-epoch multiview run of `data synth --depth 8`). Volumes now
carry the slice range (box_z0, box_z1); 4-number boxes keep meaning "every slice". Figures
of volumes (`explain --saliency all`, the report's CAM grid) cut each case at the slice with
the most lesion: the mask where there is one, else the box, else the middle slice (the
argmax of a box spanning every slice was always slice 0).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import causalign.report.figures as figures
from causalign.cli import main
from causalign.data.format import (
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    SampleRecord,
    read_manifest,
    write_manifest,
)
from causalign.data.synth import SynthConfig, generate
from causalign.errors import DataError
from causalign.methods import build_method
from causalign.metrics.localization import cam_precision
from causalign.models import build_model

DEPTH, SIDE, LESION_SLICE = 6, 16, 4


def _header(root) -> list[str]:
    with open(root / "manifest.csv", newline="") as fh:
        return next(csv.reader(fh))


def _volumes(root, boxes: dict, masks: dict | None = None, splits=("test",)) -> dict:
    """One (DEPTH, SIDE, SIDE) volume per entry of `boxes` (id → box or None) in each split,
    every slice different; `masks` (id → slice) puts a 5×5 mask on that slice."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, DatasetMeta("vol", ["a", "b"], ndim=3), image_format="npy")
    vols = {}
    for split in splits:
        for k, (sid, box) in enumerate(boxes.items()):
            vol = rng.random((DEPTH, SIDE, SIDE)).astype(np.float32)
            mask = None
            if masks and sid in masks:
                mask = np.zeros((DEPTH, SIDE, SIDE), np.uint8)
                mask[masks[sid], 5:10, 5:10] = 1
            name = sid if split == "test" else f"{split}_{sid}"
            w.add(vol, label=k % 2, split=split, mask=mask, box=box, sample_id=name)
            vols[name] = vol
    w.close()
    return vols


# ----------------------------------------------------------------------------- format


def test_volume_box_with_slice_range_covers_only_its_slices(tmp_path):
    _volumes(tmp_path, {"z": (2, 3, 9, 8, 1, 3), "all": (2, 3, 9, 8), "none": None},
             masks={"none": LESION_SLICE})
    assert _header(tmp_path)[6:12] == ["box_x0", "box_y0", "box_x1", "box_y1",
                                      "box_z0", "box_z1"]
    recs = {r.id: r for r in read_manifest(tmp_path)}
    assert recs["z"].box == (2, 3, 9, 8, 1, 3) and recs["all"].box == (2, 3, 9, 8)
    ds = LesionDataset(tmp_path, "test")
    bm = ds.box_masks[:, 0]  # (3, D, H, W); the batch mixes boxes with a mask-only sample
    rect = np.zeros((SIDE, SIDE))
    rect[3:8, 2:9] = 1
    for z in range(DEPTH):
        assert np.array_equal(bm[0, z].numpy(), rect if z in (1, 2) else 0 * rect), z
        assert np.array_equal(bm[1, z].numpy(), rect), z  # 4 numbers: every slice
    assert torch.equal(bm[2], ds.masks[2, 0])  # no box: the mask
    # one sample, and a batch of boxed samples only (the other branch), agree
    assert torch.equal(ds[0]["box_mask"], ds.box_masks[0])
    assert torch.equal(ds.batch(torch.tensor([0, 1]))["box_mask"], ds.box_masks[:2])


def test_saliency_on_a_lesion_free_slice_is_not_inside_a_3d_box(tmp_path):
    """What cam_precision sees: a map on slice 0, inside the rectangle but outside the
    lesion's slices 3..4, is outside a 3D box (it was inside the 4-number box)."""
    _volumes(tmp_path, {"z": (2, 3, 9, 8, 3, 5), "all": (2, 3, 9, 8)})
    ds = LesionDataset(tmp_path, "test")
    maps = torch.zeros(2, DEPTH, SIDE, SIDE)
    maps[:, 0, 4:6, 4:6] = 1.0
    prec = cam_precision(maps, ds.box_masks[:, 0])
    assert prec.tolist() == [0.0, 1.0]


def test_2d_manifest_has_no_slice_columns_and_4_number_volume_boxes_stay(tmp_path):
    meta = DatasetMeta("t", ["a", "b"])
    write_manifest(tmp_path / "2d", meta, [SampleRecord("0", "train", 0, "0", "images/0.png",
                                                        box=(0, 1, 5, 7))])
    assert "box_z0" not in _header(tmp_path / "2d")
    _volumes(tmp_path / "v", {"all": (2, 3, 9, 8), "none": None})
    assert "box_z0" not in _header(tmp_path / "v")  # old volume manifests read as before


@pytest.mark.parametrize("cells, needle", [
    (("2", "3", "9", "8", "1", ""), "needs both box_z0 and box_z1"),
    (("2", "3", "9", "8", "3", "3"), "empty box slice range"),
    (("", "", "", "", "1", "3"), "without a box"),
    (("2", "3", "9", "8", "1", "x"), "is not six finite numbers"),
])
def test_malformed_slice_range_is_one_clear_error(tmp_path, cells, needle):
    _volumes(tmp_path, {"z": (2, 3, 9, 8, 1, 3)})
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    row = text[1].split(",")
    row[6:12] = cells
    (tmp_path / "manifest.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    with pytest.raises(DataError, match=needle):
        read_manifest(tmp_path)


@pytest.mark.parametrize("cells, box", [
    (("2.4", "3.6", "8.2", "7.9", "1.5", "2.5"), (2, 3, 9, 8, 1, 3)),
    # a sub-pixel box: truncated to 10..10, it was refused as "empty box"
    (("10.2", "10.2", "10.8", "10.8", "", ""), (10, 10, 11, 11)),
    (("2", "3", "9", "8", "1.0", "3.0"), (2, 3, 9, 8, 1, 3)),  # whole numbers: unchanged
    # whole numbers with float noise: not grown by a pixel (review3)
    (("1.9999999999999998", "3", "9.000000000000002", "8", "1", "3.0000000000000004"),
     (2, 3, 9, 8, 1, 3)),
])
def test_fractional_box_cells_are_rounded_outward(tmp_path, cells, box):
    """Starts down, ends up (as the importers' scale_box): truncation cut off the last
    pixel or slice the box reaches into."""
    _volumes(tmp_path, {"z": (2, 3, 9, 8, 1, 3)})
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    row = text[1].split(",")
    row[6:12] = cells
    (tmp_path / "manifest.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    assert read_manifest(tmp_path)[0].box == box


def test_writer_rounds_a_fractional_box_outward(tmp_path):
    meta = DatasetMeta("t", ["a", "b"])
    w = DatasetWriter(tmp_path, meta)
    w.add(np.zeros((16, 16), np.uint8), label=0, split="test", box=(2.5, 3.5, 7.5, 8.01),
          sample_id="s")
    w.close()
    assert read_manifest(tmp_path)[0].box == (2, 3, 8, 9)


def test_slice_range_outside_the_volume_is_named(tmp_path, capsys):
    # the writer refuses it before writing; a manifest edited by hand is refused on reading
    with pytest.raises(DataError, match=r"slice range 4\.\.7 outside the volume \(6 slices"):
        _volumes(tmp_path / "w", {"z": (2, 3, 9, 8, 4, DEPTH + 1)}, splits=("train", "test"))
    _volumes(tmp_path, {"z": (2, 3, 9, 8, 4, DEPTH)}, splits=("train", "test"))
    text = (tmp_path / "manifest.csv").read_text()
    assert text.count(f"2,3,9,8,4,{DEPTH}") == 2
    (tmp_path / "manifest.csv").write_text(text.replace(f"2,3,9,8,4,{DEPTH}",
                                                        f"2,3,9,8,4,{DEPTH + 1}"))
    with pytest.raises(DataError, match=r"slice range 4\.\.7 outside the volume \(6 slices"):
        LesionDataset(tmp_path, "test")
    rc = main(["data", "check", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "slice range" in lines[0]


def test_slice_range_on_2d_images_is_refused(tmp_path):
    w = DatasetWriter(tmp_path / "w", DatasetMeta("t", ["a", "b"]))
    with pytest.raises(DataError, match="slice range .* 2D"):
        w.add(np.zeros((8, 8), np.float32), label=0, split="train", box=(0, 0, 4, 4, 0, 1))
    with pytest.raises(DataError, match="5 numbers"):
        w.add(np.zeros((8, 8), np.float32), label=0, split="train", box=(0, 0, 4, 4, 0))
    # a hand-written 2D manifest with the slice columns
    root = tmp_path / "m"
    root.mkdir()
    (root / "dataset.yaml").write_text("name: t\nclasses: [a, b]\n")
    (root / "manifest.csv").write_text(
        "id,split,label,image,box_x0,box_y0,box_x1,box_y1,box_z0,box_z1\n"
        "0,train,0,images/0.png,0,0,4,4,0,1\n")
    with pytest.raises(DataError, match="images are 2D"):
        read_manifest(root)


def test_synth_volumes_carry_the_lesions_slice_range(tmp_path):
    generate(tmp_path / "v", SynthConfig(n_train=3, n_val=1, n_test=1, size=32, depth=8))
    ds = LesionDataset(tmp_path / "v", "train")
    for i, r in enumerate(ds.records):
        assert len(r.box) == 6
        lesion = ds.masks[i, 0].flatten(1).sum(1).nonzero().squeeze(1)
        assert r.box[4:] == (int(lesion.min()), int(lesion.max()) + 1)
        assert ds.box_masks[i, 0].flatten(1).sum(1).nonzero().squeeze(1).tolist() == \
            lesion.tolist()  # the box's slices are the lesion's, no lesion-free one
    generate(tmp_path / "2d", SynthConfig(n_train=2, n_val=1, n_test=1, size=32))
    assert "box_z0" not in _header(tmp_path / "2d")
    assert all(len(r.box) == 4 for r in read_manifest(tmp_path / "2d"))


# ----------------------------------------------------------------------------- figures


def _capture_grid(monkeypatch) -> list:
    calls, real = [], figures.cam_grid

    def recording(images, boxes, maps, path, row_titles=None):
        calls.append((images, boxes, maps, row_titles))
        return real(images, boxes, maps, path, row_titles=row_titles)

    monkeypatch.setattr(figures, "cam_grid", recording)
    return calls


FIG_BOXES = {"masked": (4, 4, 11, 11), "boxed": (4, 4, 11, 11), "box3d": (4, 4, 11, 11, 1, 3)}


def test_saliency_comparison_of_a_volume_shows_the_lesions_slice(tmp_path, monkeypatch):
    from causalign.report.saliency import saliency_comparison

    vols = _volumes(tmp_path / "d", FIG_BOXES, masks={"masked": LESION_SLICE})
    ds = LesionDataset(tmp_path / "d", "test")
    torch.manual_seed(0)
    model = build_model("multiview", 1, 2, width=4, image_shape=(1, DEPTH, SIDE, SIDE)).eval()
    calls = _capture_grid(monkeypatch)
    saliency_comparison(model, build_method("erm"), ds, tmp_path / "fig.png",
                        names=["gradient"], limit=3)
    (images, _, _, _), = calls
    # the mask's slice, not slice 0 (the argmax of a box spanning every slice)
    assert np.allclose(images[0, 0], vols["masked"][LESION_SLICE], atol=1e-6)
    assert np.allclose(images[1, 0], vols["boxed"][DEPTH // 2], atol=1e-6)  # no slice stands out
    assert np.allclose(images[2, 0], vols["box3d"][1], atol=1e-6)  # in the box's slices


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """A benchmark folder with one real 1-epoch multiview run on `FIG_BOXES` volumes."""
    from causalign.engine.config import TrainConfig
    from causalign.engine.trainer import train

    root = tmp_path_factory.mktemp("vrun")
    vols = _volumes(root / "d", FIG_BOXES, masks={"masked": LESION_SLICE},
                    splits=("train", "val", "test"))
    out = root / "bench"
    run_dir = "runs/v/erm/seed0"
    train(root / "d", TrainConfig(method="erm", model="multiview", epochs=1, width=4,
                                  batch_size=4, deletion_fractions=[0.1]),
          out / run_dir, progress=False)
    results = {"suite": "s", "description": "", "experiments": [], "runs": [
        {"key": "v/erm/seed0", "dataset": "v", "method": "erm", "label": "erm",
         "setting": "default", "seed": 0, "run_dir": run_dir, "status": "done",
         "metrics": {}}]}
    (out / "results.json").write_text(json.dumps(results))
    return out, results, vols


def _case_slices(images, titles, vols) -> dict[str, int]:
    """{test case id: slice shown}, from the panels' images and their 'slice k' titles."""
    shown = {}
    for img, title in zip(images, titles, strict=True):
        z = int(title.rsplit("slice ", 1)[1])
        sid = next(s for s, v in vols.items() if s in FIG_BOXES
                   and np.allclose(img[0], v[z], atol=1e-6))
        shown[sid] = z
    return shown


# the mask's slice; the middle one for a box spanning every slice (its argmax was slice 0);
# a slice of a 3D box's range
EXPECTED_SLICES = {"masked": LESION_SLICE, "boxed": DEPTH // 2, "box3d": 1}


def test_report_cam_grid_of_volumes_shows_the_lesions_slice(volume_run, tmp_path,
                                                             monkeypatch):
    from causalign.report import html as report_html

    out, results, vols = volume_run
    calls = _capture_grid(monkeypatch)
    assert report_html.cam_figure(out, results, "v", tmp_path / "cam.png", n=3)
    (images, _, _, titles), = calls
    assert _case_slices(images, titles, vols) == EXPECTED_SLICES


def test_report_counterfactual_triptychs_of_volumes_use_each_cases_region(volume_run, tmp_path,
                                                                           monkeypatch):
    """The region was torch.where(has_mask.view(-1, 1, 1, 1), mask, box) on (N, 1, D, H, W):
    the flag broadcast along the channel axis, so every case took case 0's choice: with a
    masked case first, the box-only cases got their empty mask (no region drawn, middle
    slice)."""
    from causalign.report import html as report_html

    out, results, vols = volume_run
    calls, real = [], figures.counterfactual_grid

    def recording(x0, x_star, region, path, row_titles=None):
        calls.append((x0, region, row_titles))
        return real(x0, x_star, region, path, row_titles=row_titles)

    monkeypatch.setattr(figures, "counterfactual_grid", recording)
    assert report_html.counterfactual_figure(out, results, "v", tmp_path / "cf.png", n=3)
    (x0, region, titles), = calls
    shown = _case_slices(x0, titles, vols)
    assert shown == {k: EXPECTED_SLICES[k] for k in shown} and len(shown) >= 2
    assert all(r.any() for r in region)  # each case's own mask or box, on its slice


def test_a_box_with_a_slice_range_is_shown_at_its_middle_slice():
    """A 3D box covers each of its slices equally: argmax took the range's first slice, the
    lesion's edge."""
    from causalign.explain.export import display_slice

    box = np.zeros((8, 4, 4))
    box[2:7, 1:3, 1:3] = 1  # slices 2..6
    assert display_slice(box, 8) == 4
    mask = np.zeros((8, 4, 4))
    mask[3, :2, :2] = 1
    mask[5, :, :] = 1  # the largest cross-section wins outright
    assert display_slice(mask, 8) == 5
