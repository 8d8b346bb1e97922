"""What a run records of its data and network, and the warnings comparing another site's
data with it. The rule by which `warn_other_intensity` tells another site's pixel range from
the run's:
a span beyond one training span outside it, or under an eighth of it, warns; the synthetic
sites' contrast gains (0.75..1.25) and a degenerate (constant) training range do not
misfire."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from causalign.engine import trainer


@pytest.mark.parametrize(("trained", "here", "warns"), [
    ((0.0, 1.0), (0.0, 1.0), False),
    ((0.0, 1.0), (0.1, 0.9), False),        # a smaller test split inside the range
    ((0.0, 1.0), (0.0, 1.25), False),       # a contrast gain of 1.25
    ((0.0, 1.0), (-0.9, 1.9), False),       # up to one span outside: not flagged
    ((0.0, 1.0), (0.0, 2.01), True),        # beyond one span above
    ((0.0, 1.0), (-1.01, 1.0), True),       # beyond one span below
    ((0.0, 1.0), (0.0, 65535.0), True),     # float 0..65535
    ((0.0, 1.0), (-1024.0, 3071.0), True),  # HU
    ((0.0, 1.0), (0.0, 0.0625), True),      # 12-bit values in a 16-bit PNG
    ((0.0, 1.0), (0.0, 0.13), False),       # just over an eighth
    ((0.5, 0.5), (0.5, 0.5), False),        # constant training images, the same here
    ((0.5, 0.5), (0.4, 0.6), True),         # constant training images, others here
])
def test_other_intensity_rule(trained, here, warns, monkeypatch):
    monkeypatch.setattr(trainer, "read_run_config",
                        lambda run: {"data_intensity": list(trained)})
    monkeypatch.setattr(trainer, "intensity_range", lambda ds: here)
    ds = SimpleNamespace(root=Path("/data/site_b"), split="test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.warn_other_intensity(Path("/runs/a"), ds)
    messages = [str(w.message) for w in caught]
    assert bool(messages) is warns, messages
    if warns:
        assert len(messages) == 1 and messages[0].startswith("/data/site_b (test): pixel values")


@pytest.mark.parametrize("record", [None, [0.0], [0.0, float("nan")], "0..1"])
def test_runs_without_a_usable_record_are_not_checked(record, monkeypatch):
    monkeypatch.setattr(trainer, "read_run_config", lambda run: {"data_intensity": record})
    monkeypatch.setattr(trainer, "intensity_range", lambda ds: (0.0, 65535.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.warn_other_intensity(Path("/runs/a"), SimpleNamespace(root=Path("/d"),
                                                                      split="test"))
    assert caught == []


@pytest.mark.parametrize(("trained", "here", "warns"), [
    ([1, 32, 32], (1, 32, 32), False),
    ([1, 32, 32], (3, 32, 32), False),          # channels are refused elsewhere
    ([1, 32, 32], (1, 48, 48), True),
    ([1, 32, 32], (1, 32, 40), True),           # non-square
    ([1, 24, 32, 32], (1, 40, 32, 32), False),  # a volume's depth may differ
    ([1, 24, 32, 32], (1, 24, 64, 64), True),
    (None, (1, 48, 48), False),                 # a run from before the record
])
def test_other_geometry_warns_on_another_image_size(trained, here, warns, monkeypatch):
    monkeypatch.setattr(trainer, "read_run_config", lambda run: {"data_image_shape": trained})
    ds = SimpleNamespace(root=Path("/data/site_b"), split="val", image_shape=here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.warn_other_geometry(Path("/runs/a"), ds)
    messages = [str(w.message) for w in caught]
    assert bool(messages) is warns, messages
    if warns:
        assert messages[0].startswith(f"/data/site_b (val): images are {here[-2]}×{here[-1]} px")


def test_evaluate_on_another_image_size_warns_once(tiny_data, tmp_path, capsys):
    """A run trained at one size, evaluated with --data at another: it ran silently."""
    from causalign.cli import main
    from causalign.data.synth import SynthConfig, generate
    from causalign.engine import TrainConfig, train

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    assert trainer.read_run_config(run)["data_image_shape"][-2:] == [32, 32]
    other = tmp_path / "other"
    generate(other, SynthConfig(n_train=8, n_val=4, n_test=8, size=40, seed=1))
    capsys.readouterr()
    rc = main(["evaluate", str(run), "--data", str(other), "--no-progress"])
    err = capsys.readouterr().err
    assert rc in (0, None), err
    assert err.count("images are 40×40 px, the run was trained on 32×32") == 1, err


@pytest.mark.parametrize(("method", "expected"), [("erm", "SevenLayerCNN"), ("bagnet", "BagNet")])
def test_config_records_the_network_actually_built(tiny_data, tmp_path, method, expected):
    """bagnet (and icnn) build their own network: config.yaml said `model: cnn7` for a
    BagNet-17 run, with nothing naming what was trained."""
    from causalign.engine import TrainConfig, train

    run = tmp_path / method
    train(tiny_data, TrainConfig(method=method, epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    cfg = trainer.read_run_config(run)
    assert cfg["model_class"] == expected
    assert cfg["model_parameters"] > 0


@pytest.mark.parametrize(("method", "expected"), [("erm", "SevenLayerCNN"), ("bagnet", "BagNet")])
def test_bench_step_names_the_network_it_timed(method, expected):
    """`bench step --method bagnet` reported "model": "cnn7" (the setting) for a BagNet."""
    from causalign.engine.bench import bench_step

    result = bench_step(method, size=24, batch_size=2, steps=1, warmup=0)
    assert result["model"] == "cnn7" and result["model_class"] == expected
