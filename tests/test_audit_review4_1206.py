"""Review of 2026-12-06's commits (review4): the 1-D coupling probe of batched_cg, ..."""
import pytest
import torch

from causalign.implicit import CoupledSystemsError, batched_cg


def _tridiag(d: int) -> torch.Tensor:
    return 2 * torch.eye(d) + torch.diag(torch.ones(d - 1), 1) + torch.diag(torch.ones(d - 1), -1)


def test_cg_probe_sees_a_coupling_whose_product_overflows_in_float16():
    """A float16 b of 3e4 overflowed A b to inf; the inf gap was taken for rounding and the
    coupled system 'converged' 6-13 % off."""
    a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float16)
    b = torch.tensor([3e4, 2e4], dtype=torch.float16)
    with pytest.raises(CoupledSystemsError):
        batched_cg(lambda p: a @ p, b)


@pytest.mark.parametrize("k", range(6))
def test_cg_probe_sees_a_coupling_into_a_zero_entry_of_b(k):
    """b = e_5 with a tridiagonal A was accepted (the two entries drew the same sign)."""
    a = _tridiag(6)
    b = torch.zeros(6)
    b[k] = 1.0
    with pytest.raises(CoupledSystemsError):
        batched_cg(lambda p: a @ p, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cg_probe_still_accepts_entrywise_maps_with_zeros_and_extremes(dtype):
    fin = torch.finfo(dtype)
    b = torch.tensor([0.0, 1.0, -3.0, fin.max / 4, fin.tiny, 0.0, float("nan"), 2.0], dtype=dtype)
    a = torch.tensor([2.0, 3.0, 0.5, 1.5, 7.0, 1.0, 1.0, 1e-3], dtype=dtype)
    r = batched_cg(lambda p: a * p, b, max_iter=3, damping=0.25)
    ok = torch.isfinite(b)
    want = b.double() / (a.double() + 0.25)
    torch.testing.assert_close(r.solution.double()[ok], want[ok], rtol=8 * fin.eps, atol=0)


def test_capture_bn_stats_of_a_compiled_model_replays_the_forwards_dropout_mask():
    """The eager re-run that takes a compiled model's BatchNorm statistics drew its dropout
    mask from the RNG state after the compiled forward: statistics of another mask (means
    0.07-0.5 off at p=0.5); it now replays the state the forward started from."""
    import copy

    from torch import nn

    from causalign.explain.counterfactual import capture_bn_stats

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    x = torch.randn(4, 1, 8, 8)
    compiled(x)  # a hookless train-mode forward: Dynamo traces without any hook
    torch.manual_seed(1)
    with capture_bn_stats(compiled) as got:
        compiled(x)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    with capture_bn_stats(eager) as want:
        eager(x)
    (mean, var), = got.values()
    (mean_e, var_e), = want.values()
    torch.testing.assert_close(mean, mean_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, var_e, rtol=1e-6, atol=1e-6)
    assert torch.equal(after, torch.get_rng_state())  # the re-run left the RNG as the forward did


def test_capture_bn_stats_of_a_compiled_model_inside_dataparallel():
    """eager_module unwraps a compiled model inside DataParallel, capture_bn_stats did not:
    its hooks on the BatchNorms missed in the traced graph and the statistics came back
    empty, silently (the inner problem then used the running ones)."""
    from torch import nn

    from causalign.explain.counterfactual import capture_bn_stats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    dp = nn.DataParallel(torch.compile(net, backend="eager"))  # no GPU: runs its module
    x = torch.randn(4, 1, 8, 8)
    dp(x)  # traced without hooks
    with capture_bn_stats(dp) as got:
        dp(x)
    assert list(got) == [net[1]]
    mean, var = got[net[1]]
    h = net[0](x).detach()
    torch.testing.assert_close(mean.reshape(-1), h.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var.reshape(-1), h.var(dim=(0, 2, 3), unbiased=False))


def test_dataset_writer_checks_the_attribute_count_before_writing_any_file(tmp_path):
    """add() said its checks run before any file is written, but a wrong attribute count
    was refused after the image and mask were saved: orphan files in images/ and masks/."""
    from causalign.data import DatasetWriter
    from causalign.data.format import DatasetMeta
    from causalign.errors import DataError

    w = DatasetWriter(tmp_path, DatasetMeta("toy", ["a", "b"], ["margin"]))
    with pytest.raises(DataError, match="2 attributes given, dataset declares 1"):
        w.add(torch.rand(8, 8), label=0, split="train", mask=torch.ones(8, 8),
              attributes=[1.0, 2.0])
    assert list((tmp_path / "images").iterdir()) == []
    assert list((tmp_path / "masks").iterdir()) == []


def test_setup_warnings_of_other_ranks_still_obey_an_error_filter():
    """Ranks other than 0 ran the setup under simplefilter('ignore'), which overrode a
    caller's -W error / filterwarnings=error: rank 0 failed at a setup warning while the
    other ranks went on into the first collective and waited for it. They now drop only
    what the caller's filters would have shown."""
    import warnings

    from causalign.engine.trainer import _warnings_ignored

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="same on every rank"), _warnings_ignored():
            warnings.warn("same on every rank", stacklevel=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _warnings_ignored():
            warnings.warn("setup", stacklevel=1)
        warnings.warn("after", stacklevel=1)
    assert [str(w.message) for w in seen] == ["after"]


def test_help_constants_name_nothing_the_registries_refuse():
    """cli.py's hand-written choice lists were checked one way only (every registered name
    appears somewhere in the help): a name removed from a registry but left in the constant
    ('bagnet | lfd') passed, and --help offered a choice the command refuses."""
    import re

    from causalign.cli import METHODS_HELP, MODELS_HELP, SALIENCY_HELP
    from causalign.explain import explainer_names
    from causalign.methods.base import method_names
    from causalign.models import MODEL_NAMES

    def names(text: str) -> list[str]:
        return [re.sub(r"\s*\(.*\)$", "", n).strip() for n in text.split("|")]

    assert set(names(METHODS_HELP)) <= set(method_names())
    assert set(names(MODELS_HELP)) == set(MODEL_NAMES)
    assert set(names(SALIENCY_HELP)) == set(explainer_names())


@pytest.mark.parametrize("layer", ["", "5"])
def test_gradcam_refuses_a_layer_without_spatial_output_in_one_line(layer):
    """layer='' (get_submodule's name of the model itself) or a Linear's name failed in the
    upsampling with torch's 'Input and output must have the same number of spatial
    dimensions', a ValueError traceback; it is one InputError line naming the layer."""
    from torch import nn

    from causalign.errors import InputError
    from causalign.explain import get_explainer

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    explainer = get_explainer("gradcam", model, layer=layer)
    with pytest.raises(InputError, match=r"has no spatial output.*last: 0, 2"):
        explainer.attribute(torch.randn(2, 1, 12, 12), target=0)
    with pytest.raises(InputError, match="has no spatial output"):
        explainer.predict_and_attribute(torch.randn(2, 1, 12, 12))


def _reordered_sums(c: torch.Tensor, coupling: float = 0.0):
    """(A p)_i = Σ_h c_ih p_i (+ coupling to the next entry), the H terms summed in a new
    order at each call, as atomics on a GPU do."""
    def matvec(p: torch.Tensor) -> torch.Tensor:
        terms = c[:, torch.randperm(c.shape[1])] * p[:, None]
        out = torch.zeros_like(p)
        for h in range(terms.shape[1]):
            out = out + terms[:, h]
        return out + coupling * torch.roll(p, 1)
    return matvec


def test_cg_probe_accepts_an_entrywise_map_whose_sums_run_in_another_order_each_call():
    """Per-entry sums that cancel 100x and are reordered per call differ from themselves by
    ~1e-4 relative, far over the 16 eps slack: the entry-wise map was refused. The map's own
    run-to-run noise (a third product, before a refusal only) now bounds the gap; a coupling
    far above that noise is still refused."""
    torch.manual_seed(1)
    c = torch.randn(8, 256) * 100
    c[:, -1] = -c[:, :-1].sum(1) + 1.0  # each entry's sum is 1, from terms of ~100
    b = torch.randn(8)
    r = batched_cg(_reordered_sums(c), b, max_iter=5)
    torch.testing.assert_close(r.solution, b, rtol=1e-2, atol=1e-2)
    with pytest.raises(CoupledSystemsError):
        batched_cg(_reordered_sums(c, coupling=0.5), b, max_iter=5)


@pytest.mark.parametrize(("key", "meant"), [("Lam", "method.lam"), ("lamm", "method.lam"),
                                            ("alpah", "method.alpha"), ("epoch", "epochs")])
def test_a_misspelt_bare_method_setting_names_the_method_key(key, meant):
    """An unknown --set key was compared with the training settings only: `Lam=1` for
    causal-align suggested 'amp', and `lamm`, `alpah` suggested nothing."""
    from causalign.engine.config import TrainConfig, apply_overrides
    from causalign.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(method="causal-align"), {key: 1})
    assert str(err.value).endswith(f"; did you mean '{meant}'?")


def test_explaining_a_compiled_model_says_its_wrappers_hooks_are_not_run():
    """Explainers run a compiled model's eager module (429c2fc): a hook on the
    torch.compile wrapper (an input normalisation as a pre-hook) was silently left out of
    every map. It is said; a wrapper without hooks explains without a word."""
    import warnings

    from torch import nn

    from causalign.explain import get_explainer

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    model(torch.rand(1, 1, 8, 8))
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_explainer("gradient", compiled)
    compiled.register_forward_pre_hook(lambda m, a: (a[0] * 10 - 5,))
    with pytest.warns(UserWarning, match=r"1 forward hook\(s\) on the torch.compile wrapper"):
        get_explainer("gradient", compiled)
    with pytest.warns(UserWarning, match="register them there"):
        get_explainer("gradient", nn.DataParallel(compiled))
