"""Audit 'flip': does `causalign counterfactual` flip where users run it?"""

from __future__ import annotations

import json

import pytest
import torch


def _blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n grey images, each a bright disc at a random place and radius on a dark ground."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = torch.randint(3, size - 3, (2, n), generator=g)
    r = 2 + 3 * torch.rand(n, generator=g)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return (0.1 + 0.8 * (d2 < r[:, None, None] ** 2).float())[:, None]


def test_default_autoencoder_training_takes_enough_steps_on_a_small_split(monkeypatch):
    """The default schedule was 15 epochs whatever the split's size: on 8 images (one
    batch) 15 optimiser steps, and the autoencoder reconstructed no better than the mean
    image (measured on a 64-image 32 px split: MSE 0.0128 against 0.0086), so latent
    counterfactuals could not move x (0 of 8 flipped). Now the default takes at least
    MIN_AE_STEPS steps; an explicit epoch count is used as given."""
    from causalign.models import autoencoder as mod

    steps = []
    real = torch.optim.Adam.step

    def count(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", count)
    images = _blobs(8, size=8)
    mean_image_mse = float(images.var(0, unbiased=False).mean())
    mod.train_autoencoder(images, epochs=2, width=4, latent_channels=2)
    assert len(steps) == 2
    steps.clear()
    ae = mod.train_autoencoder(images, width=4, latent_channels=2)
    assert len(steps) == 240
    assert ae.train_mse < 0.5 * mean_image_mse, (ae.train_mse, mean_image_mse)


@pytest.fixture(scope="module")
def erm_run(tiny_data, tmp_path_factory):
    from causalign.cli import main

    run = tmp_path_factory.mktemp("flip") / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--set", "threads=1",
                 "--no-progress"]) == 0
    return run


def test_cli_says_when_few_counterfactuals_flip(erm_run, tmp_path, capsys):
    """A search that flips none printed only "flip rate 0.000", exit 0, nothing on stderr:
    it read like a finding about the model, not like a search too costly at this α. Now a
    warning names the count, the target probability and what to try."""
    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "3", "--steps",
                 "3", "--alpha", "100", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flip_rate"] == 0.0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1
    assert err[0].startswith("warning: only 0 of 3 counterfactuals flipped the prediction")
    assert "--alpha (now 100)" in err[0] and "--steps (now 3)" in err[0]
    assert "--optimizer newton" in err[0]


def test_cli_low_flip_warning_names_a_poor_autoencoder():
    """Latent space: the warning says when the autoencoder reconstructs worse than half the
    mean image's error (the measured cause of 0 flips at 32 px), and only then."""
    from types import SimpleNamespace

    from causalign.cli import _low_flip_warning

    images = _blobs(8)
    var = float(images.var(0).mean())
    s = SimpleNamespace(alpha=0.01, steps=100, space="latent")
    summary = {"n_generated": 4, "n_diverged": 0, "flip_rate": 0.25, "mean_target_prob": 0.4}
    poor = _low_flip_warning(summary, s, 0.9 * var, images)
    good = _low_flip_warning(summary, s, 0.1 * var, images)
    assert poor is not None and "autoencoder reconstructs the training images poorly" in poor
    assert good is not None and "autoencoder" not in good
    assert "only 1 of 4" in good
    assert _low_flip_warning({**summary, "flip_rate": 0.5}, s, 0.9 * var, images) is None
    # every search diverged: the divergence warning says it, not this one
    assert _low_flip_warning({**summary, "n_diverged": 4, "flip_rate": 0.0}, s, None,
                             None) is None
