"""Synthetic lesion benchmark: determinism, shortcut placement, visible causal attributes."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.data.format import LesionDataset
from causalign.data.synth import (
    ATTRIBUTES,
    CAUSAL_WEIGHTS,
    LesionParams,
    SynthConfig,
    bayes_accuracy,
    generate,
    label_threshold,
    parse_weights,
    render_lesion,
)
from causalign.errors import DataError


def _corner(ds: LesionDataset, size: int) -> np.ndarray:
    """Mean brightness of the vertical bar of a '+' (absent in a '−')."""
    arm = max(7, size // 8)
    o = max(2, size // 24)
    mid = o + arm // 2
    x = ds.images[:, 0].numpy()
    return x[:, o:o + 2, mid - 1:mid + 1].mean(axis=(1, 2))


def test_deterministic_given_seed(tmp_path):
    cfg = SynthConfig(n_train=6, n_val=2, n_test=2, size=32, seed=11)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    a, b = LesionDataset(tmp_path / "a", "train"), LesionDataset(tmp_path / "b", "train")
    assert np.array_equal(a.images.numpy(), b.images.numpy())
    assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    generate(tmp_path / "c", SynthConfig(n_train=6, n_val=2, n_test=2, size=32, seed=12))
    c = LesionDataset(tmp_path / "c", "train")
    assert not np.array_equal(a.images.numpy(), c.images.numpy())


def test_plus_minus_is_a_training_shortcut_only(tmp_path):
    generate(tmp_path / "d", SynthConfig(n_train=60, n_val=60, n_test=4, size=32, seed=1))
    train, val = LesionDataset(tmp_path / "d", "train"), LesionDataset(tmp_path / "d", "val")
    plus_train = _corner(train, 32) > 0.8
    assert np.array_equal(plus_train, train.labels.numpy() == 1)  # "+" iff y = 1
    plus_val = _corner(val, 32) > 0.8
    agreement = (plus_val == (val.labels.numpy() == 1)).mean()
    assert 0.25 < agreement < 0.75  # random in val


def test_lesion_away_from_top_left_corner(tiny_data):
    ds = LesionDataset(tiny_data, "train")
    corner = int(0.3 * 32)
    assert ds.masks[:, 0, :corner, :corner].sum() == 0
    assert (ds.masks.flatten(1).sum(1) > 5).all()  # every image has a lesion


def test_attributes_visibly_change_the_lesion():
    size = 64
    p = LesionParams(cx=40, cy=40, radius=7.0, lobe_count=5, lobe_phase=0.3,
                     spike_angles=np.linspace(0, 6, 8), spike_lengths=np.full(8, 5.0),
                     calc_offsets=np.array([[1.0, 1.0], [-1.5, 0.5]]), gg_seed=3)
    base = np.zeros(6)

    def render(**on):
        a = base.copy()
        for name, v in on.items():
            a[ATTRIBUTES.index(name)] = v
        return render_lesion(size, p, a)

    plain, m_plain = render()
    obvious, _ = render(subtlety=1)
    assert obvious.max() > 1.5 * plain.max()  # contrast
    calc, _ = render(calcification=1)
    assert calc.max() > plain.max() + 0.3  # bright core spots
    spic, m_spic = render(spiculation=1)
    assert m_spic.sum() > m_plain.sum() + 15  # spikes extend the annotated lesion
    lob, m_lob = render(lobulation=1)
    assert np.abs(m_lob.astype(int) - m_plain.astype(int)).sum() > 20  # bumpy outline
    blurred, _ = render(margin=1)
    edge = (slice(40, 41), slice(40 + 7, 40 + 10))
    assert blurred[edge].sum() > plain[edge].sum() * 1.5  # soft edge leaks outward
    solid, _ = render(texture=1)
    assert solid[m_plain].mean() > 1.5 * plain[m_plain].mean()  # solid vs ground-glass


def test_label_follows_monotone_rule(tmp_path):
    generate(tmp_path / "d", SynthConfig(n_train=400, n_val=2, n_test=2, size=32, seed=5))
    ds = LesionDataset(tmp_path / "d", "train")
    score = ds.attributes.numpy() @ np.array(CAUSAL_WEIGHTS)
    y = ds.labels.numpy()
    hi, lo = y[score > np.median(score)].mean(), y[score <= np.median(score)].mean()
    assert hi > lo + 0.5
    assert 0.9 < bayes_accuracy(0.3, 0.5) < 0.97


def test_sites_differ(tmp_path):
    generate(tmp_path / "d", SynthConfig(n_train=80, n_val=4, n_test=4, size=32, sites=3,
                                         shortcut="none", seed=2))
    ds = LesionDataset(tmp_path / "d", "train")
    assert set(ds.site_index.tolist()) == {0, 1, 2}
    prev = [ds.attributes[ds.site_index == k].mean().item() for k in range(3)]
    assert prev[0] < prev[2]  # attribute (hence label) prevalence differs across sites


def test_volumes(tmp_path):
    generate(tmp_path / "d", SynthConfig(n_train=4, n_val=2, n_test=2, size=32, depth=8, seed=0))
    ds = LesionDataset(tmp_path / "d", "train")
    assert ds.image_shape == (1, 8, 32, 32)
    slices_with_lesion = (ds.masks[:, 0].flatten(2).sum(2) > 0).sum(1)
    assert ((slices_with_lesion >= 1) & (slices_with_lesion < 8)).all()


def test_intensity_shortcut(tmp_path):
    generate(tmp_path / "d", SynthConfig(n_train=60, n_val=2, n_test=2, size=32,
                                         shortcut="intensity", seed=4))
    ds = LesionDataset(tmp_path / "d", "train")
    bg = ds.images[:, 0, :6, :6].mean((1, 2)).numpy()
    y = ds.labels.numpy()
    assert bg[y == 1].mean() > bg[y == 0].mean() + 0.08


@pytest.mark.parametrize("kw,msg", [({"shortcut": "stars"}, "unknown shortcut 'stars'"),
                                     ({"size": 16}, "too small"),
                                     ({"n_test": 0}, "every split")])
def test_invalid_config(kw, msg):
    with pytest.raises(DataError, match=msg):
        SynthConfig(**kw).validate()


@pytest.mark.parametrize("size,depth", [(100000, 1), (4097, 1), (1024, 128)])
def test_too_large_a_synthetic_image_is_refused_before_any_output(tmp_path, capsys, size, depth):
    """`data synth --size 100000` was a 57-line out-of-memory traceback after images/ and
    masks/ had been created (a rerun then needed --overwrite)."""
    from causalign.cli import main

    out = tmp_path / "big"
    rc = main(["data", "synth", str(out), "--size", str(size), "--depth", str(depth),
               "--n-train", "1", "--n-val", "1", "--n-test", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --size"), err
    assert "too large" in err[0] and not out.exists()


def test_causal_weights_replace_the_label_rule(tmp_path):
    """`causal_weights` moves the label's causes (here: the lesion's interior); unnamed
    attributes weigh 0, the threshold stays near the median score, dataset.yaml records the
    rule that was used (CCCE's ground truth reads it)."""
    weights = {"calcification": 2.0, "texture": 1.5, "subtlety": 1.0}
    cfg = SynthConfig(n_train=400, n_val=2, n_test=2, size=32, seed=5, causal_weights=weights)
    meta = generate(tmp_path / "d", cfg)
    w = np.array([weights.get(a, 0.0) for a in ATTRIBUTES])
    assert np.array_equal(cfg.weights(), w)
    info = meta.info
    assert info["causal_weights"] == dict(zip(ATTRIBUTES, w.tolist(), strict=True))
    # scores 0 … 4.5; the median of the 8 combinations of the three causes lies between 2 and
    # 2.5, so exactly the combinations of two or three causes are positive: a balanced label
    assert info["threshold"] == label_threshold(w) == 2.25
    ds = LesionDataset(tmp_path / "d", "train")
    a, y = ds.attributes.numpy(), ds.labels.numpy()
    rule = (a @ w > 2.25).astype(int)
    assert (rule == y).mean() > 0.9  # σ = 0.3 flips only scores next to t
    assert 0.4 < y.mean() < 0.6
    # the default rule's causes no longer predict the label
    spic = a[:, ATTRIBUTES.index("spiculation")].astype(bool)
    assert abs(y[spic].mean() - y[~spic].mean()) < 0.15
    assert bayes_accuracy(0.3, 0.5, w) == pytest.approx(0.9479, abs=1e-4)
    assert bayes_accuracy(0.3, 0.5, w) != bayes_accuracy(0.3, 0.5)
    # the default stays the outline rule, bit for bit
    assert np.array_equal(SynthConfig().weights(), np.array(CAUSAL_WEIGHTS))


@pytest.mark.parametrize("weights, needle", [
    ({"volume": 1.0}, "unknown attribute 'volume'"),
    ({"calcification": -1.0}, "calcification must be a finite weight >= 0"),
    ({"calcification": float("nan")}, "calcification must be a finite weight >= 0"),
    ({"calcification": True}, "calcification must be a finite weight >= 0"),
    ({"texture": 0.0}, "at least one attribute needs a weight > 0"),
    ({}, "must map attribute names to weights"),
])
def test_bad_causal_weights_are_refused(weights, needle):
    with pytest.raises(DataError, match=needle):
        SynthConfig(causal_weights=weights).validate()


def test_parse_weights():
    assert parse_weights("calcification=2, texture=1.5,") == {"calcification": 2.0,
                                                              "texture": 1.5}
    for text, needle in [("calcification", "is not NAME=WEIGHT"),
                         ("calcification=two", "is not NAME=WEIGHT"),
                         ("texture=1,texture=2", "'texture' is named twice"),
                         ("lobes=1", "unknown attribute 'lobes'")]:
        with pytest.raises(DataError, match=needle):
            parse_weights(text)
