"""Decoy MNIST (Ross, Hughes & Doshi-Velez 2017, "Right for the right reasons").

SRC holds the four MNIST IDX files (plain or ``.gz``; ``-idx3-ubyte`` or ``.idx3-ubyte``)::

    train-images-idx3-ubyte   magic 0x00000803, count, rows, cols, then uint8 pixels
    train-labels-idx1-ubyte   magic 0x00000801, count, then uint8 labels
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

The decoy: a 4×4 swatch in a random corner of every image whose gray level is
``255 − 25·y`` (`--shade-step` 25, as in the original code). In train the swatch encodes the
true digit y; in val and test it encodes a random digit, so a model that reads the swatch
fails there. Labels: the digit (classes "0"…"9"). Split: the MNIST test file is the test set;
`--val-frac` of the training file (stratified by digit, random with `--seed`) is val.

Masks mark the digit — its nonzero pixels dilated by `--mask-dilate` pixels (default 1), the
swatch excluded — so alignment methods know where the right reasons are. Images are 28×28
unless `--size` asks for another size (bilinear).

A corrupt IDX file (wrong magic number, truncated data, image/label counts that differ)
stops the import with one line: every sample depends on it.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..format import DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit
from .util import assign_splits, dilate, resize, resize_mask

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
SWATCH = 4


@dataclass
class DecoyMnistOptions(CommonOptions):
    size: int = 28
    val_frac: float = 0.1
    mask_dilate: int = 1
    shade_step: int = 25

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.mask_dilate <= 5:
            raise DataError(f"--mask-dilate must be in 0..5, got {self.mask_dilate}")
        if not 1 <= self.shade_step <= 28:
            raise DataError(f"--shade-step must be in 1..28, got {self.shade_step}")

    def fractions(self) -> dict[str, float]:
        return {"train": 1.0 - self.val_frac, "val": self.val_frac, "test": 0.0}


def find_idx(src: Path, stem: str, kind: str) -> Path:
    """train-images-idx3-ubyte[.gz] or train-images.idx3-ubyte[.gz], in SRC or below it."""
    names = [f"{stem}-{kind}", f"{stem}.{kind}"]
    for folder in (src, src / "MNIST" / "raw", src / "raw", src / "mnist"):
        for n in names:
            for cand in (folder / n, folder / f"{n}.gz"):
                if cand.exists():
                    return cand
    raise DataError(f"{src}: missing MNIST file {names[0]}[.gz] (expected the four IDX files "
                    f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    f"t10k-labels-idx1-ubyte)")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file (big-endian header: magic, dimension sizes; then uint8 data)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: corrupt deflate data
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
                        f"(not an MNIST {'image' if magic == IMAGES_MAGIC else 'label'} file)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    need = int(np.prod(dims))
    if len(raw) - header != need:
        raise DataError(f"{path}: {len(raw) - header} data bytes, header says {need} "
                        f"(shape {dims}): truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def add_decoy(img: np.ndarray, y_shown: int, rng: np.random.Generator, step: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Ross et al.'s decoy: a 4×4 swatch of gray 255 − step·y in a random corner.
    Returns the new uint8 image and the swatch's boolean footprint."""
    out = img.copy()
    h, w = img.shape
    rows = slice(0, SWATCH) if rng.random() < 0.5 else slice(h - SWATCH, h)
    cols = slice(0, SWATCH) if rng.random() < 0.5 else slice(w - SWATCH, w)
    out[rows, cols] = 255 - step * y_shown
    where = np.zeros(img.shape, bool)
    where[rows, cols] = True
    return out, where


class DecoyMnistImporter(Importer):
    kind = "decoy-mnist"
    Options = DecoyMnistOptions
    layout = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte (optionally .gz)")

    def plan(self) -> list[Unit]:
        opts: DecoyMnistOptions = self.opts
        self.data = {}
        for part in ("train", "t10k"):
            x = read_idx(find_idx(self.src, f"{part}-images", "idx3-ubyte"), IMAGES_MAGIC)
            y = read_idx(find_idx(self.src, f"{part}-labels", "idx1-ubyte"), LABELS_MAGIC)
            if len(x) != len(y):
                raise DataError(f"{self.src}: {part} has {len(x)} images but {len(y)} labels")
            if y.size and y.max() > 9:
                raise DataError(f"{self.src}: {part} labels outside 0..9 (max {y.max()})")
            self.data[part] = (x, y)
        xt, yt = self.data["train"]
        split_of = assign_splits(list(range(len(yt))), opts.fractions(), opts.seed,
                                 strata=[int(v) for v in yt])
        units = [Unit(key=f"train{i}", split=split_of[i], source=f"train #{i}",
                      payload=("train", i)) for i in range(len(yt))]
        units += [Unit(key=f"t10k{i}", split="test", source=f"t10k #{i}", payload=("t10k", i))
                  for i in range(len(self.data["t10k"][1]))]
        return self.limit_units(units)

    def meta(self) -> DatasetMeta:
        step = self.opts.shade_step
        return DatasetMeta(
            name="decoy-mnist", classes=[str(d) for d in range(10)], attributes=[], ndim=2,
            channels=1,
            info={"label_rule": "digit",
                  "decoy": f"4x4 corner swatch of gray 255 - {step}*y: y = label in train, "
                           "random digit in val/test (Ross et al. 2017)",
                  "decoy_in": ["train"],
                  "mask_rule": f"digit pixels > 0 dilated by {self.opts.mask_dilate} px, "
                               "swatch excluded"})

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        opts: DecoyMnistOptions = self.opts
        part, i = unit.payload
        x, y = self.data[part]
        img, label = x[i], int(y[i])
        rng = np.random.default_rng([opts.seed, 0 if part == "train" else 1, i])
        shown = label if unit.split == "train" else int(rng.integers(0, 10))
        decoyed, swatch = add_decoy(img, shown, rng, opts.shade_step)
        mask = dilate(img > 0, opts.mask_dilate) & ~swatch
        image = decoyed.astype(np.float32) / 255.0
        if opts.size != img.shape[0]:
            image = resize(image, (opts.size, opts.size))
            mask = resize_mask(mask, (opts.size, opts.size))
        yield Sample(id=f"{unit.split}_{part}_{i:05d}", split=unit.split, label=label,
                     image=image, mask=mask if mask.any() else None)
