"""Audit 2026-12-06 (static analysis with mypy): defects found among mypy's reports."""

import numpy as np
import pytest
import torch
from torch import nn

from causalign.metrics import deletion_scores


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_deletion_scores_without_target_scores_the_predicted_class() -> None:
    # the explainers take target=None (the predicted class); deletion_scores failed in
    # torch.as_tensor with "Could not infer dtype of NoneType" (a RuntimeError)
    torch.manual_seed(0)
    model = _model()
    x, maps = torch.rand(4, 1, 4, 4), torch.rand(4, 4, 4)
    predicted = model.eval()(x).argmax(1)
    model.train()
    out = deletion_scores(model, x, maps, None, fractions=(0.5,))
    assert torch.equal(out[0.5], deletion_scores(model, x, maps, predicted,
                                                 fractions=(0.5,))[0.5])
    assert model.training  # its mode restored


@pytest.mark.parametrize("target", [np.array([0, 1]), (0, 1), [0, 1], 1, np.int64(1)])
def test_deletion_scores_takes_every_target_form_its_hint_names(target: object) -> None:
    x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    out = deletion_scores(_model(), x, maps, target, fractions=(0.5,))  # type: ignore[arg-type]
    assert out[0.5].shape == (2,)


def test_image_split_protocol_declares_image_shape_read_only_like_lesion_dataset() -> None:
    # a settable attribute in the Protocol made every LesionDataset argument of
    # train_autoencoder / images_shape / image_chunks a type error (LesionDataset's is a
    # property): 8 of mypy's arg-type reports
    from causalign.data import LesionDataset
    from causalign.models.autoencoder import ImageSplit

    assert isinstance(LesionDataset.__dict__["image_shape"], property)
    assert isinstance(ImageSplit.__dict__.get("image_shape"), property)


def test_classification_metrics_hint_names_the_tensors_it_takes() -> None:
    import typing

    from causalign.metrics import classification_metrics

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]], requires_grad=True)
    out = classification_metrics(probs, torch.tensor([0, 1]))
    assert out["accuracy"] == 1.0 and out["auc"] == 1.0
    hints = typing.get_type_hints(classification_metrics)
    assert torch.Tensor in typing.get_args(hints["probs"])
    assert torch.Tensor in typing.get_args(hints["labels"])


def test_synth_and_box_hints_name_what_their_callers_pass() -> None:
    # generate() passes cfg.weights(), an ndarray, to label_threshold and bayes_accuracy;
    # importers pass a mask that may be None to box_of_mask (which returns None for it)
    import typing

    from causalign.data.importers.util import box_of_mask
    from causalign.data.synth import CAUSAL_WEIGHTS, bayes_accuracy, label_threshold

    w = np.asarray(CAUSAL_WEIGHTS)
    assert label_threshold(w) == label_threshold(CAUSAL_WEIGHTS)
    assert 0.5 < bayes_accuracy(0.3, 0.5, w) <= 1.0
    for fn in (label_threshold, bayes_accuracy):
        assert np.ndarray in typing.get_args(typing.get_type_hints(fn)["weights"])
    assert box_of_mask(None) is None and box_of_mask(np.zeros((3, 3), bool)) is None
    assert type(None) in typing.get_args(typing.get_type_hints(box_of_mask)["mask"])
