"""Mutation audit of the last merged code (the resume's best.pt fit check and the final
evaluation's, the multi-view model's inference chunking, the training curves' guidance legend
beside the panel): behaviours the earlier tests let slip."""

from __future__ import annotations

import pytest
import torch
from test_audit_curvlegend_1207r import (
    test_guidance_legend_goes_beside_the_panel_past_five_terms as _legend_check,
)
from test_resume_audit import _cfg as _audit_cfg
from test_resume_audit import best_elsewhere  # noqa: F401 (fixture)

from causalign.engine import train
from causalign.engine.trainer import Trainer, load_checkpoint, state_dict_mismatch
from causalign.errors import CausalignError
from causalign.io import atomic_torch_save
from causalign.models.multiview import MultiViewCNN

# ---------------------------------------------------------------- the final evaluation


@pytest.fixture
def finished_best_elsewhere(tiny_data, tmp_path, monkeypatch):
    """A 2-epoch run killed after its last epoch, before the final evaluation (no
    metrics.json), its best epoch relabelled 1: only best.pt holds it, no epoch is left."""
    run = tmp_path / "run"

    def stop(self, progress):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_final_evaluation", stop)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_data, _audit_cfg(epochs=2), run, progress=False)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and not (run / "metrics.json").exists()
    atomic_torch_save(run / "checkpoint.pt", {**ckpt, "best_epoch": 1, "best_score": 2.0})
    return run


@pytest.mark.parametrize("content", ["foreign", "no-weights"])
def test_final_evaluation_names_a_best_pt_that_does_not_fit_in_one_line(
        finished_best_elsewhere, tiny_data, content):
    """No epoch left (the resume's best.pt check is skipped) and best.pt replaced: the final
    evaluation refuses it with its own one-line CausalignError, never load_state_dict's
    traceback or a KeyError. Kills: the final evaluation's mismatch check dropped
    (RuntimeError), its "no model weights" replaced by None (KeyError 'model'), and
    `_check_best`'s `epoch >= epochs` made `>` (its "only copy" message instead)."""
    run = finished_best_elsewhere
    foreign = MultiViewCNN(width=4).state_dict()  # another architecture
    best = {"epoch": 1, "model": foreign} if content == "foreign" else {"epoch": 1}
    atomic_torch_save(run / "best.pt", best)
    with pytest.raises(CausalignError) as info:
        train(tiny_data, _audit_cfg(epochs=2), run, resume=True, progress=False)
    msg = str(info.value)
    assert "best.pt: does not fit the model" in msg and "use a new --out" in msg
    assert "only copy" not in msg and "\n" not in msg
    expected = "parameter names differ" if content == "foreign" else "no model weights"
    assert expected in msg
    assert not (run / "metrics.json").exists()


# ---------------------------------------------------------------- the guidance legend


def test_six_guidance_terms_already_put_the_legend_beside_the_panel(monkeypatch, tmp_path):
    """The threshold is "more than five": six terms (one past it: rrr, con, ad, align,
    attr_align, img_align) go beside the panel and widen the figure. The earlier test drew
    five and seven, so a threshold moved to six (`> _LEGEND_INSIDE + 1`) passed it."""
    _legend_check(monkeypatch, tmp_path, n_ppi_terms=2, beside=True)


# ---------------------------------------------------------------- the resume's best.pt check


def test_resume_refuses_an_earlier_best_pt_without_weights_in_one_line(
        best_elsewhere, tiny_data):  # noqa: F811 (the fixture)
    """best.pt of the right epoch but with no "model" entry (a dict another tool wrote) is
    refused before training as "holds no weights of epoch 1", never an AttributeError in
    state_dict_mismatch. Kills `_best_problem` without its `isinstance(best.get("model"),
    dict)` test."""
    atomic_torch_save(best_elsewhere / "best.pt", {"epoch": 1, "weights": {}})
    with pytest.raises(CausalignError, match="best.pt: holds no weights of epoch 1; it is "
                                             "the only copy of the run's best epoch 1"):
        train(tiny_data, _audit_cfg(epochs=3), best_elsewhere, resume=True, progress=False)
    ckpt = torch.load(best_elsewhere / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2  # nothing trained


def test_state_dict_mismatch_names_unexpected_keys_alone():
    """A state with every parameter of the model plus one more (no missing name, no shape
    difference) does not fit: strict load_state_dict refuses it, so the check must say so
    ("unexpected …"). Kills `if missing or unexpected` reduced to `if missing`."""
    model = MultiViewCNN(width=4)
    state = {**model.state_dict(), "extra.weight": torch.zeros(2)}
    assert state_dict_mismatch(model, state) == (
        "names", "parameter names differ: unexpected extra.weight")
    assert state_dict_mismatch(model, model.state_dict()) is None
