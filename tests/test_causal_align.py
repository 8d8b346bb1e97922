"""causal-align: implicit gradient of L_align against finite differences, masks, config, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.explain.counterfactual import CounterfactualResult, InnerProblem, eval_mode
from causalign.methods import build_method
from causalign.models.autoencoder import ConvAutoencoder

DT = torch.float64


def _tiny_model(seed: int = 0) -> nn.Module:
    """Piecewise-linear net with BatchNorm (eval statistics set to non-trivial values)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 2)).to(DT)
    bn = model[2]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.train()  # train mode on purpose: the method must switch to eval itself


def _newton(prob: InnerProblem, u: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """x* to machine precision: Newton with exact per-sample Hessians (tiny dims)."""
    n, d = u.shape[0], u[0].numel()
    for _ in range(iters):
        uu = u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.objective(uu).sum(), uu, create_graph=True)
        if g.abs().max() < 1e-13:
            break
        cols = []
        for j in range(d):
            e = torch.zeros(n, d, dtype=u.dtype)
            e[:, j] = 1.0
            (hj,) = torch.autograd.grad(g, uu, e.reshape(u.shape), retain_graph=True)
            cols.append(hj.reshape(n, d))
        h = torch.stack(cols, 2)
        u = u.detach() - torch.linalg.solve(h, g.detach().reshape(n, d)).reshape(u.shape)
    return u.detach()


def _solve(method, model, x0, target):
    gen = method.generator(model)
    with eval_mode(model, fold_bn=True):
        prob = gen.problem(x0, target)
        u = _newton(prob, prob.u0.clone())
        x_star = prob.image(u).detach()
    zeros = torch.zeros(len(x0), dtype=torch.bool)
    return CounterfactualResult(x_star=x_star, u_star=u, target=target, diverged=zeros,
                                warm=zeros, distance=torch.zeros(len(x0)), problem=prob)


def _align(res, region):
    return (((res.x_star - res.problem.x0) * (1 - region)).abs().flatten(1).sum(1)).mean()


def _case(space: str):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=gen, dtype=DT)
    region = torch.zeros(3, 1, 4, 4, dtype=DT)
    region[:, :, 1:3, 1:3] = 1.0
    target = torch.tensor([1, 0, 1])
    model = _tiny_model()
    args = dict(distance="l2", alpha=0.5, damping=0.0, cg_iters=60, cg_tol=1e-13, space=space)
    method = build_method("causal-align", args)
    if space == "latent":
        method.params.alpha = 0.05  # the code is 3-dim: a weaker pull keeps x* − x0 visible
        torch.manual_seed(0)
        ae = ConvAutoencoder(1, width=4, latent_channels=3).to(DT).eval().requires_grad_(False)
        with torch.no_grad():  # a random decoder is nearly flat; steepen it
            for mod in ae.decoder:
                if hasattr(mod, "weight"):
                    mod.weight.mul_(3.0)
        # Smooth activations: with ReLU kinks in the decoder the minimiser can sit on a kink,
        # where ∇T = 0 has no solution and neither the IFT nor finite differences apply.
        for i, mod in enumerate(ae.decoder):
            if isinstance(mod, nn.ReLU):
                ae.decoder[i] = nn.Tanh()
        method.autoencoder = ae
    return model, method, x0, region, target


def _fd(model, method, x0, region, target, eps=1e-6):
    params = [p for p in model.parameters()]
    out = []
    for p in params:
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = flat[j].item()
            vals = []
            for s in (1, -1):
                flat[j] = old + s * eps
                vals.append(_align(_solve(method, model, x0, target), region).item())
            flat[j] = old
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=DT)


@pytest.fixture(scope="module", params=["pixel", "latent"])
def fd_case(request):
    model, method, x0, region, target = _case(request.param)
    return request.param, model, method, x0, region, target, _fd(model, method, x0, region,
                                                                 target)


@pytest.mark.parametrize("variant", [dict(), dict(precondition=False),
                                     dict(hvp="finite-difference", fd_eps=1e-5)])
def test_implicit_gradient_of_alignment_matches_finite_differences(fd_case, variant):
    space, model, method, x0, region, target, fd = fd_case
    for k, v in variant.items():
        setattr(method.params, k, v)
    res = _solve(method, model, x0, target)
    model.zero_grad(set_to_none=True)
    term, stats = method.implicit_term(model, res, region)
    assert term.item() == pytest.approx(_align(res, region).item())
    term.backward()
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = F.cosine_similarity(ours, fd, dim=0).item()
    rel = ((ours - fd).norm() / fd.norm()).item()
    assert fd.norm() > 1e-3
    assert cos >= 0.99, (space, variant, cos, rel)
    assert rel < 1e-3, (space, variant, cos, rel)
    assert stats["cg_converged"] == 1.0 and stats["cg_dropped"] == 0.0
    assert model.training  # the implicit step restored the caller's mode
