"""`causalign causal pc` shows causal-learn's own progress bar during the search (the KCI
test takes minutes at a few hundred samples, 208 s at 500, with nothing on screen) on a
terminal, and not in a log file or with --no-progress."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from causalign.causal import pc
from causalign.cli import main
from causalign.engine import trainer


def stub_search(monkeypatch, tiny_data=None) -> list[dict]:
    """causal-learn's pc replaced by a recorder of what it is asked (``indep_test``,
    ``show_progress``) returning an empty graph; with ``tiny_data``, also the run's loading
    and its pooled features (random), so `causal pc` runs without a model (the plumbing is
    under test, not the search)."""
    asked: list[dict] = []

    def fake_pc(data, alpha, indep_test, show_progress):
        asked.append({"indep_test": indep_test, "show_progress": show_progress})
        k = data.shape[1]
        return types.SimpleNamespace(G=types.SimpleNamespace(graph=np.zeros((k, k))))

    monkeypatch.setattr(pc, "_require_causallearn", lambda: fake_pc)
    if tiny_data is not None:
        monkeypatch.setattr(trainer, "load_run", lambda run, device, data: (
            None, torch.nn.Linear(1, 1), None, tiny_data))
        rng = np.random.default_rng(0)
        monkeypatch.setattr(pc, "pooled_features",
                            lambda model, method, ds, device: rng.normal(size=(len(ds), 4)))
    return asked


@pytest.fixture
def fake_search(monkeypatch, tiny_data):
    return stub_search(monkeypatch, tiny_data)


@pytest.mark.parametrize(("terminal", "flag", "want"), [
    (True, [], True), (True, ["--no-progress"], False), (False, [], False)])
def test_pc_progress_only_on_a_terminal(fake_search, monkeypatch, tmp_path, capsys,
                                        terminal, flag, want):
    """On a terminal the search gets causal-learn's progress bar; --no-progress or a
    redirected stderr (a log file: tqdm's redraws would be carriage-return lines) do not."""
    import causalign.engine.progress as progress_mod

    monkeypatch.setattr(progress_mod, "is_tty", lambda stream: terminal)
    rc = main(["causal", "pc", str(tmp_path / "run"), "--split", "train", "--out",
               str(tmp_path / "pc"), "--test", "kci", *flag])
    assert rc in (0, None), capsys.readouterr().err
    assert [a["show_progress"] for a in fake_search] == [want]


def test_pc_check_passes_show_progress_to_the_search(monkeypatch):
    """`pc_check(show_progress=True)` reaches causal-learn's pc; the default stays off."""
    asked = stub_search(monkeypatch)
    rng = np.random.default_rng(1)
    n = 40
    features, attributes = rng.normal(size=(n, 5)), rng.normal(size=(n, 2))
    labels = (attributes[:, 0] > 0).astype(int)
    pc.pc_check(features, attributes, labels, ["a", "b"], show_progress=True)
    pc.pc_check(features, attributes, labels, ["a", "b"])
    assert [a["show_progress"] for a in asked] == [True, False]
