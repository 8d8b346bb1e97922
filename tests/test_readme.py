"""The README's Python examples run as printed and print what the README says they print."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(code: str, cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def _block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}"
    return found[0]


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) == 8


def test_quickstart_example(tmp_path: Path) -> None:
    out = _run(_block('TrainConfig(method="oracle"'), tmp_path)
    acc, cam_precision = map(float, out[0].split())
    assert 0.0 <= acc <= 1.0 and 0.0 <= cam_precision <= 1.0
    assert out[1] == "torch.Size([4, 1, 64, 64])"
    lo, hi = ast.literal_eval(out[2])  # bootstrap_ci's AUC interval from predictions_test.csv
    assert 0.0 <= lo <= hi <= 1.0
    op = ast.literal_eval(out[3])  # rates at the val split's sensitivity-0.9 threshold
    assert op["tp"] + op["fp"] + op["tn"] + op["fn"] == 50
    assert op["sensitivity"] == op["tp"] / (op["tp"] + op["fn"])
    assert 0.0 <= op["threshold"] <= 1.0
    assert (tmp_path / "runs" / "oracle" / "metrics.json").is_file()


def test_implicit_gradient_example(tmp_path: Path) -> None:
    out = _run(_block("implicit_gradient"), tmp_path)
    ours, closed_form = (re.findall(r"-?\d+\.\d+", part) for part in out[0].split(") tensor("))
    assert len(ours) == 3 and len(closed_form) == 3
    for a, b in zip(ours, closed_form, strict=True):
        assert abs(float(a) - float(b)) <= 1e-3 * abs(float(b))


def test_ppi_example(tmp_path: Path) -> None:
    out = _run(_block('build_method("ppi"'), tmp_path)
    parts = ast.literal_eval(out[0])  # a printed dict of floats
    assert set(parts) == {"cls", "con", "reg", "ad", "mask_area", "empty_mask", "con_weight"}
    assert all(v == v for v in parts.values())  # no NaN


def test_own_model_and_loop_example(tmp_path: Path) -> None:
    out = _run(_block("DataLoader"), tmp_path)
    assert out == [f"{name} (4, 1, 32, 32)" for name in ("wbp", "lrp-epsilon", "gradcam",
                                                         "gradient")]


def test_counterfactual_example(tmp_path: Path) -> None:
    """Prints "flipped F, change inside the mask M": a trained model's predictions flip (the
    README shows 1.00) and the in-mask share is a share."""
    out = _run(_block("CounterfactualGenerator"), tmp_path)
    m = re.fullmatch(r"flipped (\d\.\d\d), change inside the mask (\d\.\d\d)", out[-1])
    assert m, out
    flipped, inside = float(m[1]), float(m[2])
    assert flipped >= 0.75
    assert 0.0 < inside < 1.0


def test_export_example(tmp_path: Path) -> None:
    out = _run(_block("export_run"), tmp_path)
    assert out == ["['benign', 'malignant'] torch.Size([4, 2])"]
    assert (tmp_path / "runs" / "erm" / "model.pt2").is_file()


def test_predict_example(tmp_path: Path) -> None:
    out = _run(_block("predict_images("), tmp_path)
    assert out == ["(3, 2) ['benign', 'malignant'] ['case0', 'case1', 'case2']"]
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("id,")
