"""Explanation / counterfactual exports: atomic .npy files, stale outputs of an earlier run
into the same folder, and the Python-level checks of the generator, CCCE and PC settings."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from causalign.causal.ccce import causal_attribution, fit_label_model, subsets
from causalign.causal.pc import pc_check
from causalign.data.format import LesionDataset
from causalign.errors import CausalignError, ConfigError, InputError
from causalign.explain.counterfactual import CounterfactualGenerator, GaussianSmoother
from causalign.explain.counterfactual_export import (
    CounterfactualSettings,
    export_counterfactuals,
)
from causalign.explain.export import export_saliency
from causalign.io import atomic_save_npy
from causalign.methods import build_method
from causalign.models import build_model


@pytest.fixture(scope="module")
def setup(tiny_data):
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    return model, build_method("erm"), LesionDataset(tiny_data, "test")


class Killed(BaseException):
    """Stands for SIGKILL/Ctrl-C arriving while a file is being written."""


def _die_mid_write(monkeypatch) -> None:
    """np.save writes half of the .npy bytes, then the process 'dies'."""
    real = np.lib.format.write_array

    def dying(fp, array, *args, **kwargs):
        buf = io.BytesIO()
        real(buf, array, *args, **kwargs)
        data = buf.getvalue()
        fp.write(data[: len(data) // 2])
        raise Killed

    monkeypatch.setattr(np.lib.format, "write_array", dying)


# ------------------------------------------------------------------- atomic .npy


def test_atomic_save_npy_roundtrip_and_exact_name(tmp_path):
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(tmp_path / "a", m)  # np.save would have written "a.npy"
    assert np.array_equal(np.load(tmp_path / "a"), m)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_killed_map_write_keeps_the_previous_map(setup, tmp_path, monkeypatch):
    model, method, ds = setup
    export_saliency(model, method, ds, "gradient", tmp_path, limit=2)
    first = tmp_path / "maps" / f"{ds.records[0].id}.npy"
    before = np.load(first)
    _die_mid_write(monkeypatch)
    with pytest.raises(Killed):
        export_saliency(model, method, ds, "gradient", tmp_path, limit=2)
    monkeypatch.undo()
    # a plain np.save left half a file there, which np.load rejects (or misreads)
    assert np.array_equal(np.load(first), before)
    assert not list((tmp_path / "maps").glob(".*.tmp"))


def test_killed_counterfactual_write_keeps_the_previous_file(setup, tmp_path, monkeypatch):
    model, method, ds = setup
    settings = CounterfactualSettings(steps=2)
    summary = export_counterfactuals(model, method, ds, settings, tmp_path, limit=2)
    done = [r["id"] for r in summary["samples"] if "flipped" in r]
    path = tmp_path / "cf" / f"{done[0]}.npy"
    before = np.load(path)
    _die_mid_write(monkeypatch)
    with pytest.raises(Killed):
        export_counterfactuals(model, method, ds, settings, tmp_path, limit=2)
    monkeypatch.undo()
    assert np.array_equal(np.load(path), before)


# ------------------------------------------------------------------- stale outputs


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_explain_rerun_with_fewer_samples_removes_stale_maps_only(setup, tmp_path):
    model, method, ds = setup
    export_saliency(model, method, ds, "gradient", tmp_path, limit=6)
    (tmp_path / "notes.txt").write_text("mine")  # files the command did not write stay
    np.save(tmp_path / "maps" / "mine.npy", np.zeros(2))
    summary = export_saliency(model, method, ds, "gradient", tmp_path, limit=2)
    ids = [r.id for r in ds.records[:2]]
    assert summary["n"] == 2
    assert _names(tmp_path / "maps") == sorted([f"{i}.npy" for i in ids] + ["mine.npy"])
    assert _names(tmp_path / "overlays") == sorted(f"{i}.png" for i in ids)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "grid.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 2


def test_explain_killed_run_leaves_nothing_the_next_run_misses(setup, tmp_path, monkeypatch):
    model, method, ds = setup
    export_saliency(model, method, ds, "gradient", tmp_path, limit=2)
    # a run for 6 samples dies after its 4th map: maps 3 and 4 exist, no manifest names
    # them as written, yet the next run must still remove them
    import causalign.explain.export as export_mod

    real, calls = export_mod.atomic_save_npy, []

    def counting(path, array):
        calls.append(path)
        if len(calls) > 4:
            raise Killed
        real(path, array)

    monkeypatch.setattr(export_mod, "atomic_save_npy", counting)
    with pytest.raises(Killed):
        export_saliency(model, method, ds, "gradient", tmp_path, limit=6)
    monkeypatch.undo()
    assert len(_names(tmp_path / "maps")) == 4
    assert not (tmp_path / "summary.json").exists()  # no summary of a half-written folder
    export_saliency(model, method, ds, "gradient", tmp_path, limit=1)
    assert _names(tmp_path / "maps") == [f"{ds.records[0].id}.npy"]
    assert _names(tmp_path / "overlays") == [f"{ds.records[0].id}.png"]


def test_manifest_cannot_reach_outside_the_folder(setup, tmp_path):
    model, method, ds = setup
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out.mkdir()
    (out / ".causalign-explain.json").write_text(json.dumps(["../victim.txt", str(victim)]))
    export_saliency(model, method, ds, "gradient", out, limit=1)
    assert victim.read_text() == "keep"


def test_counterfactual_rerun_with_fewer_samples_removes_stale_files(setup, tmp_path):
    model, method, ds = setup
    settings = CounterfactualSettings(steps=2)
    export_counterfactuals(model, method, ds, settings, tmp_path, limit=4)
    (tmp_path / "notes.txt").write_text("mine")
    summary = export_counterfactuals(model, method, ds, settings, tmp_path, limit=1)
    done = [r["id"] for r in summary["samples"] if "flipped" in r]
    assert _names(tmp_path / "cf") == [f"{i}.npy" for i in done]
    assert _names(tmp_path / "triptychs") == [f"{i}.png" for i in done]
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------- settings checks


@pytest.mark.parametrize("kwargs", [
    {"alpha": math.inf}, {"lr": math.inf}, {"eps": math.inf}, {"alpha": math.nan},
    {"lr": math.nan}, {"steps": math.inf}, {"steps": 2.5}, {"steps": -1},
])
def test_generator_rejects_non_finite_settings(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ConfigError, match=f"{name} {value}"):
        CounterfactualGenerator(torch.nn.Linear(2, 2), **kwargs)


def test_generator_accepts_whole_float_steps():
    assert CounterfactualGenerator(torch.nn.Linear(2, 2), steps=3.0).steps == 3


@pytest.mark.parametrize("sigma", [math.inf, math.nan, 0.0])
def test_smoother_rejects_bad_sigma(sigma):
    with pytest.raises(ConfigError, match=r"sigma in \(0, 1024"):
        GaussianSmoother(sigma)
    with pytest.raises(ConfigError, match=r"sigma in \(0, 1024"):
        CounterfactualGenerator(torch.nn.Linear(2, 2), space="smooth", smooth_sigma=sigma)


@pytest.fixture(scope="module")
def ccce_data():
    rng = np.random.default_rng(0)
    a = (rng.random((40, 3)) > 0.5).astype(float)
    y = (a[:, 0] > 0).astype(int)
    return fit_label_model(a, y), a, y


@pytest.mark.parametrize("tol", [-1.0, -1e-9, math.nan, math.inf, "0.1"])
def test_ccce_rejects_bad_tol(ccce_data, tol):
    # a negative tol admitted no subset and silently named attribute 0 for every sample
    model, a, y = ccce_data
    with pytest.raises(ConfigError, match="tol must be a finite number >= 0"):
        causal_attribution(model, a, y, tol=tol)


def test_ccce_zero_tol_still_works(ccce_data):
    model, a, y = ccce_data
    res = causal_attribution(model, a, y, tol=0)
    assert res.r.shape == a.shape


@pytest.mark.parametrize("max_size", [0, 2.5, True])
def test_ccce_rejects_bad_max_size(max_size):
    with pytest.raises(ConfigError, match="max subset size"):
        subsets(3, max_size)


@pytest.fixture(scope="module")
def pc_data():
    rng = np.random.default_rng(0)
    a = (rng.random((40, 2)) > 0.5).astype(float)
    y = np.where(rng.random(40) < 0.2, 1 - a[:, 0], a[:, 0])  # not a copy: PC needs no exact tie
    return rng.normal(size=(40, 6)), a, y


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1, math.nan])
def test_pc_rejects_alpha_outside_unit_interval(pc_data, alpha):
    # causal-learn only asserts 0 < alpha < 1: a bare AssertionError with no message
    f, a, y = pc_data
    with pytest.raises(ConfigError, match=r"alpha must lie in \(0, 1\)"):
        pc_check(f, a, y, ["a", "b"], alpha=alpha)


@pytest.mark.parametrize("k", [0, -1, 2.0])
def test_pc_rejects_bad_component_count(pc_data, k):
    # -1 sliced all but one component and failed as "correlation matrix is singular"
    f, a, y = pc_data
    with pytest.raises(ConfigError, match="n_components >= 1"):
        pc_check(f, a, y, ["a", "b"], n_components=k)


# ------------------------------------------------------------------- model state, empty


def test_exports_restore_each_submodules_mode(setup, tmp_path):
    model, method, ds = setup
    model.train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # a caller's choice the exports must not undo (nor a plain .train())
    try:
        export_saliency(model, method, ds, "gradient", tmp_path / "maps", limit=1)
        assert model.training and not frozen.training
        export_counterfactuals(model, method, ds, CounterfactualSettings(steps=1),
                               tmp_path / "cf", limit=1)
        assert model.training and not frozen.training
    finally:
        model.eval()


def test_explain_limit_zero_is_one_clear_error_and_keeps_outputs(setup, tmp_path):
    model, method, ds = setup
    export_saliency(model, method, ds, "gradient", tmp_path, limit=1)
    before = _names(tmp_path)
    with pytest.raises(CausalignError, match="no samples to explain"):
        export_saliency(model, method, ds, "gradient", tmp_path, limit=0)
    assert _names(tmp_path) == before  # the earlier export is untouched


def _with(arr, index, value):
    out = np.array(arr, dtype=np.float64)
    out[index] = value
    return out


@pytest.mark.parametrize("case", ["nan-feature", "inf-attribute", "nan-label", "short-labels",
                                  "names"])
def test_pc_bad_inputs_are_one_clear_error(pc_data, case):
    # before: LinAlgError "SVD did not converge", bare AssertionErrors from causal-learn, an
    # IndexError and a misleading "correlation matrix is singular"
    f, a, y = pc_data
    names = ["a", "b"]
    if case == "nan-feature":
        f = _with(f, (0, 0), np.nan)
    elif case == "inf-attribute":
        a = _with(a, (1, 1), np.inf)
    elif case == "nan-label":
        y = _with(y, 0, np.nan)
    elif case == "short-labels":
        y = y[:30]
    else:
        names = ["a"]
    with pytest.raises(InputError, match="PC check"):
        pc_check(f, a, y, names)


def test_pc_missing_attributes_still_dropped(pc_data):
    f, a, y = pc_data
    rep = pc_check(f, _with(a, (0, 1), np.nan), y, ["a", "b"])
    assert rep["n"] == len(a) - 1
