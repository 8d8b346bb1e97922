"""Helpers shared by the importers: optional libraries, image reading/resizing, masks, boxes,
intensity normalisation, perceptual hashing and group-level splits."""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ..format import open_image

# --------------------------------------------------------------------------- errors / libraries


class SkipItem(Exception):
    """One source item cannot be imported: recorded in the summary with `reason`, never fatal.

    `reason` is a short category counted in the summary ("unreadable DICOM", "missing mask");
    `detail` says which file and what went wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_EXTRA_OF = {"pydicom": "pydicom", "nibabel": "nibabel"}


def require(module: str, kind: str) -> Any:
    """Import an optional library or raise one clear line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = _EXTRA_OF.get(module, module)
        raise DataError(f"importing {kind} data needs the '{pkg}' package, which is not installed: "
                        f"pip install 'causalign[medical]'") from None


def safe_id(text: str) -> str:
    """A sample id usable as a file name: letters, digits, '.', '-', '_' only."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return out or "sample"


class UsedIds(set):
    """The (casefolded) ids taken so far, for `unique_id`, remembering per base id the last
    suffix handed out: names that all map to one id (non-ASCII file names → 'sample')
    would otherwise retry `_1`, `_2`, … from the start each time, O(n²) for n such names."""

    def __init__(self, *args: Iterable[str]) -> None:
        super().__init__(*args)
        self.last_suffix: dict[str, int] = {}


def unique_id(sid: str, used: set[str]) -> str:
    """`sid`, or `sid_1`, `sid_2`… when taken; records the result in `used`.

    Compared case-insensitively, since ids become file names ('A.png' and 'a.png' are one
    file on macOS/Windows), and a generated suffix is checked too: 'img 1', 'img_1' and
    'img_1_1' must not end up as two samples with one id. With a `UsedIds` the search
    resumes after the last suffix given to `sid` (ids are only ever added, so every smaller
    suffix is still taken): the same ids as a plain set, in linear time."""
    last = getattr(used, "last_suffix", None)
    key = sid.casefold()
    k = last.get(key, 0) if last is not None else 0
    out = f"{sid}_{k}" if k else sid
    while out.casefold() in used:
        k += 1
        out = f"{sid}_{k}"
    used.add(out.casefold())
    if last is not None:
        last[key] = k
    return out


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk` (top-down, names sorted) that follows symlinked folders, each real folder
    once. Datasets are often assembled from links (SRC/CBIS-DDSM → /mnt/…, one link per
    patient); plain os.walk and Path.rglob skip those silently. A caller may prune
    `dirnames` in place, as with os.walk."""
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:  # a link loop, or a folder reached twice
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        yield Path(dirpath), dirnames, sorted(filenames)


def rel(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it (for messages), else the full path."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV file, names and cells stripped, a leading BOM dropped.

    A file that is not UTF-8 (e.g. saved as Latin-1/cp1252 by a spreadsheet), not CSV, or not
    a file raises DataError naming it, instead of a UnicodeDecodeError traceback."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [(c or "").strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()
                     if isinstance(v, str) or v is None} for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                        f"offset {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:  # NUL bytes, unterminated quotes …
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None
    except OSError as exc:  # a folder named like the CSV, no permission …
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return cols, rows


# --------------------------------------------------------------------------- reading images

# The most voxels a DICOM or NIfTI header may declare (2^28: 1 GiB as float32, far above a
# CT series' 512 x 512 x 600). Their pixels are decoded into an array of the declared size
# before the file is found short: a 1.1 KB .nii.gz declaring 1000^3 float32 took 28 s and
# 4.4 GB before it was reported damaged, and 2000^3 would exhaust the memory.
MAX_VOXELS = 1 << 28


def check_voxels(shape: Sequence[int], path: Path, what: str) -> None:
    """SkipItem("too large") when a header's ``shape`` holds more than `MAX_VOXELS`."""
    n = math.prod(int(v) for v in shape)
    if n > MAX_VOXELS:
        raise SkipItem(f"{what} too large", f"{path}: header declares shape "
                       f"{tuple(int(v) for v in shape)} ({n} voxels, over the limit of "
                       f"{MAX_VOXELS}, causalign.data.importers.util.MAX_VOXELS)")



IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".dcm")
_PIL_INT_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit (and 32-bit integer) gray images


@dataclass(frozen=True)
class IntensityScale:
    """How one import maps pixel values that are not 8-bit to [0, 1] — the same rule for
    every image of the import, so brightness never depends on an image's own content.

    - 8-bit sources (uint8 NPY, 8-bit PNG/JPEG/BMP/TIFF): value / 255, always.
    - Unsigned integer sources of more than 8 bits (16-bit PNG/TIFF, uint16 NPY): value /
      `int_max`, where `int_max` = 2^bits − 1 for the smallest bit depth (≥ 8) that holds
      the largest value of all such images of the import (`scan_intensity`): 12-bit data
      stored in 16-bit files (mammograms, ultrasound exports) spans [0, 1], and a dark
      image stays dark next to a bright one.
    - Float (and signed integer) NPY / float TIFF sources: kept as they are when every
      such image of the import lies within [0, 1]; otherwise (value − lo) / (hi − lo) with
      lo/hi the minimum/maximum over all of them (`float_range`).

    `high_depth` is true when some source has more than 8 bits; the runner then stores PNG
    outputs with 16 bits instead of 8 so that precision survives the import.
    """

    int_max: float | None = None  # None: no such source (a file read later: its dtype's max)
    float_range: tuple[float, float] | None = None  # None: floats kept (all within [0, 1])
    has_float: bool = False

    @property
    def high_depth(self) -> bool:
        return self.int_max is not None or self.has_float

    def to_record(self) -> dict[str, Any]:
        """For dataset.yaml (info.intensity_scale) and a run's config: `causalign predict`
        maps new files with the rule the training import used, not one taken over them."""
        return {"int_max": self.int_max,
                "float_range": None if self.float_range is None else list(self.float_range),
                "has_float": self.has_float}

    @classmethod
    def from_record(cls, record: object) -> IntensityScale | None:
        """The scale `to_record` wrote, or None for anything else (an older dataset)."""
        if not isinstance(record, dict) or set(record) != {"int_max", "float_range",
                                                           "has_float"}:
            return None
        top, rng, has_float = record["int_max"], record["float_range"], record["has_float"]
        number = (int, float)
        if not (top is None or (isinstance(top, number) and top > 0)) \
                or not isinstance(has_float, bool):
            return None
        if rng is not None and not (isinstance(rng, list) and len(rng) == 2
                                    and all(isinstance(v, number) for v in rng)
                                    and rng[0] < rng[1]):
            return None
        return cls(int_max=None if top is None else float(top),
                   float_range=None if rng is None else (float(rng[0]), float(rng[1])),
                   has_float=has_float)

    def describe(self) -> str:
        """One line for dataset.yaml (info.intensity)."""
        parts = ["8-bit sources: value / 255"]
        if self.int_max is not None:
            parts.append(f"integer sources above 8 bits: value / {int(self.int_max)} "
                         f"({int(self.int_max).bit_length()}-bit depth, the smallest that "
                         f"holds the largest value of the import)")
        if self.float_range is not None:
            lo, hi = self.float_range
            parts.append(f"float sources: (value - {lo:g}) / ({hi:g} - {lo:g}), the range "
                         f"of all float images of the import")
        elif self.has_float:
            parts.append("float sources: kept (all within [0, 1])")
        return "; ".join(parts)


def _depth_of(max_value: float) -> float:
    """2^bits − 1 for the smallest bit depth ≥ 8 that holds `max_value` (4000 → 4095)."""
    bits = max(8, int(max(max_value, 0)).bit_length())
    return float(2 ** bits - 1)


def scan_intensity(paths: Iterable[Path]) -> IntensityScale:
    """The import-wide `IntensityScale` of these image files: one pass that reads only
    headers for 8-bit files (PIL opens lazily, NPY through a memory map) and the pixels of
    the others once (their maximum, or float range). Unreadable files are left to
    `read_image`, which reports them when the unit is processed."""

    int_top, lo, hi = -1.0, math.inf, -math.inf
    has_float = False
    for path in dict.fromkeys(Path(p) for p in paths):  # each file once, in order
        try:
            if path.suffix.lower() == ".dcm":
                arr, unsigned = _dicom_values(path)
                if unsigned:
                    int_top = max(int_top, float(arr.max()))
                    continue
            elif path.suffix.lower() == ".npy":
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if arr.dtype == np.uint8 or not np.issubdtype(arr.dtype, np.number) \
                        or arr.size == 0:
                    continue
                if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] > 4:
                    arr = arr[..., :3]  # as _npy_to_float: an alpha channel is dropped
                arr = np.asarray(arr)
            else:
                with open_image(path) as im:  # reads the header only
                    if im.mode not in (*_PIL_INT_MODES, "F"):
                        continue
                    im.load()
                    arr = np.asarray(im)
        except Exception:  # noqa: BLE001 - reported per item by read_image
            continue
        # PIL's integer modes (16-bit PNG/TIFF) count as unsigned, as read_image clips at 0
        if np.issubdtype(arr.dtype, np.unsignedinteger) or (
                arr.dtype.kind == "i" and path.suffix.lower() != ".npy"):
            int_top = max(int_top, float(arr.max()))
        else:
            vals = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
            has_float = True
            if vals.size:
                lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
    rng = None if not has_float or (lo >= 0.0 and hi <= 1.0) else (lo, hi)
    return IntensityScale(int_max=_depth_of(int_top) if int_top >= 0 else None,
                          float_range=rng, has_float=has_float)


EXIF_NOTE = ("file with an EXIF orientation tag read as stored, not turned (as PIL and "
             "torchvision read it): check its annotation was drawn on the stored pixels")


def _note_exif(im, note: Callable[[str], None] | None) -> None:
    """Count a file whose EXIF orientation (tag 274) asks viewers to turn it. Its pixels are
    kept as stored, the convention of PIL, torchvision and most annotation files (CUB's boxes
    are in stored pixels), but a mask drawn on the turned view would then sit elsewhere:
    the import summary says how many such files there were."""
    if note is None:
        return
    try:
        turned = im.getexif().get(274, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is no orientation
        turned = False
    if turned:
        note(EXIF_NOTE)


def read_image(path: Path, mode: str = "L", scale: IntensityScale | None = None,
               note: Callable[[str], None] | None = None) -> np.ndarray:
    """Read PNG/JPEG/BMP/TIFF (via PIL), NPY or 2D DICOM (`_dicom_values`) as float32 in
    [0, 1]: mode "L" → (H,W) gray,
    "RGB" → (3,H,W). 8-bit files: value / 255. Deeper files follow `scale`, the import's
    one rule (see `IntensityScale`, built by `scan_intensity`); without it (a single file
    read on its own) the declared depth: 16-bit / 65535, uint32 NPY / 2^32 − 1, and float
    arrays outside [0, 1] min-max scaled on their own.
    ``note`` (an importer's `Importer.note`) counts files with an EXIF orientation tag.
    Raises SkipItem("missing file" | "unreadable image")."""
    if not path.exists():
        raise SkipItem("missing file", str(path))
    if path.suffix.lower() == ".dcm":
        arr, unsigned = _dicom_values(path)
        if not unsigned:  # HU and other signed / fractional values: the float rule
            return _npy_to_float(arr, mode, path, scale)
        top = scale.int_max if scale is not None and scale.int_max else _depth_of(arr.max())
        out = np.clip(arr / np.float32(top), 0.0, 1.0)
        return np.stack([out] * 3) if mode == "RGB" else out
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise SkipItem("unreadable image", f"{path}: {type(exc).__name__}: {exc}") from None
        return _npy_to_float(arr, mode, path, scale)

    try:
        with open_image(path) as im:
            im.load()
            _note_exif(im, note)
            if im.mode in _PIL_INT_MODES:
                # not im.convert(): PIL clips 16-bit values to 255 when converting to L/RGB
                top = scale.int_max if scale is not None and scale.int_max else 65535.0
                arr = np.clip(np.asarray(im).astype(np.float32) / np.float32(top), 0, 1)
                return np.stack([arr] * 3) if mode == "RGB" else arr
            if im.mode == "F":  # 32-bit float TIFF: as a float NPY (convert() clips it)
                return _npy_to_float(np.asarray(im), mode, path, scale)
            im = im.convert(mode)
            arr = np.asarray(im).astype(np.float32) / 255.0
    except SkipItem:
        raise
    except DataError as exc:  # over PIL's pixel limit (`open_image`)
        raise SkipItem("image too large", str(exc)) from None
    except Exception as exc:  # PIL raises many types for truncated/corrupt files
        raise SkipItem("unreadable image", f"{path}: {type(exc).__name__}: {exc}") from None
    return np.moveaxis(arr, -1, 0).copy() if arr.ndim == 3 else arr


def _dicom_values(path: Path) -> tuple[np.ndarray, bool]:
    """A 2D DICOM's pixel values in physical units (`dicom.read_pixels`: rescaled,
    MONOCHROME1 inverted) as float32, and whether they are unsigned integers (then scaled as
    a 16-bit PNG's, by the import's bit depth; otherwise, e.g. CT in HU, as a float NPY's).
    Raises SkipItem."""
    from .dicom import pydicom_module, read_pixels

    arr, _ = read_pixels(pydicom_module("folder"), path)
    unsigned = bool(arr.min() >= 0) and bool((arr == np.round(arr)).all())
    return arr, unsigned


def _npy_to_float(arr: np.ndarray, mode: str, path: Path,
                  scale: IntensityScale | None = None) -> np.ndarray:
    """An NPY array as float32 in [0, 1] by the rule of `read_image` / `IntensityScale`."""
    # channel-last (H, W, 1|3|4), as `format.to_float_image` reads it; (H, W, 1) was taken
    # as an H-channel image of size W × 1
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] > 4:
        arr = np.moveaxis(arr[..., :3], -1, 0)
    if arr.ndim not in (2, 3):
        raise SkipItem("unsupported image", f"{path}: array of shape {arr.shape} is not 2D")
    if not np.issubdtype(arr.dtype, np.number):
        raise SkipItem("unsupported image", f"{path}: dtype {arr.dtype}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.unsignedinteger):  # uint16 (12/16-bit data), uint32 …
        top = (scale.int_max if scale is not None and scale.int_max
               else float(np.iinfo(arr.dtype).max))
        out = np.clip(arr.astype(np.float32) / np.float32(top), 0.0, 1.0)
    else:
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise SkipItem("NaN/inf pixels", str(path))
        if scale is not None:
            if scale.float_range is not None:  # the import's range, not this image's
                lo, hi = scale.float_range
                out = (out - np.float32(lo)) / np.float32(hi - lo) if hi > lo \
                    else np.zeros_like(out)
            out = np.clip(out, 0.0, 1.0)
        else:
            lo, hi = float(out.min()), float(out.max())
            if lo < 0 or hi > 1:  # a single file on its own: its own range
                out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if mode == "L" and out.ndim == 3:
        out = out.mean(axis=0)
    elif mode == "RGB" and out.ndim == 2:
        out = np.stack([out] * 3)
    return out


def read_mask(path: Path, note: Callable[[str], None] | None = None) -> np.ndarray:
    """Binary mask (H,W) bool from a PNG/JPEG/NPY file: nonzero (any channel) = annotated.
    ``note`` as for `read_image`."""
    if not path.exists():
        raise SkipItem("missing mask", str(path))
    if path.suffix.lower() == ".npy":
        try:
            m = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise SkipItem("unreadable mask", f"{path}: {type(exc).__name__}: {exc}") from None
    else:

        try:
            with open_image(path) as im:
                im.load()
                _note_exif(im, note)
                m = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I;16", "I") else im)
        except DataError as exc:  # over PIL's pixel limit (`open_image`)
            raise SkipItem("mask too large", str(exc)) from None
        except Exception as exc:
            raise SkipItem("unreadable mask", f"{path}: {type(exc).__name__}: {exc}") from None
    if m.ndim == 3:
        m = m.max(axis=-1) if m.shape[-1] in (1, 3, 4) else m.max(axis=0)
    if m.ndim != 2:
        raise SkipItem("unsupported mask", f"{path}: shape {m.shape}")
    # JPEG masks carry compression noise around 0: a quarter of the range separates it.
    thr = 0.25 * float(m.max()) if m.dtype != np.bool_ and m.max() > 1 else 0
    return m > thr


# --------------------------------------------------------------------------- geometry


def resize(arr: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize the last two axes of a float array to `shape` (h, w): order 1 = bilinear with
    antialiasing when shrinking (PIL), 0 = nearest."""
    from PIL import Image

    h, w = shape
    if arr.shape[-2:] == (h, w):
        return arr.astype(np.float32, copy=False)
    resample = Image.Resampling.BILINEAR if order else Image.Resampling.NEAREST
    flat = arr.reshape(-1, *arr.shape[-2:]).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((w, h), resample))
                    for c in flat])
    return out.reshape(*arr.shape[:-2], h, w)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a binary mask: bilinear then ≥ 0.5; a lesion that would vanish keeps its pixel
    nearest to its centre so small annotations survive downsampling."""
    if mask.shape[-2:] == tuple(shape):
        return mask.astype(bool)
    out = resize(mask.astype(np.float32), shape, order=1) >= 0.5
    if mask.any() and not out.any():
        ys, xs = np.nonzero(mask)
        cy = int(ys.mean() * shape[0] / mask.shape[-2])
        cx = int(xs.mean() * shape[1] / mask.shape[-1])
        out[cy, cx] = True
    return out


def pad_to_square(arr: np.ndarray, value: float = 0.0) -> tuple[np.ndarray, int, int]:
    """Pad the last two axes to a square (centred); returns (array, x offset, y offset)."""
    h, w = arr.shape[-2:]
    s = max(h, w)
    oy, ox = (s - h) // 2, (s - w) // 2
    pad = [(0, 0)] * (arr.ndim - 2) + [(oy, s - h - oy), (ox, s - w - ox)]
    return np.pad(arr, pad, constant_values=value), ox, oy


def fit_square(
    image: np.ndarray, mask: np.ndarray | None, size: int, box: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int] | None]:
    """Letterbox an image (and its mask/box) to size×size: pad to a square with zeros, then
    resize, so anatomy keeps its aspect ratio. Boxes are (x0, y0, x1, y1), x1/y1 exclusive."""
    img, ox, oy = pad_to_square(image)
    scale = size / img.shape[-1]
    img = resize(img, (size, size))
    m = None
    if mask is not None:
        m = resize_mask(pad_to_square(mask.astype(np.float32))[0] > 0.5, (size, size))
    b = None
    if box is not None:
        b = scale_box(box, scale, ox, oy, size, size)
    return img, m, b


def scale_box(
    box: Sequence[float], scale: float, ox: float, oy: float, w: int, h: int
) -> tuple[int, int, int, int] | None:
    """Map a box through x' = (x + ox)·scale, clip to the image; None when it becomes empty."""
    x0, y0, x1, y1 = ((box[0] + ox) * scale, (box[1] + oy) * scale,
                      (box[2] + ox) * scale, (box[3] + oy) * scale)
    x0, y0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
    x1, y1 = min(int(math.ceil(x1)), w), min(int(math.ceil(y1)), h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def box_of_mask(mask: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1) of a 2D mask's nonzero pixels, x1/y1 exclusive; None for
    no mask or an empty one."""
    if mask is None or not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_square(arr: np.ndarray, cx: float, cy: float, side: int, value: float = 0.0
                ) -> np.ndarray:
    """Square crop of the last two axes centred at (cx, cy), padded with `value` outside."""
    h, w = arr.shape[-2:]
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    out = np.full((*arr.shape[:-2], side, side), value, dtype=arr.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[..., sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = arr[..., sy0:sy1, sx0:sx1]
    return out


def polygon_mask(shape: tuple[int, int], xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
    """Fill a closed polygon given in pixel coordinates (outline pixels included)."""
    from PIL import Image, ImageDraw

    h, w = shape
    im = Image.new("L", (w, h), 0)
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
    if len(pts) == 1:
        ImageDraw.Draw(im).point(pts, fill=1)
    else:
        ImageDraw.Draw(im).polygon(pts, fill=1, outline=1)
    return np.asarray(im, dtype=bool)


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask.astype(bool)
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=iterations)


# --------------------------------------------------------------------------- intensities


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map Hounsfield units to [0, 1]: lo → 0, hi → 1, clipped."""
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def percentile_normalise(x: np.ndarray, region: np.ndarray | None = None,
                         lo_q: float = 0.5, hi_q: float = 99.5) -> np.ndarray:
    """Scale so the `lo_q`/`hi_q` percentiles of `region` (default: all pixels) map to 0/1."""
    vals = x[region] if region is not None and region.any() else x.ravel()
    lo, hi = np.percentile(vals, [lo_q, hi_q])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an array (maximises between-class variance of the histogram)."""
    hist, edges = np.histogram(x.ravel(), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask, holes filled."""
    from scipy.ndimage import binary_fill_holes, label

    lab, n = label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return binary_fill_holes(lab == int(np.argmax(sizes)))


# --------------------------------------------------------------------------- perceptual hash


def phash(gray: np.ndarray, hash_size: int = 8, highfreq: int = 4) -> np.ndarray:
    """DCT perceptual hash (as `imagehash.phash`): resize to 32×32, 2D DCT, keep the 8×8
    lowest frequencies, bit = coefficient > their median. Returns 64 booleans."""
    from scipy.fft import dctn

    n = hash_size * highfreq
    small = resize(gray.astype(np.float32), (n, n))
    coef = dctn(small, norm="ortho")[:hash_size, :hash_size]
    return (coef > np.median(coef)).ravel()


def duplicate_groups(hashes: Sequence[np.ndarray], threshold: int) -> list[int]:
    """Union-find over pairs whose hash Hamming distance is ≤ threshold; returns a group index
    per item (the smallest member's index), so near-duplicate chains share one group."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n:
        bits = np.stack(hashes).astype(np.uint8)
        for i in range(n - 1):
            dist = (bits[i + 1:] != bits[i]).sum(axis=1)
            for j in np.nonzero(dist <= threshold)[0]:
                a, b = find(i), find(i + 1 + int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)]


# --------------------------------------------------------------------------- splits


def assign_splits(
    groups: Sequence[Hashable],
    fractions: dict[str, float],
    seed: int,
    weights: Sequence[float] | None = None,
    strata: Sequence[Hashable] | None = None,
) -> dict[Hashable, str]:
    """Assign whole groups (patients, duplicate sets, images) to splits.

    Groups are shuffled with `seed` (after sorting, so the result does not depend on input
    order). Within each stratum (e.g. class) that has at least one group per split, every split
    with a positive fraction first gets one group; then (and in a smaller stratum, from the
    start) each group goes to the split furthest below its target weight, so a class of two
    patients stays in training rather than lending one to validation.
    A group never straddles two splits. Deterministic given the inputs.
    """
    weights = list(weights) if weights is not None else [1.0] * len(groups)
    strata = list(strata) if strata is not None else [0] * len(groups)
    info: dict[Hashable, list] = {}
    for g, w, s in zip(groups, weights, strata, strict=True):
        if g in info:
            info[g][0] += w
        else:
            info[g] = [w, s]
    active = [s for s in ("train", "val", "test") if fractions.get(s, 0.0) > 0]
    if not active:
        raise DataError("all split fractions are zero")
    total_frac = sum(fractions[s] for s in active)
    rng = np.random.default_rng(seed)
    out: dict[Hashable, str] = {}
    by_stratum: dict[Hashable, list[Hashable]] = {}
    for g in sorted(info, key=str):
        by_stratum.setdefault(info[g][1], []).append(g)
    for stratum in sorted(by_stratum, key=str):
        gs = by_stratum[stratum]
        order = [gs[i] for i in rng.permutation(len(gs))]
        total = sum(info[g][0] for g in gs)
        load = dict.fromkeys(active, 0.0)
        for i, g in enumerate(order):
            if i < len(active) and len(order) >= len(active):
                s = active[i]
            else:
                s = max(active, key=lambda k: (fractions[k] / total_frac * total - load[k],
                                               -active.index(k)))
            out[g] = s
            load[s] += info[g][0]
    # Small strata can leave a split empty: move the lightest group of the split with the
    # most groups into it (while that split keeps at least one).
    if len(info) >= len(active):
        for s in active:
            if s in out.values():
                continue
            counts = {k: sum(v == k for v in out.values()) for k in active}
            donor = max(active, key=lambda k: (counts[k], -active.index(k)))
            g = min((g for g, v in out.items() if v == donor), key=lambda g: (info[g][0], str(g)))
            out[g] = s
    return out


def median(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.median(vals)) if vals else float("nan")
