"""Audit (pairwise combinations of `causalign train` options), 2026-12-07."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from causalign.engine import TrainConfig, Trainer


def _setup_warnings(data, out, **kw) -> tuple[Trainer, list[str]]:
    cfg = TrainConfig(**{**dict(method="erm", epochs=1, batch_size=16, width=4, seed=0,
                                device="cpu", eval_saliency="gradient",
                                deletion_fractions=[0.1]), **kw})
    t = Trainer(data, cfg, out, progress=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t._setup()
    return t, [str(w.message) for w in rec]


@pytest.mark.parametrize("method", ["icnn", "cdep"])
def test_compile_and_amp_warnings_name_the_real_reason(tiny_data, tmp_path, method):
    # icnn and cdep take one backward: the warnings said they "differentiate through the
    # model twice", and that bf16 "classifier_autocast regions" ran, which no method has
    t, msgs = _setup_warnings(tiny_data, tmp_path / method, method=method, compile=True,
                              amp=True)
    comp = [m for m in msgs if m.startswith(f"compile: method '{method}'")]
    amp = [m for m in msgs if m.startswith(f"amp: method '{method}'")]
    assert len(comp) == 1 and len(amp) == 1
    assert "twice" not in comp[0] and "double backward" not in comp[0]
    assert "twice" not in amp[0] and "amp has no effect" in amp[0]
    assert "classifier_autocast" not in amp[0]
    assert t.train_model is t.model  # uncompiled, as the warning says
    # and float32 throughout, as the warning says: amp has no effect on it
    seen: list[torch.dtype] = []
    conv = next(m for m in t.model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = t.train_set.batch(torch.arange(4))
    batch = {k: v.to(t.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with t._autocast():
        out = t.method(t.train_model, batch)
    out.total.backward()
    assert seen and all(d == torch.float32 for d in seen)


def test_double_backward_methods_keep_their_reason(tiny_data, tmp_path):
    _, msgs = _setup_warnings(tiny_data, tmp_path / "rrr", method="rrr", compile=True)
    assert any(m.startswith("compile: method 'rrr' differentiates through the model twice")
               for m in msgs)


def _strip_annotations(src, dst, keep_box: bool) -> None:
    """A copy of dataset `src` without pixel masks (and, unless keep_box, without boxes)."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["mask"] = ""
        if not keep_box:
            for c in ("box_x0", "box_y0", "box_x1", "box_y1"):
                r[c] = ""
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("keep_box,region,expect", [
    (False, "mask", "no training sample has a pixel mask, so"),
    (False, "box", "no training sample has a mask or box"),
    (True, "mask", "only boxes; use --set method.region=box"),
])
def test_hier_align_warns_when_the_image_level_has_no_region(tiny_data, tmp_path, keep_box,
                                                             region, expect):
    # `causalign train` of hier-align on data without masks ran the image level (lam1=1)
    # as 0 for every sample (history train_n_align_img 0) without a word
    data = tmp_path / "data"
    _strip_annotations(tiny_data, data, keep_box)
    _, msgs = _setup_warnings(data, tmp_path / "run", method="hier-align",
                              method_args={"region": region})
    hits = [m for m in msgs if "image-level alignment (method.lam1=1)" in m]
    assert len(hits) == 1 and expect in hits[0]
    # lam1=0 asks for the attribute level alone: nothing to warn about
    _, msgs = _setup_warnings(data, tmp_path / "run0", method="hier-align",
                              method_args={"region": region, "lam1": 0})
    assert not [m for m in msgs if "image-level" in m]


def test_hier_align_with_masks_does_not_warn(tiny_data, tmp_path):
    _, msgs = _setup_warnings(tiny_data, tmp_path / "run", method="hier-align")
    assert not [m for m in msgs if "image-level" in m]


def test_amp_on_a_cpu_without_native_bf16_warns(tiny_data, tmp_path, monkeypatch):
    # amp on such a CPU trained erm cnn7 7.6x slower per step (vgg11 never finished a run)
    # and nothing said why
    from causalign.engine import trainer as tr

    monkeypatch.setattr(tr, "_native_cpu_bf16", lambda: False)
    _, msgs = _setup_warnings(tiny_data, tmp_path / "a", amp=True)
    assert [m for m in msgs if "no native bf16" in m]
    _, msgs = _setup_warnings(tiny_data, tmp_path / "b")  # amp off: no word
    assert not [m for m in msgs if "native bf16" in m]
    monkeypatch.setattr(tr, "_native_cpu_bf16", lambda: True)
    _, msgs = _setup_warnings(tiny_data, tmp_path / "c", amp=True)
    assert not [m for m in msgs if "native bf16" in m]


def test_native_cpu_bf16_probe_returns_a_bool():
    from causalign.engine.trainer import _native_cpu_bf16

    assert isinstance(_native_cpu_bf16(), bool)
