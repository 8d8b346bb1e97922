"""Mutation audit of report figures, saliency comparison and models (report/figures.py,
report/saliency.py, models/): behaviours the earlier tests let slip."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import causalign.report.figures as figures  # noqa: E402
import causalign.report.saliency as saliency  # noqa: E402


def _saved(monkeypatch) -> list:
    """Each figure a writer would save, drawn, instead of a PNG."""
    figs: list = []

    def capture(fig, path, **kwargs):
        fig.canvas.draw()
        figs.append(fig)

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    return figs


def _ax():
    return figures.agg_figure().subplots()


# --- intensity range and image panels -------------------------------------------------


def test_display_range_keeps_unit_range_up_to_one_and_widens_a_constant():
    """Guard: values in [0, 1] inclusive draw over [0, 1] (kills `hi < 1`); a constant image
    outside it draws over ±0.5 around its value, not an empty range (kills dropping the
    widening)."""
    assert figures.display_range(np.array([0.2, 1.0])) == (0.0, 1.0)
    assert figures.display_range(np.full((2, 2), 5.0)) == (4.5, 5.5)
    assert figures.display_range(np.array([-100.0, np.nan, 300.0])) == (-100.0, 300.0)


def test_a_volume_shows_its_middle_slice_and_channels_their_mean():
    """Guard: a (C, D, H, W) panel is the middle slice (kills slice 0) and a 2-channel image
    is drawn as the channel mean (kills channel 0 only)."""
    vol = np.zeros((2, 5, 4, 4))
    vol[0, 2] = 0.8  # middle slice, channel 0
    vol[1, 2] = 0.2
    ax = _ax()
    figures._show_image(ax, vol)
    np.testing.assert_allclose(ax.images[0].get_array(), np.full((4, 4), 0.5))


def test_example_grid_shows_the_slice_with_most_lesion(monkeypatch, tmp_path):
    """Guard: a volume example shows the slice holding most of its mask, not the middle one
    (kills `z = D // 2`)."""
    figs = _saved(monkeypatch)
    img = np.zeros((1, 6, 8, 8))
    img[0, 1] = 0.7
    mask = np.zeros((1, 6, 8, 8))
    mask[0, 1, 2:5, 2:5] = 1
    figures.example_grid(img[None], mask[None], ["a"], tmp_path / "e.png", cols=1)
    np.testing.assert_allclose(figs[0].axes[0].images[0].get_array(), np.full((8, 8), 0.7))


# --- saliency overlays ----------------------------------------------------------------


def _ref_scaled(s: np.ndarray) -> tuple[np.ndarray, bool]:
    """Independent reference: signed maps ÷ max |value|, others min–max."""
    if s.min() < 0:
        return s / np.abs(s).max(), True
    return (s - s.min()) / (s.max() - s.min()), False


@pytest.mark.parametrize("s", [np.array([[-4.0, 1.0], [0.0, 2.0]]),
                               np.array([[-1.0, 3.0], [0.5, 0.0]]),
                               np.array([[0.0, 0.5], [1.0, 0.25]]),
                               np.array([[2.0, 3.0], [4.0, 6.0]])])
def test_scaled_map_matches_the_symmetric_or_min_max_reference(s):
    """Signed maps are divided by max |value| (kills a limit from the maximum only), a map
    whose minimum is exactly 0 is unsigned (kills `lo <= 0`), unsigned maps are min–max
    scaled (kills dropping the minimum)."""
    got, signed = figures._scaled_map(s)
    ref, ref_signed = _ref_scaled(s)
    assert signed == ref_signed
    np.testing.assert_allclose(got, ref)


def test_signed_overlay_is_red_for_positive_blue_for_negative_on_minus_one_to_one():
    """Paper 000 Fig. 9 convention on the overlay of a signed map: the colour scale is
    [−1, 1] (kills vmin 0), +1 draws red and −1 blue (kills a reversed map), and a weak
    pixel at 10 % of the scale is still visible (alpha 0.08; kills a 50 % threshold)."""
    ax = _ax()
    s = np.array([[-2.0, 2.0], [0.2, 0.0]])
    figures._overlay_ax(ax, np.zeros((1, 2, 2)), s, None)
    im = ax.images[1]
    assert im.get_clim() == (-1.0, 1.0)
    red, blue = im.to_rgba(1.0), im.to_rgba(-1.0)
    assert red[0] > 0.9 and red[2] < 0.1 and blue[2] > 0.9 and blue[0] < 0.1
    alpha = np.asarray(im.get_alpha())
    np.testing.assert_allclose(alpha, [[0.8, 0.8], [0.08, 0.0]])


def test_box_rectangle_covers_whole_pixels():
    """The lesion box spans its pixels' outer edges: a box over columns 2..4 and rows 1..2
    is 3 × 2 px from (1.5, 0.5) (kills a width one pixel short)."""
    ax = _ax()
    box = np.zeros((6, 6))
    box[1:3, 2:5] = 1
    figures._draw_box(ax, box)
    r = ax.patches[0]
    assert (r.get_x(), r.get_y(), r.get_width(), r.get_height()) == (1.5, 0.5, 3, 2)


def test_cam_grid_draws_each_rows_own_map(monkeypatch, tmp_path):
    """Row r of the CAM grid overlays map r of each method (kills every row showing row 0's
    map); the overlay holds the scaled map."""
    figs = _saved(monkeypatch)
    imgs = np.zeros((2, 1, 4, 4))
    m = np.stack([np.eye(4), np.fliplr(np.eye(4)) * 3])
    figures.cam_grid(imgs, np.zeros((2, 4, 4)), {"a": m}, tmp_path / "c.png")
    axes = figs[0].axes  # row-major: (row 0: input, a), (row 1: input, a)
    np.testing.assert_allclose(axes[1].images[1].get_array(), np.eye(4))
    np.testing.assert_allclose(axes[3].images[1].get_array(), np.fliplr(np.eye(4)))


def test_outline_of_a_full_mask_runs_along_the_image_edges():
    """The outline of a mask covering the image lies on the image's outer edges (−0.5 and
    W − 0.5): kills contour coordinates shifted by one pixel."""
    ax = _ax()
    figures._outline(ax, np.ones((5, 7)), "red")
    v = np.concatenate([p.vertices for c in ax.collections for p in c.get_paths()])
    np.testing.assert_allclose([v[:, 0].min(), v[:, 0].max(), v[:, 1].min(), v[:, 1].max()],
                               [-0.5, 6.5, -0.5, 4.5])


# --- signed change maps (counterfactuals) -----------------------------------------------


def test_signed_change_map_picks_the_largest_magnitude_channel_with_its_sign():
    """A decrease of −0.6 beside an increase of +0.2 is drawn as −0.6 (kills argmax of the
    signed value, which drew it as an increase)."""
    c = np.zeros((2, 1, 2))
    c[0, 0, 0], c[1, 0, 0] = 0.2, -0.6
    c[0, 0, 1], c[1, 0, 1] = 0.5, -0.1
    np.testing.assert_allclose(figures.signed_change_map(c), [[-0.6, 0.5]])


def test_triptych_change_panel_is_x_star_minus_x_red_for_increase(monkeypatch, tmp_path):
    """The third panel holds x* − x (kills x − x*) on a symmetric scale with red = increase
    and blue = decrease (paper 000 Fig. 9; kills a reversed colour map)."""
    figs = _saved(monkeypatch)
    img = np.full((1, 4, 4), 0.5)
    xs = img.copy()
    xs[0, 0, 0], xs[0, 3, 3] = 0.9, 0.3
    figures.counterfactual_triptych(img, xs, None, tmp_path / "t.png")
    im = figs[0].axes[2].images[0]
    np.testing.assert_allclose(im.get_array(), xs[0] - img[0])
    assert im.get_clim() == pytest.approx((-0.4, 0.4))
    assert im.to_rgba(0.4)[0] > 0.9 and im.to_rgba(-0.4)[2] > 0.9
    assert im.to_rgba(0.4)[2] < 0.1 and im.to_rgba(-0.4)[0] < 0.1


def test_counterfactual_grid_outlines_each_rows_own_region(monkeypatch, tmp_path):
    """Row r's change panel outlines region r (kills every row outlining row 0's region)."""
    figs = _saved(monkeypatch)
    imgs = np.zeros((2, 1, 6, 6))
    xs = imgs + 0.1
    regions = np.zeros((2, 6, 6))
    regions[1, 2:4, 2:4] = 1
    figures.counterfactual_grid(imgs, xs, regions, tmp_path / "g.png")
    axes = figs[0].axes  # row-major, 3 per row
    assert not axes[2].collections and axes[5].collections


def test_class_name_of_an_index_outside_the_names_is_the_index():
    """A negative index is no class name (kills `k < len(names)`, which named class −1 after
    the last class)."""
    class D:
        class meta:
            classes = ["benign", "malignant"]
    assert figures.class_name(D, -1) == "-1"
    assert figures.class_name(D, 1) == "malignant"


# --- saliency comparison (report's saliency.png) ----------------------------------------


def _dataset(tmp_path, n: int = 4):
    from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset

    root = tmp_path / "data"
    w = DatasetWriter(root, DatasetMeta("d", ["benign", "malignant"], ndim=2),
                      image_format="npy")
    rng = np.random.default_rng(0)
    for k in range(n):
        w.add(rng.random((16, 16)).astype(np.float32), label=0, split="test",
              sample_id=f"s{k}")
    w.close()
    return LesionDataset(root, "test")


class _AlwaysOne(torch.nn.Module):
    """Predicts class 1 for every image (labels in the data are all 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.head = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([-50.0, 50.0]))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_saliency_names_put_wbp_first_and_drop_2d_only_methods_for_volumes():
    """WBP (the paper's) leads and the rest are sorted (kills the plain sorted list); for
    volumes the methods `VOLUME_UNSUPPORTED` lists are left out (kills keeping them)."""
    from causalign.engine.evaluate import VOLUME_UNSUPPORTED

    names = saliency.saliency_names()
    assert names[0] == "wbp" and names[1:] == sorted(names[1:])
    vol = saliency.saliency_names(volumes=True)
    assert not set(vol) & set(VOLUME_UNSUPPORTED) and set(vol) < set(names)


def test_saliency_comparison_draws_first_cases_predicted_class_positive_part(monkeypatch,
                                                                              tmp_path):
    """Given maps of more cases than `limit`, the figure shows the FIRST `limit` (kills the
    last ones), with negative relevance clipped to 0 (kills drawing signed maps), and the row
    titles name the predicted class, not the label (kills p = label)."""
    from causalign.methods import build_method

    got = {}
    monkeypatch.setattr(figures, "cam_grid",
                        lambda images, boxes, maps, path, row_titles=None:
                        got.update(maps=maps, titles=row_titles))
    ds = _dataset(tmp_path)
    maps = {"gradient": np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16) - 300}
    saliency.saliency_comparison(_AlwaysOne(), build_method("erm"), ds, tmp_path / "s.png",
                                 names=["gradient"], limit=2, maps=maps)
    np.testing.assert_array_equal(got["maps"]["gradient"], np.clip(maps["gradient"][:2], 0,
                                                                    None))
    assert all("y=benign" in t and t.endswith("p=malignant") for t in got["titles"])


def test_compute_maps_are_taken_in_eval_mode_and_restore_train_mode(tmp_path):
    """Guard: maps come from the model in eval mode (BatchNorm on running statistics)
    whatever the caller's mode, which is restored. (Dropping compute_maps' own eval_mode is
    an equivalent mutant: the explainers switch to eval themselves.)"""
    torch.manual_seed(0)
    model = _AlwaysOne()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.running_var.fill_(4.0)
        model.head.bias.zero_()
    x = torch.rand(3, 1, 8, 8)
    target = torch.tensor([0, 1, 0])
    ref = saliency.compute_maps(model.eval(), x, target, ["gradient"])["gradient"]
    got = saliency.compute_maps(model.train(), x, target, ["gradient"])["gradient"]
    assert model.training
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


# --- models -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,patch", [("bagnet9", 9), ("bagnet17", 17)])
def test_bagnet_patches_are_q_by_q_and_logits_their_mean(name, patch):
    """Each patch logit sees exactly a q × q window of the input (gradient support; kills
    an extra 3 × 3 conv), the patch grid has (H − q) / 2 + 1 real cells (kills leaving the
    zero padding in), the logits are the mean of the patch evidence (kills the sum), and the
    Grad-CAM layer tiles the image at H / 2 (kills a padding of (q − 1) / 2)."""
    from causalign.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 1, 2, width=4).eval()
    x = torch.rand(1, 1, 33, 33, requires_grad=True)
    pl = model.patch_logits(x)
    cells = (33 - patch) // 2 + 1
    assert pl.shape == (1, 2, cells, cells)
    torch.testing.assert_close(model(x), pl.mean((2, 3)))
    pl[0, 0, 1, 2].backward()
    rows, cols = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    assert (rows.min(), rows.max() - rows.min() + 1) == (2, patch)
    assert (cols.min(), cols.max() - cols.min() + 1) == (4, patch)
    seen = []
    model.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    model(torch.rand(1, 1, 33, 33))
    pad = (patch - 1) // 4
    assert tuple(seen[0]) == (cells + 2 * pad,) * 2


def _ref_template_mask(x: torch.Tensor, beta: float = 4.0) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(n):
        for k in range(c):
            mi, mj = divmod(int(x[i, k].argmax()), w)
            for a in range(h):
                for b in range(w):
                    t = max(1 - beta * (abs(a - mi) + abs(b - mj)) / max(h, w), -1)
                    out[i, k, a, b] = max(float(x[i, k, a, b]) * t, 0.0)
    return out


def test_icnn_template_mask_matches_the_papers_mask_at_an_off_diagonal_peak():
    """max(x ⊙ T_μ̂, 0) with μ̂ = (row, col) of the peak, from an element-wise reference:
    kills swapped row/column of μ̂ and a dropped clamp at 0."""
    from causalign.models.icnn import template_mask

    x = torch.rand(2, 3, 5, 7)
    x[0, 0, 1, 5] = 5.0  # peak off the diagonal, non-square map
    x[1, 2, 4, 0] = 5.0
    torch.testing.assert_close(template_mask(x), _ref_template_mask(x))


def test_icnn_label_mask_applies_in_training_only_and_filters_cycle_classes():
    """The T⁻ label mask zeroes a filter's map in train mode only (kills applying it at
    evaluation); filter f belongs to class f mod C (kills blocks of filters per class)."""
    from causalign.models.icnn import ICNN, InterpretableConv

    layer = InterpretableConv(2)
    with torch.no_grad():  # a positive response everywhere: the eval-mode map is not empty
        layer.conv.weight.abs_()
        layer.conv.bias.fill_(0.1)
    x = torch.rand(1, 2, 4, 4)
    layer.negative = torch.tensor([[True, False]])
    assert layer.eval()(x)[0, 0].abs().sum() > 0
    assert layer.train()(x)[0, 0].abs().sum() == 0
    assert ICNN(1, 3, width=2).filter_class.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def _ref_icnn_loss(x: torch.Tensor, alpha: float, beta: float = 4.0) -> torch.Tensor:
    """−MI(X; T) of paper Eq. 2–3 written out per filter (float64)."""
    from causalign.models.icnn import part_templates

    n, c, h, w = x.shape
    tau = 0.5 / (h * w)
    temps = [-tau * torch.ones(h, w, dtype=x.dtype)] + list(
        part_templates(h, beta, width=w, dtype=x.dtype) * tau)
    m = len(temps) - 1
    prior = torch.tensor([1 - alpha] + [alpha / m] * m, dtype=x.dtype)
    out = []
    for k in range(c):
        px_t = torch.stack([torch.softmax(torch.stack([(x[i, k] * t).sum() for i in range(n)]),
                                          0) for t in temps])  # (T, N): p(x_i | T)
        px = (prior[:, None] * px_t).sum(0)
        out.append(-(prior[:, None] * px_t * (px_t / px).log()).sum())
    return torch.stack(out)


def test_icnn_filter_loss_is_minus_the_mutual_information_of_the_paper():
    """filter_loss against Eq. 2–3 computed term by term: p(x|T) normalised over the batch
    (kills normalising over templates), T⁻ = −τ (kills +τ)."""
    from causalign.models.icnn import filter_loss

    x = torch.rand(5, 2, 3, 4, dtype=torch.float64) * 40
    torch.testing.assert_close(filter_loss(x, 0.3), _ref_icnn_loss(x, 0.3))


def _mv(**kw):
    from causalign.models import MultiViewCNN

    torch.manual_seed(0)
    return MultiViewCNN(1, 3, width=4, **kw)


def test_multiview_output_is_log_of_attention_weighted_slice_probabilities():
    """log P = log Σ_i w_i p_i with w = softmax(ReLU(FC₂([f_i, e_i]) + δ) / τ), recomputed
    from the module's parts: kills δ outside the ReLU, τ multiplying, dropping the slice
    embedding, and pooling without the attention weights."""
    model = _mv(delta_init=0.5, tau=0.3).eval()
    with torch.no_grad():
        model.slice_cnn.classifier.weight.mul_(300.0)  # slices' p_i far apart
        # a_i = the slice embedding's first entry: some slices below −δ, some above
        model.position.weight.zero_()
        model.position.weight[:4, 0] = torch.tensor([-1.0, -0.2, 0.3, 0.8])
        model.attention.weight.zero_()
        model.attention.weight[0, -6] = 1.0
        model.attention.bias.fill_(0.0)
        # slices of very different brightness: different slice probabilities p_i
        x = torch.rand(2, 1, 4, 8, 8) * torch.tensor([0.0, 2.0, 8.0, 30.0]).view(1, 1, 4, 1, 1)
        out = model(x)
        cnn = model.slice_cnn
        f = cnn.flatten(cnn.pool(cnn.features(x.transpose(1, 2).reshape(8, 1, 8, 8))))
        p = torch.softmax(cnn.classifier(f), -1).view(2, 4, 3)
        e = model.position.weight[:4].expand(2, 4, -1)
        a = model.attention(torch.cat([f.view(2, 4, -1), e], -1)).squeeze(-1)
        w = torch.softmax(torch.relu(a + 0.5) / 0.3, dim=1)
    # the attention must matter here: some slices clipped by the ReLU, weights not uniform
    assert (a + 0.5 < 0).any() and (a + 0.5 > 0).any() and w.std(1).min() > 0.05
    assert (p.max(1).values - p.min(1).values).max() > 0.05
    torch.testing.assert_close(out, (w[..., None] * p).sum(1).log(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.last_attention, w, rtol=1e-4, atol=1e-6)


def test_multiview_trains_on_ceil_fraction_of_slices_and_evaluates_on_all():
    """train_slices=0.5 of 5 slices is 3 per volume in train mode (ceil; kills int) and every
    slice in eval mode (kills subsampling at evaluation)."""
    model = _mv(train_slices=0.5)
    x = torch.rand(2, 1, 5, 8, 8)
    model.train()(x)
    assert model.last_slices.shape == (2, 3)
    model.eval()(x)
    assert model.last_slices.tolist() == [list(range(5))] * 2


def test_build_model_sizes_the_position_table_to_deep_volumes():
    """A 600-slice volume gets a 600-row position table (kills the fixed 512)."""
    from causalign.models import build_model

    model = build_model("multiview", 1, 2, width=4, image_shape=(1, 600, 8, 8))
    assert model.position.num_embeddings == 600


def test_input_size_minimum_is_inclusive():
    """vgg11 takes 32 px images and refuses 31 (kills `<=` at the minimum)."""
    from causalign.errors import CausalignError
    from causalign.models import check_input_size

    check_input_size("vgg11", (1, 32, 32))
    with pytest.raises(CausalignError):
        check_input_size("vgg11", (1, 31, 40))


def test_autoencoder_pads_at_the_end_and_decodes_through_a_sigmoid():
    """encode pads H, W up to a multiple of 4 at the bottom/right by replication (kills
    padding at the top/left), decode is sigmoid of the decoder (kills a clamp instead)."""
    import torch.nn.functional as F

    from causalign.models.autoencoder import ConvAutoencoder

    torch.manual_seed(0)
    ae = ConvAutoencoder(1, width=4, latent_channels=2)
    x = torch.rand(1, 1, 10, 9)
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(z, ae.encoder(F.pad(x, (0, 3, 0, 2), mode="replicate")))
        torch.testing.assert_close(ae.decode(z), torch.sigmoid(ae.decoder(z)))


def test_autoencoder_output_starts_at_the_mean_intensity():
    """Before any step (epochs=0) the decoder's last bias is logit(mean pixel) (kills
    starting at 0.5)."""
    from causalign.models.autoencoder import train_autoencoder

    ae = train_autoencoder(torch.full((4, 1, 8, 8), 0.2), epochs=0, width=4, latent_channels=2)
    torch.testing.assert_close(ae.decoder[-1].bias,
                               torch.full_like(ae.decoder[-1].bias, float(np.log(0.2 / 0.8))))


def test_backbone_input_adaptation_keeps_the_mean_filter_and_cam_layers():
    """A conv adapted to another channel count carries the mean over the old input channels
    to each new one (kills copying channel 0); Grad-CAM layers are resnet18's layer4 and
    the 7-layer CNN's last ReLU."""
    from causalign.models import SevenLayerCNN, build_model
    from causalign.models.backbones import _adapt_conv

    conv = torch.nn.Conv2d(3, 4, 3)
    new = _adapt_conv(conv, 2)
    ref = conv.weight.detach().mean(1, keepdim=True).expand(4, 2, 3, 3)
    torch.testing.assert_close(new.weight.detach(), ref)
    res = build_model("resnet18", 1, 2)
    assert res.cam_layer is res.layer4
    cnn = SevenLayerCNN(1, 2, width=4)
    assert cnn.cam_layer is cnn.features[-1] and isinstance(cnn.cam_layer, torch.nn.ReLU)


def test_hierarchy_feeds_attribute_probabilities_to_the_head():
    """f(x) = f₂(σ(f₁(x))) (kills feeding raw attribute logits to f₂)."""
    from causalign.models import HierarchicalModel, MLPHead, SevenLayerCNN

    torch.manual_seed(0)
    f1, f2 = SevenLayerCNN(1, 3, width=4).eval(), MLPHead(3, 2)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(HierarchicalModel(f1, f2)(x), f2(torch.sigmoid(f1(x))))


def test_channel_mean_var_is_batchnorms_biased_variance():
    """The batch statistics are the biased (÷ N) variance train-mode BatchNorm uses (kills
    the unbiased ÷ (N − 1))."""
    from causalign.models.norm import channel_mean_var

    x = torch.randn(3, 2, 4, 5)
    mean, var = channel_mean_var(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))


def test_saliency_comparison_of_a_volume_shows_the_masks_slice_not_the_boxs(monkeypatch,
                                                                             tmp_path):
    """A volume with a 4-number box (every slice) and a mask on slice 4 is drawn at slice 4,
    image and map alike (kills choosing the slice from the box, whose tie gives the middle
    slice 3)."""
    from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset
    from causalign.methods import build_method
    from causalign.models import build_model

    root = tmp_path / "vol"
    w = DatasetWriter(root, DatasetMeta("v", ["a", "b"], ndim=3), image_format="npy")
    vol = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    mask = np.zeros((6, 16, 16), np.uint8)
    mask[4, 5:9, 5:9] = 1
    w.add(vol, label=0, split="test", mask=mask, box=(2, 2, 12, 12), sample_id="v0")
    w.close()
    ds = LesionDataset(root, "test")
    got = {}
    monkeypatch.setattr(figures, "cam_grid",
                        lambda images, boxes, maps, path, row_titles=None:
                        got.update(images=images, maps=maps))
    maps = {"gradient": np.broadcast_to(np.arange(6.0)[:, None, None], (1, 6, 16, 16))}
    torch.manual_seed(0)
    model = build_model("multiview", 1, 2, width=4, image_shape=(1, 6, 16, 16))
    saliency.saliency_comparison(model, build_method("erm"), ds, tmp_path / "s.png",
                                 names=["gradient"], limit=1, maps=maps)
    np.testing.assert_allclose(got["maps"]["gradient"][0], np.full((16, 16), 4.0))
    np.testing.assert_allclose(got["images"][0, 0], ds.batch(torch.arange(1))["image"][0, 0, 4])
