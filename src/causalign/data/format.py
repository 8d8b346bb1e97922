"""The one on-disk dataset format every importer writes and every command reads.

A dataset is a folder::

    DATA/
      dataset.yaml      name, classes, attributes, image kind, free-form metadata
      manifest.csv      one row per sample (columns below)
      images/…          PNG (2D, gray or RGB) or NPY (2D (H,W)/(C,H,W) or 3D (D,H,W))
      masks/…           same shape as the image's spatial part, nonzero = annotated area

manifest.csv columns: ``id, split, label, site, image, mask, box_x0, box_y0, box_x1, box_y1``
and one ``attr_<name>`` column per attribute listed in dataset.yaml. ``mask`` and the box
columns may be empty (sample without annotation); attribute cells may be empty (missing
annotation → NaN). Boxes are pixel coordinates, x1/y1 exclusive. Paths are relative to DATA;
a backslash in them is a folder separator on every OS (a manifest written on Windows).
Ids name per-sample files, so two may not differ only in case or Unicode form (one file on
macOS/Windows).

Volumes (``ndim: 3``) may add the optional columns ``box_z0, box_z1``: the box's slice range,
z1 exclusive, so a 3D box is the six numbers (x0, y0, x1, y1, z0, z1) (`SampleRecord.box`).
A volume's box without them (both cells empty, or no such columns) spans every slice, as
boxes on volumes always did. They are written only when some sample has a slice range, and
a slice range on 2D images, or without the x/y box, is an error.

An optional ``group`` column names the patient (subject, study…) a sample comes from, written
by the importers that know it (BraTS, LIDC-IDRI, CBIS-DDSM, a folder CSV's ``group``) and only
when some sample has one. Samples of one group belong in one split: `causalign data check`
reports groups found in several splits, and images of identical pixels in several splits.

`LesionDataset` reads one split, validates it (missing files, mask/image shape mismatch,
labels outside the declared classes, NaN/inf pixels, empty split) and raises `DataError`
with one line naming the file and the problem.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ..errors import DataError, InputError, did_you_mean, not_one_of
from ..io import LOCK_NAME, atomic_write_file, atomic_write_text

MANIFEST = "manifest.csv"
META = "dataset.yaml"
SPLITS = ("train", "val", "test")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
BOX_Z_COLUMNS = ("box_z0", "box_z1")  # optional: a volume's slice range (module docstring)
BASE_COLUMNS = ("id", "split", "label", "site", "image", "mask", *BOX_COLUMNS)
GROUP_COLUMN = "group"  # optional: the sample's patient (module docstring)


def outward_box(coords: Sequence[float]) -> tuple[int, ...]:
    """Whole-pixel box (x0, y0, x1, y1[, z0, z1]; exclusive ends) covering fractional
    coordinates: starts rounded down, ends up, as the importers' `scale_box` does. Truncation
    cut a pixel the box reaches into, and made a sub-pixel box (10.2..10.8) "empty"."""
    starts = (0, 1, 4)  # x0, y0, z0
    # a whole number printed with float noise (9.000000000000002 from 3 * 0.1 * 30) is that
    # number: rounded outward it grew the box by a pixel, and a box ending at the image's
    # edge was refused as "outside the image"
    return tuple(int(math.floor(v + _BOX_NOISE) if i in starts else math.ceil(v - _BOX_NOISE))
                 for i, v in enumerate(coords))


_BOX_NOISE = 1e-6  # pixels; far above float64's error at image sizes, far below a pixel


# Which samples a ``limit`` keeps (`LesionDataset`, `explain --pick`)
PICKS = ("first", "balanced")


def balanced_pick(labels: Sequence[int], n: int, order: Sequence[int] | None = None
                  ) -> list[int]:
    """Up to ``n`` indices into ``labels``, the classes in turn (ascending) and each class's
    samples in ``order`` (default: index order), so every class present is shown when ``n``
    allows; in the order picked."""
    by_class: dict[int, list[int]] = {}
    for i in range(len(labels)) if order is None else order:
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[c][::-1] for c in sorted(by_class)]  # popped from the end
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


@dataclass
class DatasetMeta:
    """Contents of dataset.yaml."""

    name: str
    classes: list[str]
    attributes: list[str] = field(default_factory=list)
    ndim: int = 2  # spatial dimensions of an image: 2 (H,W) or 3 (D,H,W)
    channels: int = 1
    info: dict = field(default_factory=dict)  # generator parameters, provenance, …

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "attributes": list(self.attributes),
            "ndim": self.ndim,
            "channels": self.channels,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str) -> DatasetMeta:
        for key in ("name", "classes"):
            if key not in d:
                raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(d["classes"], list) or len(d["classes"]) < 2:
            raise DataError(f"{where}: 'classes' must list at least two class names")
        # dataset.yaml is often edited by hand: check every value's type here, so a typo is
        # one line naming the key, not a traceback (or a str iterated letter by letter)
        classes = _names(d["classes"], "classes", where)
        attributes = _names(d.get("attributes") or [], "attributes", where)
        ndim, channels = d.get("ndim", 2), d.get("channels", 1)
        if isinstance(ndim, bool) or ndim not in (2, 3):
            raise DataError(f"{where}: 'ndim' must be 2 or 3 (spatial dimensions), got {ndim!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise DataError(f"{where}: 'channels' must be a positive integer, got {channels!r}")
        info = d.get("info") or {}
        if not isinstance(info, dict):
            raise DataError(f"{where}: 'info' must be a mapping, got {type(info).__name__}")
        if d["name"] is None or isinstance(d["name"], (list, dict)):
            raise DataError(f"{where}: 'name' must be a string, got {d['name']!r}")
        return cls(name=str(d["name"]), classes=classes, attributes=attributes,
                   ndim=int(ndim), channels=channels, info=dict(info))


def _names(value: object, key: str, where: str) -> list[str]:
    """A list of distinct, non-empty scalar names (class or attribute names)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: '{key}' must be a list of names, got {value!r}")
    names = []
    for v in value:
        if v is None or isinstance(v, (list, dict)) or not str(v).strip():
            raise DataError(f"{where}: '{key}' entry {v!r} is not a name")
        names.append(str(v).strip())
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{where}: '{key}' lists {', '.join(dup)} more than once")
    return names


@dataclass
class SampleRecord:
    """One manifest row, before the image is read."""

    id: str
    split: str
    label: int
    site: str
    image: str
    mask: str | None = None
    # (x0, y0, x1, y1), or for a volume (x0, y0, x1, y1, z0, z1) with its slice range
    box: tuple[int, ...] | None = None
    attributes: list[float] = field(default_factory=list)  # NaN = not annotated
    # the patient (subject, study…) the sample comes from, "" unknown: one group belongs in
    # one split, which `causalign data check` verifies
    group: str = ""


# ----------------------------------------------------------------------------- writing


class DatasetWriter:
    """Write a dataset in the format above; the manifest is written atomically on `close`.

    >>> w = DatasetWriter(out, DatasetMeta("toy", ["benign", "malignant"], ["margin"]))
    >>> w.add(image, label=1, split="train", mask=mask, attributes=[1.0])
    >>> w.close()

    or ``with DatasetWriter(out, meta) as w: ...``, which writes the manifest when the block
    ends without an exception (after one, none is written: a half-written dataset is not
    left looking complete). Images and masks may be NumPy arrays or tensors.
    """

    def __init__(self, root: str | Path, meta: DatasetMeta, image_format: str = "png",
                 png_bits: int = 8) -> None:
        if image_format not in ("png", "npy"):
            raise DataError(not_one_of("image format", image_format, ("png", "npy")))
        if png_bits not in (8, 16):
            raise DataError(f"png_bits must be 8 or 16, got {png_bits!r}")
        self.root = Path(root)
        self.meta = meta
        self.image_format = image_format
        # float images in [0, 1] become 8- or 16-bit PNGs; 16 keeps a 12/16-bit source's
        # levels (8 bits keep 256). uint8/uint16 arrays are stored as they are.
        self.png_bits = png_bits
        self.rows: list[SampleRecord] = []
        self._ids: dict[str, str] = {}  # `_file_key` -> id
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "masks").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()

    def add(
        self,
        image: np.ndarray | Tensor,
        label: int,
        split: str,
        mask: np.ndarray | Tensor | None = None,
        box: Sequence[float] | None = None,
        attributes: Sequence[float] | None = None,
        site: str = "0",
        sample_id: str | None = None,
        group: str = "",
    ) -> SampleRecord:
        sid = sample_id if sample_id is not None else f"{len(self.rows):06d}"
        # checked before any file is written: a repeated id would overwrite the earlier
        # sample's image, and a bad split/label would only fail when the dataset is read
        if not sid or sid in (".", "..") or "/" in sid or "\\" in sid:
            raise DataError(f"sample id '{sid}' is not usable as a file name")
        why = _not_portable(sid)
        if why:
            raise DataError(f"sample id '{sid}' is not usable as a file name on Windows ({why})")
        if sid in self._ids.values():
            raise DataError(f"sample id '{sid}' added twice")
        if _file_key(sid) in self._ids:
            # images/A.png and images/a.png are one file on macOS and Windows: the second
            # sample silently replaced the first's image and mask there
            raise DataError(f"sample id '{sid}' differs only in case or Unicode form from "
                            f"'{self._ids[_file_key(sid)]}' (one file name on macOS/Windows)")
        if split not in SPLITS:
            raise DataError(f"sample {sid}: split '{split}' is not one of {', '.join(SPLITS)}")
        if not 0 <= int(label) < len(self.meta.classes):
            raise DataError(f"sample {sid}: label {label} outside the declared classes "
                            f"0..{len(self.meta.classes) - 1}")
        if box is not None:
            box = outward_box(box)
            if len(box) not in (4, 6):
                raise DataError(f"sample {sid}: box {box} has {len(box)} numbers, expected 4 "
                                f"(x0, y0, x1, y1) or, for a volume, 6 (x0, y0, x1, y1, z0, z1)")
            if len(box) == 6 and self.meta.ndim != 3:
                raise DataError(f"sample {sid}: box {box} has a slice range (z0, z1), but the "
                                f"dataset's images are 2D")
            # the reader refuses these: written, they made the closed dataset unreadable
            empty = _empty_box(box)
            if empty:
                raise DataError(f"sample {sid}: {empty}")
        # (before any file: a wrong count left an orphan image and mask behind)
        attrs = [float("nan")] * len(self.meta.attributes) if attributes is None else attributes
        if len(attrs) != len(self.meta.attributes):
            raise DataError(f"sample {sid}: {len(attrs)} attributes given, "
                            f"dataset declares {len(self.meta.attributes)}")
        for name, a in zip(self.meta.attributes, attrs, strict=True):
            if not _binary_attribute(float(a)):  # -1, inf: refused by the reader likewise
                raise DataError(f"sample {sid}: attribute {name} = {float(a):g} is not in "
                                f"[0, 1] (binary attribute: 0, 1, or NaN when not annotated)")
        image = _as_array(image)
        mask = None if mask is None else _as_array(mask)
        # the reader's shape and box checks, before any file: a volume's mask given for one
        # slice (H, W), a box past the last slice or a 2D image in a 3D dataset were written
        # and only refused when the dataset was read, by `causalign train`
        self._check_shapes(sid, image, mask, box)
        fmt = self.image_format if image.ndim == 2 or self.image_format == "npy" else "npy"
        if fmt == "png" and image.dtype.kind == "f" and not np.isfinite(image).all():
            # a PNG would store NaN as 0 without a word (np.clip keeps NaN, uint8 casts it);
            # NPY keeps the NaN, which the reader reports
            raise DataError(f"sample {sid}: {int((~np.isfinite(image)).sum())} NaN/inf "
                            f"pixel value(s)")
        img_rel = f"images/{sid}.{fmt}"
        save_array(self.root / img_rel, image, fmt, bits=self.png_bits)
        mask_rel = None
        if mask is not None:
            mask_rel = f"masks/{sid}.{'png' if mask.ndim == 2 else 'npy'}"
            save_array(self.root / mask_rel, (mask > 0).astype(np.uint8) * 255, None)
        rec = SampleRecord(
            id=sid, split=split, label=int(label), site=str(site), image=img_rel, mask=mask_rel,
            box=box, attributes=[float(a) for a in attrs], group=str(group),
        )
        self.rows.append(rec)
        self._ids[_file_key(sid)] = sid
        return rec

    def _check_shapes(self, sid: str, image: np.ndarray, mask: np.ndarray | None,
                      box: tuple | None) -> None:
        """Refuse (DataError) what `LesionDataset` would refuse on reading: an image without
        ``meta.ndim`` spatial axes, a mask not of the image's spatial shape, a box (or its
        slice range) outside the image."""
        spatial = _spatial_shape(image.shape, self.meta.ndim)
        if spatial is None:
            raise DataError(f"sample {sid}: image has shape {image.shape}, expected "
                            f"{self.meta.ndim} spatial dimensions (optionally with a channel "
                            f"axis)")
        if mask is not None:
            m = mask.shape
            if len(m) == len(spatial) + 1 and m[-1] in (3, 4):  # a colour mask, as read
                m = m[:-1]
            if tuple(m) != spatial:
                raise DataError(f"sample {sid}: mask shape {tuple(mask.shape)} does not match "
                                f"the image's {spatial}"
                                + (" (a volume's mask covers every slice: zeros on the "
                                   "unannotated ones)" if len(spatial) == 3 else ""))
        if box is not None:
            h, w = spatial[-2:]
            x0, y0, x1, y1 = box[:4]
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise DataError(f"sample {sid}: box {box} outside the image ({w}x{h})")
            if len(box) == 6 and (box[4] < 0 or box[5] > spatial[0]):
                raise DataError(f"sample {sid}: box slice range {box[4]}..{box[5]} outside "
                                f"the volume ({spatial[0]} slices, 0..{spatial[0]})")

    def close(self) -> None:
        write_manifest(self.root, self.meta, self.rows)


def _spatial_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
    """The spatial shape `_stored_image` reads an array of ``shape`` as (None: refused)."""
    if len(shape) == ndim:
        return tuple(shape)
    if len(shape) == ndim + 1 and ndim == 2 and shape[-1] in (1, 3, 4) and shape[0] > 4:
        return tuple(shape[:2])  # HWC
    if len(shape) == ndim + 1:
        return tuple(shape[1:])
    return None


def _as_array(value: object) -> np.ndarray:
    """An image or mask as a NumPy array; a tensor detached and on the host (a mask tensor
    failed with "'Tensor' object has no attribute 'astype'", an image that requires grad
    with "Can't call numpy() on Tensor that requires grad", a bfloat16 one in NumPy)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _file_key(sid: str) -> str:
    """What a case-insensitive file system compares (macOS's also ignores the Unicode
    normalisation: 'é' typed as one code point or as e + accent is one file there)."""
    return unicodedata.normalize("NFC", sid).casefold()


# file names Windows refuses or reads as devices (images/con.png is the console there)
_WINDOWS_BAD_CHARS = frozenset('<>:"|?*') | frozenset(map(chr, range(32)))
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{k}" for k in range(1, 10)),
                              *(f"LPT{k}" for k in range(1, 10))})


def _not_portable(sid: str) -> str:
    """Why ``sid`` cannot name a file on Windows ('' when it can). On NTFS 'a:b.png' even
    wrote a hidden stream 'b.png' of a file 'a' instead of failing."""
    bad = sorted({c for c in sid if c in _WINDOWS_BAD_CHARS})
    if bad:
        return "contains " + " ".join(repr(c) for c in bad)
    if sid.split(".")[0].strip().upper() in _WINDOWS_DEVICES:
        return f"'{sid.split('.')[0]}' is a device name"
    return ""


def save_array(path: Path, array: np.ndarray, fmt: str | None, bits: int = 8) -> None:
    """Save an image/mask: PNG for 2D arrays (uint8/uint16 kept; other arrays, floats in
    [0, 1], → uint8, or uint16 with `bits` 16 — read back as value / 255 or / 65535)."""
    fmt = fmt or ("png" if array.ndim == 2 else "npy")
    # through a temporary file renamed over `path`: np.save / PIL's save opened `path`
    # itself, so a link left at a sample's name (`data synth --overwrite` of a received
    # folder) had its target overwritten
    if fmt == "npy":
        atomic_write_file(path, lambda fh: np.save(fh, array), fsync=False)
        return
    from PIL import Image

    if array.dtype not in (np.uint8, np.uint16):
        if bits == 16 and array.ndim == 2:  # PIL writes 16-bit PNGs for gray images only
            array = (np.clip(array, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
        else:
            array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    atomic_write_file(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"),
                      fsync=False)


def write_manifest(root: str | Path, meta: DatasetMeta, rows: Iterable[SampleRecord]) -> None:
    """Write dataset.yaml and manifest.csv atomically."""
    root = Path(root)
    rows = list(rows)
    # the slice-range columns only where some box has one: other manifests stay as they were
    with_z = any(r.box is not None and len(r.box) == 6 for r in rows)
    with_group = any(r.group for r in rows)  # likewise the group column
    header = [*BASE_COLUMNS, *(BOX_Z_COLUMNS if with_z else ()),
              *((GROUP_COLUMN,) if with_group else ()), *(f"attr_{a}" for a in meta.attributes)]
    lines = [",".join(header)]
    for r in rows:
        box = list(r.box) if r.box is not None else ["", "", "", ""]
        if with_z and len(box) == 4:
            box += ["", ""]  # a box without slice range spans every slice
        attrs = ["" if math.isnan(a) else f"{a:g}" for a in r.attributes]
        cells = [r.id, r.split, str(r.label), r.site, r.image, r.mask or "", *map(str, box),
                 *([r.group] if with_group else []), *attrs]
        lines.append(",".join(_csv_cell(c) for c in cells))
    atomic_write_text(root / META, yaml.safe_dump(meta.to_dict(), sort_keys=False))
    atomic_write_text(root / MANIFEST, "\n".join(lines) + "\n")


def _csv_cell(value: str) -> str:
    if any(ch in value for ch in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


# ----------------------------------------------------------------------------- reading


def read_meta(root: str | Path) -> DatasetMeta:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (a dataset is a folder with {META} and {MANIFEST})")
    path = root / META
    if not path.exists():
        raise DataError(f"{path}: missing ({root} is not a causalign dataset; "
                        f"create one with `causalign data synth` or `causalign data import`)")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # -sig: editors' BOM
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a mapping")
    return DatasetMeta.from_dict(d, str(path))


def read_manifest(root: str | Path, meta: DatasetMeta | None = None,
                  limit: int | None = None) -> list[SampleRecord]:
    """Parse manifest.csv into records, checking columns, labels, splits and boxes.
    ``limit``: stop after that many records (the rows after them are not read or checked;
    `data_info_from_disk` needs only the first image of a manifest that may list 20,000)."""
    if limit is not None and limit < 0:
        raise InputError(f"read_manifest: limit {limit} is negative (None reads every row)")
    root = Path(root)
    meta = meta or read_meta(root)
    path = root / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: missing")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    # utf-8-sig: a manifest saved by a spreadsheet starts with a BOM, which would otherwise
    # become part of the first column's name ("missing column id" while 'id' is there)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            reader = csv.reader(fh)
            cols = [c.strip() for c in next(reader, [])]
            missing = [c for c in ("id", "split", "label", "image") if c not in cols]
            missing += [f"attr_{a}" for a in meta.attributes if f"attr_{a}" not in cols]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
            dup = sorted({c for c in cols if c and cols.count(c) > 1})
            if dup:
                raise DataError(f"{path}: column(s) {', '.join(dup)} appear more than once")
            records = []
            first_line: dict[str, int] = {}
            folded: dict[str, str] = {}  # `_file_key` -> id
            for cells in reader if limit != 0 else ():  # limit=0: the header checks only
                lineno = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank line (e.g. left at the end by an editor)
                where = f"{path}:{lineno}"
                # a row with more or fewer cells than the header is misaligned (an unquoted
                # comma, a lost cell): reading it by position would shift labels/masks
                if len(cells) > len(cols) and not any(c.strip() for c in cells[len(cols):]):
                    cells = cells[:len(cols)]  # trailing empty cells ("a,b,c,,")
                if len(cells) != len(cols):
                    raise DataError(f"{where}: {len(cells)} cells, the header has {len(cols)} "
                                    f"(quote values that contain a comma)")
                rec = _parse_row(dict(zip(cols, cells, strict=True)), meta, where)
                # ids name per-sample output files (explanations, counterfactuals): a
                # repeated id would silently overwrite another sample's file
                if rec.id in first_line:
                    raise DataError(f"{where}: id '{rec.id}' already used on line "
                                    f"{first_line[rec.id]}")
                # …and so would one differing only in case on macOS and Windows, whose file
                # systems ignore case (maps/A.npy and maps/a.npy are one file; macOS also
                # the Unicode form)
                other = folded.get(_file_key(rec.id))
                if other is not None:
                    raise DataError(f"{where}: id '{rec.id}' differs only in case or Unicode "
                                    f"form from id '{other}' on line {first_line[other]} (one "
                                    f"file name on macOS/Windows; rename one)")
                first_line[rec.id] = lineno
                folded[_file_key(rec.id)] = rec.id
                records.append(rec)
                if limit is not None and len(records) >= limit:
                    break
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:  # NUL bytes, unterminated quotes at EOF …
            raise DataError(f"{path}: not a valid CSV file ({exc})") from None
    return records


def _parse_row(row: dict, meta: DatasetMeta, where: str) -> SampleRecord:
    sid = (row.get("id") or "").strip()
    if not sid or sid in (".", "..") or "/" in sid or "\\" in sid:
        raise DataError(f"{where}: id '{sid}' is not usable as a file name "
                        f"(empty, or contains a path separator)")
    why = _not_portable(sid) if sys.platform == "win32" else ""
    if why:  # per-sample outputs are named by it: maps/a:b.npy is a hidden NTFS stream
        raise DataError(f"{where}: id '{sid}' is not usable as a file name on Windows ({why})")
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(f"{where}: label '{row['label']}' is not an integer") from None
    if not 0 <= label < len(meta.classes):
        raise DataError(f"{where}: label {label} outside the declared classes "
                        f"0..{len(meta.classes) - 1} ({', '.join(meta.classes)})")
    split = (row.get("split") or "").strip()
    if split not in SPLITS:
        raise DataError(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
    box = None
    box_cells = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
    z_cells = [(row.get(c) or "").strip() for c in BOX_Z_COLUMNS]
    if any(z_cells):
        if meta.ndim != 3:
            raise DataError(f"{where}: box slice range {z_cells} (box_z0, box_z1) given, but "
                            f"the dataset's images are 2D")
        if not all(z_cells):
            raise DataError(f"{where}: box slice range {z_cells} needs both box_z0 and box_z1")
        if not any(box_cells):
            raise DataError(f"{where}: box slice range {z_cells} without a box (box_x0, "
                            f"box_y0, box_x1, box_y1 are empty)")
    if any(box_cells):
        try:
            box = outward_box([float(c) for c in box_cells + [c for c in z_cells if c]])
        except (ValueError, OverflowError):  # OverflowError: 'inf'
            raise DataError(f"{where}: box {box_cells + [c for c in z_cells if c]} is not "
                            f"{'six' if any(z_cells) else 'four'} finite numbers") from None
        empty = _empty_box(box)
        if empty:
            raise DataError(f"{where}: {empty}")
    # a manifest written on Windows (by hand, or str() of a WindowsPath) separates folders
    # with backslashes: on Linux/macOS 'images\\a.png' named a missing file
    image = (row.get("image") or "").strip().replace("\\", "/")
    if not image:
        raise DataError(f"{where}: no image path")
    mask = (row.get("mask") or "").strip().replace("\\", "/") or None
    for what, rel in (("image", image), ("mask", mask)):
        _check_inside(rel, what, where)
    attrs = []
    for a in meta.attributes:
        cell = (row.get(f"attr_{a}") or "").strip()
        try:
            v = float(cell) if cell else float("nan")
        except ValueError:
            raise DataError(f"{where}: attribute {a} = '{cell}' is not a number") from None
        # attributes are binary targets (BCE, CCCE): 'inf' would turn the loss into NaN
        if not _binary_attribute(v):
            raise DataError(f"{where}: attribute {a} = '{cell}' is not in [0, 1] "
                            f"(binary attribute: 0, 1, or empty when not annotated)")
        attrs.append(v)
    return SampleRecord(
        id=sid, split=split, label=label, site=(row.get("site") or "").strip() or "0",
        image=image, mask=mask, box=box,
        attributes=attrs, group=(row.get(GROUP_COLUMN) or "").strip(),
    )


def _empty_box(box: Sequence[int]) -> str:
    """Why a whole-pixel box covers no pixel ('' when it covers some)."""
    if box[2] <= box[0] or box[3] <= box[1]:
        return f"empty box {tuple(box)} (need x1 > x0 and y1 > y0)"
    if len(box) == 6 and box[5] <= box[4]:
        return f"empty box slice range {tuple(box[4:])} (need z1 > z0)"
    return ""


def _binary_attribute(v: float) -> bool:
    """An attribute value the losses take (BCE, CCCE): 0..1, or NaN for "not annotated";
    'inf' would turn the loss into NaN."""
    return math.isnan(v) or 0.0 <= v <= 1.0


@contextmanager
def open_image(path: Path) -> Iterator:
    """``PIL.Image.open`` that refuses an image over ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 M
    pixels by default) with `DataError` naming the file, before any pixel is decoded. PIL
    itself only warns up to twice that limit and decodes: a 657 KB PNG declaring 13000 ×
    13000 RGBA took 13 s and 2.8 GB of memory to read. Raise the limit in Python for
    genuine images that large."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: refused as a possible decompression bomb ({exc}); "
                            f"raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine"
                            ) from None
    with im:
        yield im


def _check_inside(rel: str | None, what: str, where: str) -> None:
    """Manifest paths are relative to the dataset folder and stay inside it: an absolute
    path or one climbing out with '..' (a received dataset naming ~/.ssh/… or
    ../../other-study/…) is refused, so reading a dataset reads only its own folder. A
    symbolic link inside the folder is followed wherever it points: that is how datasets are
    assembled from shared storage, and its target is the resolved path in any message."""
    if rel is None:
        return
    norm = os.path.normpath(rel.replace("\\", "/"))
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise DataError(f"{where}: {what} path '{rel}' is outside the dataset folder "
                        f"(paths must be relative to it, without leading '..')")


def load_array(path: Path) -> np.ndarray:
    """Read an image or mask file as a numpy array (PNG/JPEG via PIL, NPY via numpy)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with open_image(path) as im:
            im.load()
            if im.mode in ("P", "CMYK", "LA", "RGBA"):
                im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
            return np.asarray(im)
    except DataError:
        raise
    except Exception as exc:  # corrupt/truncated files surface as many exception types
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


# Stored dtypes the cache keeps as they are, and what the float image divides them by:
# 8/16-bit PNGs read back as value / 255 or / 65535 (see `save_array`); int8/int16 (e.g. CT
# in HU) as their values. Their float32 conversion is exact per value, so converting a batch
# gives the same floats as converting the whole image on reading did.
_COMPACT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0,
                  np.dtype(np.int8): None, np.dtype(np.int16): None}


# files `load_array` reads through PIL, always as (H, W) or (H, W, C)
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})


def _stored_image(array: np.ndarray, ndim: int, path: Path) -> np.ndarray:
    """A stored array as (C, *spatial), validated: in its own dtype when that is one of
    `_COMPACT_SCALE`'s, else float32 (the values `to_float_image` returns)."""
    if array.dtype in _COMPACT_SCALE:
        out = array
    elif array.dtype.kind in "iuf":  # not bool, complex, timedelta, datetime, strings
        out = array.astype(np.float32)
    else:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}")
    if out.size == 0:
        raise DataError(f"{path}: empty image (shape {array.shape})")
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise DataError(f"{path}: {bad} NaN/inf pixel value(s)")
    if path.suffix.lower() in PIL_SUFFIXES:
        # PIL gives (H, W) or (H, W, C), always: the NPY guess below (channel-last only when
        # H > 4) read a 4-row RGB PNG as a 4-channel 6x3 image, and an RGB PNG in a volume
        # dataset as a (H, W, 3) volume, with `data check` saying ok. Only image suffixes:
        # an array handed to `to_float_image` under another name keeps the NPY reading
        if ndim != 2:
            raise DataError(f"{path}: a {path.suffix} file holds a 2D image; volumes "
                            f"(ndim: {ndim}) are read from .npy files")
        if out.ndim == 3:
            return np.ascontiguousarray(np.moveaxis(out[..., :3], -1, 0))
    if out.ndim == ndim:
        out = out[None]
    elif out.ndim == ndim + 1 and ndim == 2 and out.shape[-1] in (1, 3, 4) and out.shape[0] > 4:
        out = np.moveaxis(out[..., :3], -1, 0)  # HWC (PNG RGB, NPY (H,W,1)) → CHW
    elif out.ndim != ndim + 1:
        raise DataError(f"{path}: image has shape {array.shape}, expected {ndim} spatial "
                        f"dimensions (optionally with a channel axis)")
    return np.ascontiguousarray(out)


def to_float_image(array: np.ndarray, ndim: int, path: Path) -> np.ndarray:
    """Convert a stored array to float32 (C, *spatial) with intensities scaled to [0, 1]."""
    return _np_float_images(_stored_image(array, ndim, path))


def _np_float_images(a: np.ndarray) -> np.ndarray:
    """`_stored_image`'s array → float32 (the division as numpy does it, in float32)."""
    if a.dtype == np.float32:
        return a
    scale = _COMPACT_SCALE[a.dtype]
    return a.astype(np.float32) / scale if scale else a.astype(np.float32)


def _not_binary(mask: np.ndarray) -> bool:
    """Whether a mask holds more than one value besides 0 (or any negative value): binary
    masks are {0, v} for one v > 0, e.g. {0, 1} or {0, 255}."""
    # counted, not gathered: mask[mask > 0] copied every positive pixel of every mask, ~5 %
    # of reading a split of small PNGs
    if mask.dtype.kind not in "ub" and bool((mask < 0).any()):
        return True
    top = mask.max()
    if not top > 0:
        return False
    return int(np.count_nonzero(mask == top)) + int(np.count_nonzero(mask == 0)) != mask.size


def _holds_8bit_values(image: np.ndarray) -> bool:
    """An unscaled image (float or int32/64, read as float32; int8/int16, kept as stored)
    whose values look like 8-bit pixels: whole numbers in 0..255, not all 0/1. (HU-valued CT
    has negatives; float images in [0, 1] have max ≤ 1.)"""
    top = float(image.max())
    return (1.0 < top <= 255.0 and float(image.min()) >= 0.0
            and bool(np.array_equal(image, np.round(image))))


def _image_tensor(store: np.ndarray) -> Tensor:
    """The cache as a tensor; uint16 as its bits in int16 (torch < 2.3 has no uint16)."""
    return torch.from_numpy(store.view(np.int16) if store.dtype == np.uint16 else store)


def _float_images(x: Tensor, kind: np.dtype) -> Tensor:
    """Cached images (`_image_tensor` of an array of dtype `kind`) → float32, the values
    `to_float_image` gives. True division, not a multiplication by 1/255: that differs in the
    last bit for some values, and batches must equal the float images bit for bit."""
    if kind == np.float32:
        return x
    if kind == np.uint16:
        x = x.to(torch.int32).bitwise_and_(0xFFFF)  # the int16 bits back to 0..65535
    out = x.to(torch.float32)
    scale = _COMPACT_SCALE[kind]
    return out.div_(scale) if scale else out


class LesionDataset(Dataset):
    """One split of a dataset on disk, fully validated and cached in memory.

    Items are dicts of tensors: ``image`` (C, *spatial) float32, ``label`` long, ``mask``
    (1, *spatial) float32 (zeros when absent), ``has_mask`` bool, ``box_mask`` (1, *spatial)
    (the box when given, else the mask), ``attributes`` (p,) float32 with NaN where missing,
    ``attr_known`` (p,) bool, ``site`` long (index into `sites`), ``index`` long.

    Keys and layout follow MONAI's dictionary convention (``image``, ``label``, ``mask``,
    channel first), so ``transform``, a callable taking an item dict and returning one (a
    MONAI ``Compose`` of ``…d`` transforms, or a plain function), can augment or preprocess
    each item; it is applied to every item `__getitem__` and `batch` return. The trainer
    builds its own datasets without one.

    ``limit`` keeps only ``limit`` of the split's samples and reads only their files: a
    command that shows a few samples (`data synth`'s examples.png, `explain --limit 32`) read,
    decoded and validated all of a 20000-image split first. ``pick`` says which: "first"
    (manifest order) or "balanced" (`balanced_pick`: the classes in turn, each from its
    first, so a class-sorted manifest still shows every class), kept in manifest order.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[dict[str, Tensor]], Mapping] | None = None,
                 limit: int | None = None, pick: str = "first") -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"LesionDataset: limit must be a positive int or None, got "
                             f"{limit!r}")
        if pick not in PICKS:
            raise ValueError(f"LesionDataset: pick must be one of {', '.join(PICKS)}, got "
                             f"{pick!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"LesionDataset: transform must be a callable taking the item "
                            f"dict, got {type(transform).__name__}")
        self.transform = transform
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}"
                            + did_you_mean(split, SPLITS))
        self.split = split
        all_records = read_manifest(self.root, self.meta)
        self.sites = sorted({r.site for r in all_records}, key=_site_key)
        self.records = [r for r in all_records if r.split == split]
        if not self.records:
            raise DataError(f"{self.root / MANIFEST}: split '{split}' is empty")
        if pick == "balanced" and limit is not None:
            chosen = balanced_pick([r.label for r in self.records], limit)
            self.records = [self.records[i] for i in sorted(chosen)]
        else:
            self.records = self.records[:limit]
        self._load_all()

    # Loading everything once makes validation complete before training starts and keeps
    # epochs I/O free. The cache is compact, so that real sizes fit (paper 002's CUB, 6000 RGB
    # crops of 224 px: 0.9 GB as stored uint8, 3.6 GB as float32, plus 2 × 1.2 GB of float
    # masks): images in their stored integer dtype (see `_COMPACT_SCALE`), only the non-empty
    # masks, as bool, and boxes as coordinates; `batch` makes the float32 tensors per batch.
    def _load_all(self) -> None:
        n = len(self.records)
        store: np.ndarray | None = None  # (n, C, *spatial), filled in place: no 2nd copy
        # filled per sample as numpy arrays, made tensors once at the end: a torch call per
        # sample (index assignment, torch.tensor, .any()) costs microseconds each, ~10 % of
        # reading a split of small PNGs
        mask_store: np.ndarray | None = None  # (≤ n, 1, *spatial) bool, the non-empty masks
        mask_row = np.full((n,), -1, dtype=np.int64)  # row in mask_store, -1: none
        boxes = np.zeros((n, 6), dtype=np.int64)  # x0, y0, x1, y1, z0, z1
        has_box = np.zeros(n, dtype=bool)
        n_mask_files = sum(r.mask is not None for r in self.records)
        shape, first, used = None, None, 0
        # non-binary masks and unscaled images of 8-bit values: how many, and the first
        # (path, mask) / (path, stored dtype) to name (not every mask: the split's size)
        soft_masks: list = [0, None]
        float_bytes: list = [0, None]
        # the largest uint16 value and how many uint16 images: a split of 8-bit images saved
        # as 16-bit PNGs reads as 0..0.004 (uint16 scales by 65535)
        wide: list = [0, 0, None]
        for k, r in enumerate(self.records):
            ipath = self.root / r.image
            raw = load_array(ipath)
            img = _stored_image(raw, self.meta.ndim, ipath)
            # every image kept unscaled: float/int32 (read as float32) and int8/int16
            # (cached as stored); only uint8/uint16 are scaled to 0..1
            if _COMPACT_SCALE.get(img.dtype) is None and _holds_8bit_values(img):
                float_bytes[0] += 1
                float_bytes[1] = float_bytes[1] or (ipath, raw.dtype)
            elif img.dtype == np.uint16:
                wide[0], wide[1] = wide[0] + 1, max(wide[1], int(img.max()))
                wide[2] = wide[2] or ipath
            if shape is None:
                shape, first = img.shape, ipath
            elif img.shape[1:] == shape[1:] and img.shape[0] != shape[0]:
                # same size, other colour mode (a gray PNG among RGB ones): resizing, the
                # remedy for a size mismatch, would not help
                raise DataError(f"{ipath}: image has {img.shape[0]} channel(s), {first.name}, "
                                f"the split's first image, has {shape[0]} (store every image "
                                f"in one colour mode, e.g. import with --color rgb)")
            elif img.shape != shape:
                raise DataError(f"{ipath}: image shape {img.shape} differs from {first.name}'s "
                                f"{shape}, the split's first image (resize on import so all "
                                f"images match)")
            if store is None:
                store = np.empty((n, *shape), dtype=img.dtype)
            elif img.dtype != store.dtype:
                # stored dtypes differ within the split (8- and 16-bit PNGs): one float32
                # cache, holding the values each image's own conversion gives
                store, img = _np_float_images(store), _np_float_images(img)
            store[k] = img
            spatial = img.shape[1:]
            if r.mask is not None:
                mpath = self.root / r.mask
                m = load_array(mpath)
                if m.ndim == len(spatial) + 1 and m.shape[-1] in (3, 4):
                    m = m[..., :3].max(axis=-1)  # a mask drawn in any colour, not only red
                if tuple(m.shape) != tuple(spatial):
                    raise DataError(f"{mpath}: mask shape {tuple(m.shape)} does not match "
                                    f"image {ipath.name} shape {tuple(spatial)}")
                # only float masks can hold NaN/inf (the float64 copy of every integer mask
                # found nothing)
                if m.dtype.kind in "fc" and not np.isfinite(m.astype(np.float64)).all():
                    raise DataError(f"{mpath}: NaN/inf values in mask")
                # an all-zero mask annotates nothing: as the importers do, treat it as no
                # mask, since methods would otherwise read "the evidence is nowhere" and
                # penalise every pixel (see methods/_annotation.py); its (zero) mask is
                # what a sample without mask gets, so it needs no row
                if _not_binary(m):
                    soft_masks[0] += 1
                    soft_masks[1] = soft_masks[1] or (mpath, m)
                on = m > 0
                if on.any():
                    if mask_store is None:
                        mask_store = np.zeros((n_mask_files, 1, *spatial), dtype=bool)
                    mask_store[used, 0] = on
                    mask_row[k] = used
                    used += 1
            if r.box is not None:
                x0, y0, x1, y1 = r.box[:4]
                h, w = spatial[-2], spatial[-1]
                if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                    raise DataError(f"{self.root / MANIFEST}: sample {r.id}: box {r.box} "
                                    f"outside the image ({w}x{h})")
                # a box without slice range spans every slice of a volume (2D: unused)
                d = spatial[0] if len(spatial) == 3 else 1
                z0, z1 = r.box[4:] if len(r.box) == 6 else (0, d)
                if z0 < 0 or z1 > d:
                    raise DataError(f"{self.root / MANIFEST}: sample {r.id}: box slice range "
                                    f"{z0}..{z1} outside the volume ({d} slices, 0..{d})")
                boxes[k] = (x0, y0, x1, y1, z0, z1)
                has_box[k] = True
        assert store is not None and shape is not None  # the split is not empty
        self._warn_values(soft_masks, n_mask_files, float_bytes, wide)
        if mask_store is None or used < len(mask_store):  # all-zero masks left rows unused
            mask_store = (mask_store[:used].copy() if mask_store is not None
                          else np.zeros((0, 1, *shape[1:]), dtype=bool))
        self._images, self._kind = _image_tensor(store), store.dtype
        self._masks = torch.from_numpy(mask_store)
        self._mask_row = torch.from_numpy(mask_row)
        self._boxes, self._has_box = torch.from_numpy(boxes), torch.from_numpy(has_box)
        self.has_mask = self._mask_row >= 0
        self.has_box_or_mask = self.has_mask | self._has_box
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)
        p = len(self.meta.attributes)
        attrs = np.array([r.attributes for r in self.records], np.float32).reshape(len(self), p)
        self.attributes = torch.from_numpy(attrs)
        self.site_index = torch.tensor([self.sites.index(r.site) for r in self.records])

    def restricted(self, positions: Tensor | Sequence[int]) -> LesionDataset:
        """A copy of this split holding only the samples at ``positions`` (what a
        ``torch.utils.data.Subset`` of it iterates), for the statistics methods fit in
        `setup`: per-pixel scales, the latent autoencoder, CCCE attribution. Its `batch`
        numbers samples 0..len−1; the items a Subset yields keep this split's positions as
        ``index``, so tables keyed by them map rows back through ``source_positions`` (this
        split's positions of the copy's rows) into ``source_len`` (this split's size) rows."""
        pos = self._positions(torch.as_tensor(positions, dtype=torch.long).reshape(-1))
        view = copy.copy(self)
        view.records = [self.records[i] for i in pos.tolist()]
        view._images = self._images[pos]
        view._mask_row, view._boxes, view._has_box = (self._mask_row[pos], self._boxes[pos],
                                                      self._has_box[pos])
        for name in ("has_mask", "has_box_or_mask", "labels", "attributes", "site_index"):
            setattr(view, name, getattr(self, name)[pos])
        view.source_positions = getattr(self, "source_positions", torch.arange(len(self)))[pos]
        view.source_len = getattr(self, "source_len", len(self))
        return view

    def _warn_values(self, soft_masks: list, n_mask_files: int, float_bytes: list,
                     wide: list) -> None:
        """Say so when the stored values are probably not what the files mean. Both cases
        load without error and train quietly on something else: a soft, probability or
        JPEG-saved mask counts every positive pixel as annotated (a JPEG's ringing marks
        pixels far from the lesion), 8-bit values saved as float reach the model as
        0..255 where an 8-bit PNG gives 0..1, and as 16-bit PNGs as 0..0.004."""
        where = f"{self.root}, split '{self.split}'"
        if soft_masks[0]:
            path, m = soft_masks[1]
            levels = np.unique(m)
            shown = (f"{len(levels)} distinct values from {m.min():g} to {m.max():g}"
                     if len(levels) > 4
                     else "values " + ", ".join(f"{v:g}" for v in levels.tolist()))
            warnings.warn(f"{where}: {soft_masks[0]} of {n_mask_files} masks are not binary "
                          f"(e.g. {path.name}: {shown}); "
                          f"every pixel > 0 counts as annotated, so threshold soft, "
                          f"probability or JPEG-saved masks (and store masks as PNG) first",
                          stacklevel=4)
        if float_bytes[0]:
            path, dtype = float_bytes[1]
            warnings.warn(f"{where}: {float_bytes[0]} of {len(self.records)} images hold "
                          f"whole numbers up to 255 stored as {dtype} (e.g. {path.name}): "
                          f"such images are used as stored, so the model sees 0..255 where "
                          f"uint8 files read as 0..1; divide them by 255 or store them as "
                          f"uint8", stacklevel=4)
        # only when every image is uint16 and none exceeds 255: one dark 16-bit image among
        # bright ones is no sign of 8-bit data
        if wide[0] == len(self.records) and 1 < wide[1] <= 255:
            warnings.warn(f"{where}: all {wide[0]} images are uint16 with values only up to "
                          f"{wide[1]} (e.g. {wide[2].name}): uint16 files read as value/65535, "
                          f"so the model sees 0..{wide[1] / 65535:.2g}; store 8-bit images as "
                          f"uint8 (they then read as 0..1)", stacklevel=4)

    # Whole-split float32 tensors, for the few callers that need every image at once
    # (per-pixel distance scales, autoencoder training): each access builds a new tensor of
    # the split's full float size, so loops should index `batch` instead.
    @property
    def images(self) -> Tensor:
        """(N, C, *spatial) float32 images, intensities as `to_float_image` scales them."""
        # a float32 cache would be returned as it is: a caller normalising it in place
        # (``ds.images.sub_(mean)``) would change every later item
        out = _float_images(self._images, self._kind)
        return out.clone() if out is self._images else out

    def image_batch(self, idx: Tensor) -> Tensor:
        """Float32 images (len(idx), C, *spatial) at split positions ``idx``, as `images`
        has them, untransformed: the images alone, without `batch`'s masks and boxes."""
        return _float_images(self._images[torch.as_tensor(idx, dtype=torch.long)], self._kind)

    @property
    def masks(self) -> Tensor:
        """(N, 1, *spatial) float32 masks, zeros where a sample has none."""
        return self._mask_batch(torch.arange(len(self)))

    @property
    def box_masks(self) -> Tensor:
        """(N, 1, *spatial) float32: the box where one is given, else the mask."""
        idx = torch.arange(len(self))
        return self._box_batch(idx, self._mask_batch(idx))

    @property
    def stored_dtype(self) -> np.dtype:
        """The dtype the image cache keeps (uint8 for 8-bit PNGs; see `_COMPACT_SCALE`)."""
        return np.dtype(self._kind)

    def pixel_columns(self, start: int, stop: int, stored: bool = False) -> Tensor:
        """Pixels ``start:stop`` of every image flattened to C·spatial values: (N, stop −
        start), float32 as `images` has them, or with ``stored`` in the cache's dtype (a
        uint16 cache as its int16 bits). For per-pixel statistics over the split (the scaled
        distances') without its whole float copy."""
        cols = self._images.reshape(len(self), -1)[:, start:stop]
        if stored or self._kind == np.float32:
            return cols.clone()  # a copy, never a view a caller could edit the cache through
        return _float_images(cols, self._kind)

    def regions_cover_image(self, region: str = "mask", box_fallback: bool = False) -> bool:
        """True when the split has an annotated sample and every annotated sample's region
        covers its whole image: ``region`` "mask" the pixel masks (with ``box_fallback``, the
        box of a sample without a mask, as the baselines' `annotation_region`), "box" the box
        where one is given, else the mask (as `box_masks`). No pixel then lies outside any
        region, so an alignment loss on the outside (causal-align's Eq. 3) is 0 for every
        sample."""
        full_row = self._masks.flatten(1).all(1)  # per stored mask (bool cache: cheap)
        mask_full = torch.zeros(len(self), dtype=torch.bool)
        mask_full[self.has_mask] = full_row[self._mask_row[self.has_mask]]
        if region == "mask" and not box_fallback:
            annotated, full = self.has_mask, mask_full
        else:
            spatial = self.image_shape[1:]
            h, w = spatial[-2], spatial[-1]
            d = spatial[0] if len(spatial) == 3 else 1
            x0, y0, x1, y1, z0, z1 = self._boxes.unbind(-1)
            box_full = (x0 <= 0) & (y0 <= 0) & (x1 >= w) & (y1 >= h) & (z0 <= 0) & (z1 >= d)
            annotated = self.has_box_or_mask
            full = torch.where(self.has_mask, mask_full, box_full) if region == "mask" \
                else torch.where(self._has_box, box_full, mask_full)
        return bool(annotated.any()) and bool(full[annotated].all())

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    def __len__(self) -> int:
        return len(self.records)

    def content_digest(self) -> str:
        """SHA-256 (hex) of what this split trains or scores on: the stored pixels (in their
        stored dtype), masks, boxes, labels, attributes and sites, shapes included.
        `dataset_digest` reads only dataset.yaml and manifest.csv, so images reprocessed in
        place under the same names went unrecorded. Hashes the in-memory cache (no second
        read of the files); the same files give the same digest on any machine."""
        digest = hashlib.sha256(f"{self.split}:{np.dtype(self._kind).str}".encode())
        for t in (self._images, self._masks, self._mask_row, self._boxes, self._has_box,
                  self.labels, self.attributes, self.site_index):
            arr = np.ascontiguousarray(t.numpy())
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            if arr.size:  # a dataset without attributes (or masks) has (N, 0) arrays,
                digest.update(memoryview(arr).cast("B"))  # which memoryview cannot cast
        return digest.hexdigest()

    def __getitem__(self, i: int | slice | Sequence[int] | np.ndarray | Tensor
                    ) -> dict[str, Tensor]:
        """One item for an integer (Python, numpy or 0-d tensor; negative counts from the
        end), a batch (as `batch` gives it) for a slice, an integer sequence/array/tensor or a
        boolean mask over the split. ``item["index"]`` is always the position in the split."""
        return self.batch(self._positions(i))

    def _positions(self, i: object) -> Tensor:
        """`__getitem__`'s index as long positions 0..n-1: out of range → IndexError, a
        non-integer → TypeError (a bool selected the whole split with an extra axis, a float
        or str failed inside torch with an unrelated message, ``index`` kept -1 or int32)."""
        n = len(self)
        if isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
            if not -n <= i < n:  # the common case (a sampler's int), without tensor ops
                raise IndexError(f"index {i} is out of range for the '{self.split}' split "
                                 f"of {n} samples")
            return torch.tensor(int(i) % n)
        if isinstance(i, slice):
            return torch.arange(n)[i]
        idx = None
        if i is not None and not isinstance(i, (str, bytes)):
            try:
                idx = torch.as_tensor(i)
            except (TypeError, ValueError, RuntimeError):  # e.g. a list of str, a dict
                idx = None
            if idx is not None and idx.numel() == 0 and idx.dtype != torch.bool:
                idx = idx.long()  # ``[]`` is a float tensor: an empty selection, not floats
        if idx is not None and idx.dtype == torch.bool and idx.shape == (n,) \
                and not isinstance(i, (bool, np.bool_)):
            return idx.nonzero().squeeze(1)  # a boolean mask over the split
        if idx is None or idx.dtype == torch.bool or idx.is_floating_point() \
                or idx.is_complex():
            raise TypeError(f"LesionDataset index must be an integer, a slice, integers or a "
                            f"boolean mask of length {n}, got {type(i).__name__} {i!r:.60}")
        idx = idx.to("cpu", torch.long)
        bad = (idx < -n) | (idx >= n)
        if bool(bad.any()):
            raise IndexError(f"index {int(idx[bad].reshape(-1)[0])} is out of range for the "
                             f"'{self.split}' split of {n} samples")
        return torch.where(idx < 0, idx + n, idx)

    def _mask_batch(self, idx: Tensor) -> Tensor:
        """float32 masks for `idx` (any index `Tensor.__getitem__` takes), zeros where none."""
        rows = self._mask_row[idx]
        flat = rows.reshape(-1)
        present = flat >= 0
        if bool(present.all()):  # the usual case in a fully annotated split: one gather
            out = self._masks[flat].to(torch.float32)
        else:
            out = torch.zeros((len(flat), *self._masks.shape[1:]), dtype=torch.float32)
            sel = present.nonzero().squeeze(1)
            if len(sel):
                out[sel] = self._masks[flat[sel]].to(torch.float32)
        return out.reshape(*rows.shape, *out.shape[1:])

    def _box_batch(self, idx: Tensor, masks: Tensor) -> Tensor:
        """Box masks for `idx`: 1 inside the box (in a volume, on the slices of its slice
        range: every slice for a 4-number box) where a box is given, else a copy of `masks`
        (a copy: a caller editing one must not edit the other)."""
        has = self._has_box[idx]
        if not bool(has.any()):
            return masks.clone()
        x0, y0, x1, y1, z0, z1 = self._boxes[idx].unbind(-1)
        h, w = masks.shape[-2:]
        ys = torch.arange(h)
        xs = torch.arange(w)
        rows = ((ys >= y0[..., None]) & (ys < y1[..., None])).to(torch.float32)  # (*idx, H)
        cols = ((xs >= x0[..., None]) & (xs < x1[..., None])).to(torch.float32)  # (*idx, W)
        extra = masks.dim() - has.dim() - 2  # channel (+ depth) axes the box spans
        lead = (*has.shape, *([1] * extra))
        rect = rows.reshape(*lead, h, 1) * cols.reshape(*lead, 1, w)  # 0/1: exact
        if extra == 2:  # a volume (channel, depth): only the box's slices; 2D is unchanged
            d = masks.shape[-3]
            zs = torch.arange(d)
            depth = ((zs >= z0[..., None]) & (zs < z1[..., None])).to(torch.float32)
            rect = rect * depth.reshape(*has.shape, 1, d, 1, 1)
        if bool(has.all()):
            return rect.expand_as(masks).contiguous()
        return torch.where(has.reshape(*lead, 1, 1), rect, masks)

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        """Items for an index tensor (a scalar gives one sample, a vector a batch); indexing
        the cached tensors directly is much faster than collating per-sample dicts. Images
        and masks become float32 here, from the compact cache. Every tensor returned is new:
        editing it in place leaves the dataset as it was. With a `transform`, each sample
        goes through it and the results are collated (``default_collate``)."""
        if idx.dim() == 0:
            # a 0-d index selects views of the cache (label, flags, site, a float32 image)
            # where a vector copies: an item edited in place, by a transform say, changed
            # the split for good. Copying one item's tensors is cheaper than a 1-element
            # vector index (which doubled the time per item)
            item = {k: v.clone() for k, v in self._gather(idx).items()}
            return self._transformed(item)
        if self.transform is None or idx.numel() == 0:  # an empty batch: nothing to transform
            return self._gather(idx)
        flat = idx.reshape(-1)
        items = [self.batch(j) for j in flat]  # each a 0-d index: one item, transformed
        out = default_collate(items)
        return {k: v.reshape(*idx.shape, *v.shape[1:]) if isinstance(v, Tensor) else v
                for k, v in out.items()}

    def _transformed(self, item: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.transform is None:
            return item
        out = self.transform(item)
        if not isinstance(out, Mapping):  # e.g. a transform written for images, not dicts
            name = getattr(self.transform, "__name__", type(self.transform).__name__)
            raise TypeError(f"LesionDataset transform {name} returned "
                            f"{type(out).__name__}, expected the item dict (keys "
                            f"{', '.join(item)})")
        return dict(out)

    def _gather(self, idx: Tensor) -> dict[str, Tensor]:
        """`batch` without transform, for an index tensor of any shape: the cache's items."""
        attrs = self.attributes[idx]
        masks = self._mask_batch(idx)
        return {
            "image": _float_images(self._images[idx], self._kind),
            "label": self.labels[idx],
            "mask": masks,
            "has_mask": self.has_mask[idx],
            "box_mask": self._box_batch(idx, masks),
            "has_annotation": self.has_box_or_mask[idx],
            "attributes": torch.nan_to_num(attrs, nan=0.0),
            "attr_known": ~torch.isnan(attrs),
            "site": self.site_index[idx],
            "index": idx,
        }


def check_split_channels(ds: LesionDataset, channels: int, whose: str) -> None:
    """Refuse a split whose images have another channel count than ``channels`` (the
    training split's, or the run's model's), in one line: each split is checked only
    within itself on loading, so a gray training split and an RGB validation split trained
    a whole epoch and then failed inside the first convolution (a traceback)."""
    have = ds.image_shape[0]
    if have != channels:
        raise DataError(f"{ds.root}: split '{ds.split}' has {have}-channel images, {whose} "
                        f"{channels} (store every split in one colour mode, e.g. import with "
                        f"--color rgb or --color gray)")


def split_leaks(datasets: Sequence[LesionDataset], examples: int = 3) -> list[str]:
    """What ties the splits together, one line per kind (none: []): groups (patients, from
    the manifest's ``group`` column) with samples in more than one split, and images whose
    pixels equal those of an image in another split (a copied file, a re-exported study).
    Either inflates validation and test scores; `causalign data check` prints them."""
    where: dict[str, dict[str, list[str]]] = {}
    by_pixels: dict[bytes, list[tuple[str, str]]] = {}
    constant: set[bytes] = set()  # blank images: equal by having no content, not a copy
    for ds in datasets:
        for r in ds.records:
            if r.group:
                where.setdefault(r.group, {}).setdefault(ds.split, []).append(r.id)
        # the float32 pixels the model sees, so one image stored as 8-bit PNG and as NPY
        # still matches; in chunks of ~64 MB, not the whole split as float32 at once (256
        # volumes of 4 x 32 x 128 x 128 would be 2 GB)
        chunk = max(1, (64 << 20) // (4 * math.prod(ds.image_shape)))
        for start in range(0, len(ds), chunk):
            idx = torch.arange(start, min(start + chunk, len(ds)))
            images = ds.batch(idx)["image"].numpy()
            for k, img in zip(idx.tolist(), images, strict=True):
                key = hashlib.blake2b(np.ascontiguousarray(img).tobytes(),
                                      digest_size=16).digest()
                by_pixels.setdefault(key, []).append((ds.split, ds.records[k].id))
                if key not in constant and img.size and img.min() == img.max():
                    constant.add(key)
    lines = []
    mixed = {g: s for g, s in where.items() if len(s) > 1}
    if mixed:
        shown = ", ".join(f"{g} ({', '.join(sp for sp in SPLITS if sp in s)})"
                          for g, s in sorted(mixed.items())[:examples])
        more = f", … (+{len(mixed) - examples})" if len(mixed) > examples else ""
        lines.append(f"{len(mixed)} group(s) have samples in more than one split (patient-"
                     f"level leakage): {shown}{more}")
    def first_per_split(ids: list[tuple[str, str]]) -> str:
        # one id of each split: the first three copies could all be in train
        return " = ".join(f"{sp}/{next(i for s, i in ids if s == sp)}"
                          for sp in SPLITS if any(s == sp for s, _ in ids))

    shared = {key: ids for key, ids in by_pixels.items() if len({sp for sp, _ in ids}) > 1}
    copies = [ids for key, ids in shared.items() if key not in constant]
    if copies:
        shown = ", ".join(first_per_split(ids) for ids in copies[:examples])
        more = f", … (+{len(copies) - examples})" if len(copies) > examples else ""
        lines.append(f"{len(copies)} image(s) have pixels identical to an image of another "
                     f"split: {shown}{more}")
    # constant (e.g. all-black) images are identical wherever they are: no patient leaks
    # through them, but a blank image is worth a look (a failed export, an empty slice)
    blank = [ids for key, ids in shared.items() if key in constant]
    if blank:
        n = sum(len(ids) for ids in blank)
        shown = ", ".join(first_per_split(ids) for ids in blank[:examples])
        lines.append(f"{n} image(s) in more than one split are constant (every pixel one "
                     f"value, e.g. blank): not a copied image, but check they belong in the "
                     f"data: {shown}")
    return lines


def _site_key(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


def dataset_summary(root: str | Path) -> dict:
    """Counts per split and class, mask coverage: what `causalign data info` prints."""
    meta = read_meta(root)
    recs = read_manifest(root, meta)
    out: dict = {"name": meta.name, "classes": meta.classes, "attributes": meta.attributes}
    for split in SPLITS:
        rs = [r for r in recs if r.split == split]
        out[split] = {
            "n": len(rs),
            "per_class": {c: sum(r.label == k for r in rs) for k, c in enumerate(meta.classes)},
            "with_mask": sum(r.mask is not None for r in rs),
            "with_box": sum(r.box is not None for r in rs),
        }
    return out


def ensure_empty_or_missing(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``path`` (but for the writer's own lock file) unless ``overwrite``."""
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()) and not overwrite:
        raise DataError(f"{path}: output folder exists and is not empty (use --overwrite)")
    os.makedirs(path, exist_ok=True)


def as_training_split(train_set: object) -> object:
    """``train_set`` for a method's `setup`: a ``torch.utils.data.Subset`` (nested ones too,
    as ``random_split`` makes them) of a `LesionDataset` becomes that split `restricted` to
    the subset's samples; anything else is returned as it is. A user loop that held out a
    validation part with ``random_split`` failed in setup with "'Subset' object has no
    attribute 'images'" (scaled distances, the latent space) or "'attributes'" (hier-align);
    the full split instead would fit those statistics on the held-out samples too."""
    from torch.utils.data import Subset

    if not isinstance(train_set, Subset):
        return train_set
    indices: list[int] | None = None
    ds: object = train_set
    while isinstance(ds, Subset):
        outer = [int(i) for i in ds.indices]
        indices = outer if indices is None else [outer[i] for i in indices]
        ds = ds.dataset
    if not isinstance(ds, LesionDataset) or indices is None:
        return train_set
    return ds.restricted(torch.tensor(indices, dtype=torch.long))
