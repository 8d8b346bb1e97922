"""Run an importer: resumable writing, the optional shortcut, the manifest and the summary.

Resumability: OUT/.import/state.json records kind, source and options; every finished unit
appends one JSON line (its manifest rows and skips) to OUT/.import/journal.jsonl after its
files are written (each through a temporary file and a rename). A rerun with the same
arguments reuses every journaled unit whose files still exist and read back with the
recorded shape, processes the rest, and writes dataset.yaml, manifest.csv and
import_summary.json atomically at the end — so an interrupted import continues where it
stopped and ends with the same manifest as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ...io import LOCK_NAME, atomic_write_file, atomic_write_json
from ..format import MANIFEST, META, SPLITS, DatasetMeta, SampleRecord, load_array, write_manifest
from ..synth import draw_symbol
from .base import Importer, Sample, Skipped, build_options
from .util import SkipItem

STATE_DIR = ".import"
SUMMARY = "import_summary.json"
INTENSITY_OFFSET = 0.12  # as the synthetic benchmark's intensity shortcut


def run_import(
    kind: str,
    src: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> dict:
    """Import SRC (in KIND's own layout) into OUT (causalign's dataset format); returns the
    summary (also saved as OUT/import_summary.json). Resumes an interrupted import in OUT."""
    from . import get_importer

    cls = get_importer(kind)
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"{src}: source folder does not exist")
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (give the folder that holds the {kind} data)")
    _check_overlap(src, out)
    opts = build_options(cls.Options, kind, dict(options or {}))
    importer: Importer = cls(src, opts, progress=progress)
    state = {"kind": kind, "source": str(src.resolve()),
             "options": _jsonable(dataclasses.asdict(opts))}
    done = _check_out(out, state, overwrite)

    units = importer.plan()  # reads SRC only: a failure here leaves OUT untouched
    meta = importer.meta()
    _init_out(out, state, overwrite)
    meta.info.setdefault("importer", kind)
    meta.info.setdefault("source", str(src.resolve()))
    meta.info["options"] = state["options"]
    # sources deeper than 8 bits: the import's intensity rule, and 16-bit PNGs (8 bits
    # would keep 256 of a 12-bit image's 4096 levels); 8-bit imports are unchanged
    png_bits = 16 if importer.scale is not None and importer.scale.high_depth else 8
    if importer.scale is not None:  # the rule itself, for `causalign predict` on new files
        meta.info["intensity_scale"] = importer.scale.to_record()
    if png_bits == 16:
        stored = ("gray PNG images stored with 16 bits (RGB: 8)" if opts.image_format == "png"
                  else "images stored as float32 NPY")
        meta.info["intensity"] = f"{importer.scale.describe()}; {stored}"
    if opts.shortcut != "none":
        meta.info["shortcut"] = opts.shortcut
        meta.info["shortcut_in"] = ["train"]
        meta.info["shortcut_rule"] = _shortcut_rule(opts.shortcut, len(meta.classes))
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise AssertionError(f"{kind} importer planned duplicate unit keys")

    journal_path = out / STATE_DIR / "journal.jsonl"
    records: dict[str, list[dict]] = {}
    skips: dict[str, list[dict]] = {}
    notes: dict[str, dict[str, int]] = {}
    reused = moved = 0
    task = progress.add_task(f"importing {kind}", total=len(units)) if progress else None
    with _open_journal(journal_path) as journal:
        for unit in units:
            entry = done.get(unit.key)
            # a unit journaled in another split than planned now (a split rule changed since,
            # e.g. BraTS' time points of a patient together) is imported again: kept, it sat
            # in its old split beside the new rule's (and a shortcut depends on the split)
            if entry is not None and all(r.get("split") == unit.split
                                         for r in entry["records"]) \
                    and _files_ok(out, entry["records"]):
                records[unit.key], skips[unit.key] = entry["records"], entry["skips"]
                notes[unit.key] = entry.get("notes", {})
                reused += 1
            else:
                # said in the summary: a rerun that redoes much of a finished import (e.g.
                # LIDC / CBIS-DDSM, stratified since) should say why
                moved += entry is not None and any(r.get("split") != unit.split
                                                   for r in entry["records"])
                importer.unit_notes = {}
                recs, sk, complete = _process_unit(importer, unit, out, meta, opts, png_bits)
                records[unit.key], skips[unit.key] = recs, sk
                notes[unit.key], importer.unit_notes = importer.unit_notes, None
                if complete:
                    journal.write(json.dumps({"unit": unit.key, "records": recs, "skips": sk,
                                              "notes": notes[unit.key]}) + "\n")
                    journal.flush()
            if task is not None:
                progress.advance(task)

    rows = [r for u in units for r in records[u.key]]
    all_skips = [s.to_dict() for s in importer.skipped] + [s for u in units for s in skips[u.key]]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise AssertionError(f"{kind} importer produced duplicate sample ids {dup}")
    if not rows:
        reasons = _by_reason(all_skips)
        why = "; ".join(f"{n} × {r}" for r, n in reasons.items()) or "nothing found"
        _discard_empty_import(out)
        raise DataError(f"{src}: no samples imported ({why}) — is this a {kind} folder? "
                        f"expected: {cls.layout}")
    write_manifest(out, meta, [_to_record(r) for r in rows])
    for unit_notes in notes.values():
        for what, n in unit_notes.items():
            importer.notes[what] = importer.notes.get(what, 0) + n
    if moved:
        importer.notes["unit(s) of the previous run imported again: their planned split "
                       "changed since (a newer version's split rule)"] = moved
    summary = _summary(kind, src, out, meta, rows, all_skips, importer, reused, len(units))
    atomic_write_json(out / SUMMARY, summary)
    atomic_write_json(out / STATE_DIR / "state.json", {**state, "complete": True})
    return summary


# ----------------------------------------------------------------------------- OUT folder


def _open_journal(path: Path):
    """The journal, opened to append without following a link at its name: a resumed
    import in a folder from elsewhere appended its lines to whatever such a link named."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError as exc:
        if path.is_symlink():
            raise DataError(f"{path}: is a symbolic link, not an import journal; remove it "
                            f"or use --overwrite") from None
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return os.fdopen(fd, "a", encoding="utf-8")


def _check_overlap(src: Path, out: Path) -> None:
    """OUT inside SRC: a rerun (resume) reads the import's own output as source data (the
    folder importer made OUT/images a new class). SRC inside OUT: --overwrite deletes
    OUT/images, which may be the source (CUB keeps its images in 'images/')."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise DataError(f"{out}: output folder is (inside) the source folder {src} (the "
                        f"import would read its own output); choose an OUT outside SRC")
    if o in s.parents:
        raise DataError(f"{out}: output folder contains the source folder {src}; choose "
                        f"an OUT that does not hold the source data")


def _check_out(out: Path, state: dict, overwrite: bool) -> dict[str, dict]:
    """Validate OUT before any work (read only): returns the journaled units to reuse."""
    state_file = out / STATE_DIR / "state.json"
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if overwrite or not out.exists():
        return {}
    if any(p.name != LOCK_NAME for p in out.iterdir()) and not state_file.exists():
        raise DataError(f"{out}: output folder exists and is not empty (use --overwrite)")
    if not state_file.exists():
        return {}
    try:
        old = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"{state_file}: unreadable import state (use --overwrite)") from None
    old_core = {k: old.get(k) for k in ("kind", "source", "options")}
    if old_core != state:
        changed = [k for k in ("kind", "source") if old.get(k) != state[k]]
        changed += [f"--{k.replace('_', '-')}" for k, v in state["options"].items()
                    if (old.get("options") or {}).get(k) != v]
        raise DataError(f"{out}: holds an import with different settings "
                        f"({', '.join(changed)}); rerun with the same ones to resume, "
                        f"or use --overwrite")
    return _read_journal(out / STATE_DIR / "journal.jsonl")


def _init_out(out: Path, state: dict, overwrite: bool) -> None:
    """Create OUT (after planning succeeded); --overwrite removes a previous import's files."""
    if overwrite and out.exists():
        for name in ("images", "masks", STATE_DIR):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in (MANIFEST, META, SUMMARY):
            if (out / name).exists():
                (out / name).unlink()
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    for sub in ("images", "masks"):  # temporaries of a killed import (`_save_png`)
        for entry in os.scandir(out / sub):
            if (entry.name.startswith(".") and entry.name.endswith(".tmp")
                    and entry.is_file(follow_symlinks=False)):
                os.unlink(entry.path)
    atomic_write_json(out / STATE_DIR / "state.json", {**state, "complete": False})


def _discard_empty_import(out: Path) -> None:
    """After an import that produced no sample: drop its state (and the folders it made,
    when empty). Nothing is there to resume, and a kept state would refuse the rerun with
    corrected options ('holds an import with different settings'); the journal would even
    replay the old options' skips. A folder holding a finished import is left alone."""
    if (out / MANIFEST).exists():
        return
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for d in (out / "images", out / "masks", out):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            done[entry["unit"]] = entry
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the interruption: that unit is simply redone
    return done


def _files_ok(out: Path, recs: list[dict]) -> bool:
    for r in recs:
        for key, shape_key in (("image", "shape"), ("mask", "mask_shape")):
            if not r.get(key):
                continue
            try:
                arr = load_array(out / r[key])
            except DataError:
                return False
            if list(arr.shape) != list(r[shape_key]):
                return False
    return True


# ----------------------------------------------------------------------------- one unit


def _process_unit(importer: Importer, unit, out: Path, meta: DatasetMeta, opts,
                  png_bits: int = 8) -> tuple[list[dict], list[dict], bool]:
    """Write a unit's samples; returns (rows, skips, complete). A unit that raised SkipItem
    is not journaled, so a rerun tries it again (the user may have fixed the file)."""
    recs: list[dict] = []
    skips: list[dict] = []
    items = importer.process(unit)
    while True:
        try:  # only reading the source may fail per unit; write errors (disk full) propagate
            item = next(items)
        except StopIteration:
            break
        except SkipItem as exc:
            return [], [Skipped(unit.source, exc.reason, exc.detail).to_dict()], False
        except (DataError, OSError) as exc:  # unreadable/permission problems with this unit
            return [], [Skipped(unit.source, "read error", f"{type(exc).__name__}: {exc}")
                        .to_dict()], False
        if isinstance(item, Skipped):
            skips.append(item.to_dict())
            continue
        try:
            recs.append(_write_sample(out, item, meta, opts, png_bits))
        except SkipItem as exc:
            skips.append(Skipped(item.id, exc.reason, exc.detail).to_dict())
    return recs, skips, True


def _write_sample(out: Path, s: Sample, meta: DatasetMeta, opts, png_bits: int = 8) -> dict:
    """Write one sample's files; PNG images with `png_bits` (8, or 16 for an import with
    sources deeper than 8 bits: 8 bits would keep only 256 of a 12-bit image's levels)."""
    img = np.asarray(s.image, dtype=np.float32)
    if not np.isfinite(img).all():
        raise SkipItem("NaN/inf pixels", f"sample {s.id}")
    img = np.clip(img, 0.0, 1.0)
    spatial_nd = meta.ndim
    if img.ndim not in (spatial_nd, spatial_nd + 1):
        raise AssertionError(f"sample {s.id}: image shape {img.shape} for ndim {spatial_nd}")
    if opts.shortcut != "none":
        img = add_shortcut(img, s.label, len(meta.classes), s.split, opts.shortcut,
                           _sample_rng(opts.seed, s.id))
    spatial = img.shape[-spatial_nd:]
    if s.mask is not None and tuple(s.mask.shape) != tuple(spatial):
        raise AssertionError(f"sample {s.id}: mask {s.mask.shape} vs image {spatial}")
    gray_or_rgb = img.ndim == 2 or (img.ndim == 3 and img.shape[0] == 3)
    if spatial_nd == 2 and opts.image_format == "png" and gray_or_rgb:
        image_rel = f"images/{s.id}.png"
        if png_bits == 16 and img.ndim == 2:
            q = (img * 65535.0 + 0.5).astype(np.uint16)
        else:  # PIL cannot write 16-bit RGB PNGs: colour images keep 8 bits
            q = (img * 255.0 + 0.5).astype(np.uint8)
        _save_png(out / image_rel, np.moveaxis(q, 0, -1) if q.ndim == 3 else q)
        shape = list(q.shape if q.ndim == 2 else (*q.shape[1:], 3))
    else:
        image_rel = f"images/{s.id}.npy"
        _save_npy(out / image_rel, img)
        shape = list(img.shape)
    mask_rel, mask_shape, mask_frac = None, None, None
    if s.mask is not None:
        m = (np.asarray(s.mask) > 0).astype(np.uint8) * 255
        if m.ndim == 2:
            mask_rel = f"masks/{s.id}.png"
            _save_png(out / mask_rel, m)
        else:
            mask_rel = f"masks/{s.id}.npy"
            _save_npy(out / mask_rel, m)
        mask_shape, mask_frac = list(m.shape), float((m > 0).mean())
    box = list(s.box) if s.box is not None else None
    if box is not None:
        w, h = spatial[-1], spatial[-2]
        if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
            raise AssertionError(f"sample {s.id}: box {box} outside {w}x{h}")
    attrs = s.attributes if s.attributes is not None else [math.nan] * len(meta.attributes)
    if len(attrs) != len(meta.attributes):
        raise AssertionError(f"sample {s.id}: {len(attrs)} attributes for {meta.attributes}")
    return {"id": s.id, "split": s.split, "label": int(s.label), "site": str(s.site),
            "image": image_rel, "shape": shape, "mask": mask_rel, "mask_shape": mask_shape,
            "mask_frac": mask_frac, "box": box,
            "attributes": [None if math.isnan(a) else float(a) for a in attrs],
            "group": str(s.group)}


# A fresh temporary (random name, created exclusively) renamed over the output: the fixed
# name ".NAME.tmp" was opened as it was, so a link left there had its target overwritten.
def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    atomic_write_file(path, lambda fh: Image.fromarray(arr).save(fh, format="PNG"),
                      fsync=False)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write_file(path, lambda fh: np.save(fh, arr), fsync=False)


def _to_record(r: dict) -> SampleRecord:
    return SampleRecord(
        id=r["id"], split=r["split"], label=r["label"], site=r["site"], image=r["image"],
        mask=r["mask"], box=tuple(r["box"]) if r["box"] else None,
        attributes=[math.nan if a is None else a for a in r["attributes"]],
        group=r.get("group", ""),  # a journal written before groups were recorded: none
    )


# ----------------------------------------------------------------------------- shortcut


def _sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(sample_id.encode())])


def _shortcut_rule(kind: str, n_classes: int) -> str:
    if kind == "plus-minus":
        pos = "y = 1" if n_classes == 2 else f"y >= {n_classes // 2}"
        return (f"train: '+' in the top-left corner when {pos}, '-' otherwise; "
                "val/test: '+' or '-' at random")
    return (f"train: brightness + {INTENSITY_OFFSET} * y / {n_classes - 1}; "
            "val/test: the offset of a random class")


def add_shortcut(img: np.ndarray, label: int, n_classes: int, split: str, kind: str,
                 rng: np.random.Generator) -> np.ndarray:
    """The paper's synthetic shortcut (as `causalign data synth`), on a copy of `img`.

    plus-minus: a bright '+' (label 1; with K > 2 classes: label ≥ K // 2) or '−' in the
    top-left corner. intensity: brightness offset 0.12 · label / (K − 1). In training the
    shortcut follows the label; in val/test it follows a random label, so it carries no
    information there (paper 000 §5.1).
    """
    y = label if split == "train" else int(rng.integers(0, n_classes))
    out = img.copy()
    if kind == "plus-minus":
        draw_symbol(out, y >= max(1, n_classes // 2), out.shape[-1])
    elif kind == "intensity":
        out = np.clip(out + INTENSITY_OFFSET * y / max(n_classes - 1, 1), 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- summary


def _by_reason(skips: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skips:
        out[s["reason"]] = out.get(s["reason"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _summary(kind: str, src: Path, out: Path, meta: DatasetMeta, rows: list[dict],
             skips: list[dict], importer: Importer, reused: int, n_units: int) -> dict:
    # one pass over the rows: counting per class with a scan per class was O(classes ×
    # rows), minutes for a folder import of 1000 classes × 1M images
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    per_class: dict[str, dict[int, int]] = {split: {} for split in SPLITS}
    for r in rows:
        if r["split"] in by_split:
            by_split[r["split"]].append(r)
            counts = per_class[r["split"]]
            counts[r["label"]] = counts.get(r["label"], 0) + 1
    splits = {}
    for split in SPLITS:
        rs = by_split[split]
        masked = [r for r in rs if r["mask"]]
        splits[split] = {
            "n": len(rs),
            "per_class": {c: per_class[split].get(k, 0) for k, c in enumerate(meta.classes)},
            "with_mask": len(masked),
            "mask_coverage": round(len(masked) / len(rs), 4) if rs else 0.0,
            "mean_mask_area": (round(float(np.mean([r["mask_frac"] for r in masked])), 4)
                               if masked else None),
            "with_box": sum(r["box"] is not None for r in rs),
        }
    warnings = [f"split '{s}' is empty (training and evaluation need train, val and test)"
                for s in SPLITS if splits[s]["n"] == 0]
    present = {r["label"] for r in rows}
    warnings += [f"class '{c}' has no samples (every one was skipped or filtered out)"
                 for k, c in enumerate(meta.classes) if k not in present]
    return {
        "kind": kind, "source": str(src), "out": str(out), "n": len(rows),
        "classes": meta.classes, "attributes": meta.attributes,
        "splits": splits,
        "skipped": {"n": len(skips), "by_reason": _by_reason(skips), "items": skips},
        "notes": dict(sorted(importer.notes.items())),
        "details": importer.details,
        "warnings": warnings,
        "units": {"total": n_units, "reused_from_previous_run": reused},
    }


def format_summary(summary: dict, max_items: int = 5) -> str:
    """Human-readable summary printed by `causalign data import`."""
    classes = summary["classes"]
    width = max(8, *(len(c) for c in classes))
    lines = [f"imported {summary['n']} samples ({summary['kind']}) into {summary['out']}"]
    head = f"  {'split':<6} {'n':>6} " + " ".join(f"{c:>{width}}" for c in classes)
    lines.append(head + f" {'with mask':>14} {'with box':>8}")
    for split, s in summary["splits"].items():
        cov = f"{s['with_mask']} ({100 * s['mask_coverage']:.0f}%)"
        lines.append(f"  {split:<6} {s['n']:>6} "
                     + " ".join(f"{s['per_class'][c]:>{width}}" for c in classes)
                     + f" {cov:>14} {s['with_box']:>8}")
    sk = summary["skipped"]
    if sk["n"]:
        lines.append(f"skipped {sk['n']} item(s):")
        for reason, n in sk["by_reason"].items():
            items = [i for i in sk["items"] if i["reason"] == reason]
            shown = ", ".join(i["source"] for i in items[:max_items])
            more = f", … (+{n - max_items})" if n > max_items else ""
            lines.append(f"  {n} × {reason}: {shown}{more}")
    else:
        lines.append("skipped 0 items")
    for what, n in summary["notes"].items():
        lines.append(f"note: {n} × {what}")
    for w in summary["warnings"]:
        lines.append(f"warning: {w}")
    if summary["units"]["reused_from_previous_run"]:
        lines.append(f"resumed: {summary['units']['reused_from_previous_run']} of "
                     f"{summary['units']['total']} units reused from the previous run")
    lines.append(f"summary saved to {Path(summary['out']) / SUMMARY}")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj.resolve())
    return obj
