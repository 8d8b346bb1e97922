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
    ("brats", {"size": 16}, {"min_tumor_px": 5}), ("brats", _BRATS_VOL, {"region": "tc"}),
    ("brats", {"size": 16, "min_tumor_px": 5}, {"modalities": "flair"}),
    ("cub", {"size": 24, "classes": "2,3", "crop": "box"}, {"context": 0.5}),
    ("cub", {"size": 24, "classes": "2,3"}, {"crop": "box"}),
    ("cub", {"size": 24, "classes": "2,3"}, {"mask": "box"}),
    ("cub", {"size": 24}, {"classes": "2,3"}), ("cub", {"size": 24}, {"val_frac": 0.4}),
    ("folder_csv", {"size": 32}, {"size": 24}), ("folder_csv", {"size": 32}, {"color": "rgb"}),
    ("folder_csv", {"size": 32}, {"shortcut": "intensity"}),
    ("folder_csv", {"size": 32}, {"image_format": "npy"}),
    ("folder_csv", {"size": 32}, {"limit": 1}),
    ("lidc_patches", {"size": 24}, {"window": "-500,200"}),
    ("lidc_patches", {"size": 24}, {"mask_rule": "union"}),
    ("lidc_patches", {"size": 24}, {"val_frac": 0.4}),
    ("lidc_patches", {"size": 24}, {"test_frac": 0.4}),
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
