"""Mutation audit of the trainer's BatchNorm / atomic-write / resume-settings handling, the
LIDC --patches-csv split, BraTS grade discovery, CBIS-DDSM path resolution and the export
folder's file ownership (`OwnedFiles`): behaviours the earlier tests let slip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from causalign.data.format import LesionDataset
from causalign.data.importers.brats import find_grades
from causalign.data.importers.util import assign_splits
from causalign.engine import TrainConfig
from causalign.engine.trainer import (
    _keep_run_params,
    drop_single_last,
    recalibrate_batchnorm,
    settings_diff,
)
from causalign.explain.export import OwnedFiles, _resolves_inside
from causalign.methods import build_method
from causalign.methods.base import resolved_params

EXPLAIN = ".causalign-explain.json"

# ----------------------------------------------------------------------------- export


def _manifest(out: Path) -> list[str]:
    return json.loads((out / EXPLAIN).read_text(encoding="utf-8"))


def test_a_sibling_folder_sharing_the_name_prefix_is_outside(tmp_path):
    """`_resolves_inside` compares whole path components: OUT/maps linked to a sibling
    folder 'out_mine' (whose path starts with OUT's text) is outside OUT, so a manifest entry
    through it is ignored and the user's file there kept. Kills the mutant that dropped the
    separator from the prefix test ('/x/out_mine'.startswith('/x/out'))."""
    assert _resolves_inside("/x/out", "/x/out") and _resolves_inside("/x/out/maps", "/x/out")
    assert not _resolves_inside("/x/out_mine", "/x/out")
    mine = tmp_path / "out_mine"
    mine.mkdir()
    (mine / "a.npy").write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "maps").symlink_to(mine)
    (out / EXPLAIN).write_text(json.dumps(["maps/a.npy", "grid.png"]))
    assert OwnedFiles.read_manifest(out / EXPLAIN, out) == {"grid.png"}
    OwnedFiles(out, EXPLAIN, planned=[]).finish()
    assert (mine / "a.npy").read_text() == "the user's"


def test_a_planned_file_not_written_is_removed_and_unlisted(tmp_path):
    """`finish` removes the planned files the run did not write (the manifest was widened to
    them at the start, so they count as the export's), not only the previous manifest's.
    Kills the mutant that removed only ``previous - written`` (maps/b.npy stayed on disk,
    listed by no manifest)."""
    out = tmp_path / "out"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "b.npy").write_text("stale")
    files = OwnedFiles(out, EXPLAIN, planned=["maps/a.npy", "maps/b.npy"])
    assert _manifest(out) == ["maps/a.npy", "maps/b.npy"]  # widened before any write
    files.path("maps/a.npy").write_text("new")
    files.finish()
    assert not (out / "maps" / "b.npy").exists()
    assert (out / "maps" / "a.npy").read_text() == "new"
    assert _manifest(out) == ["maps/a.npy"]


def test_the_final_manifest_lists_only_what_this_run_wrote(tmp_path):
    """A re-export writing fewer files: the earlier run's extra map is removed and the
    manifest afterwards names only this run's files (a third run must not own files that no
    longer exist, nor a same-named file the user puts there later). Kills the mutant that
    kept the previous names in the final manifest."""
    out = tmp_path / "out"
    first = OwnedFiles(out, EXPLAIN, planned=["a.npy", "b.npy"])
    for name in ("a.npy", "b.npy"):
        first.path(name).write_text("1")
    first.finish()
    assert _manifest(out) == ["a.npy", "b.npy"]
    second = OwnedFiles(out, EXPLAIN, planned=["a.npy"])
    assert second.previous == {"a.npy", "b.npy"}
    second.path("a.npy").write_text("2")
    second.finish()
    assert not (out / "b.npy").exists()
    assert _manifest(out) == ["a.npy"]
    (out / "b.npy").write_text("the user's, later")  # not the export's any more
    OwnedFiles(out, EXPLAIN, planned=["a.npy"]).finish()
    assert (out / "b.npy").read_text() == "the user's, later"


def test_a_folder_with_this_commands_manifest_is_not_taken_for_an_older_export(tmp_path):
    """`_unlisted_export` looks at summary.json only when OUT lacks this command's own
    manifest: with it, the folder is this command's and a summary holding the other
    command's key ('saliency') does not refuse the re-export. Kills the mutant that
    ignored the own manifest (a second `counterfactual` into its own folder was refused
    as `causalign explain` output), and the one that left grid.png out of the clash."""
    from causalign.errors import CausalignError
    from causalign.explain.export import refuse_other_exports

    cf = ".causalign-counterfactual.json"
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"saliency": "gradient", "n": 1}))
    (out / "grid.png").write_text("png")
    try:  # without the manifest: an older explain's output, refused
        refuse_other_exports(out, cf, {"summary.json", "grid.png"})
        raise AssertionError("not refused")
    except CausalignError as exc:  # naming both files it would overwrite
        assert "causalign explain" in str(exc) and "grid.png and summary.json" in str(exc)
    (out / cf).write_text(json.dumps(["summary.json", "grid.png"]))
    refuse_other_exports(out, cf, {"summary.json", "grid.png"})  # its own: allowed

# ----------------------------------------------------------------------------- trainer


def _bn_means(model: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_dropout_model(ds: LesionDataset) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(ds.image_shape[0], 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, ds.num_classes))


def test_recalibration_drops_a_final_one_sample_batch_as_training_does(tiny_data):
    """`recalibrate_batchnorm` over 5 samples in batches of 2 leaves out the final
    one-sample batch (`drop_single_last`, as the training epochs do): the statistics equal
    those over the first 4 samples. Kills the mutant that kept every batch (drop=False)."""
    ds = LesionDataset(tiny_data, "train")
    five, four = ds.restricted(list(range(5))), ds.restricted(list(range(4)))
    method, cpu = build_method("erm"), torch.device("cpu")
    a, b = _bn_dropout_model(ds), _bn_dropout_model(ds)
    recalibrate_batchnorm(a, method, five, batch_size=2, device=cpu)
    recalibrate_batchnorm(b, method, four, batch_size=2, device=cpu)
    for x, y in zip(_bn_means(a), _bn_means(b), strict=True):
        torch.testing.assert_close(x, y)
    c = _bn_dropout_model(ds)  # and the 5th sample does change them when it is in a batch
    recalibrate_batchnorm(c, method, five, batch_size=5, device=cpu)
    assert not torch.allclose(_bn_means(c)[0], _bn_means(b)[0])


def test_recalibration_draws_nothing_from_the_global_generator(tiny_data):
    """update_bn runs the model in train mode, where dropout draws random masks; the
    recalibration forks the RNG so the run's later draws (the next epoch's order and
    dropout) are those of a run without it. Kills the mutant without `fork_rng`."""
    ds = LesionDataset(tiny_data, "train").restricted(list(range(8)))
    model = _bn_dropout_model(ds)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    recalibrate_batchnorm(model, build_method("erm"), ds, batch_size=4,
                          device=torch.device("cpu"))
    assert torch.equal(torch.rand(4), want)


def test_single_last_batch_is_dropped_only_with_batchnorm_and_more_than_one_batch():
    """Guard: `drop_single_last` is True only for a final batch of exactly one sample, more
    samples than one batch, and a model with BatchNorm (`n >= batch_size` instead of `>`
    is an equivalent mutant: n == batch_size leaves remainder 0, never 1)."""
    bn, plain = nn.Sequential(nn.BatchNorm2d(1)), nn.Sequential(nn.Conv2d(1, 1, 1))
    assert drop_single_last(5, 2, bn) and drop_single_last(33, 16, bn)
    assert not drop_single_last(5, 2, plain)
    assert not drop_single_last(4, 2, bn) and not drop_single_last(6, 4, bn)
    assert not drop_single_last(1, 1, bn) and not drop_single_last(1, 4, bn)


def _run_folder(root: Path, cfg: TrainConfig) -> Path:
    """A run folder's config.yaml as the trainer writes it (resolved settings and the
    method's resolved hyper-parameters)."""
    run = root / "run"
    run.mkdir(parents=True)
    stored = {**cfg.to_dict(), "method_params": resolved_params(build_method(cfg.method,
                                                                             cfg.method_args))}
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    return run


def test_device_and_threads_are_no_settings_difference(tmp_path):
    """`settings_diff` leaves out device and threads (where and how fast, not what is
    trained: a run started on a GPU resumes on the CPU with 2 threads) but reports any
    other key. Kills the mutant that compared threads."""
    run = _run_folder(tmp_path, TrainConfig(method="erm", device="cpu", threads=0))
    assert settings_diff(run, TrainConfig(method="erm", device="cuda", threads=2)) == []
    assert settings_diff(run, TrainConfig(method="erm", threads=2, lr=0.5)) == [
        f"lr {TrainConfig.lr!r} -> 0.5"]


def test_an_export_with_its_manifest_is_named_by_that_manifest_not_as_an_older_version(
        tmp_path):
    """explain's output with its manifest, then `counterfactual` into the same folder: the
    refusal names the manifest (.causalign-explain.json); summary.json's keys identify only
    manifest-less output of older versions. Kills the mutant that took any summary with
    'saliency' for an older version's, whose message sent the user looking for a version
    mismatch."""
    from causalign.errors import CausalignError
    from causalign.explain.export import refuse_other_exports

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"saliency": "gradient", "n": 1}))
    (out / "grid.png").write_text("png")
    (out / EXPLAIN).write_text(json.dumps(["summary.json", "grid.png"]))
    try:
        refuse_other_exports(out, ".causalign-counterfactual.json", {"summary.json"})
        raise AssertionError("not refused")
    except CausalignError as exc:
        msg = str(exc)
    assert f"causalign explain` ({EXPLAIN})" in msg and "older" not in msg


def test_a_manifest_that_is_not_a_list_owns_nothing(tmp_path):
    """`read_manifest`: a manifest holding a JSON object (edited, or another tool's file of
    that name) is not interpreted, so none of its keys is removed. Kills the mutant that
    dropped the list check (the object's keys were taken as owned files and deleted)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / EXPLAIN).write_text(json.dumps({"notes.txt": 1}))
    assert OwnedFiles.read_manifest(out / EXPLAIN, out) == set()
    OwnedFiles(out, EXPLAIN, planned=[]).finish()
    assert (out / "notes.txt").read_text() == "keep"


def test_killed_writes_of_the_manifest_and_summary_leave_no_temporaries(tmp_path):
    """A SIGKILL during the atomic write of the manifest or summary.json leaves
    '.NAME.<random>.tmp' beside them; the next export removes those (and a map's), but not
    a temporary of a file that is not its own. Kills the mutant that cleaned only the maps'
    temporaries."""
    out = tmp_path / "out"
    (out / "maps").mkdir(parents=True)
    stale = [out / f".{EXPLAIN}.k3j2.tmp", out / ".summary.json.x81q.tmp",
             out / "maps" / ".a.npy.zz9.tmp"]
    other = out / ".notes.txt.ab12.tmp"
    for f in [*stale, other]:
        f.write_text("partial")
    OwnedFiles(out, EXPLAIN, planned=["maps/a.npy"])
    assert [f for f in stale if f.exists()] == [] and other.exists()

# ----------------------------------------------------------------------------- BraTS grades


def _subjects(root: Path, where: dict[str, str]) -> dict[str, dict[str, Path]]:
    """find_subjects' form for subjects in folders ``where[subj]`` (relative to root)."""
    return {s: {"t1": root / rel / s / f"{s}_t1.nii.gz"} for s, rel in where.items()}


def test_brats_grade_folders_are_matched_in_any_case_nearest_first(tmp_path):
    """Grade folders 'hgg'/'Lgg' count like HGG/LGG, and the folder nearest the subject
    decides (an archive kept under another grade's folder). Kills the case-sensitive match
    and the mutant without `break` (the outermost folder won)."""
    subj = _subjects(tmp_path, {"A_001": "hgg", "A_002": "Lgg", "A_003": "HGG/old/LGG"})
    assert find_grades(tmp_path, subj) == {"A_001": "HGG", "A_002": "LGG", "A_003": "LGG"}


def test_brats_grade_csv_two_folders_down_is_found_and_read_leniently(tmp_path):
    """name_mapping.csv at <root>/<a>/<b>/ (the Kaggle copy of BraTS 2020): its Grade is read
    whatever its case, subject cells with spaces match, rows with another grade are
    ignored, and an unreadable CSV beside it does not stop the search. Kills the mutants
    that searched two levels only, compared Grade case-sensitively, matched unstripped
    cells, and re-raised on the unreadable CSV."""
    deep = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    deep.mkdir(parents=True)
    (deep / "name_mapping.csv").write_text(
        "Grade,BraTS_2020_subject_ID\nhgg, S_001 \nLGG,S_002\nunknown,S_003\n")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00broken\x00")
    subj = _subjects(tmp_path, {s: "data" for s in ("S_001", "S_002", "S_003")})
    assert find_grades(tmp_path, subj) == {"S_001": "HGG", "S_002": "LGG"}


def test_brats_grade_folder_wins_over_the_csv(tmp_path):
    """A subject under HGG/ that a CSV calls LGG keeps the folder's grade (the CSV only fills
    subjects without one: `setdefault`). Kills the mutant where the CSV overwrote it."""
    (tmp_path / "grades.csv").write_text("Grade,id\nLGG,S_1\nLGG,S_2\n")
    subj = _subjects(tmp_path, {"S_1": "HGG", "S_2": "plain"})
    assert find_grades(tmp_path, subj) == {"S_1": "HGG", "S_2": "LGG"}

# ----------------------------------------------------------------------------- CBIS-DDSM paths


def _cbis_resolver(src: Path):
    """A CbisDdsmImporter ready to `resolve` (what `plan` sets up before the first use)."""
    import pydicom

    from causalign.data.importers.cbis_ddsm import CbisDdsmImporter, CbisDdsmOptions

    imp = CbisDdsmImporter(src, CbisDdsmOptions())
    imp._case_dirs, imp._series_index, imp.pydicom = None, {}, pydicom
    return imp


def _cbis_case(src: Path) -> dict[str, Path]:
    """CBIS-DDSM/<case>/<study>/<folder>/1-k.dcm: two series whose folder names are not
    their UIDs (as in the TCIA download), the CSV's path naming study 9.9 / series 1.1.2."""
    from fixtures_real import write_dicom

    case = src / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC_1" / "07-20-2016-x"
    files = {}
    for k, series in enumerate(("1.1.1", "1.1.2")):
        f = case / f"{k}.000000-ROI-{k}" / f"1-{k}.dcm"
        write_dicom(f, np.full((4, 4), k, np.uint16), SOPInstanceUID=f"1.2.{k}",
                    SeriesInstanceUID=series, StudyInstanceUID="9.9")
        files[series] = f
    return files


def test_cbis_path_resolves_by_the_series_uid_in_its_third_component(tmp_path):
    """A CSV path that does not exist is resolved in its case folder by its third component,
    the SeriesInstanceUID (not the second, the study's), with Windows separators too; an
    unknown series gives all of the case's files. Kills the mutants that matched parts[1],
    needed a 4th component, and no longer turned backslashes into slashes."""
    files = _cbis_case(tmp_path)
    imp = _cbis_resolver(tmp_path)
    case = "Mass-Training_P_00001_LEFT_CC_1"
    assert imp.resolve(f"{case}/9.9/1.1.2/000000.dcm", "ROI") == [files["1.1.2"]]
    assert imp.resolve(f"{case}/1.1.2/1.1.1", "ROI") == [files["1.1.1"]]
    assert imp.resolve(f"{case}\\9.9\\1.1.1\\000000.dcm", "ROI") == [files["1.1.1"]]
    assert imp.resolve(f"{case}/9.9/7.7/000000.dcm", "ROI") == sorted(files.values())


def test_cbis_literal_path_under_the_cbis_ddsm_folder_is_used_as_is(tmp_path):
    """A CSV path that exists below SRC/CBIS-DDSM (the TCIA folder, SRC holding the CSVs
    beside it) is that one file, even when the series UID would name another. Kills the
    mutant that tried SRC alone."""
    files = _cbis_case(tmp_path)
    imp = _cbis_resolver(tmp_path)
    rel = files["1.1.1"].relative_to(tmp_path / "CBIS-DDSM").as_posix()
    assert imp.resolve(rel, "image") == [files["1.1.1"]]
    assert imp.resolve("/" + rel, "image") == [files["1.1.1"]]


def test_cbis_case_folder_found_below_an_extra_level_and_missing_case_is_skipped(tmp_path):
    """The case folder is looked for up to 3 levels below SRC (manifest-… / CBIS-DDSM /
    <case>); a path whose case folder does not exist is a SkipItem naming it. Kills the
    mutant that searched SRC's top level only."""
    from causalign.data.importers.util import SkipItem

    files = _cbis_case(tmp_path / "manifest-123")
    imp = _cbis_resolver(tmp_path)
    case = "Mass-Training_P_00001_LEFT_CC_1"
    assert imp.resolve(f"{case}/9.9/1.1.2/000000.dcm", "ROI") == [files["1.1.2"]]
    try:
        imp.resolve("Mass-Training_P_00002_LEFT_CC_1/9.9/1.1.2/000000.dcm", "ROI mask")
        raise AssertionError("not skipped")
    except SkipItem as exc:
        assert exc.reason == "ROI mask not found" and "Mass-Training_P_00002" in exc.detail

# ----------------------------------------------------------------------------- LIDC patches


def _lidc_patches(src: Path, rows: list[tuple[str, str, str]], pid_col: str = "patient_id"):
    """patches.csv rows (patient, malignancy scores, split) with a 16×16 HU patch each; the
    planned units of `lidc --patches-csv patches.csv` and the importer."""
    from causalign.data.importers.lidc import LidcImporter, LidcOptions

    (src / "p").mkdir(parents=True)
    lines = [f"image,{pid_col},malignancy,split"]
    for k, (patient, scores, split) in enumerate(rows):
        np.save(src / "p" / f"{k}.npy", np.full((16, 16), -800 + k, np.int16))
        lines.append(f"p/{k}.npy,{patient},{scores},{split}")
    (src / "patches.csv").write_text("\n".join(lines) + "\n")
    imp = LidcImporter(src, LidcOptions(patches_csv="patches.csv", size=16, seed=4))
    return imp.plan(), imp


def test_lidc_patches_csv_split_follows_the_csv_then_the_patient(tmp_path):
    """--patches-csv: a row with an empty split takes the split the CSV gives the patient's
    other rows (the first one given, when the CSV itself puts the patient in two, which is
    noted); only the patients the CSV leaves wholly open are drawn, stratified by label,
    exactly as `assign_splits` draws them alone. Kills the mutants that took the last given
    split, dropped the note, drew every patient (the CSV's fixed patients shifted the draw
    of the others) and drew without strata."""
    fixed = [("A", "5;5;4", "val"), ("A", "5;5;4", ""), ("B", "1;1;2", "test"),
             ("B", "1;1;2", "val"), ("B", "1;1;2", "")]
    free = [(f"F{i:02d}", "5;5;4" if i % 4 == 0 else "1;1;2", "") for i in range(24)]
    units, imp = _lidc_patches(tmp_path, fixed + free)
    split = [u.split for u in units]
    assert split[:5] == ["val", "val", "test", "val", "test"]
    assert any("more than one split" in note and "B: test, val" in note
               for note in imp.notes), imp.notes
    want = assign_splits([p for p, _, _ in free], imp.opts.fractions(), 4,
                         strata=[int(s.startswith("5")) for _, s, _ in free])
    assert split[5:] == [want[p] for p, _, _ in free]
    assert {"train", "val", "test"} <= set(split[5:])


def test_lidc_patches_csv_patient_column_may_be_named_patient(tmp_path):
    """The patient column may be 'patient_id', 'patient' or 'case' (the names the importer
    accepts): with 'patient' both rows of one patient land in one split. Kills the mutant
    that dropped 'patient' (the CSV was refused as lacking a patient column)."""
    rows = [(f"P{i}", "5;5;4" if i % 2 else "1;1;2", "") for i in range(6) for _ in range(2)]
    units, _ = _lidc_patches(tmp_path, rows, pid_col="patient")
    by: dict[str, set[str]] = {}
    for u, (patient, _, _) in zip(units, rows, strict=True):
        by.setdefault(patient, set()).add(u.split)
    assert len(units) == 12 and all(len(s) == 1 for s in by.values())


def test_kept_run_params_yield_to_the_users_own_and_skip_placement(tmp_path):
    """`_keep_run_params`: a stored hyper-parameter that differs from today's default is
    kept, except where the user set the key (their method_args win) and for placement
    settings (cache_device: where, not what, is computed). Kills the mutants that left the
    user's keys or the placement keys out of the skip set."""
    stored = resolved_params(build_method("causal-align", {}))
    stored.update(cg_iters=3, cache_device="cpu")
    mine = _keep_run_params(TrainConfig(method="causal-align", method_args={"cg_iters": 5}),
                            dict(stored))
    assert mine.method_args["cg_iters"] == 5
    assert "cache_device" not in mine.method_args
    kept = _keep_run_params(TrainConfig(method="causal-align"), dict(stored))
    assert kept.method_args["cg_iters"] == 3 and "cache_device" not in kept.method_args


def test_another_method_reports_its_method_args_too(tmp_path):
    """`settings_diff` compares method_args as resolved values only when the method is the
    same; a resume with another method names the method and the raw method_args change.
    Kills the mutant that skipped method_args whatever the method."""
    run = _run_folder(tmp_path, TrainConfig(method="rrr", method_args={"lam": 5.0}))
    diffs = settings_diff(run, TrainConfig(method="erm"))
    assert diffs == ["method 'rrr' -> 'erm'", "method_args {'lam': 5.0} -> {}"]


def test_lidc_patches_csv_row_with_an_unknown_split_is_skipped(tmp_path):
    """A split cell that is not train/val/test ('training') skips its row with the reason
    'bad split value' (it never becomes a split of its own). Kills the mutant that let it
    through."""
    units, imp = _lidc_patches(tmp_path, [("A", "5;5;4", "training"), ("B", "1;1;2", "val")])
    assert [u.split for u in units] == ["val"]
    assert [s.reason for s in imp.skipped] == ["bad split value"]
