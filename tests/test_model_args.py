"""Model architecture options from the config: `model_args` / `--set model.<option>=v`.

Before, build_model passed only `width`: the multi-view model's train_slices (seed 002 App. E.3
trains on 10 of 100 slices), tau, delta_init, learn_tau and position_dim could not be set, and
`--set model.train_slices=10` was "unknown config key". Options are checked per model, stored
in config.yaml and rebuilt by evaluate / explain / --resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from causalign.cli import main
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig
from causalign.engine.config import apply_overrides, parse_set
from causalign.engine.trainer import Trainer, load_run, settings_diff
from causalign.errors import ConfigError, InputError
from causalign.methods import DataInfo, build_method
from causalign.models import MultiViewCNN, build_model

VOLUME = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 100, 8, 8), attributes=[])


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol") / "data"
    generate(root, SynthConfig(n_train=16, n_val=8, n_test=8, size=32, depth=4, seed=5))
    return root


def _train_args(data, run, *sets: str) -> list[str]:
    args = ["train", str(data), "--model", "multiview", "--out", str(run), "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--no-progress", "--set", "width=4",
            "--set", "eval_saliency=gradient", "--set", "deletion_fractions=[0.1]"]
    for s in sets:
        args += ["--set", s]
    return args


def test_set_model_options_reach_the_multiview_model():
    cfg = apply_overrides(TrainConfig(), parse_set(
        ["model=multiview", "width=4", "model.train_slices=10", "model.tau=5e-1",
         "model.delta_init=1", "model.learn_tau=true", "model.position_dim=3"]))
    # normalised: a whole-number count is an int, delta a float (as config.yaml stores them);
    # "5e-1" arrives as a string (YAML 1.1 reads only "5.0e-1" as a number)
    assert cfg.model_args == {"train_slices": 10, "tau": 0.5, "delta_init": 1.0,
                              "learn_tau": True, "position_dim": 3}
    model = build_method("erm").build_model(cfg, VOLUME)
    assert isinstance(model, MultiViewCNN)
    assert model.train_slices == 10 and model.learn_tau
    assert float(model.temperature().detach()) == pytest.approx(0.5)
    assert float(model.delta.detach()) == 1.0 and model.position.embedding_dim == 3
    # the paper's setting: 10 of 100 slices per training sample, every slice in eval
    assert model.train().slices_used(2, 100, torch.device("cpu")).shape == (2, 10)
    assert model.eval().slices_used(2, 100, torch.device("cpu")).shape == (2, 100)


def test_model_args_mapping_and_python_api():
    cfg = TrainConfig(model="multiview", model_args={"train_slices": np.float64(0.25)})
    cfg.validate()
    assert cfg.model_args == {"train_slices": 0.25}
    assert type(cfg.model_args["train_slices"]) is float  # YAML-safe, not a NumPy scalar
    merged = apply_overrides(cfg, {"model_args": {"tau": 2}, "model.learn_tau": False})
    assert merged.model_args == {"train_slices": 0.25, "tau": 2.0, "learn_tau": False}
    m = build_model("multiview", 1, 2, width=4, options={"train_slices": 3})
    assert m.train_slices == 3
    assert build_model("multiview", 1, 2, width=4,
                       options={"position_dim": 0}).position.embedding_dim == 0
    assert build_model("multiview", 1, 2, width=4).position.embedding_dim == 6  # defaults


@pytest.mark.parametrize("model,values,match", [
    ("cnn7", {"model.tau": 0.1}, "model 'cnn7' has no option 'tau'"),
    ("resnet18", {"model.train_slices": 10}, "model 'resnet18' has no option 'train_slices'"),
    ("multiview", {"model.slices": 10}, "model 'multiview' has no option 'slices' in "
                                        "model_args .valid: train_slices"),
    ("cnn7", {"model_args": {"width": 8}}, "model 'cnn7' has no option 'width' in model_args"),
    ("multiview", {"model.tau": 0}, r"model.tau must be a number > 0 in float32's range"),
    ("multiview", {"model.tau": float("inf")}, "model.tau must be a number > 0"),
    # τ and δ are float32 scalars: 1e-300 became τ = 0 and 1e39 δ = inf, every output NaN
    # (before: "non-finite loss at epoch 1 step 0 ...; try a lower --lr" after the data load)
    ("multiview", {"model.tau": 1e-300}, "model.tau must be a number > 0 in float32's range"),
    ("multiview", {"model.delta_init": 1e39}, "model.delta_init must be a finite number"),
    ("multiview", {"model.tau": "0.1x"}, "model.tau must be a number"),
    ("multiview", {"model.delta_init": float("nan")}, "model.delta_init must be a finite"),
    ("multiview", {"model.train_slices": 2.5}, "model.train_slices must be a fraction"),
    ("multiview", {"model.train_slices": 0}, "model.train_slices must be a fraction"),
    ("multiview", {"model.train_slices": True}, "model.train_slices must be a number"),
    ("multiview", {"model.learn_tau": "no"}, "model.learn_tau must be true or false"),
    ("multiview", {"model.position_dim": -1}, "model.position_dim must be a whole number"),
    ("multiview", {"model.position_dim": 2.5}, "model.position_dim must be a whole number"),
    ("multiview", {"model_args": [1]}, "model_args must be a mapping"),
])
def test_unknown_or_bad_model_option_is_one_config_error(model, values, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(TrainConfig(), {"model": model, **values})


def test_model_option_for_the_wrong_model_is_one_cli_line(tiny_data, tmp_path, capsys):
    rc = main(["train", str(tiny_data), "--out", str(tmp_path / "r"), "--epochs", "1",
               "--device", "cpu", "--no-progress", "--set", "model.tau=0.1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == ["error: model 'cnn7' has no option 'tau' in model_args (it "
                               "takes none)"]
    assert not (tmp_path / "r").exists()


def test_options_train_are_stored_and_reload(volumes, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(volumes, apply_overrides(TrainConfig(), {
        "model": "multiview", "width": 4, "epochs": 1, "batch_size": 8, "device": "cpu",
        "eval_saliency": "gradient", "deletion_fractions": [0.1],
        "model.train_slices": 2, "model.learn_tau": True}), run, progress=False)
    trainer.fit()
    # the trained model is the one configured (before: train_slices 0.5, fixed tau)
    assert trainer.model.train_slices == 2 and trainer.model.learn_tau
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model_args"] == {"train_slices": 2, "learn_tau": True}
    cfg, model, _, _ = load_run(run, device="cpu")
    # a learned τ is a parameter (log_tau), not the buffer `tau`: without the run's options
    # the rebuilt model's state_dict would not fit the checkpoint
    assert cfg.model_args == stored["model_args"] and model.learn_tau
    assert model.train_slices == 2 and "log_tau" in dict(model.named_parameters())
    assert torch.equal(model.log_tau.detach(), trainer.model.log_tau.detach().cpu())


def test_cli_evaluate_explain_and_resume_rebuild_the_run(volumes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(volumes, run, "model.learn_tau=true",
                            "model.position_dim=2")) == 0
    assert main(["evaluate", str(run), "--device", "cpu", "--no-progress"]) == 0
    # a run's config.yaml works as --config, its model_args included
    again = tmp_path / "again"
    assert main(["train", str(volumes), "--config", str(run / "config.yaml"), "--out",
                 str(again), "--no-progress"]) == 0
    assert (yaml.safe_load((again / "config.yaml").read_text())["model_args"]
            == {"learn_tau": True, "position_dim": 2})
    assert main(["explain", str(run), "--saliency", "wbp", "--out", str(tmp_path / "ex"),
                 "--limit", "2", "--device", "cpu", "--no-progress"]) == 0
    # --resume rebuilds the same model: the final evaluation of a run killed after its last
    # epoch (metrics.json missing) loads the checkpoint into it
    (run / "metrics.json").unlink()
    assert main(_train_args(volumes, run, "model.learn_tau=true", "model.position_dim=2")
                + ["--resume"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    # another option value is another model: refused, naming it
    capsys.readouterr()
    assert main(_train_args(volumes, run, "model.learn_tau=true", "model.position_dim=3")
                + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings differ: model_args" in err[0], err
    assert "'position_dim': 2" in err[0] and "'position_dim': 3" in err[0]


def test_runs_without_model_args_keep_defaults_and_resume(volumes, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(volumes, run)) == 0
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw.pop("model_args")  # a run written before model_args existed
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg, model, _, _ = load_run(run, device="cpu")
    assert cfg.model_args == {} and model.train_slices == 0.5 and not model.learn_tau
    # an option spelled out at its default is the same model: no settings difference
    same = apply_overrides(cfg, {"model.tau": 0.25, "model.train_slices": 0.5})
    assert settings_diff(run, same) == []
    other = apply_overrides(cfg, {"model.train_slices": 10})
    assert any("model_args" in d and "10" in d for d in settings_diff(run, other))


def test_run_trained_on_deeper_volumes_loads_for_shallower_data(volumes, tmp_path):
    """A multi-view model's slice-position table has max(512, depth) rows for the training
    data; load_run rebuilt it for the data at hand, so a run trained on 520-slice volumes
    could not evaluate 4-slice ones ("does not fit the run's model: position.weight (520, 6)
    vs (512, 6)"), although it embeds those positions."""
    from causalign.io import atomic_torch_save

    run = tmp_path / "run"
    assert main(_train_args(volumes, run)) == 0
    _, before, _, _ = load_run(run, device="cpu")
    # the same run as if trained on 520-slice volumes: 8 more rows in its position table
    for name in ("best.pt", "checkpoint.pt"):
        ckpt = torch.load(run / name, weights_only=False)
        w = ckpt["model"]["position.weight"]
        ckpt["model"]["position.weight"] = torch.cat([w, torch.randn(520 - len(w), w.shape[1])])
        atomic_torch_save(run / name, ckpt)
    _, model, _, _ = load_run(run, device="cpu")
    assert model.position.num_embeddings == 520 and model.max_slices == 520
    x = torch.rand(3, 1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), before(x))  # slices 0-3 embed as they did
    assert main(["evaluate", str(run), "--device", "cpu", "--no-progress"]) == 0
    # deeper volumes than the run's table: one line naming both depths, not a shape dump
    with pytest.raises(InputError, match="volume has 600 slices; this model embeds at most 520"):
        model(torch.rand(1, 1, 600, 8, 8))


@pytest.mark.parametrize("source_rows,depth", [(520, 4), (512, 600)])
def test_init_from_a_multiview_run_of_another_depth(tmp_path, source_rows, depth):
    """--set init=RUN (fine-tuning) onto volumes of another depth failed: "init: ... does
    not fit this model (position.weight (520, 6) vs (512, 6))". The rows both position
    tables have come from the source; the model keeps the size its data gives it."""
    from causalign.engine.trainer import init_weights
    from causalign.io import atomic_torch_save

    torch.manual_seed(0)
    source = MultiViewCNN(1, 2, width=4, max_slices=source_rows)
    atomic_torch_save(tmp_path / "src.pt", {"model": source.state_dict()})
    model = build_model("multiview", 1, 2, width=4, image_shape=(1, depth, 32, 32))
    fresh = model.position.weight.detach().clone()
    init_weights(model, tmp_path / "src.pt")
    rows = max(512, depth)
    k = min(rows, source_rows)
    assert model.position.num_embeddings == rows
    assert torch.equal(model.position.weight[:k], source.position.weight[:k])
    assert torch.equal(model.position.weight[k:], fresh[k:])  # no source row: fresh init
    theirs = source.state_dict()
    for name, value in model.state_dict().items():
        if name != "position.weight":
            assert torch.equal(value, theirs[name]), name


def test_model_options_in_a_config_file(tmp_path, capsys):
    """`model.tau: 0.1` in a --config file was refused as an unknown key (--set and a
    model_args mapping worked)."""
    from causalign.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: multiview\nmodel.tau: 0.1\n")
    rc = main(["train", str(tmp_path / "missing"), "--config", str(cfg), "--no-progress",
               "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    # the config was accepted: what stops the run is the missing data folder
    assert rc == 2 and "unknown config key" not in err and "missing" in err, err
    cfg.write_text("model: multiview\nmodel.bogus: 0.1\n")
    with pytest.raises(Exception, match="no option 'bogus'"):
        from causalign.engine.config import apply_overrides, load_config_file
        apply_overrides(TrainConfig(), load_config_file(cfg)).validate()
