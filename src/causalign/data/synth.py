"""Synthetic lesion benchmark: attributes cause the label, a symbol is a training shortcut.

Each image is tissue-like background with one lesion placed away from the top-left corner.
Six binary attributes, mirroring LIDC-IDRI's, visibly change the lesion (1 = the suspicious
state):

=============  ==========================================================
subtlety       1: obvious (high contrast)         0: subtle (low contrast)
calcification  1: bright core spots               0: none
margin         1: poorly defined (blurred edge)   0: sharp edge
spiculation    1: radial spikes                   0: none
lobulation     1: bumpy outline                   0: round
texture        1: solid                           0: ground-glass (faint, mottled)
=============  ==========================================================

The label follows a monotone noisy rule ``y = 1[w·a + ε > t]``, ε ~ N(0, σ²), with
non-negative weights (spiculation > margin > lobulation > texture > subtlety, calcification 0),
so attributes cause the label, some matter more than others, and calcification is a visible
but non-causal distractor. The Bayes accuracy of the rule is stored in dataset.yaml.
``causal_weights`` replaces w (attributes it does not name weigh 0); t is then chosen the same
way, near the median score. The default weights put the causes on the lesion's outline
(spikes, blurred margin, lobes); e.g. ``{calcification: 2, texture: 1.5, subtlety: 1}`` puts
them in its interior, where every cause changes the brightness inside the mask.

Shortcuts (training split only; random in val/test):
``plus-minus`` a "+" (y=1) or "−" (y=0) symbol in the top-left corner;
``intensity`` a global brightness offset for y=1; ``none``.

``sites`` K acquisition sites differ in contrast gain, noise, blur and attribute (hence label)
prevalence. ``depth`` D > 1 gives (D, H, W) volumes whose lesion spans a few slices; their
boxes carry that slice range (box_z0, box_z1; see `causalign.data.format`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

from ..errors import DataError, did_you_mean
from .format import DatasetMeta, DatasetWriter, SampleRecord

if TYPE_CHECKING:
    from rich.progress import Progress

ATTRIBUTES = ("subtlety", "calcification", "margin", "spiculation", "lobulation", "texture")
CAUSAL_WEIGHTS = (0.4, 0.0, 1.5, 2.0, 1.0, 0.7)
SHORTCUTS = ("plus-minus", "intensity", "none")


# Largest synthetic image: drawing is float64 NumPy per sample (measured on CPU: 1024 px
# ~3 s and 0.1 GB, 2048 px ~10 s and 0.5 GB per image), so 4096 px is ~2 GB and 40 s.
MAX_SIZE = 4096
MAX_VOXELS = 2 ** 26


@dataclass
class SynthConfig:
    """Parameters of `causalign data synth` (defaults = the demo's benchmark)."""

    n_train: int = 1000
    n_val: int = 300
    n_test: int = 500
    size: int = 64
    shortcut: str = "plus-minus"
    sites: int = 1
    depth: int = 1
    seed: int = 0
    label_noise: float = 0.3  # σ of ε in the label rule
    attribute_prob: float = 0.5
    # w of the label rule by attribute name, unnamed attributes 0; None: CAUSAL_WEIGHTS
    causal_weights: dict[str, float] | None = None

    def weights(self) -> np.ndarray:
        """The label rule's weight vector, in ATTRIBUTES order."""
        if self.causal_weights is None:
            return np.array(CAUSAL_WEIGHTS, dtype=np.float64)
        return np.array([float(self.causal_weights.get(a, 0.0)) for a in ATTRIBUTES])

    def validate(self) -> None:
        if self.shortcut not in SHORTCUTS:
            raise DataError(f"unknown shortcut '{self.shortcut}'; valid: {', '.join(SHORTCUTS)}"
                            + did_you_mean(self.shortcut, SHORTCUTS))
        if self.size < 32:
            raise DataError(f"--size {self.size} too small: lesions need at least 32 px")
        if self.size > MAX_SIZE or self.depth * self.size ** 2 > MAX_VOXELS:
            # checked before OUT is created: --size 100000 failed with a 57-line out-of-memory
            # traceback (40 GB for one float image) after writing images/ and masks/
            raise DataError(f"--size {self.size} --depth {self.depth} too large: synthetic "
                            f"images have at most {MAX_SIZE} px a side and {MAX_VOXELS:,} "
                            f"voxels ({self.depth * self.size ** 2:,} asked; one image of "
                            f"2048 px took 10 s and 0.5 GB to draw)")
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise DataError("every split needs at least one sample (--n-train/--n-val/--n-test)")
        if self.sites < 1:
            raise DataError(f"--sites must be >= 1, got {self.sites}")
        if self.depth < 1:
            raise DataError(f"--depth must be >= 1, got {self.depth}")
        if self.depth not in (1,) and self.depth < 4:
            raise DataError(f"--depth {self.depth}: volumes need at least 4 slices")
        if not 0 <= self.label_noise < float("inf"):  # also rejects NaN
            raise DataError(f"--label-noise must be a finite σ >= 0, got {self.label_noise}")
        if self.seed < 0:  # NumPy's SeedSequence would raise a bare ValueError traceback
            raise DataError(f"--seed must be >= 0, got {self.seed}")
        if self.causal_weights is not None:
            self._validate_weights(self.causal_weights)

    @staticmethod
    def _validate_weights(weights: object) -> None:
        if not isinstance(weights, dict) or not weights:
            raise DataError(f"causal weights must map attribute names to weights, got "
                            f"{weights!r}")
        for name, w in weights.items():
            if name not in ATTRIBUTES:
                raise DataError(f"causal weights: unknown attribute '{name}'; valid: "
                                f"{', '.join(ATTRIBUTES)}")
            if isinstance(w, bool) or not isinstance(w, int | float) \
                    or not 0 <= w < float("inf"):
                raise DataError(f"causal weights: {name} must be a finite weight >= 0, "
                                f"got {w!r}")
        if not any(w > 0 for w in weights.values()):
            raise DataError("causal weights: at least one attribute needs a weight > 0 "
                            "(else the label would be noise alone)")


def parse_weights(text: str) -> dict[str, float]:
    """``"calcification=2,texture=1.5"`` -> {"calcification": 2.0, "texture": 1.5}, checked."""
    weights: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = None
        if not sep or w is None:
            raise DataError(f"--weights: '{item}' is not NAME=WEIGHT (e.g. "
                            f"'calcification=2,texture=1.5')")
        if name.strip() in weights:
            raise DataError(f"--weights: '{name.strip()}' is named twice")
        weights[name.strip()] = w
    SynthConfig._validate_weights(weights)
    return weights


@dataclass
class SiteParams:
    gain: float
    noise: float
    blur: float
    attribute_prob: float


def site_params(k: int, n_sites: int, base_prob: float) -> SiteParams:
    """Site k of K: contrast, noise, blur and prevalence spread evenly across sites."""
    if n_sites == 1:
        return SiteParams(gain=1.0, noise=0.02, blur=0.0, attribute_prob=base_prob)
    u = k / (n_sites - 1)
    # Noise level rank: 2k mod K shuffles the sites (decorrelated from gain and blur), but for
    # even K it maps k and k + K/2 to the same rank (K = 2: both sites had noise 0.01); the
    # second half then takes the odd ranks, so the ranks are a permutation for every K.
    # Odd K is unchanged.
    rank = (2 * k) % n_sites + (2 * k) // n_sites * (1 - n_sites % 2)
    return SiteParams(
        gain=0.75 + 0.5 * u,
        noise=0.01 + 0.04 * rank / (n_sites - 1),
        blur=1.2 * ((k + 1) % n_sites) / (n_sites - 1),
        attribute_prob=base_prob - 0.2 + 0.4 * u,
    )


def label_threshold(weights: Sequence[float] | np.ndarray = CAUSAL_WEIGHTS) -> float:
    """Threshold t: midway between the two score values around the median at p = 0.5."""
    w = np.asarray(weights, dtype=np.float64)
    combos = np.array(list(itertools.product([0, 1], repeat=len(w))))
    vals = np.unique(combos @ w)
    t = np.median(combos @ w)
    i = int(np.searchsorted(vals, t))
    return float((vals[i] + vals[i - 1]) / 2) if 0 < i < len(vals) else float(t)


def bayes_accuracy(noise: float, prob: float,
                   weights: Sequence[float] | np.ndarray = CAUSAL_WEIGHTS) -> float:
    """Accuracy of the best classifier that knows the attributes exactly."""
    w = np.asarray(weights, dtype=np.float64)
    combos = np.array(list(itertools.product([0, 1], repeat=len(w))))
    p = np.prod(np.where(combos == 1, prob, 1 - prob), axis=1)
    margin = combos @ w - label_threshold(w)  # never 0: t lies midway between score values
    # σ = 0 is a deterministic rule: P(y=1 | a) is 0 or 1 (no 0-division RuntimeWarning)
    p1 = (margin > 0).astype(np.float64) if noise == 0 else norm.cdf(margin / noise)
    return float((p * np.maximum(p1, 1 - p1)).sum())


# ----------------------------------------------------------------------------- rendering


@dataclass
class LesionParams:
    cx: float
    cy: float
    radius: float
    lobe_count: int
    lobe_phase: float
    spike_angles: np.ndarray
    spike_lengths: np.ndarray
    calc_offsets: np.ndarray
    gg_seed: int


def background(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Tissue-like texture: smoothed noise at two scales around a mid-gray level."""
    size = shape[-1]
    coarse = gaussian_filter(rng.standard_normal(shape), sigma=size / 10)
    fine = gaussian_filter(rng.standard_normal(shape), sigma=size / 40)
    coarse /= coarse.std() + 1e-8
    fine /= fine.std() + 1e-8
    return 0.32 + 0.05 * coarse + 0.025 * fine


def sample_lesion(size: int, rng: np.random.Generator) -> LesionParams:
    radius = rng.uniform(0.10, 0.13) * size
    reach = radius * 1.9  # spikes extend beyond the body
    corner = 0.30 * size  # keep the lesion off the top-left corner (symbol area)
    while True:
        cx, cy = rng.uniform(reach + 1, size - reach - 1, size=2)
        if cx - reach > corner or cy - reach > corner:
            break
    n_spikes = int(rng.integers(7, 11))
    base = rng.uniform(0, 2 * np.pi)
    angles = base + np.arange(n_spikes) * 2 * np.pi / n_spikes + rng.normal(0, 0.15, n_spikes)
    return LesionParams(
        cx=float(cx), cy=float(cy), radius=float(radius),
        lobe_count=int(rng.integers(4, 7)), lobe_phase=float(rng.uniform(0, 2 * np.pi)),
        spike_angles=angles, spike_lengths=rng.uniform(0.6, 0.9, n_spikes) * radius,
        calc_offsets=rng.uniform(-0.4, 0.4, size=(int(rng.integers(2, 4)), 2)) * radius,
        gg_seed=int(rng.integers(0, 2**31 - 1)),
    )


def render_lesion(
    size: int, p: LesionParams, attrs: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion intensity (added to background) and its binary mask; `scale` shrinks the lesion
    (slices away from a volume's centre)."""
    subtle, calc, margin, spic, lob, texture = (bool(a) for a in attrs)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - p.cx, yy - p.cy
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r = p.radius * scale
    r_theta = r * (1.0 + (0.22 * np.sin(p.lobe_count * theta + p.lobe_phase) if lob else 0.0))
    edge_width = 1.8 if margin else 0.35
    body = 1.0 / (1.0 + np.exp(np.clip((rho - r_theta) / edge_width, -50, 50)))
    density = body
    spikes = np.zeros_like(rho)
    if spic:
        for ang, length in zip(p.spike_angles, p.spike_lengths * scale, strict=True):
            ux, uy = math.cos(ang), math.sin(ang)
            along = dx * ux + dy * uy
            perp = np.abs(-dx * uy + dy * ux)
            t = np.clip((along - 0.7 * r) / max(length + 0.3 * r, 1e-6), 0.0, 1.0)
            inside = (along > 0.7 * r) & (along < r + length)
            width = 0.9 * (1.0 - 0.6 * t)
            spikes = np.maximum(spikes, inside * np.exp(-0.5 * (perp / width) ** 2) * (1 - 0.5 * t))
        density = np.maximum(density, spikes)
    if not texture:  # ground-glass: faint and mottled
        g = np.random.default_rng(p.gg_seed)
        mottle = gaussian_filter(g.standard_normal((size, size)), 1.0)
        mottle /= mottle.std() + 1e-8
        density = density * (0.5 + 0.18 * mottle)
    contrast = 0.42 if subtle else 0.22
    lesion = contrast * density
    if calc:
        for ox, oy in p.calc_offsets * scale:
            spot = np.exp(-0.5 * ((xx - p.cx - ox) ** 2 + (yy - p.cy - oy) ** 2) / 1.1**2)
            lesion = lesion + 0.45 * spot * (scale > 0.3)
    # The annotation follows the lesion's geometry (body at half maximum plus spikes), not
    # its brightness, so faint ground-glass lesions are outlined as fully as solid ones.
    mask = (body > 0.5) | (spikes > 0.3)
    if not mask.any():
        mask[int(round(p.cy)), int(round(p.cx))] = True
    return lesion, mask


def draw_symbol(img: np.ndarray, plus: bool, size: int) -> None:
    """Bright "+" or "−" in the top-left corner (in place, last two axes)."""
    arm = max(7, size // 8)
    thick = max(2, size // 32)
    o = max(2, size // 24)
    mid = o + arm // 2
    img[..., mid - thick // 2: mid - thick // 2 + thick, o: o + arm] = 0.9
    if plus:
        img[..., o: o + arm, mid - thick // 2: mid - thick // 2 + thick] = 0.9


def box_of(mask: np.ndarray, pad: int, size: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + 1 + pad, size), min(int(ys.max()) + 1 + pad, size))


def render_sample(
    cfg: SynthConfig, attrs: np.ndarray, label: int, split: str, site: SiteParams,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Image, mask and box: (x0, y0, x1, y1), for a volume with its slice range z0, z1."""
    s = cfg.size
    lesion_p = sample_lesion(s, rng)
    if cfg.depth == 1:
        img = background((s, s), rng)
        lesion, mask = render_lesion(s, lesion_p, attrs)
        img = img + site.gain * lesion
    else:
        d = cfg.depth
        img = background((d, s, s), rng)
        z0 = rng.uniform(d * 0.3, d * 0.7)
        half = max(1.5, d / 6)
        mask = np.zeros((d, s, s), bool)
        for z in range(d):
            u = (z - z0) / half
            if abs(u) < 1:
                lesion, m = render_lesion(s, lesion_p, attrs, scale=math.sqrt(1 - u * u))
                img[z] += site.gain * lesion
                mask[z] = m
        if not mask.any():  # guarantee at least one lesion slice
            zc = int(np.clip(round(z0), 0, d - 1))
            lesion, mask[zc] = render_lesion(s, lesion_p, attrs)
            img[zc] += site.gain * lesion
    if site.blur > 0:
        img = gaussian_filter(img, sigma=[0] * (img.ndim - 2) + [site.blur] * 2)
    img = img + rng.normal(0, site.noise, img.shape)
    is_train = split == "train"
    if cfg.shortcut == "plus-minus":
        plus = bool(label) if is_train else bool(rng.integers(0, 2))
        draw_symbol(img, plus, s)
    elif cfg.shortcut == "intensity":
        bright = bool(label) if is_train else bool(rng.integers(0, 2))
        img = img + (0.12 if bright else 0.0)
    box: tuple[int, ...] = box_of(mask.any(axis=0) if mask.ndim == 3 else mask, pad=2, size=s)
    if mask.ndim == 3:
        # a volume's box also gives the lesion's slices (z1 exclusive, no padding: only
        # in-plane blur): a 4-number box spans every slice, lesion-free ones included, and
        # cam_precision would count saliency there as on the lesion
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        box = (*box, int(zs.min()), int(zs.max()) + 1)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask, box


def generate(out: str | Path, cfg: SynthConfig, progress: Progress | None = None) -> DatasetMeta:
    """Write the benchmark to `out` in the dataset format; deterministic given cfg.seed."""
    cfg.validate()
    weights = cfg.weights()
    threshold = label_threshold(weights)
    sites = [site_params(k, cfg.sites, cfg.attribute_prob) for k in range(cfg.sites)]
    meta = DatasetMeta(
        name=f"synth-{cfg.shortcut}", classes=["benign", "malignant"],
        attributes=list(ATTRIBUTES), ndim=3 if cfg.depth > 1 else 2, channels=1,
        info={
            "generator": "causalign.data.synth",
            "config": asdict(cfg),
            "causal_weights": dict(zip(ATTRIBUTES, weights.tolist(), strict=True)),
            "label_rule": f"y = 1[w.a + N(0, {cfg.label_noise}^2) > {threshold:.3f}]",
            "threshold": threshold,
            "bayes_accuracy": {str(k): bayes_accuracy(cfg.label_noise, sp.attribute_prob,
                                                      weights)
                               for k, sp in enumerate(sites)},
            "sites": [asdict(sp) for sp in sites],
            "shortcut_in": ["train"],
        },
    )
    writer = DatasetWriter(out, meta, image_format="png" if cfg.depth == 1 else "npy")
    splits = [("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)]
    total = sum(n for _, n in splits)
    task = progress.add_task("synthesising", total=total) if progress is not None else None
    # One child generator per split keeps splits stable when another split's size changes.
    seeds = np.random.SeedSequence(cfg.seed).spawn(len(splits))
    for (split, n), ss in zip(splits, seeds, strict=True):
        rng = np.random.default_rng(ss)
        for i in range(n):
            k = int(rng.integers(0, cfg.sites))
            site = sites[k]
            attrs = (rng.random(len(ATTRIBUTES)) < site.attribute_prob).astype(np.float64)
            label = int(attrs @ weights + rng.normal(0, cfg.label_noise) > threshold)
            img, mask, box = render_sample(cfg, attrs, label, split, site, rng)
            writer.add(img, label=label, split=split, mask=mask, box=box,
                       attributes=attrs.tolist(), site=str(k), sample_id=f"{split}_{i:05d}")
            if task is not None:
                progress.advance(task)
    writer.close()
    _prune_stale(Path(out), writer.rows)
    return meta


_SAMPLE_FILE = re.compile(r"(train|val|test)_\d+\.(png|npy)")


def _prune_stale(root: Path, rows: list[SampleRecord]) -> None:
    """Delete sample files of an earlier generation in `root` (`--overwrite` with fewer
    samples, or 2D after volumes) that the new manifest does not list. Only names this
    generator writes are touched, so other files a user keeps there survive."""
    keep = {r.image for r in rows} | {r.mask for r in rows if r.mask}
    for sub in ("images", "masks"):
        for f in (root / sub).iterdir():
            if (f.is_file() and _SAMPLE_FILE.fullmatch(f.name)
                    and f"{sub}/{f.name}" not in keep):
                f.unlink()
