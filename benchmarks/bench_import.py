"""Import speed and scaling of `causalign data import` on real-format fixtures.

    python benchmarks/bench_import.py [--scale 1] [--out benchmarks/results/import_speed.json]

Builds fixtures in each dataset's own on-disk layout with tests/fixtures_real.py's writers, at
N and 2N (and 4N) items, under a temporary folder, and times (wall seconds, one process, no
progress display):

- ``lidc``: full import of N patients × 60 CT slices (DICOM + readers' XML next to the CT);
- ``lidc_xml_apart``: planning with the XMLs kept apart from the CT (tcia-lidc-xml/), which
  indexes every header in one whole-tree scan; reports that scan's progress-bar steps;
- ``folder``: full import of N 32×32 PNGs with masks;
- ``folder_colliding_ids``: planning N images whose names are all non-ASCII (every id
  'sample'), which was quadratic in N;
- ``summary_many_classes``: the import summary for N rows over N/100 classes, which was
  O(classes × rows).

``ratio`` is time(2N) / time(N): about 2 for linear work, 4 for quadratic.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fixtures_real as fr  # noqa: E402


def _lidc(root: Path, n_patients: int, n_slices: int = 60, xml_apart: bool = False) -> Path:
    """n patients, each a copy of one of the fixture's three (its nodules and readers), with
    n_slices slices (the first 6 those of the fixture, the rest plain lung)."""
    rng = np.random.default_rng(5)
    base = root / "LIDC-IDRI"
    for p in range(1, n_patients + 1):
        t = (p - 1) % 3 + 1
        pid = fr.lidc_patient_id(p)
        study, series = fr._uid(p, 1), fr._uid(p, 2)
        folder = base / pid / "01-01-2000-NA-CT CHEST-3" / f"3000{p}.000000-NA-{p}"
        vol6 = fr._lidc_volume(t, rng)
        sops = [fr._uid(p, 3, z) for z in range(n_slices)]
        for z in range(n_slices):
            sl = vol6[z] if z < 6 else -850.0 + rng.normal(0, 20, vol6[0].shape)
            fr.write_dicom(folder / f"1-{z + 1:03d}.dcm", np.round(sl + 1024).astype(np.uint16),
                           SOPInstanceUID=sops[z], StudyInstanceUID=study,
                           SeriesInstanceUID=series, PatientID=pid, Modality="CT",
                           PixelSpacing=[fr.LIDC_SPACING] * 2, SliceThickness=fr.LIDC_THICK,
                           ImagePositionPatient=[-19.2, -19.2, fr.LIDC_Z0 - z * fr.LIDC_THICK],
                           ImageOrientationPatient=[1, 0, 0, 0, 1, 0], RescaleSlope=1,
                           RescaleIntercept=-1024.0, InstanceNumber=z + 1)
        xml_dir = root / "tcia-lidc-xml" / "157" if xml_apart else folder
        xml_dir.mkdir(parents=True, exist_ok=True)
        (xml_dir / f"{p:03d}.xml").write_text(fr._lidc_xml(t, series, study, sops))
    return root


def _folder(root: Path, n: int, cjk: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    digits = "〇一二三四五六七八九"
    for k in range(n):
        if cjk:
            cls = ("良性", "恶性")[k % 2]
            name = "图像" + "".join(digits[int(c)] for c in str(k))
        else:
            cls, name = ("healthy", "lesion")[k % 2], f"img_{k}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        side = 8 if cjk else 32
        Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8)).save(
            root / cls / f"{name}.png")
        if not cjk:
            m = np.zeros((side, side), np.uint8)
            m[8:16, 8:16] = 255
            Image.fromarray(m).save(root / cls / f"{name}_mask.png")
    return root


class _Progress:
    def __init__(self) -> None:
        self.tasks: dict[int, list] = {}

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks[len(self.tasks)] = [description, total, 0]
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.tasks[task][2] += advance


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 3)


def bench(tmp: Path, scale: float) -> dict:
    from causalign.data.format import DatasetMeta
    from causalign.data.importers import run_import
    from causalign.data.importers.base import Importer
    from causalign.data.importers.folder import FolderImporter, FolderOptions
    from causalign.data.importers.lidc import LidcImporter, LidcOptions
    from causalign.data.importers.run import _summary

    out: dict[str, dict] = {}

    def series(name: str, sizes: list[int], run) -> None:
        times = {}
        for n in sizes:
            times[n] = run(n)
            print(f"{name:22s} N={n:6d} {times[n]:8.3f} s", flush=True)
        out[name] = {"n": sizes, "seconds": [times[n] for n in sizes],
                     "ratio_2n_over_n": [round(times[b] / max(times[a], 1e-9), 2)
                                         for a, b in zip(sizes, sizes[1:], strict=False)]}

    def lidc_full(n: int) -> float:
        src = _lidc(tmp / f"lidc{n}", n)
        return _timed(lambda: run_import("lidc", src, tmp / f"lidc{n}_out", {}))

    def lidc_apart(n: int) -> float:
        src = _lidc(tmp / f"lidc_apart{n}", n, xml_apart=True)
        prog = _Progress()
        t = _timed(lambda: LidcImporter(src, LidcOptions(), progress=prog).plan())
        out.setdefault("lidc_xml_apart_progress", {})[n] = {
            d: [total, done] for d, total, done in prog.tasks.values()}
        return t

    def folder_full(n: int) -> float:
        src = _folder(tmp / f"folder{n}", n)
        return _timed(lambda: run_import("folder", src, tmp / f"folder{n}_out", {"size": 32}))

    def folder_cjk(n: int) -> float:
        src = _folder(tmp / f"cjk{n}", n, cjk=True)
        return _timed(lambda: FolderImporter(src, FolderOptions(size=8)).plan())

    def summary(n: int) -> float:
        classes = max(n // 100, 2)
        meta = DatasetMeta(name="x", classes=[f"c{k}" for k in range(classes)], attributes=[],
                           ndim=2, channels=1)
        rows = [{"split": ("train", "val", "test")[i % 3], "label": i % classes,
                 "mask": None, "mask_frac": None, "box": None} for i in range(n)]
        imp = Importer.__new__(Importer)
        imp.notes, imp.details = {}, {}
        return _timed(lambda: _summary("folder", tmp, tmp, meta, rows, [], imp, 0, n))

    def sizes(base: int) -> list[int]:  # N, 2N, 4N
        n = max(1, round(base * scale))
        return [n, 2 * n, 4 * n]

    series("lidc", sizes(10), lidc_full)
    series("lidc_xml_apart", sizes(10), lidc_apart)
    series("folder", sizes(1250), folder_full)
    series("folder_colliding_ids", sizes(2500), folder_cjk)
    series("summary_many_classes", sizes(25000), summary)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every N (> 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/import_speed.json")
    args = ap.parse_args()
    if not args.scale > 0:
        ap.error(f"--scale must be > 0, got {args.scale}")
    from causalign.io import atomic_write_json

    tmp = Path(tempfile.mkdtemp(prefix="bench_import_"))
    try:
        result = bench(tmp, args.scale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
