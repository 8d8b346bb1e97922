"""Adversarial review of the late-session features (`evaluate --temperature T`, the `pcal_`
columns, `read_manifest(limit=)`), alone and combined with the options around them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax

from causalign.data.format import read_manifest
from causalign.errors import InputError
from causalign.metrics.calibration import apply_temperature, calibrated_threshold


@pytest.mark.parametrize("t", [1e-320, 1e-310, 5e-324])
def test_a_tiny_given_temperature_scales_to_the_argmax_not_nan(t):
    """`--temperature 1e-320` (finite, > 0, so accepted) made log p / T overflow to -inf in
    every cell: `apply_temperature` gave NaN, so `predict --temperature 1e-320` wrote NaN
    probabilities with rc 0 (every image called 'benign') and `evaluate --temperature
    1e-320` failed with 'the model's outputs are not finite' behind two RuntimeWarnings.
    The limit T → 0 is the one-hot argmax (a tie shared), which it now gives."""
    p = np.array([[0.50561, 0.49439], [0.4999, 0.5001], [0.2, 0.8], [0.5, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a RuntimeWarning printed beside the CLI's line
        q = apply_temperature(p, t)
    assert np.isfinite(q).all()
    assert np.array_equal(q, [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    three = apply_temperature(np.array([[0.1, 0.3, 0.6], [0.0, 0.5, 0.5]]), t)
    assert np.array_equal(three, [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5]])
    assert calibrated_threshold(0.3, t) == 0.0 and calibrated_threshold(0.7, t) == 1.0


def test_ordinary_temperatures_scale_as_before():
    """Guard: at everyday T the max-shifted form equals softmax(log p / T) computed here
    (within 1e-15), and T = 1 is still the identity."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 50)
    for t in (0.01, 0.1081, 0.5, 2.0, 14.6, 100.0):
        assert np.allclose(apply_temperature(p, t), softmax(np.log(p) / t, axis=1),
                           rtol=0, atol=1e-15)
    assert np.array_equal(apply_temperature(p, 1), p)


def test_read_manifest_limit_zero_reads_no_record_and_a_negative_one_is_refused(tiny_data):
    """`read_manifest(root, limit=0)` returned one record (the limit was checked only after
    a record was kept), and `limit=-1` one too, silently; now 0 gives none (the header still
    checked) and a negative limit is refused naming it."""
    assert read_manifest(tiny_data, limit=0) == []
    assert len(read_manifest(tiny_data, limit=1)) == 1
    with pytest.raises(InputError, match="limit -1"):
        read_manifest(tiny_data, limit=-1)


@pytest.mark.parametrize("name", ["gradcam", "gradient"])
def test_predict_and_attribute_refuses_a_target_of_another_shape_as_attribute(name):
    """`predict_and_attribute(x, target)` with a target of 3 classes for 5 inputs raised
    torch's 'The expanded size of the tensor (5) must match the existing size (3)'
    RuntimeError, and a (1, 5) target passed, where `attribute` refuses both in one line
    ('target must hold one class per input (5), got shape (3,)'); now the same line."""
    from test_audit_volmaps_1207r import _small_cnn

    from causalign.explain import get_explainer

    x = torch.rand(5, 1, 12, 12)
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([[0, 1, 2, 0, 1]]),
                torch.zeros(5, 2, dtype=torch.long)):
        expl = get_explainer(name, _small_cnn())
        with pytest.raises(InputError) as by_attribute:
            expl.attribute(x, target=bad)
        with pytest.raises(InputError) as by_both:
            expl.predict_and_attribute(x, bad)
        assert str(by_both.value) == str(by_attribute.value)
        assert str(by_both.value).startswith("target must hold one class per input (5)")


def test_report_roc_leaves_out_a_seed_whose_test_split_holds_one_class(tmp_path):
    """The report's ROC figure averaged every seed: one seed whose test split held only
    negatives (seed 2 of erm here) made `roc_at` raise, and report.html said 'ROC curves
    for pm failed' for every method, where before (the lowest seed drawn) the figure
    came. Now that seed is left out, named under the figure, and the rest drawn."""
    from test_audit_repclin_1207q import _random_split, _run

    from causalign.report import html as report_html

    rng = np.random.default_rng(3)
    runs = [_run(tmp_path, "pm", "erm", s, None, _random_split(rng, 30)) for s in (0, 1)]
    p, _ = _random_split(rng, 30)
    runs.append(_run(tmp_path, "pm", "erm", 2, None, (p, [0] * 30)))
    runs.append(_run(tmp_path, "pm", "rrr", 0, None, _random_split(rng, 30)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        note = report_html.roc_figure_of(tmp_path, {"runs": runs}, "pm", tmp_path / "roc.png")
    assert (tmp_path / "roc.png").is_file()
    assert note == ("mean of the seeds' curves, band the min–max of the seeds' curves: erm; "
                    "one seed, band pointwise bootstrap 95 % (500 resamples): rrr; not drawn "
                    "(a test split of one class, no ROC curve): erm seed 2.")


def test_three_class_report_roc_skips_a_lowest_seed_of_one_class(tmp_path, monkeypatch):
    """Three classes: a method's lowest seed whose test split holds one class made the whole
    figure fail ('holds one class only'); its next seed is drawn, and the skipped seed is
    named under the figure."""
    from test_audit_repclin_1207q import _random_split, _run

    from causalign.report import figures
    from causalign.report import html as report_html

    rng = np.random.default_rng(4)
    p, _ = _random_split(rng, 30, classes=3)
    runs = [_run(tmp_path, "b", "erm", 0, None, (p, [2] * 30))]
    second = _random_split(rng, 30, classes=3)
    runs.append(_run(tmp_path, "b", "erm", 1, None, second))
    runs.append(_run(tmp_path, "b", "rrr", 0, None, _random_split(rng, 30, classes=3)))
    seen: list = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(curves) or real(curves, path, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        note = report_html.roc_figure_of(tmp_path, {"runs": runs}, "b", tmp_path / "roc.png")
    assert note == "not drawn (a test split of one class, no ROC curve): erm seed 0."
    (curves,) = seen
    assert list(curves) == ["erm", "rrr"]
    np.testing.assert_allclose(curves["erm"][0], second[0], atol=1e-6)  # seed 1's
    assert (tmp_path / "roc.png").stat().st_size > 5000
