"""Metric audit (1206): reported metrics against independent references (scikit-learn on the
model's exact scores, hand computations)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from causalign.data.format import LesionDataset
from causalign.engine.evaluate import evaluate_split, quick_metrics
from causalign.methods.base import build_method


class ConfidentModel(nn.Module):
    """Logits (0, 20 + 10·mean(x)): every sample predicted class 1 with a margin of 20–30,
    ranked by its mean intensity."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: Tensor) -> Tensor:
        s = 20 + self.scale * x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(s), s], 1)


def _margin_auc(ds: LesionDataset) -> float:
    batch = ds.batch(torch.arange(len(ds)))
    margin = 20 + 10 * batch["image"].double().flatten(1).mean(1)
    return float(roc_auc_score(batch["label"].numpy(), margin.numpy()))


def test_auc_of_a_confident_model_ranks_by_its_scores_not_float32_rounding(tiny_data):
    """Regression: `predict` and `evaluate_split` took the softmax in float32, where every
    class-1 probability with a logit margin above ~17 is exactly 1.0: the AUC of a confident
    model counted all its positives as ties (0.5 here, whatever the ranking). In float64
    margins up to ~36 keep their order."""
    ds = LesionDataset(tiny_data, "test")
    want = _margin_auc(ds)
    assert want != pytest.approx(0.5, abs=0.05)  # the case can tell ranking from ties
    model, method = ConfidentModel().eval(), build_method("erm")
    assert quick_metrics(model, method, ds, "cpu")["auc"] == pytest.approx(want, abs=1e-12)
    out = evaluate_split(model, method, ds, "cpu", saliency="gradient", fractions=(0.1,))
    assert out["auc"] == pytest.approx(want, abs=1e-12)


def test_benchmark_table_bolds_the_lowest_loss_not_the_highest():
    """Regression: "best per column in bold" took the largest mean of every metric, so a suite
    listing `test.loss` (or `test.cam_empty_fraction`) put the worst method in bold."""
    from causalign.engine.benchmark import Experiment, MethodSpec, experiment_table

    def rec(method: str, loss: float, acc: float) -> dict:
        return {"key": f"d/{method}/seed0", "dataset": "d", "method": method, "label": method,
                "setting": "default", "seed": 0, "experiments": ["t"], "status": "done",
                "metrics": {"test": {"loss": loss, "accuracy": acc,
                                     "cam_empty_fraction": loss / 10}}}

    exp = Experiment("t", "t", ["d"], [MethodSpec("erm", "erm"), MethodSpec("rrr", "rrr")],
                     [0], {"default": {}}, "method",
                     ["test.loss", "test.accuracy", "test.cam_empty_fraction"])
    t = experiment_table(exp, [rec("erm", 0.3, 0.9), rec("rrr", 0.7, 0.6)])
    # erm: lower loss, higher accuracy, fewer empty maps: best in every column
    assert t.bold == [[True, True, True], [False, False, False]]
