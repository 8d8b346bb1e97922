"""Output contract audit (obs, 2026-12-06): what scripts and CI logs read from causalign."""

from __future__ import annotations

import importlib.util
import json
import math
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from causalign import cli
from causalign.errors import TrainingTroubleWarning
from causalign.explain import CounterfactualSaliency
from causalign.explain.counterfactual import CounterfactualResult
from causalign.io import atomic_write_json
from causalign.models import SevenLayerCNN


def _diverging_explainer() -> CounterfactualSaliency:
    """A counterfactual explainer whose search diverges on the last sample of every call."""
    model = SevenLayerCNN(1, 2, width=4).eval()
    e = CounterfactualSaliency(model, steps=1)
    real = e.generator.generate

    def diverging(x0, **kw):  # the generator resets a diverged sample's x* to x0
        r = real(x0, **kw)
        x_star = r.x_star.clone()
        x_star[-1] = x0[-1]
        diverged = torch.zeros(len(x0), dtype=torch.bool)
        diverged[-1] = True
        fields = {f: getattr(r, f) for f in CounterfactualResult.__dataclass_fields__}
        return CounterfactualResult(**{**fields, "x_star": x_star, "diverged": diverged})

    e.generator = types.SimpleNamespace(generate=diverging)
    return e


def test_diverged_counterfactual_maps_warn_once_per_explainer_not_per_batch():
    # `evaluate`/`explain --saliency counterfactual` call attribute once per batch: the
    # count in the message differed per batch, so Python's once-per-text filter let one
    # warning through per batch
    e = _diverging_explainer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for n in (3, 2, 4):
            maps = e.attribute(torch.rand(n, 1, 8, 8), target=torch.zeros(n, dtype=torch.long))
            assert maps[-1].abs().sum() == 0
    diverged = [w for w in seen if "counterfactual searches diverged" in str(w.message)]
    assert len(diverged) == 1, [str(w.message) for w in seen]
    assert issubclass(diverged[0].category, RuntimeWarning)  # as before, for callers
    # the later calls' diverged samples stay visible without a warning each
    assert getattr(e, "diverged", None) is not None
    assert e.diverged.tolist() == [False, False, False, True]


def test_diverged_counterfactual_warning_is_one_warning_line_on_the_command_line(
        monkeypatch, capsys):
    # README: causalign's own warnings print as one line `warning: …`; this one was a plain
    # RuntimeWarning, printed in Python's two-line format (file:line, then the source line)
    e = _diverging_explainer()

    def command(argv):  # as `evaluate` and `explain` call it, once per batch
        for n in (3, 2):
            e.predict_and_attribute(torch.rand(n, 1, 8, 8))
        return 0

    monkeypatch.setattr(cli, "_main", command)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert cli.main([]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("warning: 1 of 3 counterfactual searches diverged"), err


def _load_benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"audit_obs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _strict(text: str):
    def refuse(const: str):
        raise AssertionError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def test_feature_reliance_undefined_correlations_are_null_not_nan():
    # a one-class test split (label), no mask in the split (lesion brightness) or an
    # attribute constant on it: the correlation is undefined; feature_reliance.json held a
    # bare NaN (not JSON) and numpy printed four RuntimeWarnings per empty slice
    fr = _load_benchmark("feature_reliance")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fr._corr(np.array([0.1, 0.5, 0.3]), np.ones(3)) is None  # one class
        assert fr._corr(np.array([]), np.array([])) is None  # nothing masked
        assert fr._corr(np.array([0.2]), np.array([1.0])) is None  # one sample
        assert fr._corr(np.array([0.1, 0.5, 0.3]), np.array([0.0, 1.0, 1.0])) == \
            pytest.approx(float(np.corrcoef([0.1, 0.5, 0.3], [0.0, 1.0, 1.0])[0, 1]))


def test_atomic_write_json_writes_standard_json_for_non_finite_numbers(tmp_path):
    # json.dumps writes NaN/Infinity, which strict parsers (jq, JavaScript, Go) refuse;
    # every JSON file causalign writes goes through this helper: null instead
    path = tmp_path / "m.json"
    atomic_write_json(path, {"auc": float("nan"), "deletion": {"0.1": np.float64("nan")},
                             "range": (-math.inf, 1.5), "n": 3, "ok": True, "none": None})
    assert _strict(path.read_text()) == {"auc": None, "deletion": {"0.1": None},
                                         "range": [None, 1.5], "n": 3, "ok": True,
                                         "none": None}


def test_json_on_stdout_is_standard_json(capsys):
    # `evaluate`, `data info` and `bench step` print JSON for scripts (`| jq`): the same
    # guard as the files, and bench step's one line stays one line
    cli._echo_json({"auc": float("nan"), "ratio": math.inf})
    assert _strict(capsys.readouterr().out) == {"auc": None, "ratio": None}
    cli._echo_json({"a": 1, "b": [1.5]}, indent=None)
    assert capsys.readouterr().out == '{"a": 1, "b": [1.5]}\n'


def _history_header(rows: list[dict], tmp_path: Path) -> list[str]:
    from causalign.engine.trainer import Trainer

    fake = types.SimpleNamespace(state=types.SimpleNamespace(history=rows), out=tmp_path)
    Trainer._write_history(fake)  # type: ignore[arg-type]
    return (tmp_path / "history.csv").read_text().splitlines()[0].split(",")


def test_history_columns_keep_one_order_when_a_part_starts_in_a_later_epoch(tmp_path):
    # hier-align with align_start=2 (or align_every beyond an epoch, a PPI warm-up): the
    # alignment columns first appear in epoch 2 and were appended after `seconds`, so the
    # same method's runs had different column orders (`tail -n +2` concatenation or a
    # positional reader mixed them up) and `seconds` was no longer the last column
    def row(epoch: int, aligned: bool) -> dict:
        r: dict = {"epoch": epoch, "train_loss": 1.0, "train_ce": 0.7, "train_align_step": 1.0}
        if aligned:
            r.update(train_align=0.3, train_flip_rate=1.0)
        r.update(train_accuracy=0.5, val_accuracy=0.5, val_auc=None, val_loss=0.7, seconds=1.2)
        return r

    late = _history_header([row(1, False), row(2, True)], tmp_path / "a")
    early = _history_header([row(1, True), row(2, True)], tmp_path / "b")
    assert late == early
    assert late[0] == "epoch" and late[-1] == "seconds"


def test_a_benchmark_runs_early_warning_names_the_run(monkeypatch, tmp_path, capsys):
    # `causalign benchmark` / `demo` train many runs in one process: the trainer's
    # `warning: epoch 1: train_cg_dropped >= 0.5 …` on stderr did not say which run it
    # was about (only results.json's notes did, at the end)
    from causalign.engine import benchmark, trainer

    seen = {}

    def fake_train(data, cfg, out, resume=False, progress=True, **kw):
        seen.update(kw)
        return {"method": "erm"}

    monkeypatch.setattr(trainer, "train", fake_train)
    spec = types.SimpleNamespace(key="plus-minus/causal-align/seed0", config=None)
    benchmark.run_one(spec, tmp_path / "data", tmp_path / "run")  # type: ignore[arg-type]
    assert seen.get("name") == "plus-minus/causal-align/seed0"

    fake = types.SimpleNamespace(name="plus-minus/causal-align/seed0", _warned=set(),
                                 _exploding=lambda history: [])
    row = {"epoch": 1, "train_cg_dropped": 0.9}
    # a TrainingTroubleWarning since 1207f (the command line shows it as `warning: …`)
    with pytest.warns(TrainingTroubleWarning) as caught:
        trainer.Trainer._warn_early(fake, row)  # type: ignore[arg-type]
    text = str(caught[0].message)
    assert text.startswith("plus-minus/causal-align/seed0: epoch 1: train_cg_dropped"), text
    fake.name = None  # `causalign train`: the run is the command's own, as documented
    fake._warned = set()
    with pytest.warns(TrainingTroubleWarning) as caught:
        trainer.Trainer._warn_early(fake, row)  # type: ignore[arg-type]
    assert str(caught[0].message).startswith("epoch 1: train_cg_dropped")


def test_off_a_terminal_each_bar_prints_its_line_when_it_finishes(capsys):
    # stderr a file or pipe (CI): rich drew nothing until the display stopped, then every
    # task at once, so `causalign train`'s log was empty until training ended (CircleCI and
    # Travis stop a job after 10 minutes without output) and every line had the end's time
    from causalign.engine.progress import progress_bar

    with progress_bar() as bar:
        first = bar.add_task("epoch 1/2", total=2)
        bar.advance(first)
        assert capsys.readouterr().err == ""  # no line per update
        bar.advance(first)
        assert "epoch 1/2" in capsys.readouterr().err  # at once, not when the bar stops
        second = bar.add_task("epoch 2/2", total=1)
        bar.update(second, advance=1, description="epoch 2/2 loss 0.5")
        assert "epoch 2/2 loss 0.5" in capsys.readouterr().err
    err = capsys.readouterr().err
    assert err == "", repr(err)  # not repeated at the end, and no blank line


def test_off_a_terminal_a_long_task_prints_a_heartbeat_line(capsys, monkeypatch):
    from causalign.engine import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0, raising=False)
    with progress.progress_bar() as bar:
        task = bar.add_task("benchmark", total=3)
        bar.advance(task)
        assert "benchmark" in capsys.readouterr().err  # still running: said it is alive
        bar.advance(task, 2)
        assert "3/3" in capsys.readouterr().err
    # rich's refresh thread may still be printing a heartbeat decided just before the end
    assert "3/3" not in capsys.readouterr().err  # the finished line is not repeated


def test_off_a_terminal_a_task_nothing_advances_still_prints_heartbeats(capsys, monkeypatch):
    """A benchmark's bar advances only between runs (runs train without a bar of their
    own): heartbeats came only from updates, so a 17-minute run left a CI log silent that
    long. rich's refresh thread now prints them too."""
    import time

    from causalign.engine import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.2, raising=False)
    with progress.progress_bar() as bar:
        task = bar.add_task("plus-minus/causal-align/seed0", total=2)
        time.sleep(1.5)  # one long run: nothing advances the bar
        idle = capsys.readouterr().err
        bar.advance(task, 2)
    assert idle.count("plus-minus/causal-align/seed0") >= 2, repr(idle)
    assert "0/2" in idle


def test_off_a_terminal_a_task_without_a_total_still_shows_its_last_state(capsys):
    from causalign.engine.progress import progress_bar

    with progress_bar() as bar:
        task = bar.add_task("scanning headers", total=None)
        bar.advance(task, 5)
        assert capsys.readouterr().err == ""
    err = capsys.readouterr().err
    assert err.count("scanning headers") == 1, repr(err)
