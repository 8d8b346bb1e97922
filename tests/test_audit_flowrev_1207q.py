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


def _site_b_csvs(tmp_path: Path) -> tuple[Path, Path, list[int], list[float], list[float]]:
    """Two runs' `evaluate --predictions` CSVs of one site-B split (hand-made scores)."""
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    pa = [0.10, 0.35, 0.55, 0.40, 0.65, 0.90, 0.20, 0.30]
    pb = [0.05, 0.50, 0.70, 0.60, 0.75, 0.95, 0.65, 0.55]
    paths = []
    for name, probs in (("a", pa), ("b", pb)):
        path = tmp_path / f"{name}.csv"
        rows = ["id,site,label,predicted,p_benign,p_malignant"] + [
            f"s{i},B,{y},{int(p >= 0.5)},{1 - p!r},{p!r}"
            for i, (y, p) in enumerate(zip(labels, probs, strict=True))]
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1], labels, pa, pb


def test_compare_applies_each_runs_own_threshold_to_another_sites_csvs(tmp_path, capsys):
    """Each run's threshold was chosen on its development site's val split; on site B's
    CSVs `compare` took one threshold=T for both (the pair was refused: "'0.3,0.6' is not a
    number"), so two models could not be compared at their own operating points."""
    a, b, labels, pa, pb = _site_b_csvs(tmp_path)
    assert main(["compare", str(a), str(b), "--operating-point", "threshold=0.3,0.6"]
                ) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    assert (op["rule"], op["threshold_a"], op["threshold_b"], op["chosen_on"]) == (
        "threshold=0.3,0.6", 0.3, 0.6, None)

    def rates(probs: list[float], t: float) -> tuple[float, float]:
        pos = [p >= t for p, y in zip(probs, labels, strict=True) if y == 1]
        neg = [p < t for p, y in zip(probs, labels, strict=True) if y == 0]
        return sum(pos) / len(pos), sum(neg) / len(neg)

    assert (op["sensitivity_a"], op["specificity_a"]) == rates(pa, 0.3)
    assert (op["sensitivity_b"], op["specificity_b"]) == rates(pb, 0.6)


@pytest.mark.parametrize("rule, says", [
    ("threshold=0.3,1.5", "must lie in [0, 1]"),
    ("threshold=0.3,0.4,0.5", "two thresholds"),
    ("youden,0.3", "give one of"),
])
def test_compare_threshold_pair_refused_in_one_line(tmp_path, capsys, rule, says):
    a, b, *_ = _site_b_csvs(tmp_path)
    assert main(["compare", str(a), str(b), "--operating-point", rule]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err, err


def test_evaluate_refuses_a_threshold_pair(two_sites, capsys):
    """Guard: a pair is compare's (two runs); evaluate has one run, one threshold."""
    run, _ = two_sites
    assert main(["evaluate", str(run), "--operating-point", "threshold=0.3,0.6",
                 "--no-progress"]) == 2
    assert "not a number" in capsys.readouterr().err
