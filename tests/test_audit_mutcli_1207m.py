"""Mutation audit of the command line's own logic (settings layering, validation, exit codes)
and the counterfactual/explanation outputs: behaviours the earlier tests let slip."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from causalign.cli import (
    _file_option,
    _one_line,
    _refuse_run_record,
    main,
)
from causalign.data.format import LesionDataset
from causalign.engine import trainer
from causalign.engine.config import parse_set
from causalign.errors import CausalignError
from causalign.explain import CounterfactualSaliency
from causalign.explain.counterfactual import CounterfactualGenerator, CounterfactualResult
from causalign.explain.counterfactual_export import (
    CounterfactualSettings,
    _crossing,
    attribute_change_rates,
    export_counterfactuals,
)
from causalign.explain.export import display_slice, export_saliency
from causalign.methods import build_method
from causalign.models import SevenLayerCNN

# ------------------------------------------------------------------ counterfactual map


def test_a_diverged_search_warns_once_per_explainer_and_marks_every_call(monkeypatch):
    """`CounterfactualSaliency` warns on the first call with a diverged search only (a
    command calls it once per batch), yet `.diverged` is refreshed on every call. Kills the
    mutant that never sets `_warned_diverged` (one warning per batch)."""
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    e = CounterfactualSaliency(model, steps=2)
    real = e.generator.generate
    flags = iter([[False, True], [True, True]])

    def diverging(x0, **kw):
        r = real(x0, **kw)
        fields = {f: getattr(r, f) for f in CounterfactualResult.__dataclass_fields__}
        return CounterfactualResult(**{**fields, "diverged": torch.tensor(next(flags))})

    monkeypatch.setattr(e, "generator", types.SimpleNamespace(generate=diverging))
    with pytest.warns(RuntimeWarning, match="1 of 2"):
        e.attribute(x, target=torch.tensor([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        e.attribute(x, target=torch.tensor([0, 1]))
    assert e.diverged.tolist() == [True, True]


# ------------------------------------------------------------------ export helpers


def test_a_crossing_of_one_half_gets_the_digits_that_show_it():
    """The changed-attribute text keeps adding digits until the crossing of 0.5 shows
    ('0.50→0.50' hid it). Kills the mutant stopping at two digits."""
    assert _crossing(0.5004, 0.4996) == "0.5004→0.4996"
    assert _crossing(0.91, 0.12) == "0.91→0.12"


def test_attribute_change_rate_credits_a_name_with_spaces_to_itself():
    """`attribute_change_rates` reads the name as all before the last space ("bill shape
    0.91→0.12" is "bill shape"'s change, not "bill"'s). Kills the mutant using split()[0]."""
    rows = [{"attributes_changed": ["bill shape 0.91→0.12"]}, {"attributes_changed": []}]
    rates = attribute_change_rates(rows, ["bill", "bill shape"])["attribute_change_rate"]
    assert rates == {"bill": 0.0, "bill shape": 0.5}


def test_a_volume_shows_the_middle_of_the_slices_tied_at_the_most_annotation():
    """`display_slice`: among slices tied at the largest annotated area, the middle one (a
    box over slices 2..4 drew slice 2). Kills the mutant taking the first tied slice."""
    region = np.zeros((7, 4, 4))
    region[2:5, 1:3, 1:3] = 1
    assert display_slice(region, 7) == 3
    assert display_slice(None, 7) == 3 and display_slice(np.zeros((6, 2, 2)), 6) == 3


# ------------------------------------------------------------------ settings layering


def test_parse_set_reads_yaml_values_and_splits_at_the_first_equals_sign():
    """--set values are YAML (true → bool, 0.5 → float, [..] → list) and the key ends at the
    first '=' (a value may hold '='). Kills the mutants keeping the raw string and splitting
    at the last '='."""
    got = parse_set(["amp=true", "lr=0.5", "deletion_fractions=[0.1, 0.2]", "init=a=b"])
    assert got == {"amp": True, "lr": 0.5, "deletion_fractions": [0.1, 0.2], "init": "a=b"}
    assert type(got["amp"]) is bool


def test_a_flag_beats_the_config_file(tiny_data, tmp_path, capsys, monkeypatch):
    """Layer order defaults < --config < flags: `--epochs 1` over `epochs: 3` in --config
    (and --set over --config). Kills the mutant merging the config over the flags."""
    seen = {}

    def fake_train(data, cfg, out, **kw):  # the resolved config, without training
        seen["cfg"] = cfg
        raise CausalignError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nseed: 5\nwidth: 8\n", encoding="utf-8")
    rc = main(["train", str(tiny_data), "--config", str(config), "--epochs", "1",
               "--set", "width=4", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2 and "stop here" in capsys.readouterr().err
    assert (seen["cfg"].epochs, seen["cfg"].seed, seen["cfg"].width) == (1, 5, 4)


# ------------------------------------------------------------------ output-path checks


def test_a_file_option_ending_in_a_slash_is_refused():
    """`_file_option`: `--out results/` names a folder; refused instead of writing a file
    `results`. Kills the mutant that skips the check."""
    parse = _file_option("--out", "metrics.json")
    assert parse("a/b.json") == Path("a/b.json")
    with pytest.raises(CausalignError, match="ends with '/'.*results/metrics.json"):
        parse("results/")


def test_every_run_record_is_refused_as_an_output_whatever_the_option_order(tmp_path):
    """`_refuse_run_record` refuses the checkpoints' digests too, checks every option even
    after one that is not given, and sees through '..'. Kills the mutants dropping
    checkpoint.pt.sha256, returning at the first None option, and comparing paths as
    written."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CausalignError, match="run's own checkpoint.pt.sha256"):
        _refuse_run_record(run, out=run / "checkpoint.pt.sha256")
    with pytest.raises(CausalignError, match="--predictions .*run's own config.yaml"):
        _refuse_run_record(run, out=None, predictions=run / "config.yaml")
    with pytest.raises(CausalignError, match="run's own metrics.json"):
        _refuse_run_record(run, out=run / "sub" / ".." / "metrics.json")
    _refuse_run_record(run, out=run / "eval_val.json")  # another file in the run: fine


# ------------------------------------------------------------------ exit codes, one line


def test_user_and_os_errors_exit_2_with_one_escaped_line(tmp_path, capsys):
    """A user error and an OS refusal both exit 2 with one `error:` line; control characters
    in a message are escaped. Kills the mutants returning 1 and leaving `_one_line` out."""
    assert _one_line("a\nb\tc") == "a\\nb\\tc"
    rc = main(["evaluate", str(tmp_path / "no\nrun")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    (tmp_path / "f").write_text("x", encoding="utf-8")
    rc = main(["data", "synth", str(tmp_path / "f" / "d"), "--n-train", "4", "--n-val", "2",
               "--n-test", "2", "--size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "is a file, not a folder" in err, err


# ------------------------------------------------------------------ what the exports write


class MeanModel(nn.Module):
    """Logits (−s, s), s = k·(mean intensity − t): predictions split the tiny test set."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.k, self.t = nn.Parameter(torch.tensor(40.0)), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.k * (x.flatten(1).mean(1, keepdim=True) - self.t)
        return torch.cat([-s, s], 1)


@pytest.fixture(scope="module")
def mean_setup(tiny_data):
    ds = LesionDataset(tiny_data, "test")
    t = float(ds.images.flatten(1).mean(1).median())
    return MeanModel(t).eval(), build_method("erm"), ds


def test_counterfactual_export_with_skipped_samples_writes_each_x_star_for_its_sample(
        mean_setup, tmp_path, monkeypatch):
    """With a fixed target class some samples are skipped; each written cf/<id>.npy must be
    that sample's x* (a reference search on the same batches), the skipped samples' x* of an
    earlier export into OUT removed, and the out-of-range share taken over the generated
    samples only. Kills the mutants indexing x* by batch position (k for j), dividing by n,
    and removing only files the new export did not plan."""
    import causalign.report.figures as figures

    for name in ("counterfactual_triptych", "counterfactual_grid"):  # figures: not checked here
        monkeypatch.setattr(figures, name, lambda *a, **k: None)
    model, method, ds = mean_setup
    out = tmp_path / "cf"
    settings = CounterfactualSettings(steps=3, lr=0.05, distance="l2")
    export_counterfactuals(model, method, ds, settings, out, batch_size=4)  # all written
    assert len(list((out / "cf").glob("*.npy"))) == len(ds)
    fixed = CounterfactualSettings(steps=3, lr=0.05, distance="l2", target="1")
    s = export_counterfactuals(model, method, ds, fixed, out, batch_size=4,
                               valid_range=(0.0, 0.5))
    skipped = {r["id"] for r in s["samples"] if "skipped" in r}
    assert 0 < len(skipped) < len(ds)  # the test needs both kinds in the batches
    gen = CounterfactualGenerator(model, steps=3, lr=0.05, distance="l2", target_rule="1")
    n_out = 0
    for start in range(0, len(ds), 4):
        x = ds.images[start:start + 4]
        target, valid = gen.targets(x, model(x).argmax(1))
        ref = gen.generate(x[valid], target=target[valid]).x_star
        kept = [ds.records[start + k].id for k, v in enumerate(valid.tolist()) if v]
        for i, x_star in zip(kept, ref, strict=True):
            saved = np.load(out / "cf" / f"{i}.npy")
            np.testing.assert_allclose(saved, x_star.numpy(), atol=1e-5)
            n_out += int(((saved < 0) | (saved > 0.5)).sum())
    assert {p.stem for p in (out / "cf").glob("*.npy")} == {r.id for r in ds.records} - skipped
    assert s["n_out_of_range"] == n_out > 0
    assert s["out_of_range_share"] == pytest.approx(
        n_out / (s["n_generated"] * ds.images[0].numel()))


def test_explain_summary_names_the_predicted_class_of_each_map(mean_setup, tmp_path,
                                                              monkeypatch):
    """`explain`'s summary lists, per map, the class the map explains: the model's
    prediction, not the label. Kills the mutant writing the label."""
    import causalign.report.figures as figures

    for name in ("overlay", "cam_grid"):  # figures: not checked here
        monkeypatch.setattr(figures, name, lambda *a, **k: None)
    model, method, ds = mean_setup
    s = export_saliency(model, method, ds, "gradient", tmp_path / "ex", limit=16)
    with torch.no_grad():
        pred = model(ds.images[:16]).argmax(1).tolist()
    assert [r["prediction"] for r in s["samples"]] == pred
    assert [r["label"] for r in s["samples"]] != pred  # labels differ somewhere: it can fail


def test_an_unannotated_sample_has_no_change_in_mask(mean_setup, tmp_path, monkeypatch):
    """`change_in_mask` is None for a sample without annotation (its box is empty, its share
    meaningless), and so is the summary's mean when no sample has one. Kills the mutant that
    records the share whenever it is finite."""
    import causalign.report.figures as figures

    for name in ("counterfactual_triptych", "counterfactual_grid"):  # figures: not checked
        monkeypatch.setattr(figures, name, lambda *a, **k: None)
    model, method, ds = mean_setup
    real = ds.batch

    def unannotated(idx):  # the same images, their annotation marked missing
        b = dict(real(idx))
        b["has_annotation"] = torch.zeros_like(b["has_annotation"])
        return b

    monkeypatch.setattr(ds, "batch", unannotated)
    s = export_counterfactuals(model, method, ds, CounterfactualSettings(steps=2), tmp_path,
                               limit=4, batch_size=4)
    assert [r["change_in_mask"] for r in s["samples"] if "flipped" in r] == [None] * 4
    assert s["change_in_mask"] is None
