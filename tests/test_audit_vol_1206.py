"""Audit (2026-12-06, volumes end to end): defects found walking 3D data through causalign."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from causalign.data import DatasetWriter
from causalign.data.format import DatasetMeta
from causalign.errors import DataError


def _volume_writer(root: Path) -> DatasetWriter:
    return DatasetWriter(root, DatasetMeta("v", ["a", "b"], [], ndim=3), image_format="npy")


@pytest.mark.parametrize("kwargs, words", [
    # one annotated slice given as a 2D mask: the most natural mistake with a volume
    ({"mask": np.ones((16, 16), np.uint8)}, "mask shape (16, 16)"),
    ({"mask": np.ones((3, 16, 16), np.uint8)}, "mask shape (3, 16, 16)"),
    ({"box": [1, 2, 8, 9, 2, 7]}, "slice range 2..7 outside the volume (4 slices"),
    ({"box": [1, 2, 20, 9]}, "outside the image (16x16)"),
    ({"image": np.random.rand(16, 16).astype(np.float32)}, "expected 3 spatial dimensions"),
])
def test_writer_refuses_a_volume_sample_its_reader_cannot_read(tmp_path: Path, kwargs: dict,
                                                              words: str) -> None:
    # these were written (image, mask, manifest row) and only failed when the dataset was
    # read — by `causalign train`, after the dataset had been built and copied around
    image = kwargs.pop("image", np.random.rand(4, 16, 16).astype(np.float32))
    w = _volume_writer(tmp_path)
    with pytest.raises(DataError) as info:
        w.add(image, 1, "train", **kwargs)
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    # nothing of the refused sample was left behind
    assert not list((tmp_path / "images").iterdir())
    assert not list((tmp_path / "masks").iterdir())
    assert w.rows == []


def test_writer_keeps_accepting_valid_volume_samples(tmp_path: Path) -> None:
    from causalign.data import LesionDataset

    img = np.random.rand(4, 16, 16).astype(np.float32)
    m = np.zeros((4, 16, 16), np.uint8)
    m[1:3, 4:8, 4:8] = 1  # a lesion on two of the four slices
    with _volume_writer(tmp_path) as w:
        for s in ("train", "val", "test"):
            w.add(img, 1, s, mask=m)
            w.add(img[None], 0, s, box=[0, 0, 16, 16, 0, 4])  # channel axis, full box
            w.add(img, 0, s, box=[1.5, 2, 8, 9.2])  # no slice range: every slice
    ds = LesionDataset(tmp_path, "train")
    assert ds.image_shape == (1, 4, 16, 16)


@pytest.mark.parametrize("optimizer, suggested", [("newton", False), ("adam", True),
                                                  ("ista", True)])
def test_low_flip_warning_suggests_newton_only_when_not_already_used(optimizer: str,
                                                                     suggested: bool) -> None:
    # `causalign counterfactual RUN --optimizer newton` on a 2-epoch multiview run flipped 1
    # of 3 and said "... or --optimizer newton": the optimizer it had just used
    from types import SimpleNamespace

    from causalign.cli import _low_flip_warning

    s = SimpleNamespace(alpha=0.01, steps=3, space="pixel", optimizer=optimizer, lr=0.01)
    summary = {"n_generated": 3, "n_diverged": 0, "flip_rate": 1 / 3, "mean_target_prob": 0.49,
               "samples": [], "valid_range": [0.0, 1.0]}
    line = _low_flip_warning(summary, s, None, None)
    assert line is not None and "only 1 of 3" in line and "--alpha" in line
    assert ("--optimizer newton" in line) is suggested


def test_hier_align_refusal_of_volumes_names_the_data_and_the_way_out() -> None:
    # `train VOL --method hier-align` said only "method 'hier-align' takes 2D images (C,H,W)"
    # — nothing about the dataset holding volumes, nor what trains on them
    from causalign.engine.config import TrainConfig
    from causalign.errors import CausalignError
    from causalign.methods import build_method
    from causalign.methods.base import DataInfo

    method = build_method("hier-align")
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 6, 32, 32),
                    attributes=["margin"])
    with pytest.raises(CausalignError) as err:
        method.build_model(TrainConfig(method="hier-align"), info)
    msg = str(err.value)
    assert "hier-align" in msg and "volumes of shape (1, 6, 32, 32)" in msg
    assert "--model multiview" in msg and "\n" not in msg


class _Split:
    """A training split stand-in: what `CausalAlign.setup` reads, no pixels."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        import torch

        self.labels = torch.arange(n) % 2
        self.has_mask = torch.ones(n, dtype=torch.bool)
        self.has_box_or_mask = self.has_mask
        self.image_shape = shape

    def __len__(self) -> int:
        return len(self.labels)


@pytest.mark.parametrize("args, warned", [
    ({}, True),
    ({"cache_dtype": "float16", "cache_device": "cpu"}, True),
    ({"warm_start": False}, False),
])
def test_setup_warns_when_the_warm_start_cache_would_not_fit(args: dict, warned: bool) -> None:
    # 300 BraTS-sized volumes (4 × 155 × 240 × 240): 143 MB of float32 offsets each, 43 GB
    # of cache filled on the GPU epochs into the run, with no word at setup
    import warnings

    from torch import nn

    from causalign.methods import build_method

    method = build_method("causal-align", args)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        method.setup(_Split(300, (4, 155, 240, 240)), nn.Linear(2, 2))
    lines = [str(w.message) for w in seen if "warm-start cache" in str(w.message)]
    assert bool(lines) is warned
    if warned:
        gib = "20.0 GiB at float16" if args else "39.9 GiB at float32"
        assert gib in lines[0] and "(4, 155, 240, 240)" in lines[0]
        assert ("host memory" in lines[0]) is bool(args)
    # a small volume split: nothing said
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_method("causal-align", args).setup(_Split(300, (1, 8, 32, 32)), nn.Linear(2, 2))
    assert not [w for w in seen if "warm-start cache" in str(w.message)]


def _run_record(dataset: str, saliency: str) -> dict:
    return {"key": f"{dataset}/erm/seed0", "dataset": dataset, "method": "erm", "label": "erm",
            "setting": "default", "seed": 0, "run_dir": "missing", "status": "done",
            "metrics": {"test": {"saliency": saliency,
                                 "deletion": {"0.01": 0.1, "0.1": 0.3}}}}


@pytest.mark.parametrize("runs, words", [
    # a volume suite: evaluation deleted by WBP, the caption said Grad-CAM
    ([("vol", "wbp")], "top-k WBP pixels"),
    ([("img", "gradcam")], "top-k Grad-CAM pixels"),
    ([("img", "gradcam"), ("vol", "wbp")], "top-k salient (img: Grad-CAM; vol: WBP) pixels"),
])
def test_report_deletion_caption_names_the_saliency_deleted_by(tmp_path: Path, runs: list,
                                                               words: str) -> None:
    import json

    from causalign.report.html import write_report

    (tmp_path / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [],
         "runs": [_run_record(d, s) for d, s in runs]}))
    page = Path(write_report(tmp_path)).read_text()
    assert "Deletion curves" in page and words in page


@pytest.mark.parametrize("saliency", ["lrp-gamma", "gradcam"])
def test_evaluate_refuses_an_asked_for_2d_only_saliency_on_volumes(monkeypatch, capsys,
                                                                   saliency: str) -> None:
    # `evaluate VOLRUN --saliency lrp-gamma` exited 0 with WBP's numbers (a note inside the
    # JSON only), while `explain VOLRUN --saliency lrp-gamma` refused in one line. The run's
    # own eval_saliency (gradcam by default) still falls back to WBP, as in training.
    from types import SimpleNamespace

    from torch import nn

    import causalign.cli as cli
    import causalign.engine.evaluate as ev
    import causalign.engine.trainer as tr

    cfg = SimpleNamespace(eval_saliency="gradcam", deletion_fractions=[0.1])
    monkeypatch.setattr(tr, "load_run", lambda *a, **k: (cfg, nn.Linear(2, 2), None, "d"))
    monkeypatch.setattr(cli, "_split_for_model",
                        lambda *a, **k: SimpleNamespace(image_shape=(1, 4, 8, 8)))

    def evaluated(*a, **k):
        raise AssertionError("evaluated with a substituted saliency")

    monkeypatch.setattr(ev, "evaluate_split", evaluated)
    rc = cli.main(["evaluate", "run", "--saliency", saliency, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert f"--saliency {saliency} needs 2D images" in err[0] and "volumes" in err[0]
