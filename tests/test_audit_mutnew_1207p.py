"""Mutation audit of the bootstrap / ECE-bins / compare calibration / PC test / bench and
benchmark code of the last sessions: behaviours the earlier tests let slip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causalign.engine import bench
from causalign.metrics import bootstrap_ci
from causalign.metrics.classification import BOOTSTRAP_METRICS

# ------------------------------------------------------------- evaluate --bootstrap


def test_evaluate_split_bootstrap_resamples_each_samples_own_deletion_with_the_bins(
        tiny_data, tmp_path, monkeypatch):
    """`evaluate_split(bootstrap=N, ece_bins=K)`: ``ci95.deletion[frac]`` is `bootstrap_ci`'s
    interval of the per-sample drops in the split's order (the same draws as accuracy),
    ``ci95.ece`` uses the K bins, and ``ci95`` holds the classification, localisation and
    ``deletion`` entries only (no internal ``deletion@f`` key). The drops are stubbed by a
    per-sample value of the input, so the reference is computed here from the same values.
    Kills: the drops misaligned with their samples (reversed), the ECE interval with 15 bins
    whatever ``ece_bins``, and the ``deletion@f`` keys left in ci95."""
    import causalign.engine.evaluate as ev
    from causalign.data.format import LesionDataset
    from causalign.methods import build_method

    seen: dict[float, list[torch.Tensor]] = {0.1: [], 0.2: []}

    def fake_deletion(model, x, maps, pred, fractions, fill=0.0, logits=None):
        # one value per sample, different for every image and fraction
        out = {f: x.flatten(1).std(1).double() * (1 + 10 * f) for f in fractions}
        for f, v in out.items():
            seen[f].append(v.clone())
        return out

    monkeypatch.setattr(ev, "deletion_scores", fake_deletion)
    ds = LesionDataset(tiny_data, "test")
    torch.manual_seed(0)
    # a linear model with spread confidences (a 1-epoch CNN's all sit near 0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2)).eval()
    with torch.no_grad():
        model[1].weight.mul_(40.0)
    batch = ds.batch(torch.arange(len(ds)))
    with torch.no_grad():
        probs = model(batch["image"]).double().softmax(1).numpy()
    y = batch["label"].numpy()
    # a count whose interval differs from 15 bins' on these predictions
    plain = bootstrap_ci(probs, y, 100, 2)["ci95"]["ece"]
    bins = next(k for k in (7, 40, 200, 1000, 5000)
                if bootstrap_ci(probs, y, 100, 2, ece_bins=k)["ci95"]["ece"] != plain)
    out = ev.evaluate_split(model, build_method("erm"), ds, "cpu", saliency="gradient",
                            fractions=(0.1, 0.2), batch_size=5, bootstrap=100,
                            bootstrap_seed=2, ece_bins=bins,
                            predictions=tmp_path / "p.csv")
    written = ev.read_predictions(tmp_path / "p.csv")
    assert np.array_equal(written.labels, y)
    np.testing.assert_allclose(written.probs, probs, atol=1e-5)
    # the reference resamples evaluate's own probabilities (of batches of 5: float32 rounding
    # apart from the whole-split forward above), read back at full precision
    probs = written.probs
    drops = {f"deletion@{f:g}": torch.cat(v).numpy() for f, v in seen.items()}
    ref = bootstrap_ci(probs, y, 100, 2, per_sample=drops, ece_bins=bins)["ci95"]
    ci = out["ci95"]
    assert set(ci) == {*BOOTSTRAP_METRICS, *ev.LOCALISATION_METRICS, "cam_empty_fraction",
                       "deletion"}
    assert set(ci["deletion"]) == {"0.1", "0.2"}
    for f in ("0.1", "0.2"):
        assert ci["deletion"][f] == pytest.approx(ref[f"deletion@{f}"], abs=1e-12), f
        assert out["deletion"][f] == pytest.approx(drops[f"deletion@{f}"].mean(), abs=1e-6)
    assert ci["ece"] == pytest.approx(ref["ece"], abs=1e-9)
    assert ci["ece"] != pytest.approx(bootstrap_ci(probs, y, 100, 2)["ci95"]["ece"], abs=1e-9)
    assert out["ece_bins"] == bins


# ------------------------------------------------------------------------ bench step


class _LoggedStep:
    """A _TimedStep whose k-th call takes TIMES[name][k] seconds, logging each call."""

    TIMES: dict[str, list[float]] = {}
    calls: list[str] = []

    def __init__(self, method_name, batch, cfg, info, device, method_args=None):
        self.name, self.k = method_name, 0

    def __call__(self) -> float:
        self.k += 1
        _LoggedStep.calls.append(self.name)
        return _LoggedStep.TIMES[self.name][self.k - 1]


def test_bench_warms_up_the_method_too_and_alternates_every_step(monkeypatch):
    """The warm-up steps run for ERM *and* the method, alternated like the timed ones
    (ERM, method, ERM, method, ...), and stay out of both medians: the method's slow first
    step (100 s) is not timed. Kills: only ERM warmed up (the method's warm-up step timed:
    median 51.5 s instead of 4 s), and the timed steps' order swapped."""
    _LoggedStep.calls = []
    _LoggedStep.TIMES = {"erm": [100.0, 1.0, 2.0], "rrr": [100.0, 3.0, 5.0]}
    monkeypatch.setattr(bench, "_TimedStep", _LoggedStep)
    r = bench.bench_step("rrr", size=16, batch_size=2, steps=2, warmup=1, device="cpu")
    assert _LoggedStep.calls == ["erm", "rrr"] * 3
    assert r["seconds_per_step"] == float(np.median([3.0, 5.0])) == 4.0
    assert r["erm_seconds_per_step"] == 1.5
    assert r["ratio_to_erm"] == pytest.approx(4.0 / 1.5)


def test_profiled_step_ms_is_the_mean_of_the_profiled_steps(monkeypatch):
    """``profiled_step_ms`` is 1000 × the *mean* of the profiled run's timed steps (its
    docstring: "that run's mean step"), not their median; the timed medians are unchanged by
    the profiled run. Kills: fmean → median (3000 ms vs 1000 ms here)."""
    import contextlib
    import types

    prof = types.SimpleNamespace(key_averages=lambda: [])  # no named part occurred
    monkeypatch.setattr(torch.profiler, "profile", lambda **k: contextlib.nullcontext(prof))
    _LoggedStep.calls = []
    _LoggedStep.TIMES = {"erm": [9.0, 1.0, 1.0, 1.0], "rrr": [9.0, 1.0, 1.0, 7.0]}
    monkeypatch.setattr(bench, "_TimedStep", _LoggedStep)
    r = bench.bench_step("rrr", size=16, batch_size=2, steps=3, warmup=1, device="cpu",
                         profile=True)
    assert r["seconds_per_step"] == 1.0
    assert r["profiled_step_ms"] == pytest.approx(1e3 * np.mean([1.0, 1.0, 7.0]))
    assert r["profile_ms_per_step"] == {}


# ------------------------------------------------------------------------- PC --test


def test_run_pc_check_refuses_an_unknown_test_before_reading_the_run(tmp_path):
    """The API checks ``indep_test`` before loading the run (as the CLI does): a missing
    run with ``indep_test="gsq"`` names the test, not the run. Kills: run_pc_check's own
    up-front check without the test (the error became the missing run's)."""
    from causalign.causal.pc import run_pc_check
    from causalign.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown independence test 'gsq'"):
        run_pc_check(tmp_path / "no-such-run", indep_test="gsq")


def test_cli_causal_pc_test_reaches_causal_learn(tiny_data, tmp_path, monkeypatch, capsys):
    """`causal pc RUN --test kci` hands indep_test="kci" to causal-learn's pc and records it
    in pc_check.json; the default hands "fisherz". causal-learn's pc, the run's loading and
    its pooled features are stubbed (KCI itself is slow; the plumbing is what is pinned).
    Kills: the CLI's --test or run_pc_check's indep_test not passed on (Fisher-z ran
    whatever was asked)."""
    import json

    from test_audit_pcprogress_1207r import stub_search

    from causalign.cli import main

    asked = stub_search(monkeypatch, tiny_data)
    for extra, want in (([], "fisherz"), (["--test", "kci"], "kci")):
        out = tmp_path / f"pc-{want}"
        rc = main(["causal", "pc", str(tmp_path / "run"), "--split", "train", "--out",
                   str(out), *extra])
        assert rc in (0, None), capsys.readouterr().err
        assert asked and asked[-1]["indep_test"] == want
        assert json.loads((out / "pc_check.json").read_text())["indep_test"] == want


# ------------------------------------------------------------------ benchmark resume


def test_run_one_collects_a_finished_run_without_training_it(tmp_path, monkeypatch):
    """A run folder with metrics.json (of the same settings and data) is collected: its
    metrics are returned and nothing is trained; of other settings it is refused, naming
    them. `train` is stubbed to fail if called. Kills: the finished run's metrics not
    returned (it was silently retrained, the table unchanged); the settings part is a guard
    (test_benchmark.py also kills skipping that check)."""
    import json
    import types

    import causalign.engine.trainer as trainer
    from causalign.engine import benchmark as bm
    from causalign.errors import ConfigError

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    diffs: list[str] = []
    monkeypatch.setattr(trainer, "train", no_training)
    monkeypatch.setattr(trainer, "settings_diff", lambda run_dir, cfg: list(diffs))
    monkeypatch.setattr(bm, "_data_diff", lambda run_dir, data, digests=None: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.75}}))
    spec = types.SimpleNamespace(key="d/erm/seed0", config=object())
    got = bm.run_one(spec, tmp_path / "data", run_dir)  # type: ignore[arg-type]
    assert got == {"test": {"accuracy": 0.75}}
    diffs.append("lr: 0.001 → 0.01")
    with pytest.raises(ConfigError, match="holds a finished run with other settings "
                                          r"\(lr: 0.001 → 0.01\)"):
        bm.run_one(spec, tmp_path / "data", run_dir)  # type: ignore[arg-type]
