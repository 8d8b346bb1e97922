"""Audit (part 2): do the options the first audit (test_audit_effect_1207f.py) left unchecked
act? Multi-view model options, causal-align's latent space, `data import` flags per importer
and per combination, `data synth` / `demo` / `benchmark` / `bench step` flags, and the
training keys deterministic, threads, init, negative_curvature and cache_device.

Each guard: changing the option from its default changes an observable (model output or
gradient, imported files, trained weights, a process setting inside training). An option
accepted but unread in a combination must be refused in one line (or warned), not recorded
as if it acted.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

from causalign.data.importers import run_import
from causalign.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_real import write_brats, write_cub, write_folder_csv, write_lidc_patches  # noqa: E402

# ------------------------------------------------------------------ data import flags


@pytest.fixture(scope="module")
def real_src(tmp_path_factory):
    pytest.importorskip("nibabel")
    base = tmp_path_factory.mktemp("effect2_real")
    return {"brats": write_brats(base / "brats"), "cub": write_cub(base / "cub"),
            "folder_csv": write_folder_csv(base / "fc"),
            "lidc_patches": write_lidc_patches(base / "lp")}


def _import_digest(kind: str, root, out: Path, opts: dict) -> str:
    """A digest of what an import writes: the manifest and every image and mask file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_import(kind, root, out, opts)
    h = hashlib.sha256()
    for f in sorted(out.rglob("*")):
        if f.is_file() and (f.suffix in (".png", ".npy") or f.name == "manifest.csv"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _src_opts(real_src, fixture: str, opts: dict) -> tuple[str, Path, dict]:
    kind = {"folder_csv": "folder", "lidc_patches": "lidc"}.get(fixture, fixture)
    fx = real_src[fixture]
    extra = {"csv": fx["csv"]} if fixture == "folder_csv" else \
        {"patches_csv": fx["csv"]} if fixture == "lidc_patches" else {}
    return kind, fx["root"], {**extra, **opts}


_BRATS_VOL = {"size": 16, "task": "grade", "mode": "volumes", "depth": 6, "modalities": "flair"}

# (fixture, base options, the flag that had no effect there, the words of the refusal)
IMPORT_UNUSED = [
    ("brats", {"size": 16, "min_tumor_px": 5}, {"depth": 8}, "--depth"),
    ("brats", _BRATS_VOL, {"min_tumor_px": 5}, "--min-tumor-px"),
    ("brats", _BRATS_VOL, {"slices_per_subject": 2}, "--slices-per-subject"),
    ("cub", {"size": 24, "classes": "2,3"}, {"context": 0.5}, "--context"),
    ("folder_csv", {"size": 32}, {"mask_suffix": "_seg"}, "--mask-suffix"),
    ("lidc_patches", {"size": 24}, {"spacing": 0.5}, "--spacing"),
    ("lidc_patches", {"size": 24}, {"cluster_mm": 2.0}, "--cluster-mm"),
    ("lidc_patches", {"size": 24}, {"min_readers": 3}, "--min-readers"),
]


@pytest.mark.parametrize("fixture,base,flag,named", IMPORT_UNUSED,
                         ids=[f"{f}-{n}" for f, _, _, n in IMPORT_UNUSED])
def test_import_flag_unused_in_combination_is_refused(real_src, tmp_path, fixture, base,
                                                      flag, named):
    """Regression: each flag was accepted (and recorded in .import/state.json) yet the
    import wrote byte-identical files without it: brats --depth under --mode slices,
    --min-tumor-px / --slices-per-subject under --mode volumes, cub --context under --crop
    image, folder --mask-suffix with --csv, lidc --spacing / --cluster-mm / --min-readers
    with --patches-csv. Now refused before any work, naming the flag."""
    kind, root, opts = _src_opts(real_src, fixture, base)
    with pytest.raises(DataError, match=named):
        run_import(kind, root, tmp_path / "out", {**opts, **flag})
    assert not (tmp_path / "out" / "manifest.csv").exists()


# (fixture, base options, a flag changed from its default): each acts in that combination
IMPORT_ACTS = [
    ("brats", _BRATS_VOL, {"depth": 8}), ("brats", {"size": 16, "min_tumor_px": 5},
                                          {"slices_per_subject": 2}),
    ("brats", _BRATS_VOL, {"region": "tc"}),
    ("brats", {"size": 16, "min_tumor_px": 5}, {"modalities": "flair"}),
    ("cub", {"size": 24, "classes": "2,3", "crop": "box"}, {"context": 0.5}),
    ("cub", {"size": 24, "classes": "2,3"}, {"crop": "box"}),
    ("cub", {"size": 24, "classes": "1,2"}, {"mask": "box"}),  # class 1 has segmentations
    ("cub", {"size": 24}, {"classes": "2,3"}), ("cub", {"size": 24}, {"val_frac": 0.4}),
    ("folder_csv", {"size": 32}, {"size": 24}), ("folder_csv", {"size": 32}, {"color": "rgb"}),
    ("folder_csv", {"size": 32}, {"shortcut": "intensity"}),
    ("folder_csv", {"size": 32}, {"image_format": "npy"}),
    ("folder_csv", {"size": 32}, {"limit": 1}),
    ("lidc_patches", {"size": 24}, {"window": "-500,200"}),
    ("lidc_patches", {"size": 24}, {"mask_rule": "union"}),
    ("lidc_patches", {"size": 24}, {"val_frac": 0.4}),
    ("lidc_patches", {"size": 24}, {"test_frac": 0.0}),
    ("lidc_patches", {"size": 24}, {"seed": 3}),
]


@pytest.mark.slow
@pytest.mark.parametrize("fixture,base,flag", IMPORT_ACTS,
                         ids=[f"{f}-{next(iter(c))}" for f, _, c in IMPORT_ACTS])
def test_import_flag_changes_the_files(real_src, tmp_path, fixture, base, flag):
    """Guard: each flag, changed from its default where it applies, changes the files."""
    kind, root, opts = _src_opts(real_src, fixture, base)
    a = _import_digest(kind, root, tmp_path / "a", opts)
    b = _import_digest(kind, root, tmp_path / "b", {**opts, **flag})
    assert a != b, f"{flag} changed nothing"


# ------------------------------------------------------------------ training keys

_RUN = {"method": "erm", "width": 4, "epochs": 1, "device": "cpu",
        "deletion_fractions": [0.1], "threads": 1}


def _original_setup():
    from causalign.engine.trainer import Trainer

    return Trainer._setup_run


_ORIGINAL_SETUP = _original_setup()


def _inside_training(data, out: Path, settings: dict, monkeypatch) -> dict:
    """What training sets up before its first step: torch's thread count, deterministic
    mode and the model's initial weights (recorded at the end of `_setup_run`)."""
    from causalign.engine import trainer as T

    seen: dict = {}
    setup = _ORIGINAL_SETUP  # not the attribute: a previous call's spy may still be set

    def spy(self):
        setup(self)
        seen.update(threads=torch.get_num_threads(),
                    deterministic=torch.are_deterministic_algorithms_enabled(),
                    weights=torch.cat([p.detach().flatten().clone()
                                       for p in self.model.parameters()]))

    monkeypatch.setattr(T.Trainer, "_setup_run", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.train(data, {**_RUN, **settings}, out, progress=False)
    return seen


@pytest.mark.slow  # two runs, one on 2 threads: 20 s on a loaded 2-core machine
def test_threads_sets_torch_threads_in_training(tiny_data, tmp_path, monkeypatch):
    """Guard: `threads` is torch's thread count during training (and restored after)."""
    before = torch.get_num_threads()
    seen = [_inside_training(tiny_data, tmp_path / f"t{n}", {"threads": n}, monkeypatch)
            for n in (1, 2)]
    assert [s["threads"] for s in seen] == [1, 2]
    assert torch.get_num_threads() == before


def test_deterministic_turns_on_deterministic_algorithms(tiny_data, tmp_path, monkeypatch):
    """Guard: `deterministic` turns torch's deterministic algorithms on during training
    (and off again after); the two runs' weights are bit-identical on CPU either way."""
    off = _inside_training(tiny_data, tmp_path / "a", {}, monkeypatch)
    on = _inside_training(tiny_data, tmp_path / "b", {"deterministic": True}, monkeypatch)
    assert (off["deterministic"], on["deterministic"]) == (False, True)
    assert not torch.are_deterministic_algorithms_enabled()


def test_init_sets_the_initial_weights(tiny_data, tmp_path, monkeypatch):
    """Guard: `init` makes the first step start from the given run's best weights (another
    seed's random initialisation otherwise)."""
    from causalign.engine.trainer import train

    src = tmp_path / "src"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tiny_data, {**_RUN, "seed": 5}, src, progress=False)
    state = torch.load(src / "best.pt", map_location="cpu", weights_only=False)
    state = state.get("model", state)
    plain = _inside_training(tiny_data, tmp_path / "a", {}, monkeypatch)
    init = _inside_training(tiny_data, tmp_path / "b", {"init": str(src)}, monkeypatch)
    from causalign.models import build_model

    net = build_model("cnn7", 1, 2, width=4)
    net.load_state_dict(state)
    want = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(init["weights"], want)
    assert not torch.equal(plain["weights"], want)


# ------------------------------------------------------------------ multi-view model


def _multiview_observe(options: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train-mode output and parameter gradient of a multiview model on fixed volumes, from
    one fixed initialisation and slice draw, and its parameter count."""
    from causalign.models import build_model

    torch.manual_seed(0)
    net = build_model("multiview", 1, 2, width=4, image_shape=(1, 8, 16, 16), options=options)
    net.train()
    x = torch.rand(3, 1, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    out = net(x)
    out[:, 1].sum().backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return out.detach(), grad, sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("key,value", [
    ("train_slices", 3), ("train_slices", 0.9), ("tau", 1.0), ("delta_init", 0.5),
    ("learn_tau", True), ("position_dim", 3),
])
def test_multiview_option_changes_output_or_gradient(key, value):
    """Guard: each `model.<option>` of multiview changes the train-mode output or the
    gradient (learn_tau: τ becomes a parameter, one more, with a gradient of its own)."""
    a, b = _multiview_observe({}), _multiview_observe({key: value})
    assert not torch.equal(a[0], b[0]) or a[2] != b[2] or not torch.equal(a[1], b[1])


def test_multiview_train_slices_is_read_only_in_train_mode():
    """Guard (documented): eval mode uses every slice, so train_slices does not change
    predictions; in train mode a count k draws k of the D slices."""
    from causalign.models import build_model

    for k in (3, 0.5):
        torch.manual_seed(0)
        net = build_model("multiview", 1, 2, width=4, image_shape=(1, 8, 16, 16),
                          options={"train_slices": k})
        net.train()
        net(torch.rand(2, 1, 8, 16, 16))
        assert net.last_slices.shape == (2, 3 if k == 3 else 4)
        net.eval()
        net(torch.rand(2, 1, 8, 16, 16))
        assert net.last_slices.shape == (2, 8)


# ------------------------------------------------------------------ demo / benchmark flags


def _suite_seen(monkeypatch) -> dict:
    """Replace the suite runner: record the selected suite and its arguments, run nothing."""
    from causalign.engine import benchmark as B

    seen: dict = {}

    def fake(suite, out, extra=None, progress=True, report=True, log=None):
        exps = suite.experiments
        seen.update(experiments=[e.name for e in exps],
                    methods=[m.name for e in exps for m in e.methods],
                    seeds=[s for e in exps for s in e.seeds],
                    datasets=[d for e in exps for d in e.datasets],
                    settings=[k for e in exps for k in e.settings],
                    extra=extra, progress=progress, report=report)
        raise SystemExit(0)  # stop before the caller reads the (unwritten) tables

    monkeypatch.setattr(B, "run_suite", fake)
    return seen


@pytest.mark.parametrize("kwargs,key,want", [
    ({"methods": ["erm", "ppi"]}, "methods", ["erm", "ppi"]),
    ({"seeds": 2}, "seeds", [0, 1]),
    ({"epochs": 2}, "extra", {"epochs": 2}),
    ({"progress": False}, "progress", False),
])
def test_demo_flag_reaches_the_suite(tmp_path, monkeypatch, kwargs, key, want):
    """Guard: `demo --methods/--seeds/--epochs/--no-progress` reach the suite run."""
    from causalign import demo

    seen = _suite_seen(monkeypatch)
    monkeypatch.setattr(demo, "run_suite", __import__("causalign.engine.benchmark",
                                                      fromlist=["x"]).run_suite)
    with pytest.raises(SystemExit):
        demo.run_demo(tmp_path, **kwargs)
    assert seen[key] == want


@pytest.mark.parametrize("flags,key,want", [
    (["--only", "table1"], "experiments", ["table1"]),
    (["--methods", "erm,ppi"], "methods", ["erm", "ppi"]),
    (["--seeds", "3,4"], "seeds", [3, 4]),
    (["--datasets", "plus-minus"], "datasets", ["plus-minus"]),
    (["--set", "epochs=2"], "extra", {"epochs": 2}),
    (["--no-report"], "report", False),
    (["--no-progress"], "progress", False),
])
def test_benchmark_flag_reaches_the_suite(tmp_path, monkeypatch, flags, key, want):
    """Guard: each `benchmark` flag changes the selection or arguments of the suite run."""
    from causalign.cli import main

    seen = _suite_seen(monkeypatch)
    with pytest.raises(SystemExit):
        main(["benchmark", "quick", "--out", str(tmp_path), *flags])
    assert seen[key] == want


@pytest.mark.parametrize("flags", [["--weights", "texture=5"], ["--label-noise", "1.5"],
                                   ["--seed", "2"], ["--shortcut", "none"], ["--depth", "4"]])
def test_synth_cli_flag_changes_the_data(tmp_path, flags):
    """Guard: each `data synth` flag, through the CLI, changes the manifest or the images."""
    from causalign.cli import main

    def digest(out, *extra):
        assert main(["data", "synth", str(out), "--n-train", "8", "--n-val", "4",
                     "--n-test", "4", "--size", "32", "--no-examples", "--no-progress",
                     *extra]) == 0
        h = hashlib.sha256()
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.suffix in (".png", ".npy", ".csv"):
                h.update(f.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "a") != digest(tmp_path / "b", *flags)


def test_synth_examples_flag_writes_the_sheet(tmp_path):
    """Guard: `--examples` (default) writes examples.png, `--no-examples` does not."""
    from causalign.cli import main

    for flag, want in (("--examples", True), ("--no-examples", False)):
        out = tmp_path / flag
        assert main(["data", "synth", str(out), "--n-train", "8", "--n-val", "4", "--n-test",
                     "4", "--size", "32", "--no-progress", flag]) == 0
        assert (out / "examples.png").exists() == want


# ------------------------------------------------------------------ latent space


@pytest.mark.slow
def test_latent_space_and_autoencoder_path_act(tiny_data, tmp_path):
    """Guard: method.space=latent changes the step (loss or gradient) against pixel space;
    method.autoencoder=PATH saves the autoencoder setup trains when PATH is missing, and a
    second run with the same PATH loads it (the same step, bit for bit)."""
    from test_audit_effect_1207f import _changed, _observe

    from causalign.data.format import LesionDataset

    split = LesionDataset(tiny_data, "train")
    path = tmp_path / "ae.pt"
    args = {"space": "latent", "autoencoder": str(path), "steps": 2}
    first = _observe(split, "causal-align", args, steps=1)
    assert path.is_file()
    again = _observe(split, "causal-align", args, steps=1)
    assert not _changed(first, again)
    pixel = _observe(split, "causal-align", {"steps": 2}, steps=1)
    assert _changed(first, pixel)
