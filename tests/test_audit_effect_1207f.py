"""Audit: does every documented option change what it should?

For each method hyper-parameter (`--set method.<key>=v`): changing it from its default to
another valid value must change one training step's loss or the parameter gradient on a
fixed batch (fixed seed, the trainer's build: `Method.build_model`, `set_class_weight`,
`setup`, `on_epoch_start`). An option that cannot act in a combination must say so in one
warning (or a refusal on the CLI), not be recorded in config.yaml as if it acted.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from causalign.engine.config import TrainConfig, apply_overrides
from causalign.engine.trainer import data_info
from causalign.methods.base import build_method

# ------------------------------------------------------------------ harness


@pytest.fixture(scope="module")
def train_split(tiny_data):
    from causalign.data.format import LesionDataset

    return LesionDataset(tiny_data, "train")


def _observe(split, method: str, args: dict, *, steps: int = 2, epoch: int = 1,
             model: str = "cnn7") -> tuple[list[float], torch.Tensor]:
    """Losses of ``steps`` calls of the method's loss on the first 8 training samples (the
    same batch each call: warm starts and align_every act on the second) and the parameter
    gradient of the last one, from one fixed initialisation."""
    cfg = apply_overrides(TrainConfig(), {"method": method, "model": model, "width": 4,
                                          "device": "cpu", "method_args": args})
    m = build_method(cfg.method, cfg.method_args)
    torch.manual_seed(0)
    net = m.build_model(cfg, data_info(split))
    m.set_class_weight(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.setup(split, net)
    m.on_epoch_start(epoch)
    net.train()
    batch = split.batch(torch.arange(8))
    losses, grad = [], None
    for _ in range(steps):
        torch.manual_seed(1)  # the same draws (PPI's fraction, shift) for both settings
        out = m(net, batch)
        net.zero_grad(set_to_none=True)
        out.total.backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in net.parameters()])
        losses.append(float(out.total))
    return losses, grad


def _changed(a, b) -> bool:
    la, ga = a
    lb, gb = b
    return any(abs(x - y) > 1e-7 for x, y in zip(la, lb, strict=True)) or \
        not torch.allclose(ga, gb, rtol=0, atol=1e-9)


# method -> (option, other valid value, extra settings it needs to act, epoch). Each row:
# the option acts in that combination.
CASES = {
    "rrr": [("lam", 3.0, {}), ("region", "box", {})],
    "cdep": [("lam", 3.0, {}), ("region", "box", {})],
    "chang": [("cf_weight", 3.0, {}), ("factual_weight", 3.0, {}), ("fill", "mean", {}),
              ("region", "box", {})],
    "icnn": [("lam", 3.0, {}), ("beta", 1.0, {}), ("label_mask", True, {})],
    "oracle": [("region", "box", {})],
    "ppi": [("saliency", "gradient", {}), ("mask", "hard", {}), ("omega", 10.0, {}),
            ("sigma", 0.5, {}), ("adaptive_k", 1.0, {}), ("hard_k", 1.0, {"mask": "hard"}),
            ("box_std", 0.5, {"mask": "box", "hard_k": 1.0}),
            ("top_n", 0.2, {"mask": "topn"}), ("cls_weight", 3.0, {}),
            ("con_weight", 3.0, {}), ("reg_weight", 3.0, {}), ("ad_weight", 3.0, {}),
            ("con_boost", 3.0, {"con_boost_epoch": 0}),
            ("shift_masks", True, {}), ("shift_max", 0.6, {"shift_masks": True}),
            ("fill", "mean", {}), ("contrast_on", "positive", {}), ("fraction", 0.5, {})],
    "bagnet": [("patch", 9, {})],
}
FAST = [(m, k, v, extra) for m, rows in CASES.items() for k, v, extra in rows]

# causal-align / hier-align: a CG solve per step; seconds each on 2 cores
SLOW = {
    "causal-align": [
        ("alpha", 0.05, {}), ("lam", 3.0, {}), ("steps", 3, {}), ("inner_lr", 0.05, {}),
        ("inner_optimizer", "ista", {}), ("newton_polish", 2, {}), ("cg_iters", 1, {}),
        ("cg_tol", 0.5, {}), ("damping", 1.0, {}), ("distance", "l2", {}), ("eps", 0.1, {}),
        ("target", "predicted", {}), ("align_every", 2, {}), ("align_batch", 2, {}),
        ("warm_start", False, {}), ("cache_dtype", "bfloat16", {}),
        ("hvp", "finite-difference", {}),
        ("region", "box", {}), ("dilate", 2, {}), ("align_on", "positive", {}),
        ("normalize", "none", {}), ("space", "smooth", {}),
        ("smooth_sigma", 3.0, {"space": "smooth"}), ("precondition", False, {}),
        ("balance", 0.1, {}), ("bn", "running", {})],
    "hier-align": [
        ("alpha1", 0.05, {}), ("alpha2", 0.01, {}), ("lam1", 3.0, {}), ("lam2", 3.0, {}),
        ("attr_weight", 3.0, {}), ("hidden", 8, {}), ("steps", 2, {}), ("inner_lr", 0.05, {}),
        ("distance", "l2", {}), ("eps", 0.1, {}), ("warm_start", False, {}),
        ("region", "box", {}), ("normalize", "none", {}), ("align_batch", 2, {}),
        ("attr_steps", 5, {}), ("attr_lr", 0.05, {}), ("attr_normalize", "none", {}),
        ("cg_iters", 1, {}), ("damping", 1.0, {}), ("hvp", "finite-difference", {}),
        ("align_every", 2, {}), ("balance", 0.0, {}), ("ccce_model", "frequency", {})],
}
SLOWCASES = [(m, k, v, extra) for m, rows in SLOW.items() for k, v, extra in rows]


@pytest.mark.parametrize("method,key,value,extra", FAST,
                         ids=[f"{m}.{k}" for m, k, _, _ in FAST])
def test_option_changes_loss_or_gradient(train_split, method, key, value, extra):
    """Guard: each option, changed from its default (in a combination where it applies),
    changes the loss or the parameter gradient of the first steps on a fixed batch."""
    epoch = 2  # past con_boost_epoch 0 / warm-up 0
    base = _observe(train_split, method, dict(extra), epoch=epoch)
    other = _observe(train_split, method, {**extra, key: value}, epoch=epoch)
    assert _changed(base, other), f"method.{key}={value!r} changed nothing for {method}"


@pytest.mark.slow
@pytest.mark.parametrize("method,key,value,extra", SLOWCASES,
                         ids=[f"{m}.{k}" for m, k, _, _ in SLOWCASES])
def test_alignment_option_changes_loss_or_gradient(train_split, method, key, value, extra):
    """Guard: as above for the implicit-gradient methods (a CG solve per step)."""
    base = _observe(train_split, method, dict(extra))
    other = _observe(train_split, method, {**extra, key: value})
    assert _changed(base, other), f"method.{key}={value!r} changed nothing for {method}"


@pytest.mark.slow
def test_fd_eps_is_unread_only_on_warned_fallback_steps(train_split):
    """Guard: method.fd_eps with hvp=finite-difference changed nothing on cnn7, because every
    step's finite-difference CG broke down and the Gauss-Newton fallback solved it (documented;
    the step reports fd_fallback 1, which the trainer warns about). The products it sets are
    those `implicit_gradient` uses: there fd_eps changes the gradient."""
    cfg = apply_overrides(TrainConfig(), {"method": "causal-align", "width": 4, "device": "cpu",
                                          "method_args": {"hvp": "finite-difference"}})
    m = build_method(cfg.method, cfg.method_args)
    torch.manual_seed(0)
    net = m.build_model(cfg, data_info(train_split))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.setup(train_split, net)
    out = m(net, train_split.batch(torch.arange(8)))
    assert out.parts["fd_fallback"] == 1.0

    from causalign.implicit import implicit_gradient

    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(2, 5)

    def inner(z):  # smooth in z: finite differences approximate the Hessian
        return (torch.tanh(z @ w.T) ** 2).sum() + 0.1 * z.square().sum()

    grads = [implicit_gradient(inner, x, [w], torch.ones(2, 5), hvp="finite-difference",
                               fd_eps=e) for e in (1e-3, 0.3)]
    g = [r.grads[0] for r in grads]
    assert not torch.allclose(g[0], g[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ settings that cannot act

# (method, settings, the key the warning must name): each setting is unread in that
# combination and was accepted and recorded in config.yaml without a word
UNUSED = [
    ("ppi", {"hard_k": 3.0}, "method.hard_k"),  # mask soft: no k·std threshold
    ("ppi", {"box_std": 0.5, "mask": "hard"}, "method.box_std"),
    ("ppi", {"top_n": 0.2}, "method.top_n"),
    ("ppi", {"omega": 10.0, "mask": "hard"}, "method.omega"),
    ("ppi", {"sigma": 0.5, "mask": "box"}, "method.sigma"),
    ("ppi", {"sigma": 0.5, "adaptive_k": 1.0}, "method.sigma"),  # σ set per image instead
    ("ppi", {"adaptive_k": 1.0, "mask": "hard"}, "method.adaptive_k"),
    ("ppi", {"shift_max": 0.5}, "method.shift_max"),  # shift_masks false
    ("ppi", {"con_boost_epoch": 5}, "method.con_boost_epoch"),  # con_boost 1
    ("causal-align", {"fd_eps": 0.1}, "method.fd_eps"),  # hvp exact
    ("causal-align", {"eps": 0.1, "distance": "l2"}, "method.eps"),
    ("causal-align", {"inner_lr": 0.1, "inner_optimizer": "newton"}, "method.inner_lr"),
    ("hier-align", {"fd_eps": 0.1}, "method.fd_eps"),
    ("hier-align", {"eps": 0.1, "distance": "scaled-l2"}, "method.eps"),
]


def _setup_warnings(split, method: str, args: dict) -> list[str]:
    cfg = apply_overrides(TrainConfig(), {"method": method, "width": 4, "device": "cpu",
                                          "method_args": args})
    m = build_method(cfg.method, cfg.method_args)
    torch.manual_seed(0)
    net = m.build_model(cfg, data_info(split))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m.setup(split, net)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("method,args,key", UNUSED,
                         ids=[f"{m}-{k}-{i}" for i, (m, _, k) in enumerate(UNUSED)])
def test_unused_setting_warns(train_split, method, args, key):
    """Regression: each of these settings was accepted and recorded, yet unread by the
    method in this combination, without a warning."""
    said = [w for w in _setup_warnings(train_split, method, args)
            if key in w and "no effect" in w]
    assert len(said) == 1, (key, _setup_warnings(train_split, method, args))


@pytest.mark.parametrize("method,args", [
    ("ppi", {}), ("ppi", {"mask": "hard", "hard_k": 3.0}),
    ("ppi", {"mask": "box", "hard_k": 3.0, "box_std": 0.5}),
    ("ppi", {"mask": "topn", "top_n": 0.2, "omega": 10.0, "sigma": 0.5}),
    ("ppi", {"shift_masks": True, "shift_max": 0.5}),
    ("ppi", {"con_boost": 2.0, "con_boost_epoch": 5}),
    ("causal-align", {}), ("causal-align", {"hvp": "finite-difference", "fd_eps": 0.1}),
    ("causal-align", {"distance": "scaled-l1", "eps": 0.1}),
    ("causal-align", {"inner_optimizer": "ista", "inner_lr": 0.1}),
    ("hier-align", {}),
])
def test_used_settings_do_not_warn(train_split, method, args):
    """Guard: settings that act in their combination (or defaults) are not called unused."""
    said = [w for w in _setup_warnings(train_split, method, args) if "no effect" in w]
    assert said == []


def test_unused_ppi_settings_change_nothing(train_split):
    """Guard of the warning's claim: hard_k under the soft mask really is unread."""
    base = _observe(train_split, "ppi", {})
    other = _observe(train_split, "ppi", {"hard_k": 3.0})
    assert not _changed(base, other)


# ------------------------------------------------------------------ CLI flags


def test_evaluate_bootstrap_seed_without_bootstrap_is_refused(tmp_path, capsys):
    """Regression: `evaluate --bootstrap-seed 5` without --bootstrap ran and printed the
    same metrics as seed 0: no resample is drawn, so the seed is unread."""
    from causalign.cli import main

    rc = main(["evaluate", str(tmp_path / "no-run"), "--bootstrap-seed", "5",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "--bootstrap-seed" in err and "--bootstrap" in err


@pytest.fixture(scope="module")
def erm_run(tiny_data, tmp_path_factory):
    from causalign.cli import main

    run = tmp_path_factory.mktemp("effect") / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--set", "threads=1",
                 "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("flags,named", [
    (["--distance", "l2", "--eps", "0.1"], "--eps"),
    (["--optimizer", "newton", "--lr", "0.1"], "--lr"),
])
def test_counterfactual_unused_flag_is_refused(erm_run, tmp_path, capsys, flags, named):
    """Regression: `counterfactual --distance l2 --eps 0.1` (eps smooths only the l1) and
    `--optimizer newton --lr 0.1` (Gauss-Newton takes no step size) wrote the same x* as
    without the flag, and summary.json recorded the value as if used."""
    from causalign.cli import main

    rc = main(["counterfactual", str(erm_run), "--limit", "2", "--steps", "2", "--out",
               str(tmp_path / "cf"), "--device", "cpu", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc != 0
    assert named in err, err
