"""`causalign export`: a run's model as a torch.export program for deployment."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from causalign import cli
from causalign.data import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train
from causalign.engine import export as export_module
from causalign.engine.export import export_run
from causalign.engine.trainer import load_run
from causalign.errors import CausalignError


def _train(data, out, **kw):
    cfg = TrainConfig(**{**dict(method="erm", epochs=1, width=4, batch_size=16, seed=0,
                                device="cpu", deletion_fractions=[0.1]), **kw})
    train(data, cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def erm_run(tiny_data, tmp_path_factory):
    return _train(tiny_data, tmp_path_factory.mktemp("export") / "erm")


def _load(path):
    extra = {"causalign.json": "", "config.yaml": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra["causalign.json"]), extra["config.yaml"]


def test_the_program_gives_the_runs_logits_at_any_batch_size(erm_run, tiny_data, tmp_path):
    rec = export_run(erm_run, tmp_path / "m.pt2")
    program, saved, config = _load(tmp_path / "m.pt2")
    _, model, _, _ = load_run(erm_run, device="cpu")
    test = LesionDataset(tiny_data, "test")
    for n in (1, 5, len(test)):  # the example batch was 2: the axis is dynamic
        x = test.batch(torch.arange(n))["image"]
        with torch.no_grad():
            assert torch.allclose(program(x), model(x), atol=1e-5, rtol=0)
    assert saved["classes"] == ["benign", "malignant"]
    assert saved["input_shape"] == ["batch", 1, 32, 32] and saved["model_class"] == "SevenLayerCNN"
    best = (erm_run / "best.pt").read_bytes()
    assert saved["weights"] == "best.pt"
    assert saved["weights_sha256"] == hashlib.sha256(best).hexdigest()
    assert config == (erm_run / "config.yaml").read_text() and rec["max_abs_diff"] <= 1e-5


def test_a_multiview_program_takes_other_depths(tmp_path):
    data = tmp_path / "vol"
    generate(data, SynthConfig(n_train=16, n_val=8, n_test=8, size=32, depth=4, seed=5))
    run = _train(data, tmp_path / "mv", model="multiview")
    export_run(run, tmp_path / "mv.pt2")
    program, saved, _ = _load(tmp_path / "mv.pt2")
    _, model, _, _ = load_run(run, device="cpu")
    assert saved["input_shape"] == ["batch", 1, "depth", 32, 32]
    for depth in (2, 4, 7):
        x = torch.randn(3, 1, depth, 32, 32)
        with torch.no_grad():
            assert torch.allclose(program(x), model(x), atol=1e-5, rtol=0)


def test_a_program_that_disagrees_with_the_model_is_not_written(erm_run, tmp_path,
                                                                 monkeypatch):
    """The check compares the program with the eager model: a program traced from other
    weights is refused and nothing is written."""
    real = torch.export.export

    def other_weights(model, args, **kw):
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            for p in wrong.parameters():
                p.add_(0.5)
        return real(wrong, args, **kw)

    monkeypatch.setattr(export_module.torch.export, "export", other_weights)
    with pytest.raises(CausalignError, match="differ from the model's"):
        export_run(erm_run, tmp_path / "bad.pt2")
    assert not (tmp_path / "bad.pt2").exists()


def test_an_untraceable_model_fails_in_one_line(erm_run, tmp_path, monkeypatch):
    def fail(model, args, **kw):
        raise RuntimeError("data-dependent control flow\nlong torch explanation")

    monkeypatch.setattr(export_module.torch.export, "export", fail)
    with pytest.raises(CausalignError, match=r"could not trace SevenLayerCNN \(RuntimeError: "
                                             r"data-dependent control flow\)$"):
        export_run(erm_run, tmp_path / "x.pt2")


def test_a_run_without_a_recorded_image_shape_is_refused(erm_run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in erm_run.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    text = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text("\n".join(ln for ln in text.splitlines()
                                               if not ln.startswith("data_image_shape")))
    with pytest.raises(CausalignError, match="records no image shape"):
        export_run(old, tmp_path / "x.pt2")


def test_command_line_default_path_and_errors(erm_run, capsys):
    assert cli.main(["export", str(erm_run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(erm_run / "model.pt2") and (erm_run / "model.pt2").exists()
    assert cli.main(["export", str(erm_run), "--out", str(erm_run / "best.pt")]) == 2
    assert "is the run's own best.pt" in capsys.readouterr().err
    assert cli.main(["export", str(erm_run.parent / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("run folder does not exist") and len(err.splitlines()) == 1
