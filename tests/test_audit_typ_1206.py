"""Audit (static typing and API signatures, 2026-12-06): regression tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from causalign.explain.counterfactual_export import attribute_change_rates
from causalign.methods.causal_align import CausalAlign, CausalAlignParams
from causalign.models.autoencoder import ConvAutoencoder


def test_attribute_change_rate_names_with_spaces() -> None:
    # attribute names may hold spaces (dataset.yaml only strips them); the rate was read
    # off the first word of "<name> <before>→<after>", crediting "bill shape" to "bill"
    recs = [{"attributes_changed": ["bill shape 0.91→0.12"]}, {"attributes_changed": []}]
    rates = attribute_change_rates(recs, ["bill", "bill shape", "wing"])
    assert rates["attribute_change_rate"] == {"bill": 0.0, "bill shape": 0.5, "wing": 0.0}


class _OwnAutoencoder(nn.Module):
    """Not a ConvAutoencoder: any module with encode/decode serves the latent space."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 1, 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.enc(x)

    def decode(self, z: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        return torch.sigmoid(self.dec(z))


def test_causal_align_state_dict_with_own_autoencoder() -> None:
    # CausalAlign.autoencoder is typed nn.Module (one assigned by the user is kept), but
    # state_dict passed it to autoencoder_state(ConvAutoencoder): AttributeError 'config'
    m = CausalAlign(CausalAlignParams(space="latent", distance="l2"))
    own = _OwnAutoencoder()
    m.autoencoder = own
    with pytest.warns(UserWarning, match="not a ConvAutoencoder"):
        state = m.state_dict()
    assert state["autoencoder"] is None
    fresh = CausalAlign(CausalAlignParams(space="latent", distance="l2"))
    fresh.autoencoder = own
    fresh.load_state_dict(state)  # the user's module stays
    assert fresh.autoencoder is own
    # a ConvAutoencoder is still kept
    m.autoencoder = ConvAutoencoder(in_channels=1, width=2, latent_channels=2)
    assert m.state_dict()["autoencoder"]["kind"] == "causalign-autoencoder"


@pytest.mark.parametrize("rule", ["²", "٣"])
def test_counterfactual_targets_non_ascii_digit_rule(rule: str) -> None:
    # str.isdigit() holds for "²" (int() then failed with a bare ValueError) and "٣" (taken
    # as class 3); is_target_rule, which the generator checks, refuses both
    from causalign.errors import ConfigError
    from causalign.explain.counterfactual import counterfactual_targets, is_target_rule

    assert not is_target_rule(rule)
    with pytest.raises(ConfigError, match="target rule"):
        counterfactual_targets(torch.tensor([0, 1]), 4, rule, torch.zeros(2, 4))


def test_lowrank_diag_solve_empty_batch() -> None:
    # reshape(0, -1) is ambiguous: an empty batch raised a RuntimeError, while batched_cg
    # and implicit_gradient (its callers' alternatives) return an empty solve
    from causalign.implicit import lowrank_diag_solve

    v = lowrank_diag_solve(torch.zeros(0, 2, 4), torch.zeros(0, 2, 2), torch.ones(0, 4),
                           torch.zeros(0, 1, 2, 2))
    assert v.shape == (0, 1, 2, 2)
    # the shapes are still checked for N = 0
    with pytest.raises(ValueError, match="do not match"):
        lowrank_diag_solve(torch.zeros(0, 2, 4), torch.zeros(0, 2, 2), torch.ones(0, 3),
                           torch.zeros(0, 1, 2, 2))
    # and a non-empty solve is unchanged: (JᵀSJ + diag(a)) v = b
    jac, curv = torch.randn(3, 2, 4, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    diag, b = torch.rand(3, 4, dtype=torch.float64) + 0.5, torch.randn(3, 4, dtype=torch.float64)
    v = lowrank_diag_solve(jac, curv.expand(3, 2, 2), diag, b)
    a = jac.transpose(1, 2) @ jac + torch.diag_embed(diag)
    assert torch.allclose((a @ v[:, :, None])[..., 0], b, atol=1e-10)


def test_settings_for_run_refuses_unknown_setting() -> None:
    # **overrides went through setattr: a misspelt name became a new, unused attribute and
    # the search ran with the default α, silently
    from causalign.explain.counterfactual_export import settings_for_run

    with pytest.raises(TypeError, match="unknown setting 'alpah'"):
        settings_for_run(object(), alpah=0.5)
    s = settings_for_run(object(), alpha=0.5, steps=None)  # None: keep the default
    assert (s.alpha, s.steps) == (0.5, 100)


def test_ieee_fp32_convolutions_on_torch_before_fp32_precision(monkeypatch) -> None:
    # torch 2.2-2.8 (pyproject: torch>=2.2) has no torch.backends.fp32_precision and a
    # cudnn.flags() without that argument; on CUDA the context raised AttributeError, so
    # every counterfactual search and causal-align step failed there
    import contextlib

    from causalign.explain.counterfactual import ieee_fp32_convolutions

    seen: dict[str, object] = {}

    @contextlib.contextmanager
    def old_flags(enabled=False, benchmark=False, benchmark_limit=10, deterministic=False,
                  allow_tf32=True):  # torch 2.2's signature
        seen.update(allow_tf32=allow_tf32)
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(type(torch.backends), "fp32_precision", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "flags", old_flags)
    assert not hasattr(torch.backends, "fp32_precision")
    with ieee_fp32_convolutions():
        pass
    assert seen == {"allow_tf32": False}
