"""A setting with a short list of choices names the closest one when misspelt.

These messages listed the choices but not the one meant (`method.distance=L1` against
"l1, scaled-l1, l2, scaled-l2, smooth-l1"); the longer lists (methods, settings, saliency
names) already did. One line each, and the value given is still quoted.
"""

from __future__ import annotations

import pytest

from causalign.data.importers.brats import BratsOptions
from causalign.data.importers.cub import CubOptions
from causalign.data.importers.folder import FolderOptions
from causalign.data.importers.lidc import LidcOptions
from causalign.engine.config import TrainConfig
from causalign.errors import CausalignError, ConfigError, DataError, not_one_of
from causalign.methods.base import build_method

METHOD_CASES = [
    ("causal-align", "distance", "L1", "l1"),
    ("causal-align", "hvp", "finite_difference", "finite-difference"),
    ("causal-align", "inner_optimizer", "Adam", "adam"),
    ("causal-align", "space", "pixels", "pixel"),
    ("causal-align", "bn", "Batch", "batch"),
    ("causal-align", "negative_curvature", "gauss_newton", "gauss-newton"),
    ("causal-align", "normalize", "totl", "total"),
    ("causal-align", "region", "boxes", "box"),
    ("causal-align", "align_on", "positives", "positive"),
    ("causal-align", "cache_device", "CPU", "cpu"),
    ("causal-align", "cache_dtype", "flaot16", "float16"),
    ("hier-align", "distance", "scaled_l2", "scaled-l2"),
    ("hier-align", "ccce_model", "logistc", "logistic"),
    ("hier-align", "attr_normalize", "Total", "total"),
    ("ppi", "saliency", "grad-cam", "gradcam"),
    ("ppi", "mask", "sofft", "soft"),
    ("ppi", "contrast_on", "positives", "positive"),
    ("chang", "fill", "shufle", "shuffle"),
    ("oracle", "region", "Mask", "mask"),
    ("rrr", "region", "boxs", "box"),
    ("cdep", "region", "masks", "mask"),
]


@pytest.mark.parametrize(("method", "key", "value", "meant"), METHOD_CASES)
def test_a_misspelt_method_choice_names_the_closest(method, key, value, meant):
    with pytest.raises(ConfigError) as err:
        build_method(method, {key: value})
    msg = str(err.value)
    assert msg.startswith(f"method.{key} must be ")
    assert f"got '{value}'" in msg
    # the closest is named first (scaled_l2: 'scaled-l2' or 'scaled-l1')
    assert f"; did you mean '{meant}'" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(("options", "key", "value", "meant"), [
    (LidcOptions, "mask_rule", "concensus", "consensus"),
    (LidcOptions, "label", "malignant", "malignancy"),
    (CubOptions, "mask", "segmentaton", "segmentation"),
    (CubOptions, "crop", "Box", "box"),
    (BratsOptions, "mode", "volume", "volumes"),
    (BratsOptions, "task", "tumour", "tumor"),
    (BratsOptions, "region", "WT", "wt"),
    (FolderOptions, "color", "grey", "gray"),
    (FolderOptions, "image_format", "PNG", "png"),
])
def test_a_misspelt_importer_choice_names_the_closest(options, key, value, meant):
    with pytest.raises(DataError) as err:
        options(**{key: value}).validate()
    msg = str(err.value)
    assert msg.startswith(f"--{key.replace('_', '-')} must be ")
    assert msg.endswith(f"got '{value}'; did you mean '{meant}'?"), msg


@pytest.mark.parametrize(("key", "value", "meant"), [
    ("select_metric", "AUC", "auc"),
    ("scheduler", "cosin", "cosine"),
    ("augment", "dihedal", "dihedral"),
])
def test_a_misspelt_training_choice_names_the_closest(key, value, meant):
    with pytest.raises(CausalignError) as err:
        TrainConfig(**{key: value}).validate()
    assert str(err.value).endswith(f"got '{value}'; did you mean '{meant}'?"), str(err.value)


def test_the_choice_message_lists_two_with_or_and_more_with_one_of():
    assert not_one_of("k", "x", ("a", "b")) == "k must be a or b, got 'x'"
    assert not_one_of("k", "x", ("a", "b", "c")) == "k must be one of a, b, c, got 'x'"
    # nothing close: no suggestion
    assert not_one_of("method.bn", "zzz", ("batch", "running")) == (
        "method.bn must be batch or running, got 'zzz'")
