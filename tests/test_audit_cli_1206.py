"""CLI discoverability (audit 2026-12-06): a misspelt name says which one was meant, the
tool says its version, and --help names every method, model and saliency it accepts."""

from __future__ import annotations

import pytest
from test_cli_edges import _assert_user_error, _run

from causalign.engine.config import TrainConfig, apply_overrides
from causalign.errors import CausalignError, did_you_mean

# ---------------------------------------------------------------- "did you mean"


@pytest.mark.parametrize(("sets", "meant"), [
    # Before: 32 valid method.* keys listed, the meant one nowhere near the typo
    (["--method", "causal-align", "--set", "method.lamm=1"], "did you mean 'method.lam'?"),
    (["--method", "causal-align", "--set", "method.stepz=3"], "did you mean 'method.steps'"),
    (["--method", "causal-algn"], "did you mean 'causal-align'?"),
    (["--set", "epoch=3"], "did you mean 'epochs'?"),
    (["--model", "resnet"], "did you mean 'resnet18'?"),
    (["--set", "eval_saliency=gradcm"], "did you mean 'gradcam'?"),
    (["--set", "scheduler=cosin"], "did you mean 'cosine'?"),
])
def test_a_misspelt_train_setting_names_the_closest_valid_one(tmp_path, capsys, sets, meant):
    # refused before the data is read: the folder need not exist
    rc, out, err = _run(capsys, "train", tmp_path / "no_data", "--out", tmp_path / "run", *sets)
    _assert_user_error(rc, err, meant)
    assert "valid: " in err or "must be cosine or none" in err  # every choice still named
    assert not (tmp_path / "run").exists()


def test_select_metric_names_the_bad_value_and_the_meant_one():
    # Before: "select_metric must be balanced_accuracy, accuracy, auc or loss" (no value)
    with pytest.raises(CausalignError, match=r"got 'AUC'; did you mean 'auc'\?"):
        apply_overrides(TrainConfig(), {"select_metric": "AUC"})


@pytest.mark.parametrize(("argv", "meant"), [
    (["counterfactual", "TMP/run", "--distance", "L1"], "did you mean 'l1'?"),
    (["counterfactual", "TMP/run", "--optimizer", "adm"], "did you mean 'adam'?"),
    (["data", "synth", "TMP/out", "--shortcut", "plusminus"], "did you mean 'plus-minus'?"),
    (["counterfactual", "TMP/run", "--space", "zzz"], None),
])
def test_misspelt_option_values_name_the_closest_one(tmp_path, capsys, argv, meant):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    rc, _, err = _run(capsys, *argv)
    if meant is None:  # no close name: no suggestion, the usual message
        assert rc == 2 and "did you mean" not in err
        return
    _assert_user_error(rc, err, meant)


def test_did_you_mean_ignores_case_takes_stems_and_stays_quiet_when_nothing_is_close():
    assert did_you_mean("Test", ["train", "val", "test"]) == "; did you mean 'test'?"
    assert did_you_mean("lrp", ["lrp-epsilon", "lrp-flat", "gradcam"]) == \
        "; did you mean 'lrp-epsilon' or 'lrp-flat'?"
    assert did_you_mean("zzz", ["train", "val", "test"]) == ""
    assert did_you_mean("lamm", ["lam", "alpha"], "method.") == "; did you mean 'method.lam'?"


def test_an_unknown_split_names_the_meant_one(tiny_data):
    from causalign.data.format import LesionDataset

    with pytest.raises(CausalignError, match=r"unknown split 'tset'.*did you mean 'test'\?"):
        LesionDataset(tiny_data, "tset")
