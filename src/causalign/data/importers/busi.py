"""BUSI — Breast Ultrasound Images (Al-Dhabyani et al. 2020; "Aryashah2k" in paper 000 App. C.1).

SRC layout (``Dataset_BUSI_with_GT``, or the folder holding it)::

    benign/benign (1).png  benign/benign (1)_mask.png  [benign/benign (1)_mask_1.png …]
    malignant/malignant (1).png  malignant/malignant (1)_mask.png …
    normal/normal (1).png  normal/normal (1)_mask.png   (all-zero masks)

Label rule: the class folder; `--classes` picks and orders the classes (default
``benign,malignant`` → benign 0, malignant 1; add ``normal`` for three classes). Masks: all
of an image's ``_mask*.png`` files are merged by OR (some lesions have several). An all-zero
merged mask (the ``normal`` class) is stored as *no mask*, since there is no lesion to align
with. Images are made square by zero padding, then resized to `--size`; grayscale.

Splits: the dataset has no patient ids, so the split is random with `--seed` (stratified by
class, `--val-frac`/`--test-frac`). BUSI holds near-duplicate images; they are found with a
64-bit DCT perceptual hash (Hamming distance ≤ `--dup-threshold`, default 4) and every group
of near-duplicates is kept in one split (or reduced to its first image with
`--drop-duplicates`). No attributes.

Skipped with a reason: an image without any mask file (benign/malignant), unreadable image or
mask, a mask whose size differs from its image.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..format import DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit, parse_list
from .folder import mask_name_pattern
from .util import (
    SkipItem,
    UsedIds,
    assign_splits,
    box_of_mask,
    duplicate_groups,
    fit_square,
    phash,
    read_image,
    read_mask,
    rel,
    safe_id,
    scan_intensity,
    unique_id,
)

BUSI_CLASSES = ("benign", "malignant", "normal")
# the folder importer's mask names: predict sorts raw BUSI folders by the same rule
_MASK = mask_name_pattern("_mask")


@dataclass
class BusiOptions(CommonOptions):
    size: int = 128
    classes: str = "benign,malignant"
    val_frac: float = 0.15
    test_frac: float = 0.15
    dup_threshold: int = 4
    drop_duplicates: bool = False

    def validate(self) -> None:
        super().validate()
        names = parse_list(self.classes)
        bad = [c for c in names if c.lower() not in BUSI_CLASSES]
        if bad or len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"--classes '{self.classes}': give two or three distinct names of "
                            f"{', '.join(BUSI_CLASSES)}")
        if not 0 <= self.dup_threshold <= 32:
            raise DataError(f"--dup-threshold must be in 0..32 bits, got {self.dup_threshold}")


def natural_key(name: str) -> list:
    """'benign (10)' after 'benign (9)'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def find_class_root(src: Path, classes: list[str]) -> Path:
    """The folder that holds the class folders: SRC itself or one/two levels below it."""
    # a macOS zip's '__MACOSX/' copy (and hidden folders) hold the same class folder names
    # full of '._x.png' stubs: picked first when it sorted before the real root
    candidates = [src, src / "Dataset_BUSI_with_GT", *sorted(
        p for p in src.iterdir()
        if p.is_dir() and p.name != "__MACOSX" and not p.name.startswith("."))]
    for c in candidates:
        if c.is_dir() and all(_class_dir(c, k) is not None for k in classes):
            return c
    raise DataError(f"{src}: no folders {', '.join(f'{k}/' for k in classes)} found "
                    f"(expected the Dataset_BUSI_with_GT layout)")


def _class_dir(root: Path, name: str) -> Path | None:
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


class BusiImporter(Importer):
    kind = "busi"
    Options = BusiOptions
    layout = ("Dataset_BUSI_with_GT/{benign,malignant,normal}/'<class> (k).png' with "
              "'<class> (k)_mask.png' [+ '_mask_1.png' …]")

    def plan(self) -> list[Unit]:
        opts: BusiOptions = self.opts
        self.classes = [c.lower() for c in parse_list(opts.classes)]
        root = find_class_root(self.src, self.classes)
        items = []  # (class index, image path, mask paths)
        for k, cls in enumerate(self.classes):
            folder = _class_dir(root, cls)
            # not hidden files: macOS copies leave '._benign (1).png' (AppleDouble) beside
            # each image, which were counted as unreadable images
            files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                     and p.suffix.lower() in (".png", ".jpg", ".jpeg")]
            masks: dict[str, list[Path]] = {}
            images = []
            for p in files:
                m = _MASK.match(p.stem)
                if m:
                    masks.setdefault(m.group("stem").lower(), []).append(p)
                else:
                    images.append(p)
            orphan = set(masks) - {p.stem.lower() for p in images}
            for stem in sorted(orphan, key=natural_key):
                self.skip(rel(masks[stem][0], self.src), "mask without image")
            for p in sorted(images, key=lambda q: natural_key(q.name)):
                ms = sorted(masks.get(p.stem.lower(), []), key=lambda q: natural_key(q.name))
                if not ms and cls != "normal":
                    self.skip(rel(p, self.src), "missing mask", f"no '{p.stem}_mask*.png'")
                    continue
                items.append((k, p, ms))
        empty = [c for k, c in enumerate(self.classes) if not any(it[0] == k for it in items)]
        if empty:  # otherwise a two-class dataset with one class, and exit 0
            raise DataError(f"{root}: no usable images in {', '.join(f'{c}/' for c in empty)} "
                            f"(need '<class> (k).png' with '<class> (k)_mask.png')")
        # Near-duplicate detection: a hash per readable image.
        task = self.task("hashing images (near-duplicates)", len(items))
        kept, hashes = [], []
        for it in items:
            try:
                hashes.append(phash(read_image(it[1], "L")))
                kept.append(it)
            except SkipItem as exc:
                self.skip(rel(it[1], self.src), exc.reason, exc.detail)
            self.advance(task)
        group_of = duplicate_groups(hashes, opts.dup_threshold)
        members: dict[int, list[int]] = {}
        for i, g in enumerate(group_of):
            members.setdefault(g, []).append(i)
        dup_groups = [m for m in members.values() if len(m) > 1]
        names = [rel(it[1], self.src) for it in kept]
        self.details = {
            "duplicate_groups": len(dup_groups),
            "images_in_duplicate_groups": sum(len(m) for m in dup_groups),
            "duplicate_threshold_bits": opts.dup_threshold,
            "groups": [[names[i] for i in m] for m in dup_groups],
            "cross_class_groups": [[names[i] for i in m] for m in dup_groups
                                   if len({kept[i][0] for i in m}) > 1],
        }
        if opts.drop_duplicates:
            drop = {i for m in dup_groups for i in m[1:]}
            for i in sorted(drop):
                self.skip(names[i], "near-duplicate dropped (--drop-duplicates)",
                          f"duplicate of {names[group_of[i]]}")
        else:
            drop = set()
        idx = [i for i in range(len(kept)) if i not in drop]
        split_of = assign_splits([group_of[i] for i in idx], opts.fractions(), opts.seed,
                                 strata=[kept[group_of[i]][0] for i in idx])
        used = UsedIds()
        units = []
        for i in idx:
            k, path, ms = kept[i]
            sid = safe_id(path.stem)
            if sid.casefold() in used:
                sid = safe_id(f"{self.classes[k]}_{path.stem}")
            sid = unique_id(sid, used)
            units.append(Unit(key=f"{self.classes[k]}/{path.name}", split=split_of[group_of[i]],
                              source=names[i], payload=(sid, k, path, ms)))
        units = self.limit_units(units)
        # one intensity rule for the import (BUSI is 8-bit; a 16-bit export is scaled by
        # the import's bit depth, never per image). The hashes above are scale invariant.
        self.scale = scan_intensity(u.payload[2] for u in units)
        return units

    def meta(self) -> DatasetMeta:
        return DatasetMeta(
            name="busi", classes=list(self.classes), attributes=[], ndim=2, channels=1,
            info={"label_rule": "class folder: " + ", ".join(
                      f"{c} → {k}" for k, c in enumerate(self.classes)),
                  "mask_rule": "OR of every '_mask*.png'; all-zero → no mask",
                  "split_rule": "random by class with seed; near-duplicate groups (DCT pHash) "
                                "kept in one split"})

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        sid, k, path, mask_paths = unit.payload
        img = read_image(path, "L", self.scale, note=self.note)
        merged = np.zeros(img.shape, bool)
        for mp in mask_paths:
            m = read_mask(mp, note=self.note)
            if m.shape != img.shape:
                raise SkipItem("mask shape mismatch",
                               f"{rel(mp, self.src)} is {m.shape}, image is {img.shape}")
            merged |= m
        mask = merged if merged.any() else None
        if mask is None and mask_paths:
            self.note("empty mask stored as no mask (normal class or blank mask file)")
        img, mask, _ = fit_square(img, mask, self.opts.size)
        yield Sample(id=sid, split=unit.split, label=k, image=img, mask=mask,
                     box=box_of_mask(mask) if mask is not None else None)
