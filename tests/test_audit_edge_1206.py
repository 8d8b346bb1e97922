"""Boundary values of hier-align / causal-align settings and data shapes (edge audit)."""

from __future__ import annotations

import pytest
import torch

from causalign.cli import main
from causalign.engine.config import TrainConfig
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.base import DataInfo

P = 4
INFO = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32),
                attributes=[f"a{i}" for i in range(P)])
FAST = dict(steps=2, attr_steps=10, cg_iters=3)
FAST_CA = dict(steps=2, cg_iters=3)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 32, 32)
    mask[:, :, 10:22, 10:22] = 1
    return {
        "image": torch.rand(n, 1, 32, 32, generator=g),
        "label": torch.tensor([0, 1] * (n // 2)),
        "mask": mask, "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
        "has_annotation": torch.ones(n, dtype=torch.bool),
        "attributes": (torch.rand(n, P, generator=g) > 0.5).float(),
        "attr_known": torch.ones(n, P, dtype=torch.bool),
        "index": torch.arange(n),
    }


def test_hier_align_saturated_attributes_keep_a_star_a_probability():
    """A confident f₁ (|z| > 17: â is exactly 0 or 1 in float32) made Eq. 6's a* =
    â + σ(u*) − σ(u₀) (u₀ the clamped logit) leave [0, 1] by ~1e-7, and the image-level
    search refused it as a target: training stopped with "soft counterfactual target must
    hold probabilities in [0, 1]", blaming the target for a rounding of the method's own."""
    torch.manual_seed(0)
    method = build_method("hier-align", FAST)
    model = method.build_model(TrainConfig(width=4), INFO)
    model.f1.register_forward_hook(lambda _m, _i, out: out * 1e3)  # saturated attributes
    out = method.loss(model, _batch())
    assert torch.isfinite(out.total)
    assert out.parts["n_align_img"] > 0 and "img_align" in out.parts


@pytest.mark.parametrize("every", [0, -1])
def test_hier_align_refuses_align_every_below_one(every: int) -> None:
    """hier-align passes align_every=1 to its levels, so only its own check sees the key: 0
    failed on the first step with a ZeroDivisionError traceback, -1 was accepted."""
    with pytest.raises(ConfigError, match=rf"method.align_every must be >= 1, got {every}"):
        build_method("hier-align", {"align_every": every})


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
@pytest.mark.parametrize("tol", [1.0, 5.0])
def test_cg_tol_of_one_or_more_is_refused(method: str, tol: float) -> None:
    """CG stops at ‖r‖ <= tol·‖b‖, met by v = 0 once tol >= 1: every step reported CG
    converged with no sample dropped, and the alignment gradient was exactly zero."""
    with pytest.raises(ConfigError, match=r"method.cg_tol must be in \(0, 1\)"):
        build_method(method, {"cg_tol": tol})
    build_method(method, {"cg_tol": 0.5})  # below 1 stays valid


def test_hier_align_refuses_an_overflowing_attr_weight() -> None:
    """attr_weight had no upper bound (α and λ have MAX_SETTING): 1e40 overflowed float32 and
    stopped training on its first step with "non-finite loss"."""
    with pytest.raises(ConfigError, match=r"method.attr_weight must be in \[0, 1e\+30\]"):
        build_method("hier-align", {"attr_weight": 1e40})


def test_align_start_after_the_last_epoch_is_refused(tiny_data, tmp_path, capsys) -> None:
    """method.align_start=2 with 1 epoch trained CE + BCE only, exit 0, without a word."""
    rc = main(["train", str(tiny_data), "--method", "hier-align", "--epochs", "1",
               "--batch-size", "48", "--out", str(tmp_path / "run"), "--no-progress",
               "--set", "method.align_start=2", "--set", "method.steps=1",
               "--set", "method.attr_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "method.align_start=2 is after the run's last epoch (epochs 1)" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("warmup", [2, 3])
def test_ppi_warmup_covering_every_epoch_is_refused(tiny_data, tmp_path, capsys,
                                                    warmup) -> None:
    """PPI's method.warmup_epochs >= epochs trained L_cls alone for the whole run (ERM under
    PPI's name), exit 0, without a word; one epoch fewer is a run with PPI terms."""
    rc = main(["train", str(tiny_data), "--method", "ppi", "--epochs", "2",
               "--out", str(tmp_path / "run"), "--no-progress",
               "--set", f"method.warmup_epochs={warmup}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert (f"method.warmup_epochs={warmup} covers every epoch of the run (epochs 2): the ppi "
            f"terms would never act") in err[0]
    assert not (tmp_path / "run").exists()


def _with_full_training_masks(tiny_data, tmp_path):
    """A copy of `tiny_data` whose training masks each cover the whole image (an inverted or
    blank-filled export)."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for p in (root / "masks").glob("train_*.png"):
        Image.fromarray(np.full_like(np.array(Image.open(p)), 255)).save(p)
    return root


def test_causal_align_refuses_masks_covering_every_image(tiny_data, tmp_path) -> None:
    """Every training mask covering its whole image (an inverted or blank-filled export):
    1 − m was 0 everywhere, L_align 0 for every sample, and causal-align trained ERM at the
    alignment's cost with exit 0 (history: train_align 0). Boxes that do not cover the
    image still align under region=box."""
    from causalign.data.format import LesionDataset
    from causalign.errors import DataError

    train = LesionDataset(_with_full_training_masks(tiny_data, tmp_path), "train")
    assert bool(train.has_mask.any())
    method = build_method("causal-align", FAST_CA)
    model = method.build_model(TrainConfig(width=4), INFO)
    with pytest.raises(DataError, match=r"every annotated training sample's mask covers its "
                                        r"whole image"):
        method.setup(train, model)
    assert not train.regions_cover_image("box")
    build_method("causal-align", dict(FAST_CA, region="box")).setup(train, model)
    # the untouched data is not refused
    build_method("causal-align", FAST_CA).setup(LesionDataset(tiny_data, "train"), model)


def test_hier_align_attr_eps_below_the_floor_names_attr_eps() -> None:
    """method.attr_eps=1e-30 was refused by the attribute level's own check, as
    "method.eps must be >= 1e-15": the image level's key, which the user had not set."""
    with pytest.raises(ConfigError, match=r"^method.attr_eps must be >= 1e-15.*got 1e-30$"):
        build_method("hier-align", {"attr_eps": 1e-30})


@pytest.mark.parametrize(("settings", "named"), [
    ({"align_on": "positive"}, "method.align_on=positive skips those labelled 0"),
    ({"target": "0"}, "method.target=0 skips the samples labelled 0"),
])
def test_causal_align_refuses_a_split_with_no_alignable_sample(settings, named) -> None:
    """Only negatives annotated: align_on=positive (or target 0) skipped every annotated
    sample, history's train_n_align was 0 and the run trained ERM with exit 0."""
    from types import SimpleNamespace

    labels = torch.tensor([0, 0, 1, 1])
    has = torch.tensor([True, True, False, False])  # the positives have no mask
    split = SimpleNamespace(labels=labels, has_mask=has, has_box_or_mask=has,
                            image_shape=(1, 32, 32), meta=SimpleNamespace(classes=["a", "b"]))
    method = build_method("causal-align", dict(FAST_CA, **settings))
    model = method.build_model(TrainConfig(width=4), INFO)
    with pytest.raises(ConfigError, match=rf"none of the 2 annotated training samples can "
                                          rf"align \({named}\)"):
        method.setup(split, model)
    # one annotated positive is enough
    split.has_mask = split.has_box_or_mask = torch.tensor([True, True, True, False])
    build_method("causal-align", dict(FAST_CA, **settings)).setup(split, model)


def test_hier_align_refuses_a_hidden_width_past_torch_sizes() -> None:
    """method.hidden=1e20 passed validation and nn.Linear failed with an "Overflow when
    unpacking long long" TypeError traceback when the model was built."""
    with pytest.raises(ConfigError, match=r"method.hidden must be in 1\.\.2147483647"):
        build_method("hier-align", {"hidden": 10**20})
    with pytest.raises(ConfigError, match=r"method.hidden must be in 1\.\."):
        build_method("hier-align", {"hidden": 0})


@pytest.mark.parametrize("value", [None, [], {"a": 1}])
def test_a_text_setting_refuses_null_lists_and_mappings(value, tmp_path, monkeypatch) -> None:
    """`--set method.autoencoder=null` (or `[]`) became the path "None" ("[]"): a
    space=latent run trained an autoencoder and saved it under that name in the working
    directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"method.autoencoder: expected str, got"):
        build_method("causal-align", {"autoencoder": value, "space": "latent"})
    assert build_method("causal-align", {"target": 1}).params.target == "1"  # ints stay


def test_hier_align_warns_when_masks_cover_every_image(tiny_data, tmp_path) -> None:
    """The same annotations under hier-align: Eq. 7 (the image level) was 0 for every sample
    without a word. Warned, not refused: the attribute level still aligns."""
    import warnings

    from causalign.data.format import LesionDataset

    train = LesionDataset(_with_full_training_masks(tiny_data, tmp_path), "train")
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32),
                    attributes=list(train.meta.attributes))
    method = build_method("hier-align", FAST)
    model = method.build_model(TrainConfig(width=4), info)
    with pytest.warns(UserWarning, match=r"every annotated training sample's mask covers its "
                                         r"whole image, so the image-level alignment "
                                         r"\(method.lam1\) is 0"):
        method.setup(train, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method("hier-align", dict(FAST, lam1=0)).setup(train, model)  # asked for none
        build_method("hier-align", FAST).setup(LesionDataset(tiny_data, "train"), model)
