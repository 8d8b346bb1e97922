"""`causalign predict --maps --threshold`: on a multi-view volume run each map explains the
called class (the decision at the threshold), as on 2D runs, and is a volume map; and
`Explainer.predict_and_attribute(x, target)`, which gives those maps in Grad-CAM's one
forward pass (a no-grad forward for the logits plus Captum's forward before)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train
from causalign.engine.trainer import load_run
from causalign.explain import get_explainer
from causalign.explain.base import saliency_map


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """A 1-epoch multi-view run on small synthetic volumes (depth 4, 32 px)."""
    root = tmp_path_factory.mktemp("volmaps")
    data, run = root / "vol", root / "run"
    generate(data, SynthConfig(n_train=16, n_val=8, n_test=12, size=32, depth=4, seed=5))
    train(data, TrainConfig(method="erm", model="multiview", epochs=1, batch_size=8, width=4,
                            seed=0), run, progress=False)
    return data, run


def _predict(data: Path, run: Path, tmp: Path, *extra: str) -> tuple[list[dict], dict, Path]:
    out, maps = tmp / "p.csv", tmp / "maps"
    assert main(["predict", str(run), str(data), "--out", str(out), "--saliency", "wbp",
                 "--maps", str(maps), "--device", "cpu", "--no-progress", *extra]) in (0, None)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((maps / "summary.json").read_text()), maps


def _direct(data: Path, run: Path, targets: list[int]) -> np.ndarray:
    """WBP called directly on the test volumes with one target class per volume."""
    _, model, method, _ = load_run(run, device="cpu", data=data)
    ds = LesionDataset(data, "test")
    x = method.model_input(ds.batch(torch.arange(len(ds))))
    model.eval()
    attr = get_explainer("wbp", model).attribute(x, target=torch.tensor(targets))
    return saliency_map(attr).float().numpy()


def test_volume_threshold_maps_explain_the_called_class(volume_run, tmp_path):
    """Guard (the volume path of 388c320 was untested; it passes on the code and would fail
    on the code before it). At a threshold between the volumes' p₁ values, some called
    classes differ from the argmax; each written map equals WBP of the called class,
    computed here, is a (D, H, W) volume map, and summary.json names the called class as
    the explained one."""
    data, run = volume_run
    rows, _, _ = _predict(data, run, tmp_path / "a")
    positive = [k for k in rows[0] if k.startswith("p_")][1]  # class 1's column
    p1 = np.array([float(r[positive]) for r in rows])
    argmax = [int(r["predicted"]) for r in rows]
    # a threshold that calls some argmax-negative volumes positive or the reverse
    t = float(np.median(p1))
    rows, summary, maps = _predict(data, run, tmp_path / "b", "--threshold", f"{t:.17g}")
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    called = [classes.index(r["called_class"]) for r in rows]
    assert called == [int(p >= t) for p in p1]
    assert called != argmax, (t, p1)
    direct = _direct(data, run, called)
    assert direct.ndim == 4 and direct.shape[1] == 4  # (N, D, H, W)
    for r, ref in zip(rows, direct, strict=True):
        got = np.load(maps / "maps" / f"{r['id']}.npy")
        assert got.shape == ref.shape
        assert np.allclose(got, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert [(s["id"], s["explained"]) for s in summary["samples"]] == \
        [(r["id"], c) for r, c in zip(rows, called, strict=True)]
    assert [s["prediction"] for s in summary["samples"]] == argmax


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("name", ["gradcam", "gradient", "wbp"])
def test_predict_and_attribute_with_target_equals_attribute(name):
    """The map of a given class per input equals `attribute(x, target)`'s, and the logits
    are the model's own, for the one-pass Grad-CAM and the default path alike; target None
    stays the argmax's map (guard)."""
    net = _small_cnn()
    x = torch.rand(5, 1, 12, 12)
    target = torch.tensor([0, 2, 1, 2, 0])
    expl = get_explainer(name, net)
    logits, maps = expl.predict_and_attribute(x, target)
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-6)
    ref = get_explainer(name, net).attribute(x, target=target)
    assert torch.allclose(maps, ref, atol=1e-6 * max(1.0, float(ref.abs().max())))
    _, argmax_maps = expl.predict_and_attribute(x)
    ref_argmax = get_explainer(name, net).attribute(x, target=net(x).argmax(1))
    assert torch.allclose(argmax_maps, ref_argmax, atol=1e-6 * max(1.0, float(ref.abs().max())))
    # an int target means that class for every input, as in `attribute`
    _, maps2 = expl.predict_and_attribute(x, 2)
    assert torch.allclose(maps2, get_explainer(name, net).attribute(x, target=2), atol=1e-6)


def test_gradcam_with_target_takes_one_forward_pass():
    """Grad-CAM's map of a given class comes from the forward pass that gives the logits:
    the model runs once per call (twice before: a no-grad forward, then Captum's)."""
    net = _small_cnn()
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    get_explainer("gradcam", net).predict_and_attribute(torch.rand(3, 1, 12, 12),
                                                        torch.tensor([1, 0, 2]))
    assert len(calls) == 1


def test_predict_and_attribute_refuses_a_class_the_model_lacks():
    """A target outside the model's classes is refused in one line before any map."""
    from causalign.errors import InputError

    for name in ("gradcam", "gradient"):
        with pytest.raises(InputError, match=r"target classes must lie in 0..2, got 0..3"):
            get_explainer(name, _small_cnn()).predict_and_attribute(
                torch.rand(2, 1, 12, 12), torch.tensor([0, 3]))
