"""TrainConfig / train() / evaluation from a PyTorch user's side: wrong Python types in a
TrainConfig, NumPy scalars and paths as values, foreign `init` files, the caller's grad mode
and default dtype, models cast to another dtype, and sync_bn in a single process."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import die_after_checkpoint

from causalign.engine import TrainConfig, load_run, train
from causalign.engine.evaluate import evaluate_split, quick_metrics
from causalign.errors import CausalignError, ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from causalign.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("opts") / "data"
    generate(root, SynthConfig(n_train=32, n_val=16, n_test=16, size=32, seed=5))
    return root


def _cfg(**kw) -> TrainConfig:
    base = dict(method="erm", epochs=1, width=4, batch_size=16, seed=0, device="cpu",
                threads=1, deletion_fractions=[0.1], eval_saliency="gradcam")
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "best.pt", weights_only=False)["model"]


@pytest.mark.parametrize(("kw", "message"), [
    # a string "false" is truthy: deterministic mode (and amp, bn_recalibrate) went on
    ({"deterministic": "false"}, r"deterministic must be true or false, got 'false'"),
    ({"amp": "no"}, r"amp must be true or false, got 'no'"),
    ({"epochs": "3"}, r"epochs must be an integer, got '3' \(str\)"),
    ({"epochs": 2.0}, r"epochs must be an integer, got 2\.0"),
    ({"lr": "1e-3"}, r"lr must be a number, got '1e-3'"),
    ({"lr": True}, r"lr must be a number, got True"),
    ({"seed": True}, r"seed must be an integer, got True"),
    ({"device": None}, r"device must be a string, got None"),
    ({"init": 1}, r"init must be a string, got 1"),
    ({"method_args": "steps=2"}, r"method_args must be a mapping"),
    ({"deletion_fractions": None}, r"deletion_fractions must be a list of numbers in \(0, 1\)"),
])
def test_wrong_python_types_in_a_trainconfig_are_one_config_error(kw, message):
    """Before: "false" passed validation (and switched the flag on), the others surfaced as
    TypeError/AttributeError/ValueError/RuntimeError tracebacks from the comparisons or
    from torch."""
    with pytest.raises(ConfigError, match=message):
        _cfg(**kw).validate()


def test_numpy_scalars_tuples_and_paths_are_accepted_and_stored_as_python(data, tmp_path):
    """Values from a NumPy sweep or a pathlib.Path made config.yaml's writer raise
    yaml.representer.RepresenterError after the data was loaded."""
    first = tmp_path / "first"
    train(data, _cfg(), first, progress=False)
    cfg = _cfg(lr=np.float64(1e-3), epochs=np.int64(1), batch_size=np.int32(16),
               amp=np.bool_(False), deletion_fractions=(np.float64(0.1),), init=first,
               method="causal-align", method_args={"steps": np.int64(2), "cg_iters": 2})
    train(data, cfg, tmp_path / "second", progress=False)
    stored = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())
    assert stored["lr"] == 1e-3 and type(stored["lr"]) is float
    assert stored["epochs"] == 1 and stored["batch_size"] == 16 and stored["amp"] is False
    assert stored["deletion_fractions"] == [0.1]
    assert stored["init"] == str(first)
    assert stored["method_args"] == {"steps": 2, "cg_iters": 2}
    assert type(stored["method_args"]["steps"]) is int


@pytest.mark.parametrize("content", [torch.zeros(3), None])
def test_init_from_a_pt_file_without_weights_is_one_line(data, tmp_path, content):
    """A .pt holding a tensor or None: `"model" in state` raised RuntimeError/TypeError."""
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(CausalignError, match=r"init: .*foreign\.pt holds no model weights"):
        train(data, _cfg(init=str(path)), tmp_path / "run", progress=False)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_train_inside_no_grad_or_inference_mode_trains_and_restores_it(data, tmp_path,
                                                                       context):
    """Before: "element 0 of tensors does not require grad" at the first backward."""
    reference = train(data, _cfg(), tmp_path / "ref", progress=False)
    with context():
        metrics = train(data, _cfg(), tmp_path / "run", progress=False)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert metrics["test"] == reference["test"]
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_train_and_load_run_under_a_float64_default_dtype(data, tmp_path):
    """torch.set_default_dtype(torch.float64) built float64 weights that the float32 data
    could not enter ("Input type (torch.FloatTensor) and weight type (torch.DoubleTensor)
    should be the same"); the run now equals a float32 one and the default is restored."""
    reference = train(data, _cfg(), tmp_path / "ref", progress=False)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        metrics = train(data, _cfg(), tmp_path / "run", progress=False)
        assert torch.get_default_dtype() == torch.float64
        _, model, _, _ = load_run(tmp_path / "run", device="cpu")
        assert next(model.parameters()).dtype == torch.float32  # the checkpoint's dtype
        with pytest.raises(CausalignError):  # restored when training raises, too
            train(data, _cfg(init=str(tmp_path / "nothing")), tmp_path / "bad", progress=False)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(saved)
    assert metrics["test"] == reference["test"]
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_quick_metrics_and_evaluate_split_take_a_model_of_another_dtype(data, tmp_path,
                                                                         dtype):
    """The splits are float32 and the caller cannot cast them: a `.double()` model failed
    with a dtype-mismatch RuntimeError in quick_metrics and an InputError asking to cast the
    inputs in evaluate_split."""
    from causalign.data import LesionDataset

    train(data, _cfg(), tmp_path / "run", progress=False)
    _, model, method, _ = load_run(tmp_path / "run", device="cpu")
    test = LesionDataset(data, "test")
    ref_quick = quick_metrics(model, method, test, "cpu")
    ref_eval = evaluate_split(model, method, test, "cpu", fractions=(0.1,))
    model = model.to(dtype)
    quick = quick_metrics(model, method, test, "cpu")
    full = evaluate_split(model, method, test, "cpu", fractions=(0.1,))
    assert next(model.parameters()).dtype == dtype  # the model is not cast back
    assert quick["n"] == ref_quick["n"] == full["n"]
    tol = 1e-6 if dtype == torch.float64 else 0.1
    assert quick["loss"] == pytest.approx(ref_quick["loss"], abs=tol)
    assert full["loss"] == pytest.approx(ref_eval["loss"], abs=tol)
    if dtype == torch.float64:
        assert quick["accuracy"] == ref_quick["accuracy"]
        assert full["cam_precision"] == pytest.approx(ref_eval["cam_precision"], abs=1e-5)


def test_sync_bn_in_a_single_process_warns_instead_of_silently_doing_nothing(data, tmp_path):
    """sync_bn only acts across torchrun ranks; a single process recorded sync_bn: true and
    ran plain BatchNorm without a word."""
    with pytest.warns(UserWarning) as record:
        metrics = train(data, _cfg(sync_bn=True), tmp_path / "run", progress=False)
    said = [str(w.message) for w in record if "sync_bn" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("sync_bn: training runs in a single process")
    assert "test" in metrics  # it still trained and evaluated, with plain BatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning when it is off
        assert "test" in train(data, _cfg(), tmp_path / "off", progress=False)


def test_resume_does_not_need_the_init_source_any_more(data, tmp_path, monkeypatch):
    """The checkpoint holds the weights, yet resuming re-applied `init`: a moved or deleted
    init run (or a relative path from another folder) stopped `--resume` with "init: ...: no
    checkpoint there"."""
    import shutil

    from causalign.engine.trainer import Trainer

    source = tmp_path / "pretrained"
    train(data, _cfg(), source, progress=False)
    cfg = _cfg(epochs=2, init=str(source))
    full = train(data, cfg, tmp_path / "full", progress=False)
    original = die_after_checkpoint(monkeypatch, 1)  # interrupted right after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(data, cfg, tmp_path / "part", progress=False)
    monkeypatch.setattr(Trainer, "_save_state", original)
    shutil.rmtree(source)
    resumed = train(data, cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["test"] == full["test"]
    # a finished run resumed: its stored metrics, no init needed either
    assert train(data, cfg, tmp_path / "full", resume=True, progress=False) == full
    # a fresh run still needs it
    with pytest.raises(CausalignError, match=r"init: .*pretrained: no checkpoint there"):
        train(data, cfg, tmp_path / "fresh", progress=False)


def test_a_torch_device_is_accepted_where_a_device_name_is(data, tmp_path):
    """load_run(run, device=torch.device("cpu")) raised "TypeError: expected string or
    bytes-like object" from the device-name regex; None did the same."""
    cfg = _cfg(device=torch.device("cpu"))
    train(data, cfg, tmp_path / "run", progress=False)
    assert cfg.device == "cpu"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "cpu"
    _, model, _, _ = load_run(tmp_path / "run", device=torch.device("cpu"))
    assert next(model.parameters()).device == torch.device("cpu")
    with pytest.raises(CausalignError, match=r"device must be auto, cpu or cuda\[:k\], got None"):
        load_run(tmp_path / "run", device=None)


def test_train_takes_a_mapping_of_config_keys_and_refuses_other_objects(data, tmp_path):
    """A dict in place of a TrainConfig raised "AttributeError: 'dict' object has no
    attribute 'validate'"; it now reads like a --config file."""
    metrics = train(data, {"method": "erm", "epochs": 1, "width": 4, "batch_size": 16,
                           "device": "cpu", "threads": 1, "deletion_fractions": [0.1]},
                    tmp_path / "run", progress=False)
    assert metrics["epochs"] == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["width"] == 4
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'"):
        train(data, {"epoch": 1}, tmp_path / "typo", progress=False)
    with pytest.raises(ConfigError, match=r"cfg must be a TrainConfig .* got str"):
        train(data, "erm", tmp_path / "str", progress=False)


def test_a_second_fit_of_the_same_trainer_does_not_overwrite_its_finished_run(data,
                                                                             tmp_path):
    """The out-folder check ran only in Trainer.__init__: fit() again retrained from scratch
    and rewrote the finished run's metrics.json (README: a finished run is never overwritten
    without --resume)."""
    from causalign.engine.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(data, _cfg(), run, progress=False)
    trainer.fit()
    before = (run / "metrics.json").read_bytes(), (run / "checkpoint.pt").read_bytes()
    with pytest.raises(CausalignError, match=r"already holds a run"):
        trainer.fit()
    assert ((run / "metrics.json").read_bytes(), (run / "checkpoint.pt").read_bytes()) == before
    # with resume, a second fit returns the finished run's metrics
    resumed = Trainer(data, _cfg(), run, resume=True, progress=False)
    assert resumed.fit() == resumed.fit()
