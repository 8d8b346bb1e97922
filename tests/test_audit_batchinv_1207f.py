"""Audit: a per-sample result (saliency map, counterfactual, CG solve, metric, prediction)
must not depend on which other samples share its batch, or on the batch size.

Batched results are compared with the same samples in batches of 3 beside very different
companions (noise, constant images, NaN-prone ones). float64 models for the iterative
searches: in float32 the convolution kernels differ with the batch size in the last bit and a
non-convex search can amplify that (README, Reproducibility), which is not a batch coupling.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.data import LesionDataset
from causalign.errors import InputError
from causalign.explain import CounterfactualGenerator, get_explainer
from causalign.explain.base import explainer_names
from causalign.implicit import batched_cg
from causalign.metrics import cam_precision
from causalign.metrics.faithfulness import deletion_scores
from causalign.models.cnn import SevenLayerCNN


@pytest.fixture(scope="module")
def setup(tiny_data):
    """A width-4 SevenLayerCNN after two quick epochs, 8 test images and 8 companions."""
    torch.manual_seed(0)
    train = LesionDataset(tiny_data, "train")
    model = SevenLayerCNN(width=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for start in range(0, len(train), 16):
            b = train.batch(torch.arange(start, min(start + 16, len(train))))
            loss = nn.functional.cross_entropy(model(b["image"]), b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = LesionDataset(tiny_data, "test").batch(torch.arange(16))
    x = test["image"][:8].float()
    g = torch.Generator().manual_seed(1)
    comp = torch.cat([test["image"][8:12].float(), torch.randn(2, *x.shape[1:], generator=g) * 5,
                      torch.zeros(1, *x.shape[1:]), torch.full((1, *x.shape[1:]), 50.0)])
    return model, x, comp, test


def _in_threes(fn, x: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """fn's result for each x[i] computed in a batch [companion, x[i], companion]."""
    rows = []
    for i in range(len(x)):
        a, b = comp[i % len(comp)], comp[(i + 3) % len(comp)]
        rows.append(fn(torch.stack([a, x[i], b]))[1:2])
    return torch.cat(rows)


@pytest.mark.parametrize("name", [n for n in explainer_names() if n != "counterfactual"])
def test_saliency_maps_do_not_depend_on_batch_companions(setup, name: str) -> None:
    """Guard: every gradient/LRP/CAM map of a sample is the same in a batch of 8, alone and
    beside noise or constant images (measured: ≤ 6e-7 relative alone, 0 in batches of 3)."""
    model, x, comp, _ = setup
    explainer = get_explainer(name, model)
    fn = lambda xb: explainer.attribute(xb, target=0).detach()  # noqa: E731
    full = fn(x)
    alone = torch.cat([fn(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    torch.testing.assert_close(_in_threes(fn, x, comp), full, rtol=1e-5,
                               atol=1e-5 * float(full.abs().max()))


class _NaNProne(nn.Module):
    """Finite logits for ordinary images; NaN for a sample with a pixel above 1e3."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * (1 + 0 * torch.log(1e3 - x.flatten(1).amax(1, keepdim=True)))


@pytest.mark.parametrize(("optimizer", "distance", "space", "steps"), [
    ("adam", "l1", "pixel", 30), ("ista", "l1", "pixel", 30), ("newton", "l2", "pixel", 4),
    ("adam", "l1", "smooth", 20), ("newton", "l1", "pixel", 4)])
def test_counterfactuals_do_not_depend_on_batch_companions(setup, optimizer, distance, space,
                                                           steps) -> None:
    """Guard: each sample's x*, flipped and diverged flags are its own, alone or beside a
    NaN-prone companion whose search diverges (float64: ≤ 4e-12 in the audit)."""
    model, x, comp, _ = setup
    base = __import__("copy").deepcopy(model).double()
    net = _NaNProne(base).eval()
    x, comp = x.double(), comp.double()
    bad = torch.full((2, *x.shape[1:]), 2e3, dtype=torch.float64)
    comp = torch.cat([comp, bad])
    gen = CounterfactualGenerator(net, steps=steps, lr=0.05, alpha=0.01, optimizer=optimizer,
                                  distance=distance, space=space, polish=1)

    def fn(xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = 1 - base(xb).argmax(1)
        r = gen.generate(xb, target=target)
        flags = torch.stack([r.flipped, r.diverged], 1).double()
        return torch.cat([r.x_star.flatten(1), flags], 1)

    full = fn(x)
    assert (full[:, -1] == 0).all() and (full[:, :-2] != x.flatten(1)).any()
    with_bad = fn(torch.cat([bad[:1], x[:2]]))
    assert with_bad[0, -1] == 1  # the companion's search did diverge
    torch.testing.assert_close(with_bad[1:], full[:2], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_in_threes(fn, x, comp.flip(0)), full, rtol=1e-9,
                               atol=1e-9)
    alone = torch.cat([fn(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, full[:3], rtol=1e-9, atol=1e-9)


def test_batched_cg_solutions_do_not_depend_on_batch_companions() -> None:
    """Guard: a sample's CG solution and convergence flag are the same beside an
    ill-conditioned, an indefinite (breakdown) and a NaN system (only `iterations`, the
    batch's loop count, is batch-level, as CGResult documents)."""
    torch.manual_seed(0)
    a = torch.rand(11, 40, dtype=torch.float64) + 0.1
    a[8] = torch.rand(40, dtype=torch.float64) * 1e6 + 1e-6
    a[9] = -a[9]
    a[10] = float("nan")
    b = torch.randn(11, 40, dtype=torch.float64)

    def solve(idx: list[int]):
        return batched_cg(lambda p: a[idx] * p, b[idx], max_iter=40, tol=1e-8)

    full = solve(list(range(8)))
    for i in range(8):
        for idx in ([i], [8, i, 9], [10, i], [i, 9, 10, 8]):
            r = solve(idx)
            k = idx.index(i)
            assert torch.equal(r.solution[k], full.solution[i])
            assert bool(r.converged[k]) == bool(full.converged[i])
            assert bool(r.breakdown[k]) == bool(full.breakdown[i]) is False


def test_cam_precision_and_deletion_do_not_depend_on_batch_companions(setup) -> None:
    """Guard: cam_precision (per-map normalisation) and deletion drops (per-sample order)."""
    model, x, comp, test = setup
    xs = torch.cat([x, comp])
    maps = get_explainer("gradcam", model).attribute(xs, target=0).detach()[:, 0]
    ann = torch.cat([test["box_mask"][:8, 0], test["box_mask"][:8, 0]]).float()

    def both(idx: torch.Tensor) -> torch.Tensor:
        drops = deletion_scores(model, xs[idx], maps[idx], None)
        return torch.cat([cam_precision(maps[idx], ann[idx])[:, None],
                          torch.stack(list(drops.values()), 1).double()], 1)

    full = both(torch.arange(8))
    mixed = torch.cat([both(torch.tensor([8 + i, i, 8 + (i + 5) % 8]))[1:2] for i in range(8)])
    torch.testing.assert_close(mixed, full, rtol=1e-5, atol=1e-6)


def _bn_without_running_stats() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam"])
def test_gradient_maps_refuse_batchnorm_without_running_statistics(name: str) -> None:
    """A BatchNorm with track_running_stats=False normalises over the batch even in eval mode:
    a sample's gradient / input-x-gradient / Grad-CAM map changed with its batch-mates (by
    0.89–1.0 of the map's maximum, SevenLayerCNN width 4), silently, while wbp, lrp-* and the
    counterfactual map refused such a model. Refused now for a batch, as they do; one sample
    at a time still works."""
    model = _bn_without_running_stats()
    x = torch.rand(4, 1, 12, 12)
    with pytest.raises(InputError, match=r"BatchNorm '1' has no running statistics.*"
                                         r"one sample at a time"):
        get_explainer(name, model).attribute(x, target=1)
    if name == "gradcam":
        with pytest.raises(InputError, match="no running statistics"):
            get_explainer(name, model).predict_and_attribute(x)
    one = get_explainer(name, model).attribute(x[:1], target=1)
    assert one.shape[0] == 1 and torch.isfinite(one).all()
    assert not model.training


def test_deletion_refuses_batchnorm_without_running_statistics() -> None:
    """deletion_scores of such a model: a sample's drops depended on its batch-mates (0.89
    of the largest drop in the audit). Refused for a batch; one sample at a time works."""
    model = _bn_without_running_stats()
    x = torch.rand(4, 1, 12, 12)
    with pytest.raises(InputError, match="no running statistics.*one sample at a time"):
        deletion_scores(model, x, x[:, 0], 1)
    drops = deletion_scores(model, x[:1], x[:1, 0], 1)
    assert all(v.shape == (1,) for v in drops.values())


def test_ppi_adversarial_mask_comes_from_another_image_of_the_batch() -> None:
    """Guard (by design, README): L_ad pairs each image with another image's mask of the same
    batch (a derangement: never its own), and a batch of one has no L_ad."""
    from causalign.methods.ppi import derangement

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 16):
        perm = derangement(n, generator=g)
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != torch.arange(n)).all()
