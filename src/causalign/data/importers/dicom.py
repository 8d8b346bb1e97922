"""DICOM reading for the importers (pydicom, from the optional `medical` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .util import SkipItem, check_voxels, require, walk


def pydicom_module(kind: str) -> Any:
    return require("pydicom", kind)


def read_header(pydicom: Any, path: Path, tags: list[str] | None = None) -> Any:
    """Header only (no pixel data); raises SkipItem("unreadable DICOM")."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    except Exception as exc:  # InvalidDicomError, EOF, struct errors …
        raise SkipItem("unreadable DICOM", f"{path}: {type(exc).__name__}: {exc}") from None


def read_pixels(pydicom: Any, path: Path) -> tuple[np.ndarray, Any]:
    """Pixel values in physical units (RescaleSlope·stored + RescaleIntercept, e.g. HU for CT)
    as float32, and the dataset. MONOCHROME1 images are inverted so bright = dense."""
    try:
        ds = pydicom.dcmread(str(path))
        shape = [_int_tag(ds, "NumberOfFrames"), _int_tag(ds, "Rows"), _int_tag(ds, "Columns"),
                 _int_tag(ds, "SamplesPerPixel")]
    except Exception as exc:
        raise SkipItem("unreadable DICOM", f"{path}: {type(exc).__name__}: {exc}") from None
    check_voxels(shape, path, "DICOM")  # before decoding (a compressed frame can be tiny)
    try:
        arr = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    except Exception as exc:  # also a RescaleSlope/Intercept that is not a number
        raise SkipItem("unreadable DICOM", f"{path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim != 2:
        raise SkipItem("unsupported DICOM", f"{path}: pixel array of shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr * slope + intercept
    if not np.isfinite(arr).all():
        raise SkipItem("unreadable DICOM", f"{path}: non-finite pixel values after rescale "
                       f"(RescaleSlope {slope}, RescaleIntercept {intercept})")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr, ds


def _int_tag(ds: Any, name: str) -> int:
    """A size tag as an int (1 when absent or empty)."""
    value = ds.get(name)
    value = getattr(value, "value", value)
    return max(int(value), 1) if value not in (None, "") else 1


def is_dicom_name(name: str) -> bool:
    """A file name DICOM files are stored under: '*.dcm', no suffix ('IM000001', DICOMDIR
    trees) or a UID ('1.3.6.1.4.1.14519….'), whose last component looked like a suffix and
    was skipped. Hidden files are not."""
    if name.startswith("."):
        return False
    suffix = Path(name).suffix
    return suffix.lower() == ".dcm" or suffix == "" or name.replace(".", "").isdigit()


def dicom_files(folder: Path) -> list[Path]:
    """Candidate DICOM files under a folder (`is_dicom_name`)."""
    return sorted(d / f for d, _, files in walk(folder) for f in files
                  if is_dicom_name(f) and (d / f).is_file())
