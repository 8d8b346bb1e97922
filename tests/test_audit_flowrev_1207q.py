"""Two-site workflow audit: a run trained on site A, evaluated, explained and compared on
site B (`--data OTHER`) with the operating-point, calibration and figure options together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from causalign.cli import main
from causalign.engine import TrainConfig, train


@pytest.fixture(scope="module")
def two_sites(tiny_data, tmp_path_factory):
    """(run trained on site A, site B): B is a copy of A's dataset in another folder, as a
    second hospital's export would be."""
    root = tmp_path_factory.mktemp("flowrev")
    run = root / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, width=4, device="cpu"), run,
          progress=False)
    site_b = root / "site_b"
    shutil.copytree(tiny_data, site_b)
    return run, site_b


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cross_site_json_names_the_dataset_whose_val_chose_threshold_and_t(two_sites,
                                                                          capsys):
    """With --data B the threshold and T are chosen on B's val split, not the run's own:
    the JSON said only `chosen_on: "val"`, which a reader takes for the run's validation
    split (site A's, the one `predict --threshold` transfers from)."""
    run, site_b = two_sites
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(site_b), "--operating-point", "youden",
                 "--calibrate", "temperature", "--device", "cpu", "--no-progress"]) in (0, None)
    out = _json(capsys)
    for block in (out["operating_point"], out["calibration"]):
        assert block["chosen_on"] == "val"
        assert block["chosen_on_data"] == str(site_b.resolve())


def test_own_site_json_keeps_its_keys(two_sites, capsys):
    """Guard: on the run's own dataset no extra key (the blocks' key order is documented)."""
    run, _ = two_sites
    capsys.readouterr()
    assert main(["evaluate", str(run), "--operating-point", "youden", "--calibrate",
                 "temperature", "--device", "cpu", "--no-progress"]) in (0, None)
    out = _json(capsys)
    assert "chosen_on_data" not in out["operating_point"]
    assert "chosen_on_data" not in out["calibration"]


def test_cross_site_figures_name_the_dataset(two_sites, tmp_path, capsys, monkeypatch):
    """--roc and --reliability of site B were titled "RUN (test)", the same as site A's
    figures: two figures of different sites could not be told apart."""
    import causalign.report.figures as figures

    seen: list[str] = []
    real_roc, real_rel = figures.roc_figure, figures.reliability_diagram
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.extend(curves) or real_roc(
                            curves, path, **k))
    monkeypatch.setattr(figures, "reliability_diagram",
                        lambda panels, path, **k: seen.extend(panels) or real_rel(
                            panels, path, **k))
    run, site_b = two_sites
    assert main(["evaluate", str(run), "--data", str(site_b), "--roc",
                 str(tmp_path / "roc.png"), "--reliability", str(tmp_path / "rel.png"),
                 "--device", "cpu", "--no-progress"]) in (0, None)
    capsys.readouterr()
    assert len(seen) == 2
    assert all(str(site_b) in title for title in seen), seen


def test_explain_summary_names_run_and_dataset(two_sites, tmp_path, capsys):
    """explain's summary.json named neither the run nor the dataset (counterfactual's has a
    provenance block): maps of site B were indistinguishable from site A's."""
    run, site_b = two_sites
    out = tmp_path / "maps"
    assert main(["explain", str(run), "--data", str(site_b), "--limit", "4", "--pick",
                 "balanced", "--out", str(out), "--device", "cpu", "--no-progress"]
                ) in (0, None)
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["run"] == str(Path(run).resolve())
    assert prov["data"] == str(site_b.resolve())
    assert prov["weights_sha256"] and prov["split_content_digest"]
    assert summary["pick"] == "balanced"
    assert sorted(s["label"] for s in summary["samples"]) == [0, 0, 1, 1]
