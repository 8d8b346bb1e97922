"""Audit (part 3): the causal-align options the first two audits (test_audit_effect_1207f.py,
test_audit_effect2_1207m.py) left open: the CG settings under method.space=latent, hvp, bn,
target, warm_start, precondition, cg_tol and balance there, negative_curvature's three
behaviours, and cache_device on a CPU-only machine.

Observable: one or two steps' loss and parameter gradient on fixed samples (`_observe`), and
the step's solve figures (`cg_dropped`, `gn_fallback`, `damping`: history.csv's columns).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from causalign.methods import build_method
from causalign.methods.causal_align import CausalAlign

sys.path.insert(0, str(Path(__file__).parent))
from test_audit_edge2_1206 import _setup_warnings  # noqa: E402
from test_audit_effect_1207f import _changed, _observe  # noqa: E402
from test_cg_cap_fallback import _batch, _tanh_mlp  # noqa: E402

# ------------------------------------------------------------------ cache_device


@pytest.mark.parametrize("name", ["causal-align", "hier-align"])
def test_cache_device_cpu_with_a_cpu_model_says_it_changes_nothing(name):
    """Regression: method.cache_device=cpu on a model on the CPU was accepted and recorded in
    config.yaml without a word, although the cache already sits in host memory there (the
    cache's rows are on the same device, the step bit-identical). Setup now says so in one
    line; the setting stays valid (a run moved to a GPU with --resume reads it)."""
    lines = [m for m in _setup_warnings({"cache_device": "cpu"}, name, None)
             if "method.cache_device" in m]
    assert len(lines) == 1 and "no effect" in lines[0] and "CPU" in lines[0], lines
    assert "\n" not in lines[0]
    assert not any("method.cache_device" in m for m in _setup_warnings({}, name, None))


def test_cache_device_places_the_cache_rows():
    """Guard: cache_device reaches the warm-start cache (cpu: host memory; model: wherever
    the search runs, the CPU here), and on a CPU-only machine both give the same step."""
    assert build_method("causal-align", {"cache_device": "cpu"}).cache.device == \
        torch.device("cpu")
    assert build_method("causal-align", {}).cache.device is None


# ------------------------------------------------------------------ latent space


@pytest.fixture(scope="module")
def latent_ae(tiny_data, tmp_path_factory):
    """The tiny split and two small autoencoder files setup loads instead of training its own
    (~60 s on 2 cores): "fit", 40 epochs on 16 images (its decoder responds to the code as
    setup's does), and "weak", 2 epochs (a decoder that barely does)."""
    from causalign.data.format import LesionDataset
    from causalign.models.autoencoder import save_autoencoder, train_autoencoder

    split = LesionDataset(tiny_data, "train")
    base = tmp_path_factory.mktemp("effect3")
    paths = {}
    for name, epochs in (("fit", 40), ("weak", 2)):
        paths[name] = str(base / f"{name}.pt")
        save_autoencoder(paths[name], train_autoencoder(split.images[:16], epochs=epochs))
    return split, paths


def _latent(latent_ae, args: dict, monkeypatch, steps: int = 1, ae: str = "fit"):
    """`_observe` in space latent (2 search steps) plus each step's parts (cg_dropped,
    gn_fallback, damping: the solve's history.csv columns)."""
    split, paths = latent_ae
    path = paths[ae]
    parts: list[dict] = []
    real = CausalAlign._loss

    def spy(self, model, batch, warm):
        out = real(self, model, batch, warm)
        parts.append(dict(out.parts))
        return out

    with monkeypatch.context() as mp:
        mp.setattr(CausalAlign, "_loss", spy)
        obs = _observe(split, "causal-align",
                       {"space": "latent", "autoencoder": path, "steps": 2, **args}, steps=steps)
    return obs, parts


@pytest.mark.slow  # the module's autoencoders: 10-30 s on a loaded 2-core machine
def test_latent_cg_iters_caps_the_cg_solve(latent_ae, monkeypatch):
    """Guard: an earlier audit saw method.cg_iters=1 change nothing under space=latent and
    guessed every step went to the Gauss-Newton fallback (which never reads the cap). Not so
    at the defaults: preconditioned CG solves the latent step itself (gn_fallback 0, every
    sample converged in 2-3 iterations), and a cap of 1 leaves every sample unconverged, so
    all are dropped and the step's gradient is CE's alone (an explicit cap is kept as asked:
    no fallback)."""
    base, bp = _latent(latent_ae, {}, monkeypatch)
    capped, cp = _latent(latent_ae, {"cg_iters": 1}, monkeypatch)
    assert bp[0]["gn_fallback"] == 0.0 and bp[0]["cg_converged"] == 1.0
    assert bp[0]["cg_dropped"] == 0.0
    assert cp[0]["gn_fallback"] == 0.0 and cp[0]["cg_dropped"] == 1.0
    assert _changed(base, capped)
    ce_only, _ = _latent(latent_ae, {"lam": 0.0}, monkeypatch)
    torch.testing.assert_close(capped[1], ce_only[1])


@pytest.mark.slow
def test_latent_cg_settings_change_nothing_only_where_one_iteration_solves(latent_ae,
                                                                           monkeypatch):
    """Guard (documented): what the earlier audit saw. Under a decoder that barely responds
    to the code the preconditioned latent system is nearly the identity, CG meets the
    tolerance in one iteration (train_cg_iters 1, no fallback), so cg_iters=1 and cg_tol=0.5
    leave the step bit-identical: read, with nothing left to cut."""
    base, bp = _latent(latent_ae, {}, monkeypatch, ae="weak")
    assert bp[0]["cg_iters"] == 1.0 and bp[0]["gn_fallback"] == 0.0
    assert bp[0]["cg_converged"] == 1.0
    for change in ({"cg_iters": 1}, {"cg_tol": 0.5}):
        assert not _changed(base, _latent(latent_ae, change, monkeypatch, ae="weak")[0])


# option -> other value, steps (warm_start acts on the second visit)
LATENT = [("hvp", "finite-difference", 1), ("hvp", "gauss-newton", 1), ("bn", "running", 1),
          ("target", "predicted", 1), ("warm_start", False, 2), ("precondition", False, 1),
          ("cg_tol", 0.5, 1), ("balance", 0.1, 1)]


@pytest.mark.slow  # the module's autoencoders
@pytest.mark.parametrize("key,value,steps", LATENT, ids=[f"{k}={v}" for k, v, _ in LATENT])
def test_latent_option_changes_loss_or_gradient(latent_ae, monkeypatch, key, value, steps):
    """Guard: each option, changed from its default under space=latent, changes the loss or
    the gradient of the first steps (none of them warns there)."""
    base, _ = _latent(latent_ae, {}, monkeypatch, steps)
    other, _ = _latent(latent_ae, {key: value}, monkeypatch, steps)
    assert _changed(base, other), f"method.{key}={value!r} changed nothing in space latent"


# ------------------------------------------------------------------ negative curvature


def test_negative_curvature_each_value_does_what_readme_says():
    """Guard: a tanh MLP (seed 3) whose input Hessian is indefinite at x*: with an ample CG cap
    (300, tol 1e-7: no sample runs out of iterations) CG breaks down on 3 of 8 samples.
    gauss-newton (default) solves the step with the Gauss-Newton system (gn_fallback, δ stays,
    none dropped); damping raises δ until CG solves; damping with damping_max = δ drops the
    broken samples (the oldest behaviour). Three different gradients."""
    out = {}
    for name, extra in (("gn", {}), ("damp", {"negative_curvature": "damping"}),
                        ("drop", {"negative_curvature": "damping", "damping_max": 0.01})):
        model = _tanh_mlp(3)
        method = build_method("causal-align", {"cg_iters": 300, "cg_tol": 1e-7,
                                               "warm_start": False, **extra})
        res = method(model, _batch(3))
        res.total.backward()
        out[name] = (res.parts, torch.cat([q.grad.flatten() for q in model.parameters()]))
    gn, damp, drop = (out[k][0] for k in ("gn", "damp", "drop"))
    assert gn["gn_fallback"] == 1.0 and gn["damping"] == 0.01 and gn["cg_dropped"] == 0.0
    assert damp["gn_fallback"] == 0.0 and damp["damping"] > 0.01
    assert drop["gn_fallback"] == 0.0 and drop["damping"] == 0.01
    assert drop["cg_dropped"] == 0.375
    grads = [out[k][1] for k in ("gn", "damp", "drop")]
    assert not any(torch.allclose(a, b) for a, b in ((grads[0], grads[1]),
                                                     (grads[0], grads[2]),
                                                     (grads[1], grads[2])))
