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
