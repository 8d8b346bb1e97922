"""Bring your own model and training loop: causalign's explainers and method losses on a
user's own nn.Module, with batches from a plain torch DataLoader, without the Trainer.
Where a piece cannot handle the model or batch it must say so in one line (InputError) and
leave the model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from causalign.data.format import LesionDataset
from causalign.errors import InputError
from causalign.explain import get_explainer
from causalign.methods import build_method

SMALL = {"causal-align": {"steps": 2}}
ANNOTATED = ("causal-align", "rrr", "cdep", "chang", "oracle")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)


class PreActNet(nn.Module):
    """A pre-activation residual block (BN -> ReLU -> conv, plus the skip): in module order
    conv1 is followed by bn2, but bn2 normalises stem + conv1, not conv1's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.r1, self.conv1 = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.bn2, self.r2, self.conv2 = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv1(self.r1(self.bn1(h)))
        h = self.conv2(self.r2(self.bn2(h)))
        return self.fc(h.mean((2, 3)))


class DenseNet(nn.Module):
    """DenseNet-style: norm2 normalises a concatenation (12 channels) while the layer before
    it in module order, conv1, has 4 outputs (zennit's fold crashed half-way)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.norm0(self.conv0(x)))
        b = torch.cat([a, F.relu(self.conv1(a))], 1)
        return self.fc(F.relu(self.conv2(F.relu(self.norm2(b)))).mean((2, 3)))


class LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.ln = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm([4, 8, 8])
        self.act, self.fc = nn.GELU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.ln(self.conv(x))).mean((2, 3)))


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


class FunctionalNet(nn.Module):
    """Functional ReLUs, a concatenation and a skip sum: piecewise linear, so WBP is x ⊙ ∇x."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = F.relu(self.c3(torch.cat([a, F.relu(self.c2(a))], 1))) + a
        return self.fc(F.max_pool2d(b, 2).mean((2, 3)))


# ----------------------------------------------------------------------------- explainers


@pytest.mark.parametrize("name", ["lrp-epsilon", "lrp-gamma"])
def test_lrp_refuses_a_batchnorm_fold_that_changes_the_network(name):
    """zennit folds a BatchNorm into the conv before it in *module order*; in a pre-activation
    block that computes other logits, so the map was silently that of another network."""
    model = PreActNet().eval()
    _randomise_bn(model)
    x = torch.rand(2, 3, 8, 8)
    before, logits = _state(model), model(x).detach()
    with pytest.raises(InputError, match=r"cannot fold BatchNorm 'bn2' into 'conv1'"):
        get_explainer(name, model).attribute(x, target=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), logits) and _n_hooks(model) == 0


def test_lrp_on_densenet_style_concat_is_refused_and_leaves_the_model_intact():
    """The fold crashed half-way (a RuntimeError on the channel mismatch) after merging the
    pairs before it and adding a bias to a bias-free conv; every later use of the model, a
    gradient map included, then failed."""
    model = DenseNet().eval()
    _randomise_bn(model)
    x = torch.rand(2, 3, 8, 8)
    before = _state(model)
    params = [id(p) for p in model.parameters()]
    with pytest.raises(InputError, match=r"BatchNorm 'norm2' into 'conv1'"):
        get_explainer("lrp-epsilon", model).attribute(x, target=0)
    assert model.conv1.bias is None and [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _n_hooks(model) == 0
    get_explainer("gradient", model).attribute(x, target=0)  # the model still works


def test_lrp_undoes_a_canonizer_that_fails_half_way():
    """A canonizer that raises inside zennit's register() returns no handle: what it changed
    (and the hooks registered before it) must still be undone."""
    from zennit.canonizers import Canonizer

    class HalfWay(Canonizer):
        def apply(self, root):
            root.fc.weight.data = torch.zeros_like(root.fc.weight)
            root.fc.bias = None
            raise RuntimeError("boom")

        def register(self):
            pass

        def remove(self):
            pass

    model = FunctionalNet().eval()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        get_explainer("lrp-epsilon", model, canonizers=[HalfWay()]).attribute(
            torch.rand(1, 3, 8, 8), target=0)
    assert model.fc.bias is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _n_hooks(model) == 0


@pytest.mark.parametrize("cls,layer", [(LayerNormNet, "LayerNorm"),
                                       (TinyViT, "MultiheadAttention")])
@pytest.mark.parametrize("name,create_graph", [("wbp", False), ("wbp", True),
                                               ("lrp-epsilon", False), ("lrp-epsilon", True),
                                               ("lrp-gamma", False)])
def test_wbp_and_lrp_refuse_layers_without_a_rule(cls, layer, name, create_graph):
    """WBP returned the plain gradient through LayerNorm/attention under the WBP label; zennit
    crashed on MultiheadAttention ("hook 'backward' has returned an incorrect number of
    values"). Now: one line naming the layer; modes and hooks as they were."""
    model = cls().train()
    with pytest.raises(InputError, match=rf"{name} has no rule for .*{layer}"):
        get_explainer(name, model).attribute(torch.rand(2, 3, 8, 8), target=1,
                                             create_graph=create_graph)
    assert model.training and all(m.training for m in model.modules())
    assert _n_hooks(model) == 0
    get_explainer("gradient", model).attribute(torch.rand(2, 3, 8, 8), target=1)


def test_wbp_on_functional_piecewise_linear_model_is_input_times_gradient():
    model = FunctionalNet()
    x = torch.rand(3, 3, 8, 8)
    wbp = get_explainer("wbp", model).attribute(x, target=1)
    ixg = get_explainer("input-x-gradient", model).attribute(x, target=1)
    torch.testing.assert_close(wbp, ixg)
    assert _n_hooks(model) == 0


def test_gradcam_evaluation_map_matches_attribute_with_inplace_relu():
    """`predict_and_attribute` (evaluation, export) kept the conv's output tensor, which a
    following ReLU(inplace=True) overwrote: its map used post-ReLU activations and differed
    from `attribute`'s (Captum's) by ~66% of the map's maximum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.rand(4, 3, 16, 16)
    cam = get_explainer("gradcam", model)
    logits, fast = cam.predict_and_attribute(x)
    torch.testing.assert_close(fast, cam.attribute(x, target=logits.argmax(1)))
    torch.testing.assert_close(logits, model(x).detach())


def test_gradcam_default_layer_the_forward_never_runs():
    """The default layer is the last Conv2d in module order; GoogLeNet's auxiliary heads come
    last and run only in train mode, so Captum failed with "AssertionError: Forward hook did
    not obtain any outputs for given layer". Now the last conv the forward runs is used; a
    layer the user names that never runs is refused with one line."""
    from causalign.explain.gradcam import GradCAM

    class AuxLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
            self.aux = nn.Conv2d(4, 2, 1)  # an auxiliary head, used in training only

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.conv(x))
            out = self.fc(h.mean((2, 3)))
            return out + self.aux(h).mean((2, 3)) if self.training else out

    torch.manual_seed(0)
    model = AuxLast().train()
    x = torch.rand(2, 3, 8, 8)
    cam = get_explainer("gradcam", model)
    expected = GradCAM(model, layer=model.conv).attribute(x, target=1)
    torch.testing.assert_close(cam.attribute(x, target=1), expected)
    assert cam.layer is model.conv and model.training and _n_hooks(model) == 0
    with pytest.raises(InputError, match=r"does not run layer 'aux'"):
        GradCAM(model, layer=model.aux).attribute(x, target=1)


# ----------------------------------------------------------------------- method losses


def _net(out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, out))


@pytest.fixture(scope="module")
def loader_batch(tiny_data):
    ds = LesionDataset(tiny_data, "train")
    return ds, next(iter(DataLoader(ds, batch_size=6, shuffle=False)))


@pytest.mark.parametrize("method", ["erm", "causal-align", "rrr", "cdep", "chang", "ppi",
                                    "oracle"])
def test_method_loss_in_a_user_loop(method, loader_batch):
    """A DataLoader batch, the user's own model in train mode (BatchNorm), loss.backward()
    and an optimizer step; the method leaves no hook on the model."""
    ds, batch = loader_batch
    model = _net().train()
    m = build_method(method, SMALL.get(method))
    m.setup(ds, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = m(model, batch)
    out.total.backward()
    opt.step()
    assert torch.isfinite(out.total) and _n_hooks(model) == 0 and model.training


@pytest.mark.parametrize("method", ANNOTATED)
def test_mask_without_channel_axis_is_refused(method, loader_batch):
    """(N, H, W) masks broadcast against (N, 1, H, W) images into (N, N, H, W): causal-align
    and rrr returned a loss mixing every sample's mask with every image, others crashed
    deep in torch."""
    _, batch = loader_batch
    bad = dict(batch, mask=batch["mask"][:, 0], box_mask=batch["box_mask"][:, 0])
    with pytest.raises(InputError, match=r"batch\['mask'\] must have shape \(6, 1, 32, 32\).*"
                                         r"\(6, 32, 32\)"):
        build_method(method, SMALL.get(method))(_net(), bad)


@pytest.mark.parametrize("method", ANNOTATED)
def test_wrong_size_or_missing_masks_are_refused(method, loader_batch):
    _, batch = loader_batch
    small = dict(batch, mask=batch["mask"][..., :16, :16])
    with pytest.raises(InputError, match=r"mask.*\(6, 1, 16, 16\)"):
        build_method(method, SMALL.get(method))(_net(), small)
    bare = {"image": batch["image"], "label": batch["label"]}
    with pytest.raises(InputError, match=r"missing: mask, has_mask, box_mask, has_annotation"):
        build_method(method, SMALL.get(method))(_net(), bare)


@pytest.mark.parametrize("method", ANNOTATED)
def test_masks_outside_0_1_are_refused(method, loader_batch):
    """A 0/255 mask read from a PNG weighted pixels by 1 - 255: causal-align's alignment
    "L1" loss came out at -15.5, rrr/cdep/chang/oracle changed silently."""
    _, batch = loader_batch
    b255 = dict(batch, mask=(batch["mask"] * 255).to(torch.uint8),
                box_mask=(batch["box_mask"] * 255).to(torch.uint8))
    with pytest.raises(InputError, match=r"batch\['mask'\] must hold values in \[0, 1\].*0\.\.255"):
        build_method(method, SMALL.get(method))(_net(), b255)
    nan = batch["box_mask"].clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"batch\['box_mask'\] must hold values in \[0, 1\]"):
        build_method(method, SMALL.get(method))(_net(), dict(batch, box_mask=nan))
    build_method(method, SMALL.get(method))(_net(), dict(batch, mask=batch["mask"] > 0))  # bool


@pytest.mark.parametrize("method", ["erm", "causal-align", "rrr", "ppi", "oracle"])
def test_non_finite_pixels_are_refused_before_the_loss(method, loader_batch):
    """A NaN pixel in a user's own batch gave a NaN loss, and after opt.step() a NaN model:
    nothing said which input was at fault."""
    _, batch = loader_batch
    for bad in (float("nan"), float("inf")):
        image = batch["image"].clone()
        image[2, 0, 5, 5] = bad
        image[4, 0, 0, 0] = bad
        model = _net()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(InputError, match=r"batch\['image'\] holds 2 NaN/inf value\(s\), in "
                                             r"sample\(s\) 2, 4 of 6"):
            build_method(method, SMALL.get(method))(model, dict(batch, image=image))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert _n_hooks(model) == 0


@pytest.mark.parametrize("method", ["erm", "rrr", "ppi"])
def test_model_with_one_output_is_refused_and_unhooked(method, loader_batch):
    """An (N,) output failed inside cross_entropy with "Expected floating point type for
    target with class probabilities, got Long"."""
    _, batch = loader_batch

    class Squeezed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(1)

    class Pair(Squeezed):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net[:-1](x), x.mean((1, 2, 3))

    model = Squeezed()
    with pytest.raises(InputError, match=r"\(N, classes\) logits.*Squeezed returned .*\(6,\)"):
        build_method(method)(model, batch)
    assert _n_hooks(model) == 0
    with pytest.raises(InputError, match=r"\(N, classes\) logits.*Pair returned tuple"):
        build_method(method)(Pair(), batch)


def test_label_and_dtype_mismatches_are_refused(loader_batch):
    _, batch = loader_batch
    erm = build_method("erm")
    with pytest.raises(InputError, match=r"batch\['label'\] must be an int64"):
        erm(_net(), dict(batch, label=batch["label"].int()))
    with pytest.raises(InputError, match=r"float32 but Sequential's parameters are "
                                         r"torch.float64"):
        erm(_net().double(), batch)
    out = erm(_net().double(), dict(batch, image=batch["image"].double()))  # both float64
    assert out.total.dtype == torch.float64


def test_hier_align_names_the_model_and_batch_it_needs(loader_batch):
    """Was AttributeError "'Sequential' object has no attribute 'f1'" and KeyError
    'attributes'."""
    from causalign.models import HierarchicalModel

    _, batch = loader_batch
    m = build_method("hier-align")
    with pytest.raises(InputError, match=r"hier-align needs a hierarchical model with modules "
                                         r"f1 .* got Sequential"):
        m(_net(), batch)
    no_attrs = {k: v for k, v in batch.items() if k not in ("attributes", "attr_known")}
    model = HierarchicalModel(_net(6), nn.Linear(6, 2))
    with pytest.raises(InputError, match=r"needs batch\['attributes'\]"):
        m(model, no_attrs)
