"""CUB-200-2011 (Wah et al. 2011; paper 002 §4.1, App. D).

SRC layout (``CUB_200_2011``, or the folder holding it)::

    images.txt              '<image_id> <class folder>/<file>.jpg'
    image_class_labels.txt  '<image_id> <class_id>'
    train_test_split.txt    '<image_id> <1 = train | 0 = test>'
    bounding_boxes.txt      '<image_id> <x> <y> <width> <height>'   (pixels, floats)
    classes.txt             '<class_id> <class folder>'
    images/<class folder>/<file>.jpg
    segmentations/<class folder>/<file>.png   optional (separate download; inside
                                              CUB_200_2011/ or beside it)

Label rule: the species; `--classes` selects a subset by id, id range or name
(``1-10,17`` or ``001.Black_footed_Albatross``), labels are 0… in class-id order. Split: the
official one — ``is_training_image = 1`` → train, 0 → test; `--val-frac` of each class's
training images (random with `--seed`) become val.

Annotation: the bounding box is always stored (box columns). The mask is `--mask auto`
(default: the segmentation when the file exists, else the box), ``box`` (filled box),
``segmentation`` (skip images without one) or ``none``. Segmentation PNGs average several
annotators' outlines (gray levels); pixels ≥ 128 (a majority) are foreground.
`--crop image` (default) letterboxes the whole photo to `--size`; `--crop box` crops a square
around the box enlarged by `--context` (default 0.15 of its side on each side). RGB.

Attributes (`--cub-attributes`, default ``none``): ``all`` or a list of attribute ids, id
ranges and names (``1-15,has_wing_color::blue``) from ``attributes.txt`` (beside
CUB_200_2011/ in the official download, or inside it or its attributes/ folder), values from
``attributes/image_attribute_labels.txt`` ('<image_id> <attribute_id> <is_present>
<certainty_id> <time>'; extra fields, as a few official lines have, are ignored): 1/0 as
``is_present``, empty (not annotated) where the certainty is 1 ("not visible") or the image
has no line for the attribute. Needed for hier-align and `causalign causal ccce` (CCCE needs
a binary label: pick two species with `--classes`).

Skipped with a reason: a listed image missing or unreadable, an image without class label or
split entry, an unreadable segmentation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError, not_one_of
from ..format import DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit, parse_list
from .util import (
    SkipItem,
    assign_splits,
    crop_square,
    fit_square,
    read_image,
    resize,
    resize_mask,
    scale_box,
)


@dataclass
class CubOptions(CommonOptions):
    size: int = 224
    classes: str = ""
    val_frac: float = 0.1
    mask: str = "auto"
    crop: str = "image"
    context: float = 0.15
    cub_attributes: str = "none"  # none | all | ids, id ranges, names

    def validate(self) -> None:
        super().validate()
        masks = ("auto", "box", "segmentation", "none")
        if self.mask not in masks:
            raise DataError(not_one_of("--mask", self.mask, masks))
        if self.crop not in ("image", "box"):
            raise DataError(not_one_of("--crop", self.crop, ("image", "box")))
        if not 0 <= self.context <= 2:
            raise DataError(f"--context must be in [0, 2], got {self.context}")

    def fractions(self) -> dict[str, float]:
        return {"train": 1.0 - self.val_frac, "val": self.val_frac, "test": 0.0}

    def flag_use(self) -> list[tuple[str, bool, str]]:
        return [("context", self.crop == "box", "with --crop box (the margin of the crop)")]


def read_table(path: Path, ncols: int) -> dict[str, list[str]]:
    """'<id> <v1> …' lines → {id: [v1, …]} (the last column may contain spaces)."""
    if not path.exists():
        raise DataError(f"{path}: missing (expected the CUB_200_2011 layout)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=ncols)
        if len(parts) != ncols + 1:
            raise DataError(f"{path}:{lineno}: expected {ncols + 1} fields, got '{line}'")
        # ids are integers (image / class ids): they are sorted and formatted as numbers
        if not parts[0].isdigit():
            raise DataError(f"{path}:{lineno}: id '{parts[0]}' is not a number")
        if parts[0] in out:
            raise DataError(f"{path}:{lineno}: id {parts[0]} listed twice")
        out[parts[0]] = parts[1:]
    return out


NOT_VISIBLE = "1"  # certainties.txt: 1 not visible, 2 guessing, 3 probably, 4 definitely


def read_attribute_names(root: Path) -> dict[str, str]:
    """attributes.txt ('<id> <name>'): beside CUB_200_2011/ (the official tarball), in it,
    or in its attributes/ folder."""
    places = [root.parent / "attributes.txt", root / "attributes.txt",
              root / "attributes" / "attributes.txt"]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        raise DataError(f"--cub-attributes: no attributes.txt (looked in "
                        f"{', '.join(str(p) for p in places)})")
    return {k: v[0] for k, v in read_table(path, 1).items()}


def _token_ids(tok: str, by_name: dict[str, str], flag: str) -> list[str]:
    """The ids one token of an id list names: 'low-high', an id, or a name in ``by_name``
    ("" for an unknown name, which the caller refuses)."""
    m = re.fullmatch(r"(\d+)-(\d+)", tok)
    if m and int(m.group(1)) > int(m.group(2)):
        # '15-1' selected nothing and, beside another token, was dropped without a word
        raise DataError(f"{flag}: empty id range '{tok}' (write low-high, "
                        f"e.g. {m.group(2)}-{m.group(1)})")
    if m:
        return [str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)]
    return [str(int(tok))] if tok.isdigit() else [by_name.get(tok.lower(), "")]


def select_attributes(spec: str, names: dict[str, str]) -> list[str]:
    """Attribute ids chosen by 'all' or '1-15,has_wing_color::blue', in id order."""
    if spec.strip().lower() == "all":
        return sorted(names, key=int)
    by_name = {v.lower(): k for k, v in names.items()}
    chosen: set[str] = set()
    for tok in parse_list(spec):
        ids = _token_ids(tok, by_name, "--cub-attributes")
        for aid in ids:
            if aid not in names:
                raise DataError(f"--cub-attributes: unknown CUB attribute '{tok}' (ids "
                                f"1..{len(names)} or names from attributes.txt)")
            chosen.add(aid)
    if not chosen:
        raise DataError("--cub-attributes: no attribute selected (none, all, or ids/names)")
    return sorted(chosen, key=int)


def read_attribute_labels(path: Path, wanted: list[str], images: set[str]
                          ) -> dict[str, list[float]]:
    """image id → values of the ``wanted`` attribute ids (1/0, NaN: not visible or no line)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (--cub-attributes needs the per-image labels)")
    col = {aid: j for j, aid in enumerate(wanted)}
    out: dict[str, list[float]] = {}
    try:
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 4 or not (parts[0].isdigit() and parts[1].isdigit()) \
                        or parts[2] not in ("0", "1"):
                    raise DataError(f"{path}:{lineno}: expected '<image_id> <attribute_id> "
                                    f"<is_present 0/1> <certainty_id> <time>', got "
                                    f"'{line.strip()}'")
                j = col.get(parts[1])
                if j is None or parts[0] not in images:
                    continue
                row = out.setdefault(parts[0], [math.nan] * len(wanted))
                row[j] = math.nan if parts[3] == NOT_VISIBLE else float(parts[2])
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return out


def find_root(src: Path) -> Path:
    for c in (src, src / "CUB_200_2011"):
        if (c / "images.txt").exists():
            return c
    raise DataError(f"{src}: no images.txt (expected CUB_200_2011/ with images.txt, "
                    f"image_class_labels.txt, train_test_split.txt, bounding_boxes.txt)")


def select_classes(spec: str, classes: dict[str, str]) -> list[str]:
    """Class ids chosen by '1-10,17,Black_footed_Albatross' (ids, ranges, names)."""
    if not spec.strip():
        return sorted(classes, key=int)
    by_name = {}
    for cid, folder in classes.items():
        by_name[folder.lower()] = cid
        by_name[re.sub(r"^\d+\.", "", folder).lower()] = cid
    chosen: list[str] = []
    for tok in parse_list(spec):
        ids = _token_ids(tok, by_name, "--classes")
        for cid in ids:
            if cid not in classes:
                raise DataError(f"--classes: unknown CUB class '{tok}' "
                                f"(ids 1..{len(classes)} or names from classes.txt)")
            if cid not in chosen:
                chosen.append(cid)
    if len(chosen) < 2:
        raise DataError("--classes must select at least two classes")
    return sorted(chosen, key=int)


class CubImporter(Importer):
    kind = "cub"
    Options = CubOptions
    layout = ("CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, "
              "bounding_boxes.txt, classes.txt, images/…} [segmentations/…]")

    def plan(self) -> list[Unit]:
        opts: CubOptions = self.opts
        root = find_root(self.src)
        self.root = root
        images = read_table(root / "images.txt", 1)
        labels = read_table(root / "image_class_labels.txt", 1)
        is_train = read_table(root / "train_test_split.txt", 1)
        boxes = read_table(root / "bounding_boxes.txt", 4)
        class_file = root / "classes.txt"
        if class_file.exists():
            classes = {k: v[0] for k, v in read_table(class_file, 1).items()}
        else:  # derive names from the image folders
            classes = {}
            for iid, (path,) in images.items():
                if iid in labels:
                    classes.setdefault(labels[iid][0], path.split("/")[0])
        chosen = select_classes(opts.classes, classes)
        self.class_ids = chosen
        self.class_names = [classes[c] for c in chosen]
        seg_dirs = [root / "segmentations", root.parent / "segmentations"]
        self.seg_root = next((d for d in seg_dirs if d.is_dir()), None)
        if opts.mask == "segmentation" and self.seg_root is None:
            raise DataError(f"{root}: --mask segmentation but no segmentations/ folder "
                            f"(looked in {seg_dirs[0]} and {seg_dirs[1]})")
        self.attr_names: list[str] = []
        attr_of: dict[str, list[float]] = {}
        if opts.cub_attributes.strip().lower() != "none":
            names = read_attribute_names(root)
            wanted = select_attributes(opts.cub_attributes, names)
            self.attr_names = [names[a] for a in wanted]
            attr_of = read_attribute_labels(root / "attributes" / "image_attribute_labels.txt",
                                            wanted, set(images))
        items = []
        for iid in sorted(images, key=int):
            (path,) = images[iid]
            if iid not in labels:
                self.skip(path, "no class label", f"image id {iid} not in image_class_labels")
                continue
            if labels[iid][0] not in chosen:
                continue
            if iid not in is_train:
                self.skip(path, "no split entry", f"image id {iid} not in train_test_split")
                continue
            if is_train[iid][0] not in ("0", "1"):  # anything else would silently be test
                self.skip(path, "bad split entry",
                          f"image id {iid}: is_training_image '{is_train[iid][0]}' not 0/1")
                continue
            box = None
            if iid in boxes:
                try:
                    x, y, w, h = (float(v) for v in boxes[iid])
                    ok = all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
                    box = (x, y, x + w, y + h) if ok else None  # 'nan' parses as a float
                except ValueError:
                    box = None
            if box is None:
                self.note("image without a usable bounding box")
            items.append((iid, path, chosen.index(labels[iid][0]), is_train[iid][0] == "1", box))
        train = [it for it in items if it[3]]
        split_of = assign_splits([it[0] for it in train], opts.fractions(), opts.seed,
                                 strata=[it[2] for it in train])
        units = []
        for iid, path, label, tr, box in items:
            split = split_of[iid] if tr else "test"
            attrs = attr_of.get(iid, [math.nan] * len(self.attr_names)) \
                if self.attr_names else None
            units.append(Unit(key=iid, split=split, source=f"images/{path}",
                              payload=(iid, path, label, box, attrs)))
        return self.limit_units(units)

    def meta(self) -> DatasetMeta:
        return DatasetMeta(
            name="cub", classes=list(self.class_names), attributes=list(self.attr_names),
            ndim=2, channels=3,
            info={"label_rule": "species in class-id order",
                  "class_ids": [int(c) for c in self.class_ids],
                  "split_rule": "official train_test_split.txt; val carved from train",
                  "mask_rule": f"--mask {self.opts.mask}; segmentation ≥ 128 = foreground",
                  **({"attribute_rule": "is_present (1/0); empty where certainty 1 (not "
                                        "visible) or not listed"} if self.attr_names else {})})

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        opts: CubOptions = self.opts
        iid, path, label, box, attrs = unit.payload
        img = read_image(self.root / "images" / path, "RGB", note=self.note)
        h, w = img.shape[-2:]
        seg = None
        seg_path = (self.seg_root / path).with_suffix(".png") if self.seg_root else None
        if opts.mask in ("auto", "segmentation") and seg_path is not None and seg_path.exists():
            seg = read_mask_threshold(seg_path)
            if seg.shape != (h, w):
                raise SkipItem("mask shape mismatch",
                               f"segmentations/{path}: {seg.shape}, image {(h, w)}")
        elif opts.mask == "segmentation":
            raise SkipItem("missing segmentation", f"segmentations/{path}")
        if box is not None:  # clip to the photo
            box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], w), min(box[3], h))
            if box[2] <= box[0] or box[3] <= box[1]:
                box = None
        mask = None
        if seg is not None:
            mask = seg if seg.any() else None
        elif opts.mask in ("auto", "box") and box is not None:
            mask = np.zeros((h, w), bool)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0:y1, x0:x1] = True
        if opts.crop == "box" and box is not None:
            side = int(round(max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * opts.context)))
            side = max(side, 8)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            img = resize(crop_square(img, cx, cy, side), (opts.size, opts.size))
            if mask is not None:
                mask = resize_mask(crop_square(mask, cx, cy, side), (opts.size, opts.size))
            scale = opts.size / side
            out_box = scale_box(box, scale, -x0, -y0, opts.size, opts.size)
        else:
            if opts.crop == "box":
                self.note("no box: whole image used (--crop box)")
            img, mask, out_box = fit_square(img, mask, opts.size, box=box)
        if mask is not None and not mask.any():
            mask = None
        yield Sample(id=f"cub_{int(iid):05d}", split=unit.split, label=label, image=img,
                     mask=mask, box=out_box, attributes=attrs)


def read_mask_threshold(path: Path) -> np.ndarray:
    """CUB segmentation: gray levels = share of annotators; ≥ 128 (majority) = foreground."""
    from ..format import open_image

    try:
        with open_image(path) as im:  # over PIL's pixel limit: DataError, caught below
            arr = np.asarray(im.convert("L"))
    except Exception as exc:
        raise SkipItem("unreadable segmentation", f"{path}: {type(exc).__name__}: {exc}"
                       ) from None
    return arr >= 128

