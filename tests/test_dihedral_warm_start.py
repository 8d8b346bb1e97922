"""Warm starts under `augment=dihedral`: cached counterfactual offsets follow each sample's
flips/transposition (image-shaped spaces), latent codes are keyed by the orientation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.engine.trainer import dihedral_augment
from causalign.errors import InputError
from causalign.explain.counterfactual import (
    CounterfactualGenerator,
    WarmStartCache,
    dihedral_code,
    dihedral_transform,
)
from causalign.methods import build_method


def _all_eight() -> torch.Tensor:
    """The 8 elements of the dihedral group as (flip_h, flip_w, swap) rows."""
    return torch.tensor([[(k >> b) & 1 for b in range(3)] for k in range(8)], dtype=torch.bool)


class _Net(nn.Module):
    """A small 2-class conv net whose output is not flip-invariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class _PoolCode(nn.Module):
    """A fixed latent "autoencoder": 2x2 average pooling, code flattened (not image-shaped)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2).flatten(1)

    def decode(self, u: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = size
        return F.interpolate(u.view(len(u), 1, h // 2, w // 2), size=(h, w))


def test_augment_records_the_transform_it_applied():
    g = torch.Generator().manual_seed(0)
    n = 32
    image = torch.rand(n, 1, 6, 6)
    batch = {"image": image, "mask": torch.rand(n, 1, 6, 6), "box_mask": torch.rand(n, 1, 6, 6),
             "label": torch.zeros(n, dtype=torch.long)}
    out = dihedral_augment(batch, g)
    t = out["dihedral"]
    assert t.dtype == torch.bool and t.shape == (n, 3) and len(set(map(tuple, t.tolist()))) == 8
    assert "dihedral" not in batch  # the input batch is not modified
    for key in ("image", "mask", "box_mask"):
        assert torch.equal(dihedral_transform(batch[key], t), out[key])
        assert torch.equal(dihedral_transform(out[key], t, inverse=True), batch[key])
    # non-square images are never transposed: no swap recorded
    wide = {"image": torch.rand(n, 1, 4, 6), "label": torch.zeros(n, dtype=torch.long)}
    out = dihedral_augment(wide, torch.Generator().manual_seed(0))
    assert not bool(out["dihedral"][:, 2].any())
    assert torch.equal(dihedral_transform(wide["image"], out["dihedral"]), out["image"])


def test_cache_returns_offsets_in_the_orientation_asked_for():
    """An offset put for a flipped sample comes back flipped back for the unflipped one."""
    cache = WarmStartCache()
    base = torch.randn(1, 1, 5, 5)
    ids = torch.zeros(8, dtype=torch.long)
    t = _all_eight()
    for k in range(8):  # stored under any orientation, read back under every one
        cache.put(ids[:1], dihedral_transform(base, t[k:k + 1]), torch.ones(1, dtype=torch.bool),
                  t[k:k + 1])
        assert torch.equal(cache.offsets[:1], base)  # canonical orientation on disk
        off, hit = cache.get(ids, torch.zeros(8, 1, 5, 5), t)
        assert bool(hit.all())
        assert torch.equal(off, dihedral_transform(base.expand(8, -1, -1, -1), t))
    with pytest.raises(InputError, match=r"dihedral must be an \(N, 3\)"):
        cache.get(ids, torch.zeros(8, 1, 5, 5), t[:, :2])


@pytest.mark.parametrize("space", ["pixel", "smooth"])
def test_generator_warm_start_follows_the_flip(space):
    """A search on x caches offset d; x flipped then starts (steps=0: stays) at flip(d)."""
    model = _Net().eval()
    x = torch.rand(4, 1, 8, 8)
    ids = torch.arange(4)
    gen = CounterfactualGenerator(model, steps=5, lr=0.05, warm_start=True, space=space)
    first = gen.generate(x, target=torch.ones(4, dtype=torch.long), ids=ids, report=False)
    d = first.u_star - first.problem.u0
    assert float(d.abs().sum()) > 0
    t = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    gen.steps = 0
    again = gen.generate(dihedral_transform(x, t), target=torch.ones(4, dtype=torch.long),
                         ids=ids, report=False, dihedral=t)
    assert bool(again.warm.all())
    assert torch.equal(again.u_star - again.problem.u0, dihedral_transform(d, t))
    # and the cache still holds the offsets of the samples as stored
    off, _ = gen.cache.get(ids, d)
    assert torch.equal(off, d)


def test_latent_codes_are_keyed_by_orientation():
    """Codes are not image-shaped: a solution warm-starts only the same orientation."""
    model = _Net().eval()
    x = torch.rand(2, 1, 8, 8)
    ids = torch.tensor([3, 5])
    gen = CounterfactualGenerator(model, steps=5, lr=0.05, warm_start=True, space="latent",
                                  autoencoder=_PoolCode())
    target = torch.ones(2, dtype=torch.long)
    t = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    first = gen.generate(dihedral_transform(x, t), target=target, ids=ids, report=False,
                         dihedral=t)
    assert not bool(first.warm.any())
    d = first.u_star - first.problem.u0
    gen.steps = 0
    same = gen.generate(dihedral_transform(x, t), target=target, ids=ids, report=False,
                        dihedral=t)
    assert bool(same.warm.all())
    assert torch.equal(same.u_star - same.problem.u0, d)
    other = torch.tensor([[0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    moved = gen.generate(dihedral_transform(x, other), target=target, ids=ids, report=False,
                         dihedral=other)
    assert not bool(moved.warm.any())  # cold: no code was solved for this input yet
    assert torch.equal(moved.u_star, moved.problem.u0)


def test_latent_orientation_keys_survive_the_data_parallel_merge():
    """The latent space keys a cache row by index × 8 + orientation; the data-parallel merge
    compared those keys with dataset indices, so each rank kept only its own rows and the
    merged cache (the checkpoint's) lost every other rank's solutions."""
    from causalign.engine.distributed import merge_method_states, touched_only

    t = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    ranks, touched = [], [torch.tensor([3, 5]), torch.tensor([4, 6])]
    for ids in touched:
        gen = CounterfactualGenerator(_Net().eval(), steps=3, lr=0.05, warm_start=True,
                                      space="latent", autoencoder=_PoolCode())
        gen.generate(dihedral_transform(torch.rand(2, 1, 8, 8), t),
                     target=torch.ones(2, dtype=torch.long), ids=ids, report=False,
                     dihedral=t)
        ranks.append({"cache": gen.cache.state_dict()})
    cut = [touched_only(s, k) for s, k in zip(ranks, touched, strict=True)]
    assert [len(c["cache"]["ids"]) for c in cut] == [2, 2]  # was [0, 0]
    merged = merge_method_states(cut, touched, own=ranks[0])["cache"]
    codes = dihedral_code(t)
    want = sorted((torch.cat(touched).view(2, 2) * 8 + codes).flatten().tolist())
    assert sorted(merged["ids"].tolist()) == want  # was rank 0's rows only
    again = CounterfactualGenerator(_Net().eval(), warm_start=True, space="latent",
                                    autoencoder=_PoolCode())
    again.cache.load_state_dict(merged)
    assert again.cache.id_stride == 8 and len(again.cache) == 4


def _batch(n: int = 6, size: int = 8, attributes: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 1:4, 2:6] = 1  # off-centre: every transform moves it
    out = {"image": torch.rand(n, 1, size, size, generator=g), "mask": mask,
           "box_mask": mask.clone(), "has_mask": torch.ones(n, dtype=torch.bool),
           "has_annotation": torch.ones(n, dtype=torch.bool),
           "label": torch.arange(n) % 2, "index": torch.arange(n) + 10}
    if attributes:
        out["attributes"] = (torch.rand(n, attributes, generator=g) > 0.5).float()
        out["attr_known"] = torch.ones(n, attributes, dtype=torch.bool)
    return out


def test_causal_align_step_on_a_flipped_batch_reuses_the_flipped_offset():
    """Step 1 solves on the batch; step 2 (no inner steps) on its augmented copy must start
    each x* at the flipped offset, so L_align (change outside the flipped mask) is the same."""
    method = build_method("causal-align", {"steps": 5, "inner_lr": 0.05, "cg_iters": 2,
                                           "distance": "l1", "align_every": 1})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 64, 2))
    batch = _batch()
    first = method(model, batch)
    assert first.parts["cf_warm"] == 0.0 and first.parts["align"] > 0
    aug = dihedral_augment(batch, torch.Generator().manual_seed(2))
    assert bool(aug["dihedral"].any())
    method.params.steps = 0
    second = method(model, aug)
    assert second.parts["cf_warm"] == 1.0
    assert second.parts["align"] == pytest.approx(first.parts["align"], rel=1e-6)


def test_hier_align_image_level_reuses_the_flipped_offset():
    from causalign.models import HierarchicalModel, MLPHead

    method = build_method("hier-align", {"steps": 5, "attr_steps": 5, "cg_iters": 2,
                                         "inner_lr": 0.05})
    torch.manual_seed(0)
    f1 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                       nn.Linear(2 * 64, 3))
    model = HierarchicalModel(f1, MLPHead(3, 2, hidden=4))
    batch = _batch(attributes=3)
    first = method(model, batch)
    assert first.parts["img_cf_warm"] == 0.0 and first.parts["img_align"] > 0
    aug = dihedral_augment(batch, torch.Generator().manual_seed(2))
    method.pixel.params.steps = 0
    second = method(model, aug)
    assert second.parts["img_cf_warm"] == 1.0
    assert second.parts["img_align"] == pytest.approx(first.parts["img_align"], rel=1e-6)


class _FlipInvariantNet(nn.Module):
    """Pixel-wise features, then a global mean: the same output for every flip and
    transposition of the input, so a flipped input's counterfactual is the flipped one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.pix = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.pix(x)).mean((2, 3)))


@pytest.mark.parametrize("optimizer", ["adam", "ista", "newton"])
def test_a_scaled_distance_is_flipped_with_the_image(optimizer):
    """scaled-l1's per-pixel scale is measured on the stored images. Under augment=dihedral
    it stayed in the stored orientation while the image was flipped, so a flipped sample
    solved another problem (a change on the left weighed by the right's scale: 2.157 against
    0.255). With the scale flipped as well, a flip-invariant model's counterfactual of the
    flipped image is the flipped counterfactual, for every optimiser."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 8, 8, generator=g)
    scale = torch.ones(1, 8, 8)
    scale[..., :4] = 0.1  # the left half barely varies in "training": changes there cost 10x
    gen = CounterfactualGenerator(_FlipInvariantNet().eval(), distance="scaled-l1",
                                  scale=scale, steps=15, lr=0.05, alpha=0.02,
                                  optimizer=optimizer)
    d = _all_eight()
    target = torch.ones(8, dtype=torch.long)
    plain = gen.generate(x0, target=target)
    flipped = gen.generate(dihedral_transform(x0, d), target=target, dihedral=d)
    torch.testing.assert_close(flipped.x_star, dihedral_transform(plain.x_star, d),
                               rtol=1e-4, atol=1e-5)
    # (float summation order differs between orientations: Newton's line search, ~4e-4)
    torch.testing.assert_close(flipped.distance, plain.distance, rtol=2e-3, atol=1e-6)
    # the flipped problem weighs each pixel by the scale of the pixel it came from
    prob = gen.problem(dihedral_transform(x0, d), target, d)
    torch.testing.assert_close(prob.scale, dihedral_transform(scale.expand(8, 1, 8, 8), d))
    assert prob.subset(torch.tensor([2, 5])).scale.shape == (2, 1, 8, 8)
