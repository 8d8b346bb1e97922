"""Review of the 2026-12-06 evening commits (review3): what their authors missed."""

from __future__ import annotations

import pytest

from causalign.engine import benchmark as bm

_SUITE = {
    "name": "tiny",
    "defaults": {"epochs": 1, "width": 4, "batch_size": 16, "device": "cpu"},
    "datasets": {"pm": {"synth": {"n_train": 32, "n_val": 16, "n_test": 16, "size": 32,
                                  "seed": 1}}},
    "experiments": {"t": {"title": "T", "datasets": ["pm"], "seeds": [0, 1],
                          "methods": ["erm"]}},
}


def test_benchmark_stops_at_an_interrupt_hidden_behind_a_clean_up_error(tmp_path, monkeypatch):
    # 6580b78 made the CLI treat an error raised while Ctrl-C unwound as the interrupt, but
    # the benchmark's per-run net caught it first: the run was recorded as failed and the
    # next run started, so Ctrl-C did not stop the benchmark
    calls = []

    def run_one(spec, data, run_dir):
        calls.append(spec.key)
        try:
            raise KeyboardInterrupt
        finally:  # torch.save's zip writer failing its clean-up during the interrupt
            raise RuntimeError("PytorchStreamWriter failed writing file: unexpected pos")

    monkeypatch.setattr(bm, "prepare_dataset", lambda suite, name, out: tmp_path)
    monkeypatch.setattr(bm, "run_one", run_one)
    suite = bm.parse_suite(_SUITE, tmp_path, "tiny")
    with pytest.raises(KeyboardInterrupt):
        bm.run_suite(suite, tmp_path / "out", progress=False, report=False)
    assert calls == ["pm/erm/seed0"]  # the second run never started
