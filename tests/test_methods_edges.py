"""Edge cases of the training methods and models: hyper-parameter values as `--set` gives
them, model/method combinations that must be refused up front, state a step must not leave
behind, and batches without annotations."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from causalign.engine.config import TrainConfig
from causalign.errors import CausalignError, ConfigError
from causalign.methods import build_method
from causalign.methods.base import DataInfo
from causalign.models import HierarchicalModel, MLPHead, build_model
from causalign.models.icnn import ICNN

SMALL = {"causal-align": {"steps": 2}, "hier-align": {"steps": 2, "attr_steps": 3}}


def _batch(n: int = 4, size: int = 16, channels: int = 1, annotated: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, size, size)
    mask[..., 4:10, 4:10] = 1.0
    has = torch.full((n,), annotated)
    return {"image": torch.rand(n, channels, size, size, generator=g),
            "label": torch.arange(n) % 2, "mask": mask, "box_mask": mask.clone(),
            "has_mask": has, "has_annotation": has.clone(),
            "attributes": torch.rand(n, 3, generator=g).round(),
            "attr_known": torch.ones(n, 3, dtype=torch.bool), "index": torch.arange(n)}


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if method == "icnn":
        return ICNN(1, 2, width=4)
    if method == "hier-align":
        return HierarchicalModel(build_model("cnn7", 1, 3, width=4), MLPHead(3, 2, hidden=8))
    return build_model("cnn7", 1, 2, width=4)


def _info(shape: tuple[int, ...], channels: int = 1) -> DataInfo:
    return DataInfo(in_channels=channels, num_classes=2, image_shape=shape,
                    attributes=["a", "b", "c"])


# ---------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("method,key", [("rrr", "lam"), ("cdep", "lam"), ("chang", "cf_weight"),
                                        ("icnn", "lam"), ("ppi", "omega")])
def test_set_string_numbers_are_coerced_for_every_method(method, key):
    # `--set method.lam=1e-3` reaches build_method as the string "1e-3" (YAML 1.1); before,
    # only causal-align converted it and the others died in validate() with a TypeError.
    m = build_method(method, {key: "1e-3"})
    assert getattr(m.params, key) == pytest.approx(1e-3)
    assert isinstance(getattr(m.params, key), float)


@pytest.mark.parametrize("method,args,key", [
    ("rrr", {"lam": "abc"}, "method.lam"),
    ("bagnet", {"patch": 17.5}, "method.patch"),  # was silently truncated to 17
    ("chang", {"factual_weight": float("nan")}, "method.factual_weight"),  # was accepted
    ("ppi", {"cls_weight": float("inf")}, "method.cls_weight"),  # was accepted
    ("ppi", {"shift_masks": "yes"}, "method.shift_masks"),  # a truthy string was accepted
    ("ppi", {"con_boost_epoch": -1}, "method.con_boost_epoch"),
    ("icnn", {"label_mask": "no"}, "method.label_mask"),  # "no" is truthy: was accepted
    ("causal-align", {"inner_lr": "inf"}, "method.inner_lr"),
])
def test_bad_hyper_parameter_values_name_the_key(method, args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method(method, args)


# ---------------------------------------------------------------- model / method combinations


@pytest.mark.parametrize("model", ["resnet18", "bagnet9", "multiview"])
def test_icnn_refuses_another_model(model):
    # icnn builds its own model: before, --model resnet18 was silently ignored (the run's
    # config said resnet18, the weights were an ICNN).
    with pytest.raises(ConfigError, match=f"--model {model}"):
        build_method("icnn").build_model(TrainConfig(model=model, width=4), _info((1, 32, 32)))


def test_bagnet_method_refuses_a_conflicting_model():
    method = build_method("bagnet")  # patch 17
    with pytest.raises(ConfigError, match="method.patch=9"):
        method.build_model(TrainConfig(model="bagnet9", width=4), _info((1, 32, 32)))
    with pytest.raises(ConfigError, match="--model resnet18"):
        method.build_model(TrainConfig(model="resnet18", width=4), _info((1, 32, 32)))
    model = method.build_model(TrainConfig(model="bagnet17", width=4), _info((1, 32, 32)))
    assert model.patch == 17


def test_hier_align_refuses_a_volume_model_on_2d_images():
    # before: built, then "MultiViewCNN takes volumes" as a traceback on the first step
    with pytest.raises(CausalignError, match="multiview"):
        build_method("hier-align").build_model(TrainConfig(model="multiview", width=4),
                                               _info((1, 32, 32)))


@pytest.mark.parametrize("method,model,shape,need", [
    ("erm", "inception_v3", (1, 32, 32), "75x75"),
    ("causal-align", "vgg11", (3, 16, 16), "32x32"),
    ("erm", "cnn7", (1, 3, 40), "4x4"),
    ("hier-align", "vgg11", (1, 16, 16), "32x32"),
    ("icnn", "cnn7", (1, 3, 3), "4x4"),
    ("bagnet", "cnn7", (1, 16, 16), "17 px"),
])
def test_images_too_small_for_the_model_are_refused_up_front(method, model, shape, need):
    # before: a torch RuntimeError ("Output size is too small", "Kernel size can't be
    # greater than actual input size") as a traceback in the first training step
    with pytest.raises(CausalignError, match=need):
        build_method(method).build_model(TrainConfig(model=model, width=4),
                                         _info(shape, shape[0]))


def test_small_images_still_build_where_the_model_takes_them():
    info = _info((1, 8, 8))
    assert build_method("erm").build_model(TrainConfig(model="resnet18"), info) is not None
    m = build_method("erm").build_model(TrainConfig(model="cnn7", width=4), _info((1, 4, 4)))
    assert m(torch.rand(2, 1, 4, 4)).shape == (2, 2)


def test_multiview_takes_volumes_deeper_than_512_slices():
    # before: the model was built with 512 position embeddings and the first batch of a
    # 600-slice volume died with a ValueError traceback
    info = _info((1, 600, 4, 4))
    model = build_method("erm").build_model(TrainConfig(model="multiview", width=2), info)
    assert model(torch.rand(1, 1, 600, 4, 4)).shape == (1, 2)
    # a model built without the data's shape keeps the default table (same checkpoints)
    assert build_model("multiview", 1, 2, width=2).max_slices == 512


def test_multiview_wrong_input_is_an_input_error():
    from causalign.errors import InputError
    from causalign.models.multiview import MultiViewCNN

    model = MultiViewCNN(1, 2, width=2, max_slices=4)
    with pytest.raises(InputError, match="takes volumes"):  # was a bare ValueError
        model(torch.rand(1, 1, 4, 4))
    with pytest.raises(InputError, match="5 slices"):
        model(torch.rand(1, 1, 5, 4, 4))


def test_causal_align_refuses_an_autoencoder_of_other_channels(tmp_path):
    from causalign.models.autoencoder import ConvAutoencoder, save_autoencoder

    path = tmp_path / "ae.pt"
    save_autoencoder(path, ConvAutoencoder(1, width=4, latent_channels=2))
    method = build_method("causal-align", {"steps": 1, "space": "latent",
                                           "autoencoder": str(path)})
    model = build_model("cnn7", 3, 2, width=4)
    with pytest.raises(CausalignError, match="1-channel"):  # was a conv RuntimeError
        method(model, _batch(channels=3))


def test_causal_align_refuses_an_unusable_autoencoder_path_before_training(tmp_path,
                                                                           monkeypatch):
    import causalign.models.autoencoder as ae_mod

    def no_training(images, **kwargs):
        raise AssertionError("trained an autoencoder it could not have saved")

    monkeypatch.setattr(ae_mod, "train_autoencoder", no_training)
    (tmp_path / "a_file").write_text("x")
    method = build_method("causal-align", {"steps": 1, "space": "latent",
                                           "autoencoder": str(tmp_path / "a_file" / "ae.pt")})
    with pytest.raises(CausalignError, match="cannot create the folder"):
        method(build_model("cnn7", 1, 2, width=4), _batch())


def test_causal_align_refuses_a_box_only_training_split():
    # The trainer checks for "a mask or a box"; with region=mask and boxes only, every step
    # skipped L_align (n_align = 0): ERM under the name causal-align, without a word.
    boxes_only = types.SimpleNamespace(has_mask=torch.zeros(8, dtype=torch.bool),
                                       has_box_or_mask=torch.ones(8, dtype=torch.bool),
                                       images=torch.rand(8, 1, 16, 16))
    model = _model("causal-align")
    with pytest.raises(ConfigError, match="method.region=box"):
        build_method("causal-align").setup(boxes_only, model)
    build_method("causal-align", {"region": "box"}).setup(boxes_only, model)
    # hier-align's image level is optional: masks absent is not an error there
    build_method("hier-align").pixel.setup(boxes_only, model)


def test_causal_align_warns_when_part_of_the_annotated_samples_have_only_a_box():
    # a mixed mask/box import: under region=mask the box-only samples skip L_align
    mixed = types.SimpleNamespace(has_mask=torch.arange(8) < 5,
                                  has_box_or_mask=torch.ones(8, dtype=torch.bool),
                                  images=torch.rand(8, 1, 16, 16))
    model = _model("causal-align")
    with pytest.warns(UserWarning, match="3 of 8 annotated training samples have only a box") \
            as seen:
        build_method("causal-align").setup(mixed, model)
    assert sum("only a box" in str(w.message) for w in seen) == 1  # once, not per sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # region=box uses them: nothing to say
        build_method("causal-align", {"region": "box"}).setup(mixed, model)
        masks = types.SimpleNamespace(has_mask=torch.ones(8, dtype=torch.bool),
                                      has_box_or_mask=torch.ones(8, dtype=torch.bool),
                                      images=torch.rand(8, 1, 16, 16))
        build_method("causal-align").setup(masks, model)


# ---------------------------------------------------------------- state left by a step


def test_icnn_step_leaves_no_autograd_graph_on_the_model():
    method, model = build_method("icnn"), _model("icnn")
    method(model, _batch()).total.backward()
    assert model.interpretable.last_maps is None
    copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user ..." before
    # a plain forward (evaluation, explainers) does not keep the maps either
    model(torch.rand(2, 1, 16, 16))
    assert model.interpretable.last_maps is None
    # and the filter loss still trains the interpretable layer
    model.zero_grad()
    out = method(model, _batch())
    out.total.backward()
    assert out.parts["filter"] != 0.0
    assert model.interpretable.conv.weight.grad.abs().sum() > 0


ANNOTATION_METHODS = ["oracle", "causal-align", "rrr", "cdep", "chang"]


@pytest.mark.parametrize("method", ANNOTATION_METHODS + ["hier-align"])
def test_a_batch_without_annotations_gets_plain_ce_and_leaves_the_model_as_it_was(method):
    m, model = build_method(method, SMALL.get(method)), _model(method)
    model.train()
    batch = _batch(annotated=False)
    batch["attr_known"][:] = False  # hier-align: no attribute level either
    modes = [mod.training for mod in model.modules()]
    out = m(model, batch)
    with torch.no_grad():
        logits = model(batch["image"])  # hier-align's model is f₂(σ(f₁(x))) too
    assert torch.isfinite(out.total)
    assert out.total.item() == pytest.approx(F.cross_entropy(logits, batch["label"]).item(),
                                             rel=1e-4, abs=1e-5)
    assert [mod.training for mod in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())  # no .grad before backward
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks
               and "forward" not in mod.__dict__ for mod in model.modules())


@pytest.mark.parametrize("method", ANNOTATION_METHODS + ["hier-align", "ppi", "icnn", "erm"])
@pytest.mark.parametrize("n", [1, 3])
def test_batch_of_one_and_full_masks_give_finite_gradients(method, n):
    m, model = build_method(method, SMALL.get(method)), _model(method)
    batch = _batch(n=n)
    batch["mask"][:] = 1.0  # every pixel is evidence
    batch["box_mask"][:] = 1.0
    out = m(model, batch)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("frozen", ["f1", "f2"])
def test_hier_align_trains_with_one_level_frozen(frozen):
    # e.g. a pretrained attribute predictor f₁ kept fixed while the head f₂ learns: the
    # gradient balance asked autograd for the norm over an empty parameter list
    # ("`inputs` argument to `grad()` cannot be empty")
    method, model = build_method("hier-align", SMALL["hier-align"]), _model("hier-align")
    getattr(model, frozen).requires_grad_(False)
    out = method(model, _batch())
    out.total.backward()
    assert torch.isfinite(out.total)
    trained = model.f2 if frozen == "f1" else model.f1
    assert all(p.grad is None for p in getattr(model, frozen).parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


@pytest.mark.parametrize(("args", "needle"), [
    ({"target": "²"}, "method.target must be"),  # "²".isdigit(): int() failed at step 1
    ({"dilate": 10**20}, "method.dilate must be in 0..1048576"),  # max_pool2d overflow
    ({"eps": 1e-30}, "method.eps must be >= 1e-15"),  # ε² underflows: every search NaN
    ({"autoencoder": "ae.pt"}, "method.autoencoder is used only with method.space=latent"),
])
def test_causal_align_settings_that_failed_late_or_silently_are_refused(args, needle):
    with pytest.raises(ConfigError, match=needle):
        build_method("causal-align", args)


def test_causal_align_setup_refuses_settings_the_data_cannot_take(tiny_data):
    """target=5 on two classes failed at the first step without naming the setting; a
    dilation over the whole image left no alignment term (ERM under another name)."""
    from causalign.data.format import LesionDataset

    train_set = LesionDataset(tiny_data, "train")
    model = build_model("cnn7", 1, 2, width=4)
    with pytest.raises(ConfigError, match=r"method.target=5 is no class of this data "
                                          r"\(classes 0..1\)"):
        build_method("causal-align", {"target": 5}).setup(train_set, model)
    for dilate in (32, 31):  # 31 grows one corner pixel over the whole 32×32 image too
        with pytest.raises(ConfigError, match=rf"method.dilate={dilate} grows the region over "
                                              rf"the whole 32×32 image"):
            build_method("causal-align", {"dilate": dilate}).setup(train_set, model)
    build_method("causal-align", {"target": 1, "dilate": 30}).setup(train_set, model)


def test_latent_space_on_volumes_is_refused_up_front(tmp_path):
    """It failed inside the autoencoder's training: "needs a non-empty (N,C,H,W) image
    batch", naming neither the setting nor the volumes."""
    from causalign.data.format import LesionDataset
    from causalign.data.synth import SynthConfig, generate

    generate(tmp_path / "v", SynthConfig(n_train=8, n_val=2, n_test=2, size=32, depth=4,
                                         seed=0))
    train_set = LesionDataset(tmp_path / "v", "train")
    model = build_model("multiview", 1, 2, width=4)
    with pytest.raises(ConfigError, match=r"method.space=latent takes 2D images"):
        build_method("causal-align", {"space": "latent"}).setup(train_set, model)


def test_a_setting_refused_at_setup_leaves_no_empty_run_folder(tiny_data, tmp_path, capsys):
    from causalign.cli import main

    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--method", "causal-align", "--out", str(run),
                 "--epochs", "1", "--set", "width=4", "--set", "threads=1",
                 "--set", "method.target=5", "--no-progress"]) == 2
    assert "method.target=5 is no class of this data" in capsys.readouterr().err
    assert not run.exists()
    run.mkdir()  # a folder the user made stays
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(tiny_data), "--method", "causal-align", "--out", str(run),
                 "--epochs", "1", "--set", "width=4", "--set", "threads=1",
                 "--set", "method.target=5", "--no-progress"]) == 2
    assert (run / "notes.txt").read_text() == "mine"
