"""Audit 2026-12-06 (conv): the public API used with the habits of PyTorch, Captum, MONAI,
zennit and TorchOpt users."""

from __future__ import annotations

import pytest
import torch

from causalign.implicit import CoupledSystemsError, batched_cg, implicit_gradient


def _spd(d: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return m @ m.T + d * torch.eye(d, dtype=torch.float64)


def test_cg_refuses_a_coupled_matvec_on_a_1d_rhs_as_scipy_and_torchopt_take_it():
    """``batched_cg(lambda p: A @ p, b)`` with b of shape (D,), as SciPy's ``cg(A, b)`` and
    TorchOpt's ``solve_cg(matvec, b)`` are called, was solved as D 1x1 systems: every one
    reported converged while ‖A v − b‖ = 1.86 for ‖b‖ ≈ 2 (a silently wrong solution)."""
    a = _spd(6)
    b = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    with pytest.raises(CoupledSystemsError, match=r"pass b\[None\] \(shape \(1, 6\)\)"):
        batched_cg(lambda p: a @ p, b, max_iter=50, tol=1e-10)
    one = batched_cg(lambda p: p @ a, b[None], max_iter=50, tol=1e-10)  # the way to say it
    assert one.converged.all()
    torch.testing.assert_close(a @ one.solution[0], b)


def test_cg_still_solves_1d_rhs_as_independent_scalar_systems():
    """A 1-D b with an entry-wise matvec is D 1x1 systems, as documented: still solved, with
    a zero rhs, a breakdown (negative curvature) and damping handled as before."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        d = torch.tensor([2.0, -1.0, 4.0, 3.0], dtype=dtype)
        b = torch.tensor([1.0, 1.0, 0.0, 6.0], dtype=dtype)
        res = batched_cg(lambda p, d=d: d * p, b, damping=1.0)
        assert res.converged.tolist() == [True, False, True, True]
        assert res.breakdown.tolist() == [False, True, False, False]
        torch.testing.assert_close(res.solution[[0, 2, 3]],
                                   torch.tensor([1 / 3, 0.0, 1.5], dtype=dtype))
    # neither a warm start whose b − A x0 cancels (A = 307, b = 1.2e-3, x0 = −0.76) nor
    # half precision's drift (a "converged" x off by 1 %) is taken for a coupling
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        d = (torch.rand(500, generator=gen) * 10.0 ** torch.randint(-3, 4, (500,), generator=gen))
        b = torch.randn(500, generator=gen) * 10.0 ** torch.randint(-3, 3, (500,), generator=gen)
        d, b = d.to(dtype), b.to(dtype)
        batched_cg(lambda p, d=d: d * p, b, x0=torch.randn(500, generator=gen).to(dtype))
        batched_cg(lambda p, d=d: d * p, b, max_iter=3)


def test_implicit_gradient_refuses_a_coupled_objective_of_a_1d_x():
    """A quadratic ½xᵀAx − θᵀx of a 1-D x (one vector problem, in a SciPy user's eyes)
    gave a gradient of D decoupled scalar problems, silently; now one line says to pass
    shape (1, D). Entry-wise (truly scalar) problems keep working, exact and by finite
    differences."""
    a = _spd(5).float()
    theta = torch.randn(5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with pytest.raises(ValueError, match=r"couples the entries of the 1-D x_star.*\(1, 5\)"):
        implicit_gradient(lambda x: 0.5 * x @ a @ x - theta @ x, torch.zeros(5), [theta],
                          torch.ones(5))
    # the same problem as one (1, 5) sample: dL/dθ = A⁻¹ 1 for L = Σ x*, x* = A⁻¹θ
    res = implicit_gradient(lambda x: (0.5 * (x @ a) * x).sum() - (theta * x).sum(),
                            torch.zeros(1, 5), [theta], torch.ones(1, 5), cg_max_iter=50,
                            cg_tol=1e-7)
    torch.testing.assert_close(res.grads[0], torch.linalg.solve(a, torch.ones(5)),
                               rtol=1e-4, atol=1e-5)
    for hvp in ("exact", "finite-difference"):
        res = implicit_gradient(lambda x: (0.5 * (x - theta) ** 2 + 0.1 * x ** 4).sum(),
                                torch.randn(7)[:5], [theta], torch.ones(5), hvp=hvp)
        assert res.cg.converged.all()


def test_explainers_of_a_compiled_model_give_the_eager_models_maps():
    """Captum's, zennit's and WBP's hooks on submodules do not reach a graph Dynamo traced
    before they were registered. After one forward of the compiled model (backend eager),
    Grad-CAM failed ("forward does not run layer 'features.3'"), and after a Grad-CAM map
    LRP-ε maps were computed without zennit's rules: 0.88 off for eager values of at most
    1.3e-4, silently. Explainers now run the compiled model's eager module (same
    parameters), as the counterfactual search does."""
    from causalign.explain import get_explainer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(2, 1, 8, 8)
    torch._dynamo.reset()  # no graph cached by an earlier test
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # a compiled model has run before anyone explains it
    for name in ("gradcam", "wbp", "lrp-epsilon"):
        explainer = get_explainer(name, compiled)
        torch.testing.assert_close(explainer.attribute(x, target=1),
                                   get_explainer(name, model).attribute(x, target=1))
        assert explainer.model is model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_dataset_writer_takes_tensors_and_works_as_a_context_manager(tmp_path):
    """A PyTorch user's ``w.add(image_tensor, ..., mask=mask_tensor)`` failed with
    "'Tensor' object has no attribute 'astype'" (a tensor image passed, its mask not), an
    image that requires grad with "Can't call numpy() on Tensor that requires grad", and
    ``with DatasetWriter(...) as w`` with "does not support the context manager protocol"."""
    from causalign.data import DatasetMeta, DatasetWriter, LesionDataset

    meta = DatasetMeta("toy", ["a", "b"], [])
    images = torch.rand(4, 8, 8)
    mask = torch.zeros(8, 8)
    mask[2:5, 3:6] = 1
    with DatasetWriter(tmp_path / "d", meta, image_format="npy") as w:
        for i, split in enumerate(("train", "train", "val", "test")):
            img = images[i].clone().requires_grad_(i == 0)
            w.add(img, label=torch.tensor(i % 2), split=split, mask=mask.bool() if i else mask)
        w.add(images[0].bfloat16(), label=0, split="test")
    ds = LesionDataset(tmp_path / "d", "train")
    torch.testing.assert_close(ds[:]["image"][:, 0], images[:2])
    assert ds[:]["has_mask"].all() and torch.equal(ds[1]["mask"][0], mask)
    assert ds[:]["label"].tolist() == [0, 1]
    torch.testing.assert_close(LesionDataset(tmp_path / "d", "test")[1]["image"][0],
                               images[0].bfloat16().float())
    # an exception inside the block writes no manifest: no half dataset that reads as whole
    with pytest.raises(RuntimeError, match="stop"), DatasetWriter(tmp_path / "e", meta) as w:
        w.add(images[0], label=0, split="train")
        raise RuntimeError("stop")
    assert not (tmp_path / "e" / "manifest.csv").exists()


def test_gradcam_takes_a_layer_name_and_refuses_a_non_module_in_one_line():
    """``get_explainer("gradcam", model, layer="features.15")`` (torchcam's
    ``target_layer`` habit) failed at the first map with "'str' object has no attribute
    'register_forward_hook'", and ``layer=3`` with "'int' object is not iterable", both
    deep inside Captum."""
    from causalign.errors import InputError
    from causalign.explain import get_explainer
    from causalign.models import SevenLayerCNN

    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=2).eval()
    x = torch.rand(2, 1, 8, 8)
    by_name = get_explainer("gradcam", model, layer="features.16").attribute(x, target=1)
    by_module = get_explainer("gradcam", model, layer=model.features[16]).attribute(x, target=1)
    torch.testing.assert_close(by_name, by_module)
    with pytest.raises(InputError, match=r"no layer 'features\.99' \(its convolutions: .*"
                                         r"features\.17\)"):
        get_explainer("gradcam", model, layer="features.99")
    with pytest.raises(InputError, match="must be a module of the model or its name"):
        get_explainer("gradcam", model, layer=3)


@pytest.mark.parametrize("wrap", [None, "DataParallel", "Sequential"])
def test_batch_statistics_of_a_compiled_model_that_has_run_before(wrap):
    """Hooks on the submodules of a ``torch.compile``'d model do not fire in a graph Dynamo
    traced without them: after one train-mode forward without them (a step of
    ``align_every=2``, a warm-up), `capture_bn_stats` came back empty and causal-align's
    inner problem silently used the running statistics (its gradient at cosine 0.46 to the
    eager model's). The statistics are now taken by an eager no-grad pass of the same
    inputs, which leaves the running statistics and the compiled forward's backward alone.
    The same inside a wrapper (DataParallel, a user's container): only a model with
    ``_orig_mod`` itself was recognised, so the BatchNorms inside a wrapped one got plain
    hooks, which such a graph never runs (the DataParallel gradient test failed whenever an
    earlier test had compiled the same class without hooks)."""
    from causalign.explain.counterfactual import capture_bn_stats
    from causalign.models import SevenLayerCNN

    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=2).train()
    reference = SevenLayerCNN(1, 2, width=2).train()
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    wrapped = {None: compiled, "DataParallel": torch.nn.DataParallel(compiled),
               "Sequential": torch.nn.Sequential(compiled)}[wrap]
    x0, x = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    wrapped(x0)  # traced without hooks
    reference(x0)
    with capture_bn_stats(wrapped) as stats:
        logits = wrapped(x)
    with capture_bn_stats(reference) as expected:
        reference(x)
    assert len(stats) == len(expected) == 6
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ref_bns = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m, r in zip(bns, ref_bns, strict=True):
        torch.testing.assert_close(stats[m], expected[r])
    logits.sum().backward()  # the buffers the compiled forward saved are untouched
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


def test_causalign_own_hooks_on_a_compiled_wrapper_are_not_reported_as_the_users():
    """The warning that hooks on a torch.compile wrapper are not run counted causalign's own
    (capture_bn_stats' recapture hooks): a compiled causal-align step warned of them at the
    counterfactual generator it builds inside that context. A user's hook still warns."""
    import warnings

    from causalign.explain.counterfactual import CounterfactualGenerator, capture_bn_stats
    from causalign.models import SevenLayerCNN

    torch.manual_seed(0)
    compiled = torch.compile(SevenLayerCNN(1, 2, width=2).train(), backend="eager")
    for wrapped in (compiled, torch.nn.DataParallel(compiled)):
        with capture_bn_stats(wrapped), warnings.catch_warnings():
            warnings.simplefilter("error")
            wrapped(torch.rand(4, 1, 8, 8))
            CounterfactualGenerator(wrapped)
    handle = compiled.register_forward_pre_hook(lambda m, args: None)
    try:
        with pytest.warns(UserWarning, match="1 forward hook"):
            CounterfactualGenerator(compiled)
    finally:
        handle.remove()


def test_causal_align_on_a_wrapped_compiled_model_warns_of_no_hook_of_its_own():
    """causal-align's own output check (a forward hook on the model it is given) on a
    DataParallel around a compiled model was counted as a user's hook on the wrapper."""
    import copy
    import warnings

    from test_audit_model_forms import _batch, _net

    from causalign.methods import build_method

    compiled = torch.compile(copy.deepcopy(_net().train()), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = build_method("causal-align", {"steps": 2})(torch.nn.DataParallel(compiled),
                                                         _batch())
    assert torch.isfinite(out.total)


def test_explainers_of_a_model_with_a_compiled_part_give_the_eager_models_maps():
    """A compiled part inside a container (nn.Sequential(torch.compile(backbone), head)) has
    the same problem one level down: only a model compiled as a whole, or inside
    DataParallel/DDP, was explained through its eager module. After one forward, Grad-CAM
    failed ("does not run layer") and LRP maps were computed without zennit's rules. The
    container is now explained through a view of it with the eager part; the user's model
    keeps its compiled part."""
    from causalign.explain import get_explainer

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten())
    head = torch.nn.Linear(4, 2)
    eager = torch.nn.Sequential(backbone, head).eval()
    x = torch.rand(2, 1, 8, 8)
    torch._dynamo.reset()
    compiled_part = torch.compile(backbone, backend="eager")
    model = torch.nn.Sequential(compiled_part, head).eval()
    model(x)  # traced without any explainer's hooks
    for name, layer in (("gradcam", {"layer": backbone[3]}), ("wbp", {}),
                        ("lrp-epsilon", {})):
        got = get_explainer(name, model, **layer).attribute(x, target=1)
        torch.testing.assert_close(got, get_explainer(name, eager, **layer).attribute(
            x, target=1))
    assert model[0] is compiled_part and not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
