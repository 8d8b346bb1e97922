"""Plain folders of images: ``ROOT/<class>/<image>``, or a CSV that lists images.

Tree layout::

    ROOT/<class>/<name>.png|jpg|jpeg|bmp|tif|npy|dcm
    ROOT/<class>/<name>_mask.png            optional; '<name>_mask_1.png' … are merged by OR
                                            (the suffix in any case: '_Mask', '_MASK')

Label rule: classes are the class folders in sorted order (or the order given by
`--classes`, which may also select a subset), label = index of the image's class.

CSV layout (`--csv FILE`, paths relative to ROOT) — columns, all optional but ``image``:
``image``; ``label`` (class name, or an integer index) or ``class`` (default: the first folder
of ``image``); ``split`` (train/val/test; empty → random); ``mask`` (one path, or several
separated by ';' merged by OR); ``box_x0, box_y0, box_x1, box_y1`` (pixels of the original
image, x1/y1 exclusive); ``site``; ``group`` (e.g. a patient id: a group never straddles two
splits it is drawn into; its rows with an empty ``split`` take the split given on its other
rows, and a group the ``split`` column itself puts in two splits is noted in the summary);
``attr_<name>`` (binary attributes, 0/1, empty = not annotated).

Images are converted to gray (`--color gray`, default) or RGB, made square by zero padding
and resized to `--size`. Intensities: 8-bit files → value / 255; one rule for the whole
import scales deeper files (16-bit PNG/TIFF and uint16 NPY by the bit depth of the largest
value of the import, e.g. 12-bit data / 4095; float NPY outside [0, 1] by the import's
range), never by an image's own maximum, and such imports store 16-bit PNGs (see
`util.IntensityScale`). 2D DICOM files (`.dcm`, needs pydicom) are read in physical units
(rescale slope/intercept applied, MONOCHROME1 inverted): unsigned integer values by the
16-bit rule, others (CT in HU) by the float rule. An all-zero mask is stored as no mask.
Random splits are stratified by class and drawn with `--seed` at group level.

Skipped with a reason: a CSV row pointing to a missing file, unreadable images or masks, a
mask whose size differs from its image, unknown class/split values, non-numeric boxes or
attributes, and with `--color rgb` a channel-first NPY of other than 1 or 3 channels (a
(1, H, W) array is gray, stored as RGB).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ...errors import DataError, not_one_of
from ..format import SPLITS, DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit, parse_list
from .util import (
    IMAGE_SUFFIXES,
    IntensityScale,
    SkipItem,
    UsedIds,
    assign_splits,
    box_of_mask,
    fit_square,
    read_csv,
    read_image,
    read_mask,
    rel,
    safe_id,
    scan_intensity,
    unique_id,
    walk,
)


@dataclass
class FolderOptions(CommonOptions):
    size: int = 128
    classes: str = ""
    csv: str | None = None
    color: str = "gray"
    mask_suffix: str = "_mask"
    val_frac: float = 0.15
    test_frac: float = 0.15

    def validate(self) -> None:
        super().validate()
        if self.color not in ("gray", "rgb"):
            raise DataError(not_one_of("--color", self.color, ("gray", "rgb")))
        if not self.mask_suffix:
            raise DataError("--mask-suffix must not be empty")

    def flag_use(self) -> list[tuple[str, bool, str]]:
        return [("mask_suffix", not self.csv,
                 "for class folders (with --csv, the CSV's mask column names the masks)")]


@dataclass
class _Item:
    sid: str
    source: str
    image: Path
    label: int
    masks: list[Path]
    box: tuple[float, float, float, float] | None = None
    attributes: list[float] | None = None
    site: str = "0"
    group: str = ""
    split: str = ""
    # merged CSV rows where some gave masks and some boxes: the stored box joins both
    join_mask_box: bool = False


class FolderImporter(Importer):
    kind = "folder"
    Options = FolderOptions
    layout = "ROOT/<class>/<image> with optional <image>_mask.<ext>, or --csv FILE"

    def plan(self) -> list[Unit]:
        opts: FolderOptions = self.opts
        self.attributes: list[str] = []
        items = self._plan_csv(Path(opts.csv)) if opts.csv else self._plan_tree()
        # a group with a split cell filled on some rows only: its other rows follow that
        # split (drawn apart, 8 of 10 patients had images in test and in train or val)
        given: dict[str, list[str]] = {}
        for it in items:
            if it.split and it.group and it.split not in given.setdefault(it.group, []):
                given[it.group].append(it.split)
        for it in items:
            if not it.split and it.group in given:
                it.split = given[it.group][0]
        mixed = sorted(g for g, splits in given.items() if len(splits) > 1)
        if mixed:  # the user's own split column puts a group in two splits: say so
            self.note("group(s) in more than one split by the CSV's split column (e.g. "
                      f"{mixed[0]}: {', '.join(given[mixed[0]])})", len(mixed))
        fixed = [it for it in items if it.split]
        free = [it for it in items if not it.split]
        # without a group column, rows of one image file (e.g. one row per lesion) are one
        # group: split apart, the same pixels would sit in train and in test. The group is
        # named by the file's first sample id, so splits of unique files stay as they were.
        first_sid: dict[Path, str] = {}
        for it in free:
            first_sid.setdefault(it.image.resolve(), it.sid)

        def group(it: _Item) -> str:
            return it.group or first_sid[it.image.resolve()]

        split_of = assign_splits([group(it) for it in free], opts.fractions(),
                                 opts.seed, strata=[it.label for it in free])
        for it in free:
            it.split = split_of[group(it)]
        units = [Unit(key=it.sid, split=it.split, source=it.source, payload=it)
                 for it in fixed + free]
        order = {it.sid: i for i, it in enumerate(items)}
        units.sort(key=lambda u: order[u.key])
        units = self.limit_units(units)
        # one intensity rule for the whole import (16-bit depth, float range), decided
        # before any image is written; recomputed identically when an import resumes
        self.scale = scan_intensity(u.payload.image for u in units)
        return units

    # ------------------------------------------------------------------ tree
    def _plan_tree(self) -> list[_Item]:
        dirs = sorted(p.name for p in self.src.iterdir() if p.is_dir()
                      and not p.name.startswith("."))
        self.classes = self._choose_classes(dirs, "class folder")
        items = []
        used = UsedIds()  # non-ASCII names can map to the same id ('良性/1' → '1')
        for k, cls in enumerate(self.classes):
            found = tree_files(self.src / cls, self.opts.mask_suffix)
            # a link whose target is gone (a dataset assembled from links, then moved) was
            # dropped without a word: the class silently lost those images
            for p in found.broken:
                self.skip(rel(p, self.src), "broken symlink", f"-> {os.readlink(p)}")
            for key in found.orphan_masks():
                self.skip(rel(found.masks[key][0], self.src), "mask without image")
            images, masks = found.images, found.masks
            for p in images:
                r = p.relative_to(self.src)
                sid = unique_id(safe_id(str(r.with_suffix(""))), used)
                items.append(_Item(sid=sid, source=str(r), image=p,
                                   label=k, masks=masks.get(p.parent / p.stem, [])))
        # a class folder without images (an empty folder, a 'masks/' or '__MACOSX/' folder
        # taken for a class) would silently declare a class no sample has
        empty = [c for k, c in enumerate(self.classes) if not any(it.label == k for it in items)]
        if empty:
            raise DataError(f"{self.src}: class folder(s) {', '.join(empty)} hold no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); remove them or pick the classes "
                            f"with --classes")
        return items

    def _choose_classes(self, found: list[str], what: str) -> list[str]:
        wanted = parse_list(self.opts.classes)
        if wanted:
            missing = [c for c in wanted if c not in found]
            if missing:
                raise DataError(f"{self.src}: --classes {', '.join(missing)} not found "
                                f"(found {what}s: {', '.join(found) or 'none'})")
            return wanted
        if len(found) < 2:
            raise DataError(f"{self.src}: need at least two {what}s, found "
                            f"{len(found)} ({', '.join(found) or 'none'}); expected "
                            f"ROOT/<class>/<image>")
        return found

    # ------------------------------------------------------------------ csv
    def _plan_csv(self, csv_path: Path) -> list[_Item]:
        path = csv_path if csv_path.is_absolute() else self.src / csv_path
        if not path.exists() and csv_path.exists():
            path = csv_path
        if not path.exists():
            raise DataError(f"{csv_path}: CSV file not found (looked in {self.src})")
        cols, rows = read_csv(path)
        if "image" not in cols:
            raise DataError(f"{path}: missing column 'image' (columns: {', '.join(cols)})")
        self.attributes = [c[5:] for c in cols if c.startswith("attr_")]
        _refuse_score_columns(path, self.attributes, rows)
        label_col = "label" if "label" in cols else "class" if "class" in cols else None

        def class_of(row: dict) -> str:
            if label_col:
                return row[label_col]
            return Path(row["image"]).parts[0] if len(Path(row["image"]).parts) > 1 else ""

        values = sorted({class_of(r) for r in rows if class_of(r)},
                        key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
        self.classes = self._choose_classes(values, "class value")
        items = []
        used = UsedIds()
        for lineno, row in enumerate(rows, start=2):
            src_desc = f"{path.name}:{lineno}"
            cls = class_of(row)
            if cls not in self.classes:
                if parse_list(self.opts.classes):
                    self.note("CSV rows of classes not selected by --classes")
                else:
                    self.skip(src_desc, "unknown class", f"'{cls}'")
                continue
            split = row.get("split", "")
            if split and split not in SPLITS:
                self.skip(src_desc, "bad split value", f"'{split}'")
                continue
            try:
                box = None
                cells = [row.get(c, "") for c in ("box_x0", "box_y0", "box_x1", "box_y1")]
                if any(cells):
                    box = tuple(float(c) for c in cells)
                    if not all(math.isfinite(v) for v in box):  # 'nan'/'inf' parse as floats
                        raise ValueError(f"non-finite box {cells}")
                    if box[2] <= box[0] or box[3] <= box[1]:
                        raise ValueError(f"empty box {cells}")
            except ValueError as exc:
                self.skip(src_desc, "bad box", str(exc))
                continue
            try:
                attrs = [float(row[f"attr_{a}"]) if row.get(f"attr_{a}") else math.nan
                         for a in self.attributes]
                # binary attributes (the dataset reader refuses anything else): 'inf' or a
                # 1–5 score written as is would make the imported dataset unreadable
                bad = [f"attr_{a}={row[f'attr_{a}']}" for a, v in zip(self.attributes, attrs,
                                                                       strict=True)
                       if math.isinf(v) or not (math.isnan(v) or 0.0 <= v <= 1.0)]
                if bad:
                    raise ValueError(f"{', '.join(bad)} not in [0, 1]")
            except ValueError as exc:
                self.skip(src_desc, "bad attribute value", str(exc))
                continue
            img_rel = Path(row["image"])
            if not (self.src / img_rel).is_file():  # before the split: it would take a place
                self.skip(f"{src_desc} ({row['image']})", "missing file",
                          str(self.src / img_rel))
                continue
            sid = unique_id(safe_id(str(img_rel.with_suffix(""))), used)
            masks = [self.src / m for m in parse_list(row.get("mask", "").replace(";", ","))]
            items.append(_Item(sid=sid, source=f"{src_desc} ({row['image']})",
                               image=self.src / img_rel, label=self.classes.index(cls),
                               masks=masks, box=box, attributes=attrs,
                               site=row.get("site", ""), group=row.get("group", ""),
                               split=split))
        return self._merge_rows_of_one_image(items)

    def _merge_rows_of_one_image(self, items: list[_Item]) -> list[_Item]:
        """One sample per image file. Rows of one image (one row per lesion) were one sample
        each, every copy annotated with its own lesion only: Eq. 3 and CAM precision then
        counted the image's other lesions as "outside the annotation". Merged: masks OR-ed,
        boxes joined into their bounding box, an attribute kept where the rows agree
        (unknown otherwise), a split, site or group given on some rows only taken from them. Rows
        that disagree on the label, or on a given split, site or group are skipped."""
        by_image: dict[Path, list[_Item]] = {}
        for it in items:
            by_image.setdefault(it.image.resolve(), []).append(it)
        merged = []
        for rows in by_image.values():
            first = rows[0]
            if len(rows) == 1:
                merged.append(replace(first, site=first.site or "0"))  # no site: site 0
                continue
            lines = ", ".join(r.source.split(" ")[0] for r in rows)
            # an empty split, site or group cell leaves it to the image's other rows (one row
            # per lesion often fills them in once): only two given values clash
            splits = {r.split for r in rows if r.split}
            groups = {r.group for r in rows if r.group}
            sites = {r.site for r in rows if r.site}
            clash = next((what for what, values in (
                ("labels", {r.label for r in rows}), ("splits", splits),
                ("sites", sites), ("groups", groups)) if len(values) > 1),
                None)
            if clash is not None:
                self.skip(f"{lines} ({first.image.name})",
                          f"rows of one image with different {clash}")
                continue
            boxes = [r.box for r in rows if r.box is not None]
            box = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                   max(b[2] for b in boxes), max(b[3] for b in boxes)) if boxes else None
            attrs = None
            if first.attributes is not None:
                attrs = []
                for k in range(len(first.attributes)):
                    known = {r.attributes[k] for r in rows if not math.isnan(r.attributes[k])}
                    attrs.append(known.pop() if len(known) == 1 else math.nan)
            masks = list(dict.fromkeys(m for r in rows for m in r.masks))
            self.note("CSV rows merged into their image's sample (masks OR-ed, boxes "
                      "joined)", len(rows) - 1)
            merged.append(replace(first, source=f"{lines} ({first.image.name})", masks=masks,
                                  box=box, attributes=attrs, split=next(iter(splits), ""),
                                  group=next(iter(groups), ""), site=next(iter(sites), "0"),
                                  join_mask_box=bool(masks) and box is not None))
        return merged

    def meta(self) -> DatasetMeta:
        return DatasetMeta(
            name=safe_id(self.src.name) or "folder", classes=list(self.classes),
            attributes=list(self.attributes), ndim=2,
            channels=3 if self.opts.color == "rgb" else 1,
            info={"label_rule": ", ".join(f"{c} → {k}" for k, c in enumerate(self.classes)),
                  "mask_rule": f"OR of '<image>{self.opts.mask_suffix}*' files (or the CSV's "
                               "mask column); all-zero → no mask"})

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        it: _Item = unit.payload
        img = read_folder_image(it.image, self.opts.color, self.scale, note=self.note,
                                root=self.src)
        spatial = img.shape[-2:]
        mask = None
        if it.masks:
            mask = np.zeros(spatial, bool)
            for mp in it.masks:
                m = read_mask(mp, note=self.note)
                if m.shape != spatial:
                    raise SkipItem("mask shape mismatch",
                                   f"{rel(mp, self.src)} is {m.shape}, image is {spatial}")
                mask |= m
            if not mask.any():
                self.note("empty mask stored as no mask")
                mask = None
        img, mask, box = fit_square(img, mask, self.opts.size, box=it.box)
        if it.box is not None and box is None:
            self.note("box outside the image dropped")
        if it.join_mask_box and mask is not None:
            # one row's lesion has a mask, another's only a box: the box holds both (the
            # box of a mask-only row was otherwise lost, its lesion "outside" under box)
            mb = box_of_mask(mask)
            box = mb if box is None else (min(box[0], mb[0]), min(box[1], mb[1]),
                                          max(box[2], mb[2]), max(box[3], mb[3]))
        yield Sample(id=it.sid, split=unit.split, label=it.label, image=img, mask=mask,
                     box=box if it.box is not None else box_of_mask(mask),
                     attributes=it.attributes, site=it.site, group=it.group)


@dataclass
class TreeFiles:
    """The files of one folder (searched recursively) as the tree layout reads them."""

    images: list[Path]
    masks: dict[Path, list[Path]]  # image path without suffix → its mask files
    broken: list[Path]  # links whose target is gone
    other: int  # hidden files and files of other suffixes (not read at all)

    def orphan_masks(self) -> list[Path]:
        """Keys of ``masks`` that no image has (sorted)."""
        return sorted(set(self.masks) - {p.parent / p.stem for p in self.images})


def mask_name_pattern(mask_suffix: str = "_mask") -> re.Pattern[str]:
    """A mask file's stem: '<image stem><suffix>' or '<image stem><suffix>_<k>', the suffix
    in any case ('x_Mask.PNG' beside 'x.png' was imported as an image of the class)."""
    return re.compile(rf"^(?P<stem>.+?){re.escape(mask_suffix)}(?:_\d+)?$", re.IGNORECASE)


def tree_files(folder: Path, mask_suffix: str = "_mask") -> TreeFiles:
    """Images and masks under ``folder`` by the tree layout's rules: a file of an image suffix
    (`IMAGE_SUFFIXES`, not hidden) whose stem ends in ``mask_suffix`` (optionally `_<k>`) is a
    mask, every other one an image. `causalign predict` sorts raw folders by this function
    too, so a mask is never predicted as an image."""
    named, other = [], 0
    for d, _, names in walk(folder):
        for f in names:
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."):
                named.append(d / f)
            else:
                other += 1
    named.sort()
    broken = [p for p in named if p.is_symlink() and not p.exists()]
    mask_re = mask_name_pattern(mask_suffix)
    masks: dict[Path, list[Path]] = {}
    images = []
    for p in named:
        if not p.is_file():
            continue
        m = mask_re.match(p.stem)
        if m:
            masks.setdefault(p.parent / m.group("stem"), []).append(p)
        else:
            images.append(p)
    return TreeFiles(images=images, masks=masks, broken=broken, other=other)


def read_folder_image(path: Path, color: str, scale: IntensityScale | None = None,
                      note: Callable[[str], None] | None = None,
                      root: Path | None = None) -> np.ndarray:
    """One image as the folder importer reads it, before `fit_square`: (H, W) for
    ``color`` "gray", (3, H, W) for "rgb", values in [0, 1] by ``scale`` (the import's
    `IntensityScale`). `causalign predict` reads plain files through this function too, so
    new images reach a run as an imported split's did. Raises SkipItem."""
    img = read_image(path, "RGB" if color == "rgb" else "L", scale, note=note)
    if color == "rgb" and img.ndim == 3 and img.shape[0] != 3:
        # read_image passes a channel-first NPY's channels through, but dataset.yaml
        # declares 3: a (1, H, W) array is gray → RGB; other counts (2, 4 modalities …)
        # have no RGB reading, and a mix of counts would make the split unreadable
        if img.shape[0] != 1:
            shown = rel(path, root) if root is not None else str(path)
            raise SkipItem("unsupported image", f"{shown} has {img.shape[0]} channels; "
                           f"--color rgb takes 1 or 3")
        img = np.repeat(img, 3, axis=0)
    return img


def _refuse_score_columns(path: Path, attributes: list[str], rows: list[dict]) -> None:
    """An attribute column that holds scores (LIDC-style 1–5 ratings written as is), not 0/1.
    Each such row used to be skipped as "bad attribute value", and the rows kept were those
    whose score happened to be 0 or 1: a score of 1 ("none" on a 1–5 scale) imported as
    present, on a biased subset. A column whose values mostly lie outside [0, 1], or that
    holds two or more integer levels above 1, is refused; a stray value in a binary column
    is still skipped with its row."""
    for a in attributes:
        vals = []
        for row in rows:
            try:
                v = float(row.get(f"attr_{a}") or "nan")
            except ValueError:
                continue
            if math.isfinite(v):
                vals.append(v)
        out = [v for v in vals if not 0.0 <= v <= 1.0]
        # a rating scale shows several levels above 1; with "none" (1) the most common
        # score (LIDC's spiculation, lobulation: ~2/3 of nodules) fewer than half the values
        # lie outside [0, 1], and the 1s were imported as present
        levels = {v for v in out if v >= 2 and v == int(v)}
        if len(vals) >= 2 and (2 * len(out) > len(vals) or len(levels) >= 2):
            raise DataError(
                f"{path}: column attr_{a} holds scores, not binary attributes ({len(out)} of "
                f"{len(vals)} values outside [0, 1], range {min(vals):g}..{max(vals):g}); "
                f"write 0/1 (e.g. 1 where the score is >= 3, as the lidc importer does)")

