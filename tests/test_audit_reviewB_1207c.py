"""Review audit (part B) of the cross-site commits: a run used on another site (--data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from causalign.cli import main
from causalign.engine import TrainConfig, train


def _float_site(src: Path, dst: Path, factor: float, splits: tuple[str, ...]) -> Path:
    """`src`'s rows of `splits`, every image saved as a float32 .npy array times `factor`
    (a site storing raw values, so x*'s bounds are the data's min..max, not [0, 1])."""
    import numpy as np

    from causalign.data.format import load_array, to_float_image

    shutil.copytree(src, dst)
    with open(dst / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] in splits]
    for r in rows:
        img = to_float_image(load_array(dst / r["image"]), 2, dst / r["image"])[0]
        r["image"] = f"images/{r['id']}.npy"
        np.save(dst / r["image"], (img * factor).astype(np.float32))
    with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_counterfactual_bounds_do_not_depend_on_the_distance_under_data(tiny_data, tmp_path,
                                                                        capsys):
    """With --data OTHER a scaled search read the run's own training split for its per-pixel
    scale, and that split's range went into x*'s bounds too: the same 4 float test images
    were bounded to [44.7, 1000] under scaled-l1 and [44.7, 600] under l1 (measured). The
    bounds are --data's own, whatever the distance."""
    own = _float_site(tiny_data, tmp_path / "own", 1000.0, ("train", "val", "test"))
    other = _float_site(tiny_data, tmp_path / "other", 600.0, ("test",))
    run = tmp_path / "run"
    train(own, TrainConfig(method="erm", epochs=1, width=4, device="cpu"), run,
          progress=False)
    ranges = {}
    for distance in ("l1", "scaled-l1"):
        out = tmp_path / f"cf_{distance}"
        rc = main(["counterfactual", str(run), "--data", str(other), "--out", str(out),
                   "--limit", "2", "--steps", "2", "--distance", distance, "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        ranges[distance] = json.loads((out / "summary.json").read_text())["valid_range"]
    assert ranges["l1"] == ranges["scaled-l1"], ranges
    assert ranges["l1"][1] <= 600.0 + 1e-3, ranges
