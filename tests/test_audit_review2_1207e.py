"""Review of the calibration/bootstrap, stratified-import, review-fix and Grad-CAM-matrix
commits (audit_review2, 1207e)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_class_weight_imbalance_refuses_a_split_without_a_class(tmp_path):
    """A tiny --n-test left the test split without a malignant sample: every run trained,
    then the summary crashed in statistics.fmean on AUC None. Now one line, before any
    training, and --out is left free for the rerun."""
    out = tmp_path / "cw"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "class_weight_imbalance.py"), "--out",
         str(out), "--seeds", "0", "--epochs", "1", "--n-train", "40", "--n-val", "20",
         "--n-test", "3", "--minority", "0.1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no malignant" in lines[0] and "test" in lines[0], lines
    assert not out.exists()


def test_a_saliency_fallback_reaches_the_benchmark_table_notes():
    """eval_saliency=gradcam on resnet18 at 32 px (a 1x1 layer) or on volumes: the test
    split's CAM columns are WBP's; metrics.json said so (test.saliency_note) but tables.md
    did not, so a table read as Grad-CAM's numbers. One note per dataset and note."""
    from causalign.engine.benchmark import Experiment, MethodSpec, _slim, experiment_table

    note = ("gradcam's layer is 1x1 at this image size (a constant map): localisation "
            "and deletion use wbp")
    recs = [{"key": f"d/erm/seed{s}", "dataset": "d", "method": "erm", "label": "erm",
             "setting": "default", "seed": s, "experiments": ["t"], "status": "done",
             "metrics": _slim({"method": "erm", "test": {"accuracy": 0.5, "cam_precision": 0.2,
                                                         "saliency_note": note}})}
            for s in (0, 1)]
    exp = Experiment("t", "t", ["d"], [MethodSpec("erm", "erm")], [0, 1], {"default": {}},
                     "method", ["test.accuracy", "test.cam_precision"])
    notes = experiment_table(exp, recs).notes
    hits = [n for n in notes if note in n]
    assert hits == [f"d/erm/seed0 and 1 other run(s): warning: test: {note}"], notes


def test_shape_hint_survives_torch_compile():
    """shape_errors gave its one-line channel hint only for errors whose traceback passes
    through the first conv's frame; a torch.compile'd model fails while Dynamo traces it,
    in frames of no layer, so the hint (given before that narrowing) was lost to a
    multi-screen Dynamo error. Eager models keep the narrowing (head errors stay raw)."""
    import pytest
    import torch
    from torch import nn

    from causalign.errors import InputError
    from causalign.explain.base import shape_errors

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(5, 2)  # takes 5: a head that fails on the conv's 4

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    x = torch.randn(1, 1, 12, 12)
    compiled = torch.compile(Net(), backend="eager")
    with pytest.raises(InputError, match="takes \\(N, 3, H, W\\)"):
        with shape_errors(compiled, x, "explain"):
            compiled(x)
    eager = Net()
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:  # raw, not the hint
        with shape_errors(eager, torch.randn(1, 3, 12, 12), "explain"):
            eager(torch.randn(1, 3, 12, 12))
    assert not isinstance(info.value, InputError)
