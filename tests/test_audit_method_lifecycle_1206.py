"""The lifecycle of causal-align / hier-align method objects in a user's own training loop:
setup() called again, state_dict() into a fresh object, pickling, no setup() at all,
on_epoch_start() forgotten or 0-based."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from causalign.data import LesionDataset, SynthConfig, generate
from causalign.errors import ConfigError, InputError
from causalign.explain.counterfactual import distance_scale
from causalign.methods import build_method
from causalign.models import HierarchicalModel, MLPHead

FAST = {"steps": 2, "align_batch": 4}
HIER = {"steps": 2, "attr_steps": 3, "align_batch": 4}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    generate(root / "a", SynthConfig(n_train=16, n_val=4, n_test=4, size=32, seed=0))
    generate(root / "b", SynthConfig(n_train=16, n_val=4, n_test=4, size=32, seed=5))
    return LesionDataset(root / "a", "train"), LesionDataset(root / "b", "train")


def _net(outputs=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, outputs))


def _hier():
    torch.manual_seed(0)
    f1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    return HierarchicalModel(f1, MLPHead(6, 2, hidden=8))


def _step(method, model, batch):
    model.zero_grad()
    out = method(model, batch)
    out.total.backward()
    return out


def test_a_second_setup_on_another_split_starts_a_new_run(splits):
    """setup() on split B after training on A kept A's per-pixel scales (setup skipped a
    scale already there), A's warm-start rows (B's sample i started from A's offset i) and
    the step counter."""
    a, b = splits
    method = build_method("causal-align", dict(FAST, distance="scaled-l1"))
    model = _net()
    method.setup(a, model)
    _step(method, model, a.batch(torch.arange(8)))
    assert len(method.cache) == 4 and method.step == 1
    method.setup(b, model)
    assert torch.equal(method.scale, distance_scale(b.images, "scaled-l1"))
    assert len(method.cache) == 0 and method.step == 0
    out = _step(method, model, b.batch(torch.arange(8)))
    assert out.parts["cf_warm"] == 0.0  # no row of A's run warm-starts B's samples


def test_setup_after_load_state_dict_keeps_the_loaded_state(splits):
    """The trainer's resume order (and a user's): load_state_dict, then setup: the loaded
    cache, scales and step stay."""
    a, _ = splits
    method = build_method("causal-align", dict(FAST, distance="scaled-l1"))
    model = _net()
    method.setup(a, model)
    _step(method, model, a.batch(torch.arange(8)))
    state = copy.deepcopy(method.state_dict())
    state["scale"] = state["scale"] * 2  # tell a kept scale from a refitted one
    for fresh in (build_method("causal-align", dict(FAST, distance="scaled-l1")), method):
        fresh.load_state_dict(copy.deepcopy(state))
        fresh.setup(a, model)
        assert torch.equal(fresh.scale, state["scale"])
        assert len(fresh.cache) == 4 and fresh.step == 1


def test_hier_align_second_setup_starts_a_new_run(splits):
    a, b = splits
    method = build_method("hier-align", HIER)
    model = _hier()
    method.setup(a, model)
    method.on_epoch_start(1)
    _step(method, model, a.batch(torch.arange(8)))
    assert len(method.pixel.cache) > 0 and method.step == 1
    method.setup(b, model)
    assert len(method.pixel.cache) == 0 and method.step == 0


def test_a_fresh_object_loading_the_state_takes_the_same_step(splits):
    a, _ = splits
    params = dict(FAST, distance="scaled-l1")
    method, model = build_method("causal-align", params), _net()
    method.setup(a, model)
    batch = a.batch(torch.arange(8))
    for _ in range(2):
        _step(method, model, batch)
    weights = copy.deepcopy(model.state_dict())
    fresh = build_method("causal-align", params)
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    results = []
    for m in (method, fresh, copy.deepcopy(method)):
        model.load_state_dict(weights)
        out = _step(m, model, batch)
        results.append((out.total.detach(), [q.grad.clone() for q in model.parameters()]))
        assert out.parts["cf_warm"] == 1.0
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, h) for g, h in zip(grads, results[0][1], strict=True))


@pytest.mark.parametrize("name", ["causal-align", "hier-align"])
def test_pickle_and_torch_save_of_a_method_that_has_stepped(splits, name):
    """The auto CG cap's weak reference to the model made pickle.dumps(method) and
    torch.save(method) fail after the first aligned step ("cannot pickle
    'weakref.ReferenceType' object")."""
    a, _ = splits
    if name == "causal-align":
        method, model = build_method(name, FAST), _net()
    else:
        method, model = build_method(name, dict(HIER, cg_iters=0)), _hier()
    method.setup(a, model)
    method.on_epoch_start(1)
    _step(method, model, a.batch(torch.arange(8)))
    cache = method.cache if name == "causal-align" else method.pixel.cache
    assert len(cache)
    copied = pickle.loads(pickle.dumps(method))
    buf = io.BytesIO()
    torch.save(method, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (copied, loaded):
        c = m.cache if name == "causal-align" else m.pixel.cache
        assert torch.equal(c.cached_ids(), cache.cached_ids())
        _step(m, model, a.batch(torch.arange(8)))  # and it trains on


@pytest.mark.parametrize(("saved", "loading"), [
    ({"distance": "scaled-l1"}, {"distance": "l1"}),
    ({"distance": "scaled-l2"}, {"distance": "scaled-l1"}),
    ({}, {"space": "smooth"}),
])
def test_a_state_of_other_settings_is_refused(splits, saved, loading):
    """An l1 method that loaded a scaled-l1 state computed scaled-l1 (the generator divides
    by any scale it is given); a pixel-space cache warm-started space smooth's variable."""
    a, _ = splits
    method, model = build_method("causal-align", dict(FAST, **saved)), _net()
    method.setup(a, model)
    _step(method, model, a.batch(torch.arange(8)))
    other = build_method("causal-align", dict(FAST, **loading))
    key = next(iter(loading))
    with pytest.raises(ConfigError, match=rf"other settings \(method\.{key} "):
        other.load_state_dict(method.state_dict())
    # an older state without its settings: scales into an unscaled distance still refused
    old = {k: v for k, v in method.state_dict().items() if k != "settings"}
    if old["scale"] is not None and not loading.get("distance", "l1").startswith("scaled"):
        with pytest.raises(ConfigError, match="per-pixel distance scales"):
            other.load_state_dict(old)


def test_hier_align_state_of_another_distance_is_refused(splits):
    a, _ = splits
    method, model = build_method("hier-align", dict(HIER, distance="scaled-l1")), _hier()
    method.setup(a, model)
    other = build_method("hier-align", HIER)
    with pytest.raises(ConfigError, match=r"method\.distance 'scaled-l1' -> 'l1'"):
        other.load_state_dict(method.state_dict())


def test_no_setup_says_what_it_fits_on_the_batch(splits):
    """Without setup(), scaled-l1's per-pixel scales were fitted on the first batch (and
    space latent's autoencoder trained on it), without a word."""
    a, _ = splits
    method, model = build_method("causal-align", dict(FAST, distance="scaled-l1")), _net()
    batch = a.batch(torch.arange(8))
    with pytest.warns(UserWarning, match=r"setup\(\) was not called: its per-pixel distance "
                                         r"scales fitted on this batch \(8 images\)"):
        _step(method, model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(method, model, batch)  # once
    set_up = build_method("causal-align", dict(FAST, distance="scaled-l1"))
    set_up.setup(a, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(set_up, model, batch)


def test_hier_align_without_setup_says_its_attribution_is_per_batch(splits):
    a, _ = splits
    method, model = build_method("hier-align", HIER), _hier()
    batch = a.batch(torch.arange(8))
    with pytest.warns(UserWarning, match=r"hier-align: setup\(\) was not called: its CCCE "
                                         r"attribution r .*each batch"):
        _step(method, model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(method, model, batch)


def test_hier_align_refuses_epoch_zero_and_a_forgotten_on_epoch_start(splits):
    """on_epoch_start(0) (0-based epochs) left out the alignment terms for the whole first
    epoch; align_start > 1 without on_epoch_start never aligned at all."""
    a, _ = splits
    model = _hier()
    method = build_method("hier-align", HIER)
    method.setup(a, model)
    with pytest.raises(InputError, match="1-based"):
        method.on_epoch_start(0)
    late = build_method("hier-align", dict(HIER, align_start=2))
    late.setup(a, model)
    batch = a.batch(torch.arange(8))
    running = model.f1[1].running_mean.clone()
    with pytest.raises(InputError, match=r"align_start=2 counts epochs.*on_epoch_start"):
        late(model, batch)
    assert late.step == 0 and torch.equal(model.f1[1].running_mean, running)
    late.on_epoch_start(1)
    assert late(model, batch).parts["align_step"] == 0.0
    late.on_epoch_start(2)
    assert late(model, batch).parts["align_step"] == 1.0
