"""Audit (integ, 2026-12-07): causalign's pieces inside a user's own PyTorch loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.explain import CounterfactualGenerator
from causalign.models.autoencoder import train_autoencoder


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_latent_counterfactuals_under_bf16_autocast():
    # the code u0 and D(u0) were taken under the caller's autocast (bfloat16) while the
    # search runs without it: the decoder failed ("Input type (c10::BFloat16) and bias type
    # (float) should be the same"), so causal-align space=latent broke under autocast
    x = _images()
    ae = train_autoencoder(x, epochs=1)
    gen = CounterfactualGenerator(_classifier(), steps=3, space="latent", autoencoder=ae)
    ref = gen.generate(x, target=torch.ones(4, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = gen.generate(x, target=torch.ones(4, dtype=torch.long))
    assert res.x_star.dtype == torch.float32
    torch.testing.assert_close(res.x_star, ref.x_star)


@pytest.mark.parametrize("context", ["no_grad", "autocast"])
def test_train_autoencoder_ignores_the_callers_grad_and_autocast(context):
    # causal-align fits its latent autoencoder lazily in the first loss call: under
    # torch.no_grad() (a validation pass first) that failed with "element 0 of tensors does
    # not require grad"; under bf16 autocast it trained another (bfloat16) autoencoder
    x = _images(8)
    ref = train_autoencoder(x, epochs=2)
    ctx = torch.no_grad() if context == "no_grad" else torch.autocast("cpu",
                                                                     dtype=torch.bfloat16)
    with ctx:
        ae = train_autoencoder(x, epochs=2)
    assert ae.train_mse == pytest.approx(ref.train_mse, rel=1e-6)
    for a, b in zip(_weights(ae), _weights(ref), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("space", ["latent", "smooth"])
def test_alignment_gradient_unchanged_by_bf16_autocast(space):
    # ∇_u L_align (`_outer_grad`) decoded u* under the caller's autocast: in bfloat16 the
    # rounding of D(u*) − D(u0) swamped the change and the latent alignment gradient was 69 %
    # off (the smooth space's blur 0.09 %), while the search and CG already ran without it
    from causalign.methods import build_method

    x = _images()
    region = torch.zeros_like(x)
    region[..., 4:10, 4:10] = 1
    method = build_method("causal-align", {"space": space, "warm_start": False})
    if space == "latent":
        method.autoencoder = train_autoencoder(x, epochs=1)
    model = _classifier()
    target = torch.tensor([1, 0, 1, 0])
    grads = []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            term, _ = method.alignment(model, x, target, region, None)
        term.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * float(grads[0].norm()))


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    from causalign.data import LesionDataset, SynthConfig, generate

    root = tmp_path_factory.mktemp("integ")
    generate(root, SynthConfig(n_train=8, n_val=2, n_test=2, size=32, seed=0))
    return LesionDataset(root, "train")


def test_hier_align_loss_under_bf16_autocast(train_split):
    # f1 gave bfloat16 attribute probabilities under autocast and Eq. 6's search, run
    # without autocast, failed in f2's Linear ("mat1 and mat2 must have the same dtype, but
    # got BFloat16 and Float"): hier-align could not be used in an autocast training loop
    from causalign.methods import build_method
    from causalign.models import HierarchicalModel
    from causalign.models.mlp import MLPHead

    torch.manual_seed(0)
    f1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                       nn.Flatten(), nn.Linear(4, train_split.attributes.shape[1]))
    model = HierarchicalModel(f1, MLPHead(train_split.attributes.shape[1], 2, hidden=8))
    method = build_method("hier-align", {"steps": 2, "attr_steps": 3, "warm_start": False})
    method.setup(train_split, model)
    method.on_epoch_start(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(model, train_split.batch(torch.arange(8)))
    assert out.parts["attr_n_align"] > 0 and out.parts["img_n_align"] > 0
    out.total.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.f2.parameters())


def test_counterfactual_generator_refuses_mixed_dtypes_under_autocast():
    # the dtype check was skipped under autocast, but the search runs without it: bfloat16
    # inputs to a float32 model failed inside conv2d ("Input type (c10::BFloat16) and bias
    # type (float) should be the same") instead of the one line given outside autocast
    from causalign.errors import InputError

    gen = CounterfactualGenerator(_classifier(), steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(InputError, match="inputs are torch.bfloat16 but Sequential's "
                                            "parameters are torch.float32"):
        gen.generate(_images().bfloat16(), target=torch.ones(4, dtype=torch.long))


def test_implicit_gradient_through_attention():
    # the exact products and the mixed product differentiate ∇ₓT again, and the fused CPU
    # flash-attention kernel has no double backward: implicit_gradient (so causal-align on
    # any model with nn.MultiheadAttention) failed with "derivative for aten::_scaled_dot_
    # product_flash_attention_for_cpu_backward is not implemented"
    import torch.nn.functional as F

    from causalign.implicit import implicit_gradient

    dt = torch.float64
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=dt, requires_grad=True)

    def inner(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:  # 2 samples (4 tokens × 3)
        return 0.5 * (x - th).square().sum() + 0.05 * F.scaled_dot_product_attention(
            x, x, x).sum()

    def solve(th: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(2, 4, 3, dtype=dt)
        for _ in range(200):
            x = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(inner(x, th), x)
            x = x - 0.8 * g
        return x.detach()

    c = torch.randn(2, 4, 3, dtype=dt, generator=torch.Generator().manual_seed(0))
    res = implicit_gradient(lambda x: inner(x, theta), solve(theta.detach()), [theta], c,
                            cg_tol=1e-10, cg_max_iter=50)
    fd = []
    for i in range(3):
        e = torch.zeros(3, dtype=dt)
        e[i] = 1e-5
        fd.append(((solve(theta.detach() + e) - solve(theta.detach() - e)) * c).sum() / 2e-5)
    torch.testing.assert_close(res.grads[0], torch.stack(fd), rtol=1e-6, atol=1e-8)


def test_counterfactual_generator_names_a_numpy_batch():
    # "x0 must be a floating-point batch (N, C, ...), got float32 of shape (4, 1, 16, 16)"
    # described a NumPy array as if it were a valid float32 batch
    from causalign.errors import InputError

    gen = CounterfactualGenerator(_classifier(), steps=2)
    with pytest.raises(InputError, match="x0 must be a torch.Tensor .* got ndarray"):
        gen.generate(_images().numpy(), target=[1, 0, 1, 0])


def test_setup_takes_a_random_split_subset(train_split):
    # random_split's Subset (the usual way to hold out a validation part in one's own loop)
    # failed in setup with "'Subset' object has no attribute 'images'" (scaled distances,
    # the latent space) or "'attributes'" (hier-align); the scales now come from the
    # subset's own samples, nested subsets included
    from torch.utils.data import Subset

    from causalign.explain.counterfactual import distance_scale
    from causalign.methods import build_method
    from causalign.models import HierarchicalModel
    from causalign.models.mlp import MLPHead

    sub = Subset(Subset(train_split, [7, 6, 5, 4, 3, 2]), [0, 2, 3, 5])  # samples 7, 5, 4, 2
    method = build_method("causal-align", {"distance": "scaled-l1"})
    method.setup(sub, _classifier())
    want = distance_scale(train_split.images[[7, 5, 4, 2]], "scaled-l1")
    torch.testing.assert_close(method.scale, want)
    assert not torch.allclose(want, distance_scale(train_split.images, "scaled-l1"))
    p = train_split.attributes.shape[1]
    hier = build_method("hier-align", {})
    f1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                       nn.Flatten(), nn.Linear(4, p))
    hier.setup(sub, HierarchicalModel(f1, MLPHead(p, 2, hidden=8)))
    # the table is looked up by batch["index"], the full split's positions a Subset yields
    rows = [7, 5, 4, 2]
    ref = build_method("hier-align", {})
    ref.fit_attribution(train_split.attributes[rows], train_split.labels[rows])
    assert hier.r_table.shape == (len(train_split), p)
    assert torch.equal(hier.r_table[rows], ref.r_table)
    assert torch.equal(hier.r_known[rows], ref.r_known)
    assert not hier.r_known[[0, 1, 3, 6]].any()


def test_setup_names_a_dataset_it_cannot_fit_on(train_split):
    # a ConcatDataset (or a user's own Dataset) failed with "'ConcatDataset' object has no
    # attribute 'images'" / "'attributes'"
    from torch.utils.data import ConcatDataset

    from causalign.errors import InputError
    from causalign.methods import build_method
    from causalign.models import HierarchicalModel

    both = ConcatDataset([train_split, train_split])
    with pytest.raises(InputError, match="causal-align: setup fits its per-pixel distance "
                                         "scales .* got ConcatDataset"):
        build_method("causal-align", {"distance": "scaled-l1"}).setup(both, _classifier())
    model = HierarchicalModel(_classifier(), nn.Linear(2, 2))
    with pytest.raises(InputError, match="hier-align: setup fits the CCCE attribution .* got "
                                         "ConcatDataset"):
        build_method("hier-align", {}).setup(both, model)


def test_batched_cg_names_numpy_arguments():
    # "'numpy.ndarray' object has no attribute 'dim'"
    import numpy as np

    from causalign.implicit import batched_cg

    b = torch.ones(3, 2)
    with pytest.raises(ValueError, match="b must be a torch.Tensor .* got ndarray"):
        batched_cg(lambda v: 2 * v, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="x0 must be a torch.Tensor .* got ndarray"):
        batched_cg(lambda v: 2 * v, b, x0=np.zeros((3, 2), np.float32))
    torch.testing.assert_close(batched_cg(lambda v: 2 * v, b).solution, b / 2)


def test_metrics_say_how_to_reduce_multichannel_attributions():
    # an explainer's attribution of an RGB input is (N, 3, H, W): the metrics refused it
    # with a bare shape mismatch, not saying that its channels need reducing
    from causalign.errors import InputError
    from causalign.explain import saliency_map
    from causalign.metrics import cam_precision, deletion_scores

    maps, mask = torch.rand(4, 3, 8, 8), torch.zeros(4, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    with pytest.raises(InputError,
                       match=r"3-channel attributions: reduce them .*explain\.saliency_map"):
        cam_precision(maps, mask)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(InputError, match="3-channel attributions"):
        deletion_scores(model, torch.rand(4, 3, 8, 8), maps, target=0)
    assert cam_precision(saliency_map(maps), mask).shape == (4,)
