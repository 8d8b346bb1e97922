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


def test_a_rerun_says_how_many_units_it_imported_again_for_a_new_split(tmp_path):
    """Units journaled in another split than planned now are imported again (LIDC and
    CBIS-DDSM are stratified since, so an import begun before redoes many of them); the
    summary said only 'reused k of n', not why the rest was redone. Now a note counts them."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from causalign.data.importers import run_import
    from causalign.data.importers.run import format_summary

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,label,group,split"]
    for p in range(6):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(src / f"p{p}.png")
        lines.append(f"p{p}.png,{'ab'[p % 2]},P{p},{['train', 'val', 'test'][p % 3]}")
    (src / "l.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = {"csv": "l.csv", "size": 16}
    out = tmp_path / "out"
    run_import("folder", src, out, opts)
    journal = next(out.rglob("journal.jsonl"))
    entries = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
    for e in entries[:2]:  # two units drawn by an older rule into another split
        for r in e["records"]:
            r["split"] = {"train": "test", "val": "train", "test": "val"}[r["split"]]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    summary = run_import("folder", src, out, opts)
    assert summary["units"]["reused_from_previous_run"] == 4
    text = format_summary(summary)
    assert "note: 2 × unit(s) of the previous run imported again: their planned split " \
           "changed" in text, text
    shutil.rmtree(out)
