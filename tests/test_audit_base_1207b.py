"""Audit 2026-12-07 (base): the baselines against their original papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.methods import build_method
from causalign.methods.cdep import contextual_decomposition


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_cd_sums_to_logits_with_the_conv_padding_mode(padding_mode):
    """CD must decompose the function the model computes: a conv with non-zero padding was
    propagated with zero padding, so β + γ missed the logits by 0.02–0.04."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    region = (torch.rand(2, 1, 8, 8) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(rel + irrel, model(x), atol=1e-12, rtol=0)


def test_cdep_setup_refuses_a_chain_with_a_layer_without_a_cd_rule():
    """`setup` promises to refuse an unsupported model before training: a chain with a
    LeakyReLU passed it and failed only in the first step's propagation."""
    from causalign.errors import ConfigError

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.LeakyReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="no contextual-decomposition rule for LeakyReLU"):
        build_method("cdep").setup(None, model)


def test_cd_of_a_supported_model_inside_a_chain():
    """nn.Sequential(preprocessing, cnn7) was refused ("no rule for SevenLayerCNN") although
    both parts have CD rules."""
    from causalign.models.cnn import SevenLayerCNN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), SevenLayerCNN(1, 2, width=4)).double().eval()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    region = (torch.rand(2, 1, 16, 16) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(rel + irrel, model(x), atol=1e-12, rtol=0)


def _full_mask_copy(tiny_data, tmp_path, drop_mask_of: str | None = None):
    """A copy of `tiny_data` whose training masks each cover the whole image (an inverted or
    blank-filled export); ``drop_mask_of``: a training sample left with only its box."""
    import csv
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for p in (root / "masks").glob("train_*.png"):
        Image.fromarray(np.full_like(np.array(Image.open(p)), 255)).save(p)
    if drop_mask_of is not None:
        with open(root / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if r["id"] == drop_mask_of:
                r["mask"] = ""
        with open(root / "manifest.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


ANNOTATED_BASELINES = {"rrr": "the right-reasons penalty is 0",
                       "cdep": "no background whose evidence",
                       "chang": "no counterfactual or factual image",
                       "oracle": "x·m is the full image"}


@pytest.mark.parametrize("name", sorted(ANNOTATED_BASELINES))
def test_baselines_refuse_regions_covering_every_image(name, tiny_data, tmp_path):
    """Every training mask covering its image: RRR's penalty was 0 and the oracle's x·m was
    x (both ERM under another name), CDEP penalised σ(−logit) (S = ∅), Chang's
    counterfactual was the whole image in-filled and told "not y": all trained with exit 0,
    where causal-align refuses such data. A sample whose box (no mask) leaves background,
    and the untouched data, are not refused."""
    from causalign.data.format import LesionDataset
    from causalign.errors import DataError
    from causalign.models.cnn import SevenLayerCNN

    model = SevenLayerCNN(1, 2, width=4)
    train = LesionDataset(_full_mask_copy(tiny_data, tmp_path / "full"), "train")
    with pytest.raises(DataError, match=f"{name}: every annotated training sample's mask "
                                        f"covers its whole image.*{ANNOTATED_BASELINES[name]}"):
        build_method(name).setup(train, model)
    mixed = LesionDataset(_full_mask_copy(tiny_data, tmp_path / "mixed", "train_00000"),
                          "train")
    assert not bool(mixed.has_mask[0]) and bool(mixed.has_box_or_mask[0])
    assert mixed.regions_cover_image("mask")  # causal-align's check ignores box-only samples
    build_method(name).setup(mixed, model)  # the box of train_00000 leaves background
    build_method(name).setup(LesionDataset(tiny_data, "train"), model)


def test_icnn_filter_loss_is_far_below_ce_at_the_default_lambda(tiny_data):
    """Pins what README "Baselines" now says (it claimed every λ puts the two terms on one
    scale): at λ = 1 ICNN's filter loss at initialisation is orders of magnitude below CE,
    in value and in its parameter gradient."""
    import torch.nn.functional as F

    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import iterate_batches
    from causalign.models.icnn import ICNN, filter_loss

    torch.manual_seed(0)
    batch = next(iter(iterate_batches(LesionDataset(tiny_data, "train"), 32)))
    model = ICNN(1, 2, width=16).train()
    out = build_method("icnn")(model, batch)
    assert abs(out.parts["filter"]) < 1e-3 * out.parts["ce"]
    params = list(model.parameters())
    model.interpretable.record_maps = True
    logits = model(batch["image"])
    maps = model.interpretable.last_maps
    model.interpretable.record_maps = False
    y = batch["label"]
    share = torch.stack([(y == k).float().mean() for k in range(2)])
    terms = (F.cross_entropy(logits, y), filter_loss(maps, share[model.filter_class]).mean())
    norms = [torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(
        t, params, retain_graph=True, allow_unused=True) if g is not None)) for t in terms]
    assert norms[1] < 1e-2 * norms[0]
