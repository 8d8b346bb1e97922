"""Edge cases of the synthetic benchmark generator and the HTML report: option values at their
limits, `--overwrite` reruns and report rebuilds leaving no stale files."""

from __future__ import annotations

import csv
import json
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

from causalign.cli import main
from causalign.data.synth import SynthConfig, bayes_accuracy, site_params
from causalign.errors import DataError
from causalign.report.html import write_report


def _run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_negative_seed_is_a_one_line_error(tmp_path, capsys):
    # NumPy's SeedSequence raised "ValueError: expected non-negative integer" (a traceback)
    with pytest.raises(DataError, match="--seed must be >= 0"):
        SynthConfig(seed=-1).validate()
    rc, _, err = _run(capsys, "data", "synth", str(tmp_path / "d"), "--n-train", "2",
                      "--n-val", "1", "--n-test", "1", "--size", "32", "--seed", "-1",
                      "--no-examples")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --seed"), err
    assert not (tmp_path / "d" / "manifest.csv").exists()


def test_zero_label_noise_is_a_deterministic_rule_without_warnings():
    # σ = 0 divided by zero in the Bayes accuracy (a RuntimeWarning printed by `data synth`)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bayes_accuracy(0.0, 0.5) == 1.0
        assert bayes_accuracy(0.0, 0.3) == pytest.approx(1.0)
    assert bayes_accuracy(0.3, 0.5) == pytest.approx(0.943, abs=5e-4)  # README's value


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_every_site_has_its_own_noise_level(k):
    """README: K sites differ in contrast, noise, blur and prevalence. 2k mod K gave both of
    two sites noise 0.01 (and pairs of sites for any even K)."""
    params = [site_params(i, k, 0.5) for i in range(k)]
    for field in ("gain", "noise", "blur", "attribute_prob"):
        values = [round(getattr(p, field), 6) for p in params]
        assert len(set(values)) == k, (field, values)
    noise = sorted(p.noise for p in params)
    assert noise[0] == pytest.approx(0.01) and noise[-1] == pytest.approx(0.05)


def test_odd_site_counts_keep_their_noise_levels():
    # the fix must not change datasets generated with an odd K
    assert [round(site_params(i, 3, 0.5).noise, 4) for i in range(3)] == [0.01, 0.05, 0.03]


def test_overwrite_leaves_no_stale_samples_or_examples(tmp_path, capsys):
    out = tmp_path / "d"
    rc, _, err = _run(capsys, "data", "synth", str(out), "--n-train", "4", "--n-val", "2",
                      "--n-test", "2", "--size", "32", "--depth", "4", "--no-examples")
    assert rc == 0, err
    (out / "examples.png").write_bytes(b"old examples")  # as a run with --examples leaves
    (out / "images" / "keep_me.txt").write_text("not a sample")
    rc, _, err = _run(capsys, "data", "synth", str(out), "--n-train", "2", "--n-val", "1",
                      "--n-test", "1", "--size", "32", "--overwrite", "--no-examples")
    assert rc == 0, err
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    listed = {row["image"] for row in manifest} | {row["mask"] for row in manifest}
    on_disk = {f"{sub}/{f.name}" for sub in ("images", "masks") for f in (out / sub).iterdir()}
    # the 8 .npy volumes of the first run are gone; only the new PNGs (and the user's file)
    assert on_disk == listed | {"images/keep_me.txt"}, sorted(on_disk - listed)
    assert not (out / "examples.png").exists()
    rc, _, err = _run(capsys, "data", "check", str(out))
    assert rc == 0, err


class _Html(HTMLParser):
    """Tag balance and the <img> sources of a page."""

    void = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")
        if tag not in self.void:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append(tag)


def _results(deletion: bool) -> dict:
    metrics = {"test": {"accuracy": 0.5, "deletion": {"0.01": 0.1, "0.1": 0.3}}} \
        if deletion else {"test": {"accuracy": 0.5}}
    return {"suite": "tiny", "description": "", "experiments": [], "runs": [
        {"key": "pm/erm/seed0", "dataset": "pm", "method": "erm", "label": "erm",
         "setting": "default", "seed": 0, "run_dir": "runs/pm/erm/seed0", "status": "done",
         "metrics": metrics}]}


def test_report_rebuild_removes_figures_it_no_longer_shows(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(_results(deletion=True)))
    (out / "cross_site.json").write_text(json.dumps(
        {"erm": {"auc": np.array([[0.9, 0.6], [0.7, 0.8]]).tolist()}}))
    page = write_report(out)
    figs = out / "figures"
    assert {f.name for f in figs.iterdir()} == {"deletion.png", "cross_site.png"}
    parser = _Html()
    parser.feed(page.read_text())
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert len(parser.sources) == 2
    assert all(s.startswith("data:image/png;base64,") for s in parser.sources)
    # the run folder is missing: the CAM and counterfactual figures fail (noted in the page)
    assert "CAM grid for pm failed" in page.read_text()

    # rebuild without cross_site.json and without deletion metrics: both figures were left
    # behind in DIR/figures/ although report.html no longer showed them
    (out / "cross_site.json").unlink()
    (out / "results.json").write_text(json.dumps(_results(deletion=False)))
    (figs / "cam_grid_gone.png").write_bytes(b"from a dataset no longer in the results")
    (figs / "notes.txt").write_text("not a report figure")
    write_report(out)
    assert {f.name for f in figs.iterdir()} == {"notes.txt"}
    assert "<img" not in page.read_text()


def test_example_grid_shows_the_lesion_slice_of_a_volume(tmp_path, monkeypatch):
    """A volume's lesion spans a few slices, often not the middle one: the grid showed the
    middle slice, with neither lesion nor outline (`data synth --depth 8` examples.png)."""
    from causalign.report import figures

    shown: list[np.ndarray] = []

    def capture(fig, path, **kwargs):
        shown.extend(np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images)

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    images = np.zeros((2, 1, 8, 16, 16), np.float32)
    masks = np.zeros((2, 1, 8, 16, 16), bool)
    for i, z in enumerate((1, 6)):  # lesion on slice 1, resp. 6 only
        images[i, 0, z, 4:9, 4:9] = 1.0
        masks[i, 0, z, 4:9, 4:9] = True
    figures.example_grid(images, masks, ["a", "b"], tmp_path / "ex.png")
    assert len(shown) == 2
    for img in shown:
        assert img.shape == (16, 16) and img.sum() == 25  # the whole 5×5 lesion is shown


def fake_model_figures(monkeypatch, tmp_path):
    """Stand-ins for the report's model-based figures (they need trained runs), writing a
    PNG header where the real ones would; returns an empty benchmark folder."""
    from causalign.report import html as report_html

    def fake_figure(out, results, dataset, path, n=4):
        path.parent.mkdir(parents=True, exist_ok=True)  # as atomic_savefig does
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        return "erm"

    monkeypatch.setattr(report_html, "cam_figure", fake_figure)
    monkeypatch.setattr(report_html, "counterfactual_figure", fake_figure)
    out = tmp_path / "bench"
    out.mkdir()
    return out


def test_report_figure_names_stay_inside_the_figures_folder(tmp_path, monkeypatch):
    """A suite's dataset name may hold "/" (run folders are slugged): the CAM grid and
    counterfactual figures were written to nested folders, or outside DIR/figures/ for a
    name with "../"."""
    out = fake_model_figures(monkeypatch, tmp_path)
    results = _results(deletion=False)
    results["runs"][0]["dataset"] = "../../lidc/sub set"
    (out / "results.json").write_text(json.dumps(results))
    page = write_report(out).read_text()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == ["bench/figures/cam_grid_lidc-sub-set.png",
                       "bench/figures/counterfactuals_lidc-sub-set.png"], written
    assert page.count("<img") == 2 and "../../lidc/sub set" in page


def test_bad_weights_option_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "data", "synth", str(tmp_path / "d"), "--n-train", "2",
                      "--n-val", "1", "--n-test", "1", "--size", "32", "--weights",
                      "calcification=2,volume=1", "--no-examples")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: causal weights: unknown attribute 'volume'"), err
    assert not (tmp_path / "d").exists()
    rc, out, _ = _run(capsys, "data", "synth", str(tmp_path / "d"), "--n-train", "4",
                      "--n-val", "2", "--n-test", "2", "--size", "32", "--weights",
                      "calcification=1", "--no-examples", "--no-progress")
    assert rc == 0, out
    info = yaml.safe_load((tmp_path / "d" / "dataset.yaml").read_text())["info"]
    assert info["causal_weights"]["calcification"] == 1.0
    assert info["causal_weights"]["spiculation"] == 0.0 and info["threshold"] == 0.5
