"""Audit 2026-12-06 (static analysis with mypy): defects found among mypy's reports."""

import numpy as np
import pytest
import torch
from torch import nn

from causalign.errors import InputError
from causalign.metrics import deletion_scores


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_deletion_scores_without_target_is_one_clear_input_error() -> None:
    # the explainers take target=None (the predicted class); deletion_scores failed in
    # torch.as_tensor with "Could not infer dtype of NoneType" (a RuntimeError)
    x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(InputError, match="target"):
        deletion_scores(_model(), x, maps, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [np.array([0, 1]), (0, 1), [0, 1], 1, np.int64(1)])
def test_deletion_scores_takes_every_target_form_its_hint_names(target: object) -> None:
    x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    out = deletion_scores(_model(), x, maps, target, fractions=(0.5,))  # type: ignore[arg-type]
    assert out[0.5].shape == (2,)
