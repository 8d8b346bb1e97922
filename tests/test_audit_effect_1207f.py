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
        losses.append(float(out.total.detach()))
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
        ("align_every", 2, {}), ("balance", 0.0, {}), ("ccce_model", "frequency", {}),
        ("cache_dtype", "bfloat16", {}), ("bn", "running", {}), ("cg_tol", 0.5, {}),
        ("precondition", False, {}), ("ccce_max_size", 1, {}), ("ccce_tol", 0.5, {}),
        ("align_start", 2, {})],
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


def test_ppi_warmup_epochs_changes_the_first_epoch(train_split):
    """Guard: method.warmup_epochs=1 leaves epoch 1 to L_cls alone."""
    base = _observe(train_split, "ppi", {}, epoch=1)
    other = _observe(train_split, "ppi", {"warmup_epochs": 1}, epoch=1)
    assert _changed(base, other)


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
    ("causal-align", {"hvp": "gauss-newton", "cg_iters": 5}, "method.cg_iters"),  # no CG
    ("causal-align", {"hvp": "gauss-newton", "cg_tol": 0.1}, "method.cg_tol"),
    ("causal-align", {"hvp": "gauss-newton", "precondition": False}, "method.precondition"),
    ("causal-align", {"hvp": "gauss-newton", "gn_switch": 1}, "method.gn_switch"),
    ("causal-align", {"negative_curvature": "damping", "gn_switch": 1}, "method.gn_switch"),
    ("causal-align", {"damping_max": 1.0}, "method.damping_max"),  # gauss-newton fallback
    ("hier-align", {"fd_eps": 0.1}, "method.fd_eps"),
    ("hier-align", {"hvp": "gauss-newton", "cg_iters": 3}, "method.cg_iters"),
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
    ("causal-align", {"cg_iters": 5, "cg_tol": 0.1, "precondition": False, "gn_switch": 1}),
    ("causal-align", {"negative_curvature": "damping", "damping_max": 1.0}),
    ("causal-align", {"hvp": "finite-difference", "cg_iters": 5}),
    ("hier-align", {}),
])
def test_used_settings_do_not_warn(train_split, method, args):
    """Guard: settings that act in their combination (or defaults) are not called unused."""
    said = [w for w in _setup_warnings(train_split, method, args) if "no effect" in w]
    assert said == []


UNREAD = [  # (combination, the change the warning calls unread in it)
    ({"hvp": "gauss-newton"}, {"cg_iters": 5}), ({"hvp": "gauss-newton"}, {"cg_tol": 0.1}),
    ({"hvp": "gauss-newton"}, {"precondition": False}),
    ({"hvp": "gauss-newton"}, {"gn_switch": 1}),
    ({"negative_curvature": "damping"}, {"gn_switch": 1}), ({}, {"damping_max": 1.0}),
    ({}, {"fd_eps": 0.1}), ({"distance": "l2"}, {"eps": 0.1}),
    ({"inner_optimizer": "newton", "steps": 2}, {"inner_lr": 0.1}),
]


@pytest.mark.slow
@pytest.mark.parametrize("combo,change", UNREAD,
                         ids=[f"{next(iter(c))}" for _, c in UNREAD])
def test_warned_settings_change_nothing(train_split, combo, change):
    """Guard of the warnings' claim: in these combinations the setting is unread (loss and
    gradient of two steps bit-identical)."""
    base = _observe(train_split, "causal-align", combo)
    other = _observe(train_split, "causal-align", {**combo, **change})
    assert not _changed(base, other)


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


# ------------------------------------------------------------------ training settings

_BASE_RUN = {"method": "erm", "width": 4, "epochs": 2, "device": "cpu",
             "deletion_fractions": [0.1], "threads": 1}


def _train_observe(data, out, settings: dict) -> dict:
    """What a 2-epoch ERM run leaves: the best weights, history rows and metrics."""
    import csv
    import json

    from causalign.engine.trainer import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(data, {**_BASE_RUN, **settings}, out, progress=False)
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    with open(out / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return {"weights": torch.cat([v.flatten().float() for v in state.values()
                                  if isinstance(v, torch.Tensor)]),
            "history": history, "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory):
    return _train_observe(tiny_data, tmp_path_factory.mktemp("effect_base") / "run", {})


def _weights(o):
    return o["weights"]


TRAIN_CASES = [
    ("width", 6, lambda o: o["weights"].numel()),
    ("epochs", 3, lambda o: len(o["history"])),
    ("batch_size", 16, lambda o: o["history"][0]["train_loss"]),
    ("lr", 0.01, _weights), ("weight_decay", 0.1, _weights), ("seed", 1, _weights),
    ("scheduler", "none", _weights), ("augment", "dihedral", _weights),
    ("class_weight", [1.0, 3.0], _weights),
    ("eval_saliency", "wbp", lambda o: o["metrics"]["test"]["saliency"]),
    ("deletion_fractions", [0.2], lambda o: sorted(o["metrics"]["test"]["deletion"])),
    ("deletion_fill", 0.5, lambda o: o["metrics"]["test"]["deletion"]["0.1"]),
    ("bn_recalibrate", False, lambda o: o["metrics"]["val"]["loss"]),
    ("train_eval_samples", 8, lambda o: o["history"][0]["train_accuracy"]),
]


@pytest.mark.parametrize("key,value,observe", TRAIN_CASES,
                         ids=[k for k, _, _ in TRAIN_CASES])
def test_training_setting_changes_the_run(tiny_data, tmp_path, base_run, key, value, observe):
    """Guard: each training setting, changed from the audit's base, changes what the run
    leaves (weights, history.csv or metrics.json)."""
    other = _train_observe(tiny_data, tmp_path / "run", {key: value})
    a, b = observe(base_run), observe(other)
    same = torch.equal(a, b) if isinstance(a, torch.Tensor) and a.shape == b.shape else a == b
    assert not same, f"{key}={value!r} changed nothing"


def test_select_metric_changes_the_score():
    """Guard: select_metric picks what `Trainer._score` ranks epochs by (a 2-epoch run may
    pick the same epoch under two metrics, so the score itself is the observable)."""
    from causalign.engine.trainer import Trainer

    metrics = {"auc": 0.9, "accuracy": 0.6, "balanced_accuracy": 0.55, "loss": 0.4}
    scores = set()
    for metric in ("auc", "accuracy", "balanced_accuracy", "loss"):
        t = Trainer.__new__(Trainer)
        t.cfg = apply_overrides(TrainConfig(), {"select_metric": metric})
        scores.add(t._score(metrics))
    assert len(scores) == 4


# ------------------------------------------------------------------ data synth flags

_SYNTH = dict(n_train=12, n_val=4, n_test=4, size=32, seed=0)


def _synth(root, **kw) -> tuple[str, bytes]:
    """The manifest and the first training image's pixels of a tiny synthetic set."""
    from causalign.data.format import LesionDataset
    from causalign.data.synth import SynthConfig, generate

    generate(root, SynthConfig(**{**_SYNTH, **kw}))
    ds = LesionDataset(root, "train")
    pixels = ds.batch(torch.arange(12))["image"].numpy().tobytes()
    return (root / "manifest.csv").read_text(), pixels


@pytest.mark.parametrize("key,value", [
    ("n_train", 13), ("size", 40), ("shortcut", "intensity"), ("shortcut", "none"),
    ("sites", 2), ("depth", 4), ("seed", 1), ("label_noise", 1.5),
    ("causal_weights", {"texture": 5.0}),
])
def test_synth_setting_changes_the_data(tmp_path, key, value):
    """Guard: each `data synth` setting changes the manifest or the images."""
    base = _synth(tmp_path / "a")
    other = _synth(tmp_path / "b", **{key: value})
    assert base != other


def test_hier_align_defaults_are_not_called_unused(train_split):
    """Regression guard: hier-align's image level compares with hier-align's defaults
    (cg_iters 8), so hvp=gauss-newton alone names no CG setting."""
    said = [w for w in _setup_warnings(train_split, "hier-align", {"hvp": "gauss-newton"})
            if "no effect" in w]
    assert said == []


def _cf_arrays(run, out, *flags) -> bytes:
    """The x* arrays `counterfactual` writes for the first 2 test samples."""
    import numpy as np

    from causalign.cli import main

    assert main(["counterfactual", str(run), "--limit", "2", "--steps", "5", "--out", str(out),
                 "--device", "cpu", "--no-progress", *flags]) == 0
    return b"".join(np.load(f).tobytes() for f in sorted((out / "cf").glob("*.npy")))


@pytest.mark.slow
@pytest.mark.parametrize("flags,base", [
    (["--alpha", "0.5"], []), (["--steps", "9"], []), (["--lr", "0.05"], []),
    (["--optimizer", "ista"], []), (["--distance", "l2"], []), (["--eps", "0.2"], []),
    (["--space", "smooth"], []), (["--smooth-sigma", "3"], ["--space", "smooth"]),
    (["--bounds", "none"], []), (["--split", "val"], []),
])
def test_counterfactual_flag_changes_x_star(erm_run, tmp_path, flags, base):
    """Guard: each `counterfactual` search flag changes the x* arrays it writes."""
    a = _cf_arrays(erm_run, tmp_path / "a", *base)
    b = _cf_arrays(erm_run, tmp_path / "b", *base, *flags)
    assert a != b


@pytest.mark.parametrize("flags", [["--saliency", "gradient"], ["--split", "val"],
                                   ["--limit", "3"]])
def test_explain_flag_changes_the_maps(erm_run, tmp_path, flags):
    """Guard: each `explain` flag changes the saliency maps it writes."""
    import numpy as np

    from causalign.cli import main

    def maps(out, *extra):
        assert main(["explain", str(erm_run), "--saliency", "wbp", "--limit", "2", "--out",
                     str(out), "--device", "cpu", "--no-progress", *extra]) == 0
        return {f.name: np.load(f).tobytes() for f in sorted(out.rglob("maps/*.npy"))}

    assert maps(tmp_path / "a") != maps(tmp_path / "b", *flags)


def test_evaluate_flags_change_the_metrics(erm_run, tmp_path, capsys):
    """Guard: evaluate's --saliency, --split and --bootstrap-seed (with --bootstrap) change
    the metrics JSON."""
    import json

    from causalign.cli import main

    def metrics(*flags):
        assert main(["evaluate", str(erm_run), "--device", "cpu", "--no-progress",
                     *flags]) == 0
        return json.loads(capsys.readouterr().out)

    base = metrics()
    assert metrics("--saliency", "wbp")["cam_precision"] != base["cam_precision"]
    assert metrics("--split", "val")["loss"] != base["loss"]
    boot = [metrics("--bootstrap", "100", "--bootstrap-seed", s)["ci95"] for s in ("0", "1")]
    assert boot[0] != boot[1]
