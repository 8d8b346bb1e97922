"""Review of the session's merged work (cad786c..4caa719): regressions found and fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

# ------------------------------------------------------------------ shape hints


class CoordNet(nn.Module):
    """CoordConv: 1-channel images get two coordinate channels before a 3-channel stem, so
    the first conv's in_channels (3) is not the inputs' channel count (1)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * size * size, 2)

    def forward(self, x):
        n, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
        x = torch.cat([x, yy.expand(n, 1, h, w), xx.expand(n, 1, h, w)], 1)
        return self.head(torch.relu(self.stem(x)).flatten(1))


@pytest.mark.parametrize("name", ["gradient", "gradcam"])
def test_a_failure_after_the_input_layer_keeps_its_own_error(name):
    """The hint ("1 channel(s), not 3") was given for any failure whose message said
    "input" or "shape" once the inputs did not match the first conv: a CoordConv model
    that takes these images fine, failing in its head on another image size ("mat1 and
    mat2 shapes cannot be multiplied"), was told to change its channel count."""
    from causalign.errors import InputError
    from causalign.explain import get_explainer

    torch.manual_seed(0)
    model = CoordNet().eval()
    assert get_explainer(name, model).attribute(torch.rand(2, 1, 16, 16), 0).shape[0] == 2
    with pytest.raises(RuntimeError) as info:
        get_explainer(name, model).attribute(torch.rand(2, 1, 24, 24), 0)
    assert not isinstance(info.value, InputError)
    assert "mat1 and mat2" in str(info.value) and "channel" not in str(info.value)


def test_grayscale_without_channel_axis_still_gets_the_hint():
    """Guard: the failure the hint is for (raised in the first conv) still gets it."""
    from causalign.errors import InputError
    from causalign.explain import get_explainer

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match="without the channel axis"):
        get_explainer("gradient", model).attribute(torch.rand(4, 16, 16), 0)
    bn_first = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match="without the channel axis"):
        get_explainer("gradient", bn_first).attribute(torch.rand(4, 16, 16), 0)


# ------------------------------------------------------------------ leak report


def _dataset(root, blank_per_split: int, copy: bool = False):
    from causalign.data.format import DatasetMeta, DatasetWriter

    rng = np.random.default_rng(0)
    first = None
    with DatasetWriter(root, DatasetMeta(name="b", classes=["normal", "benign"]),
                       image_format="npy") as w:
        for split, n in (("train", 8), ("val", 4), ("test", 4)):
            for i in range(n):
                img = (np.zeros((16, 16), np.float32) if i < blank_per_split
                       else rng.random((16, 16)).astype(np.float32))
                if first is None and i >= blank_per_split:
                    first = img
                if copy and i == n - 1:  # the last image of every split
                    img = first
                w.add(img, i % 2, split, sample_id=f"{split}{i}")
    return root


def _leaks(root):
    from causalign.data.format import SPLITS, LesionDataset, split_leaks

    return split_leaks([LesionDataset(root, s) for s in SPLITS])


def test_blank_images_are_not_reported_as_copied_images(tmp_path):
    """All-black images (a normal class without findings, an empty export) in train and
    test were reported as "1 image(s) have pixels identical to an image of another split:
    train/train0 = train/train1": a leak warning for images that hold no patient, its
    examples all from one split, and 6 images counted as 1."""
    lines = _leaks(_dataset(tmp_path / "d", blank_per_split=2))
    assert not any("identical" in line for line in lines), lines
    assert len(lines) == 1 and "constant" in lines[0] and "6 image(s)" in lines[0], lines


def test_a_copied_image_is_named_with_the_splits_it_leaks_into(tmp_path):
    """The example showed an image's first three copies, all in train when train held
    three: the test copy that is the leak went unnamed."""
    lines = _leaks(_dataset(tmp_path / "d", blank_per_split=0, copy=True))
    assert len(lines) == 1 and "train/train0 = val/val3 = test/test3" in lines[0], lines
    assert lines[0].startswith("1 image(s)"), lines


# ------------------------------------------------------------------ evaluate's own files


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory):
    from causalign.engine.config import TrainConfig
    from causalign.engine.trainer import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_data, TrainConfig(epochs=1, width=4, batch_size=16, device="cpu",
                                 model="cnn7"), out, progress=False)
    return out


@pytest.mark.parametrize("name", ["best.pt.sha256", "checkpoint.pt.sha256", "resumes.json",
                                  "benchmark_run.json"])
def test_evaluate_refuses_the_runs_other_records(small_run, tmp_path, name):
    """`--out RUN/metrics.json` was refused, but `--out RUN/best.pt.sha256` replaced the
    checkpoint's digest with the metrics JSON: every later load said "checkpoint is corrupt
    or truncated (checksum mismatch)". Likewise resumes.json and a benchmark's
    benchmark_run.json (written with --predictions: a CSV in a JSON's place)."""
    import shutil

    from causalign.cli import main

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = (run / name).read_bytes() if (run / name).exists() else b"kept\n"
    (run / name).write_bytes(before)
    option = "--predictions" if name.endswith(".json") else "--out"
    assert main(["evaluate", str(run), "--device", "cpu", option, str(run / name)]) != 0
    assert (run / name).read_bytes() == before


# ------------------------------------------------------------------ saliency sanity cascade


def test_the_cascade_randomises_a_batchnorm_that_precedes_its_conv():
    """Only a BatchNorm directly *after* a conv/linear was reset: a pre-activation block's
    BatchNorm (bn -> relu -> conv), or one leading the network, kept its trained affine and
    running statistics through "every layer random"."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import saliency_sanity as S

    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.ReLU(),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    covered = [m for _, group in S.cascade_layers(model) for m in group]
    with_state = [m for m in model.modules()
                  if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))]
    assert all(any(m is c for c in covered) for m in with_state)
    assert len(covered) == len({id(m) for m in covered})  # none reset twice
    # the order is still from the logits down: the linear first, the leading BN last
    layers = S.cascade_layers(model)
    assert layers[0][1][0] is model[8] and layers[-1][1][0] is model[0]


# ------------------------------------------------------------------ bench_dataset_open --src


def test_bench_dataset_open_refuses_a_src_without_causalign(tiny_data, tmp_path,
                                                           monkeypatch, capsys):
    """A --src that holds no causalign (a typo, a worktree's root instead of its src) put a
    missing folder on the child's PYTHONPATH, and the child imported the installed
    causalign: the "baseline" timed was another checkout's code, with no word."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "review_bench_dataset_open", root / "benchmarks" / "bench_dataset_open.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec.loader.exec_module(mod)
    out = tmp_path / "o.json"
    monkeypatch.setattr(sys, "argv", ["bench_dataset_open.py", str(tiny_data), "--repeats",
                                      "1", "--src", str(tmp_path / "typo"), "--out",
                                      str(out)])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code not in (0, None)
    assert "typo" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ import resume vs new splits


def test_a_resumed_import_does_not_keep_a_units_old_split(tmp_path):
    """Rerunning an import resumes from its journal, which recorded each unit's split: units
    journaled before a split rule changed (BraTS' time points, LIDC's patient folder, a CSV
    group's empty split cells, all changed this session) kept their old split beside the
    new rule's, and a finished import rerun to apply the fix changed nothing. A unit whose
    planned split differs from its journal's is now imported again."""
    import json
    import shutil

    from PIL import Image

    from causalign.data.format import read_manifest
    from causalign.data.importers import run_import

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,label,group,split"]
    for p in range(6):
        for k in range(2):
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(
                src / f"p{p}_{k}.png")
            lines.append(f"p{p}_{k}.png,{'ab'[p % 2]},P{p},{['train', 'val', 'test'][p % 3]}")
    (src / "l.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = {"csv": "l.csv", "size": 16}
    run_import("folder", src, tmp_path / "fresh", opts)
    want = {r.id: r.split for r in read_manifest(tmp_path / "fresh")}

    out = tmp_path / "out"
    shutil.copytree(tmp_path / "fresh", out)
    journal = next(out.rglob("journal.jsonl"))
    entries = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
    for e in entries:  # as an older rule had drawn them: every unit in another split
        for r in e["records"]:
            r["split"] = {"train": "test", "val": "train", "test": "val"}[r["split"]]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    run_import("folder", src, out, opts)
    assert {r.id: r.split for r in read_manifest(out)} == want
