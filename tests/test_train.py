"""Trainer: run folder contents, metrics.json contract, resume, best-on-val, oracle input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from causalign.engine import TrainConfig, Trainer, load_run, train
from causalign.engine.config import apply_overrides, parse_set
from causalign.errors import CausalignError, ConfigError
from causalign.methods import build_method

TEST_KEYS = {"accuracy", "balanced_accuracy", "auc", "cam_precision", "cam_mass_in_mask",
             "deletion", "n"}


def _cfg(**kw):
    base = dict(method="erm", epochs=2, batch_size=16, width=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def die_after_checkpoint(monkeypatch, epoch: int):
    """Make training stop with KeyboardInterrupt right after epoch ``epoch``'s checkpoint,
    as a kill would; returns the real `Trainer._save_state`, to put back for the resume."""
    original = Trainer._save_state

    def save_then_die(self):
        original(self)
        if self.state.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", save_then_die)
    return original


def test_erm_run_folder_and_metrics(tiny_data, tmp_path):
    run = tmp_path / "run"
    metrics = train(tiny_data, _cfg(), run, progress=True)
    for name in ("config.yaml", "history.csv", "checkpoint.pt", "checkpoint.pt.sha256",
                 "best.pt", "metrics.json"):
        assert (run / name).exists(), name
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert TEST_KEYS <= set(on_disk["test"]) and TEST_KEYS <= set(on_disk["val"])
    assert set(on_disk["test"]["deletion"]) == {"0.002", "0.01", "0.02", "0.1", "0.2"}
    assert on_disk["test"]["n"] == 16
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["method"] == "erm" and resolved["epochs"] == 2 and "data" in resolved
    hist = (run / "history.csv").read_text().strip().splitlines()
    assert len(hist) == 3 and "val_balanced_accuracy" in hist[0]


@pytest.mark.parametrize("augment", ["none", "dihedral"])
def test_resume_matches_uninterrupted(tiny_data, tmp_path, monkeypatch, augment):
    full = tmp_path / "full"
    cfg = _cfg(epochs=3, deterministic=True, augment=augment)
    train(tiny_data, cfg, full, progress=False)
    part = tmp_path / "part"
    original = die_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, cfg, part, progress=False)
    monkeypatch.setattr(Trainer, "_save_state", original)
    assert not (part / "metrics.json").exists()
    train(tiny_data, cfg, part, resume=True, progress=False)
    assert json.loads((part / "metrics.json").read_text())["test"] == \
        json.loads((full / "metrics.json").read_text())["test"]
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_existing_run_needs_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, _cfg(epochs=1), run, progress=False)
    with pytest.raises(CausalignError, match="already holds a run"):
        train(tiny_data, _cfg(epochs=1), run, progress=False)
    with pytest.raises(CausalignError, match=r"settings differ: lr 0.001 -> 0.01"):
        train(tiny_data, _cfg(epochs=1, lr=0.01), run, resume=True, progress=False)


def test_resume_refuses_a_run_whose_method_defaults_changed(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, _cfg(method="rrr", epochs=1), run, progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["method_params"] == {"lam": 10.0, "region": "mask"}  # defaults included
    stored["method_params"]["lam"] = 5.0  # trained when the default was another value
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(CausalignError, match=r"settings differ: method.lam 5.0 -> 10.0"):
        train(tiny_data, _cfg(method="rrr", epochs=1), run, resume=True, progress=False)


def test_a_parameter_added_since_the_run_differs_only_off_its_default(tmp_path):
    from causalign.engine.trainer import settings_diff

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(method="rrr", epochs=1)
    stored = {**cfg.to_dict(), "method_params": {"lam": 10.0}}  # trained before `region`
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    assert settings_diff(run, cfg) == []  # region at its default: the earlier behaviour
    box = _cfg(method="rrr", epochs=1, method_args={"region": "box"})
    stored["method_args"] = {"region": "box"}
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    assert settings_diff(run, box) == ["method.region None -> 'box'"]


def test_corrupt_checkpoint_detected(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, _cfg(epochs=1), run, progress=False)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CausalignError, match="corrupt or truncated"):
        train(tiny_data, _cfg(epochs=1), run, resume=True, progress=False)


def test_load_run_restores_best_model(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, _cfg(epochs=2), run, progress=False)
    cfg, model, method, data = load_run(run, device="cpu")
    best = torch.load(run / "best.pt", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])
    assert cfg.method == "erm" and not model.training


def test_oracle_sees_only_the_annotation(tiny_data):
    from causalign.data.format import LesionDataset

    ds = LesionDataset(tiny_data, "train")
    batch = ds.batch(torch.arange(4))
    x = build_method("oracle").model_input(batch)
    outside = batch["mask"] == 0
    assert x[outside].abs().sum() == 0
    assert torch.equal(x[~outside], batch["image"][~outside])
    x_box = build_method("oracle", {"region": "box"}).model_input(batch)
    assert (x_box != 0).sum() >= (x != 0).sum()


def test_oracle_without_mask_falls_back_to_box_then_image(tiny_data):
    from causalign.data.format import LesionDataset

    batch = LesionDataset(tiny_data, "train").batch(torch.arange(2))
    batch["has_mask"] = torch.tensor([False, False])
    batch["has_annotation"] = torch.tensor([True, False])
    x = build_method("oracle").model_input(batch)
    assert torch.equal(x[0], batch["image"][0] * batch["box_mask"][0])
    assert torch.equal(x[1], batch["image"][1])


def test_config_overrides_and_errors():
    cfg = apply_overrides(TrainConfig(), parse_set(["lr=0.01", "epochs=3", "method.region=box",
                                                    "deletion_fractions=[0.1]"]))
    assert cfg.lr == 0.01 and cfg.epochs == 3 and cfg.method_args == {"region": "box"}
    with pytest.raises(ConfigError, match="unknown config key 'lrr'; valid: .*lr"):
        apply_overrides(TrainConfig(), {"lrr": 1})
    with pytest.raises(ConfigError, match="epochs: expected int"):
        apply_overrides(TrainConfig(), {"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown parameter.*'oracle'; valid.*: method.region="):
        build_method("oracle", {"alpha": 1})


def test_dihedral_augment_moves_masks_with_image():
    from causalign.engine.trainer import dihedral_augment
    g = torch.Generator().manual_seed(0)
    n, size = 64, 8
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 1, 2] = 1  # one off-diagonal, off-centre pixel: every transform moves it
    image = torch.rand(n, 1, size, size) * (1 - mask) + 2 * mask  # value 2 marks the mask
    batch = {"image": image, "mask": mask, "box_mask": mask.clone(),
             "label": torch.zeros(n, dtype=torch.long)}
    out = dihedral_augment(batch, g)
    assert torch.equal(out["mask"].bool(), out["image"] == 2)
    assert torch.equal(out["box_mask"], out["mask"])
    assert torch.equal(batch["mask"], mask)  # the input batch is not modified
    # all 8 elements of the dihedral group show up over 64 draws
    where = {tuple(m.nonzero()[0].tolist()) for m in out["mask"][:, 0]}
    assert len(where) == 8
    again = dihedral_augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(again["image"], out["image"])


def test_augment_key_is_validated():
    with pytest.raises(ConfigError, match="augment must be none or dihedral"):
        apply_overrides(TrainConfig(), parse_set(["augment=mixup"]))


def test_init_starts_from_another_runs_weights(tiny_data, tmp_path):
    src = tmp_path / "src"
    train(tiny_data, _cfg(epochs=1), src, progress=False)
    ft = tmp_path / "ft"
    # a learning rate far below float32 resolution: the weights stay those of the source run
    train(tiny_data, _cfg(epochs=1, init=str(src), lr=1e-20, seed=5), ft, progress=False)
    a = torch.load(src / "best.pt", weights_only=False)["model"]
    b = torch.load(ft / "checkpoint.pt", weights_only=False)["model"]
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(a[k], b[k]) for k in params)
    fresh = tmp_path / "fresh"
    train(tiny_data, _cfg(epochs=1, lr=1e-20, seed=5), fresh, progress=False)
    c = torch.load(fresh / "checkpoint.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in params)  # without init: other weights


def test_init_errors_name_the_problem(tiny_data, tmp_path):
    with pytest.raises(CausalignError, match="init: .*no checkpoint there"):
        train(tiny_data, _cfg(epochs=1, init=str(tmp_path / "missing")), tmp_path / "a",
              progress=False)
    src = tmp_path / "src"
    train(tiny_data, _cfg(epochs=1, width=8), src, progress=False)
    # width 8 vs the default: same names, other shapes; the message names one and counts
    with pytest.raises(CausalignError, match=r"does not fit this model \(parameter shapes "
                       r"differ, checkpoint vs model: features\.0\.weight \(8, 1, 3, 3\) vs "
                       r"\(\d+, 1, 3, 3\) and \d+ more\)"):
        train(tiny_data, _cfg(epochs=1, init=str(src)), tmp_path / "b", progress=False)
    # another architecture: the names differ
    with pytest.raises(CausalignError, match=r"parameter names differ: missing .* and \d+ "
                                             r"more; unexpected .* and \d+ more"):
        train(tiny_data, _cfg(epochs=1, init=str(src), model="resnet18", width=16), tmp_path / "c",
              progress=False)


def test_resume_compares_method_settings_by_value_not_by_spelling(tmp_path):
    """`--set method.lam=1 --set method.alpha=0.001` on resume as `alpha=1e-3`, or with a
    default spelt out (`steps=10`), was refused: the raw --set dicts were compared."""
    from causalign.engine.trainer import settings_diff
    from causalign.methods import build_method
    from causalign.methods.base import resolved_params

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(method="causal-align", epochs=1, method_args={"lam": 1, "alpha": 0.001})
    stored = {**cfg.to_dict(),
              "method_params": resolved_params(build_method(cfg.method, cfg.method_args))}
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    for args in ({"lam": "1", "alpha": "1e-3"}, {"lam": 1.0, "alpha": 0.001, "steps": 10}):
        assert settings_diff(run, _cfg(method="causal-align", epochs=1, method_args=args)) == []
    # a real difference is still named, as method.<key>
    other = _cfg(method="causal-align", epochs=1, method_args={"lam": 1, "alpha": "2e-3"})
    assert settings_diff(run, other) == ["method.alpha 0.001 -> 0.002"]
