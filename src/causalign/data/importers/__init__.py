"""Importers: convert real datasets from their own on-disk layout into causalign's format.

`causalign data import KIND SRC OUT [options]` — KIND is one of `IMPORTERS`. Each importer
lives in its own module (``importers/<kind>.py``) and is loaded only when used, so the
optional medical libraries (pydicom, nibabel) are needed only by the kinds that read them.
"""

from __future__ import annotations

import importlib

from ...errors import unknown_name
from .base import Importer
from .run import format_summary, run_import

# kind → (module, class name)
IMPORTERS: dict[str, tuple[str, str]] = {
    "lidc": ("lidc", "LidcImporter"),
    "cbis-ddsm": ("cbis_ddsm", "CbisDdsmImporter"),
    "busi": ("busi", "BusiImporter"),
    "brats": ("brats", "BratsImporter"),
    "cub": ("cub", "CubImporter"),
    "decoy-mnist": ("decoy_mnist", "DecoyMnistImporter"),
    "folder": ("folder", "FolderImporter"),
}


def get_importer(kind: str) -> type[Importer]:
    """The importer class registered for `kind` (unknown kinds list the valid ones)."""
    if kind not in IMPORTERS:
        raise unknown_name("import kind", kind, list(IMPORTERS))
    module, name = IMPORTERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["IMPORTERS", "Importer", "format_summary", "get_importer", "run_import"]
