"""The report's "Operating points and calibration" table: what a clinical reader asks after
the results table — sensitivity and specificity at a threshold chosen on val, and whether the
probabilities are calibrated — from each run's predictions_val.csv and predictions_test.csv
alone (no model run), as `causalign evaluate --operating-point RULE --calibrate temperature`
computes them: threshold chosen on val (`choose_threshold`), sensitivity, specificity, PPV and
NPV on test (`operating_point_metrics`), T fitted on val (`fit_temperature`), test ECE before
and after (`apply_temperature`, 15 bins as metrics.json). report.html shows it
(`report.html._clinical_section`) and the benchmark's tables.md (so the demo's summary.md)
carries it as markdown (`clinical_markdown`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..metrics.calibration import apply_temperature, fit_temperature
from ..metrics.classification import expected_calibration_error
from ..metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    one_vs_rest,
    operating_point_metrics,
)
from .tables import fmt_mean_std

if TYPE_CHECKING:
    from ..engine.benchmark import Table
    from ..engine.evaluate import Predictions

# the rules of the table, in its column order: Youden's J and a screening point
CLINICAL_POINTS = ("youden", "sensitivity=0.9")
# each rule's test rates, in column order (operating_point_metrics' keys)
CLINICAL_RATES = ("sensitivity", "specificity", "ppv", "npv")

# the section's caption, markdown (backticks: code); report.html converts it (`caption_html`)
CLINICAL_TITLE = "Operating points and calibration"
CLINICAL_CAPTION = (
    "Per method (default setting): the threshold on the positive class's probability "
    "(class 1's of two; for more, each class's in turn, see below) chosen on the val split "
    "by Youden's J and by sensitivity ≥ 0.9, the test "
    "sensitivity, specificity, PPV and NPV at it (PPV and NPV depend on the test split's "
    "prevalence, given under each table), and the test ECE (15 bins) before and after "
    "temperature scaling fitted on val, with its T; from predictions_val.csv and "
    "predictions_test.csv, as `causalign evaluate --operating-point RULE --calibrate "
    "temperature` gives them; for more than two classes, one row per class, that class "
    "against the rest (`--positive CLASS`). Mean (std, ddof 0) over seeds where a method has "
    "several; seeds: the runs counted (\"3 (2 with val thresholds)\": one run chose none, "
    "e.g. without predictions_val.csv; the notes say why).")


def run_clinical_values(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """One run's values for the table: ``{"n_classes", "<rule>.threshold" / ".sensitivity" /
    ".specificity", "ece", "ece_after", "temperature"}`` (a value None where it cannot be
    computed) and the notes saying why; for more than two classes the rates are per class
    against the rest, ``"<c>/<rule>.<rate>"`` for class index c, with ``"classes"`` the
    names. A run without predictions_test.csv gives ({},
    [note]); without predictions_val.csv, only the test ECE (nothing to choose or fit on)."""
    from ..engine.evaluate import read_predictions

    test_csv, val_csv = run_dir / "predictions_test.csv", run_dir / "predictions_val.csv"
    if not test_csv.is_file():
        # runs from before the predictions files (or collected without them): said, no crash
        return {}, ["no predictions_test.csv (a run older than the predictions files)"]
    test = read_predictions(test_csv)
    labels = np.asarray(test.labels, dtype=np.int64)
    values: dict[str, Any] = {"n_classes": test.probs.shape[1],
                              "ece": expected_calibration_error(test.probs, test.labels),
                              # what PPV and NPV depend on: each class's test count
                              "test_counts": np.bincount(
                                  labels, minlength=test.probs.shape[1]).tolist(),
                              "classes": list(test.classes)}
    if not val_csv.is_file():
        return values, ["no predictions_val.csv: no threshold chosen, no temperature fitted"]
    val = read_predictions(val_csv)
    if val.probs.shape[1] != test.probs.shape[1]:
        return values, [f"predictions_val.csv has {val.probs.shape[1]} classes, "
                        f"predictions_test.csv {test.probs.shape[1]}"]
    notes: list[str] = []
    if test.probs.shape[1] == 2:
        values.update(_operating_points(val, test, 1, "", "", notes))
    else:
        # no positive class by convention: each class against the rest, as `evaluate
        # --positive CLASS` gives it, under keys "<class index>/<rule>.<rate>"
        for c, name in enumerate(test.classes):
            values.update(_operating_points(val, test, c, f"{c}/", f" ({name} vs rest)", notes))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            temperature = fit_temperature(val.probs, val.labels)
        # a fit at the search bound (a separated val split) is worth a reader's note
        notes += [str(w.message) for w in caught]
    except InputError as exc:
        notes.append(f"temperature scaling: {exc}")
    else:
        values["temperature"] = temperature
        values["ece_after"] = expected_calibration_error(
            apply_temperature(test.probs, temperature), test.labels)
    return values, notes


def _operating_points(val: Predictions, test: Predictions, positive: int, prefix: str,
                      what: str, notes: list[str]) -> dict[str, float | None]:
    """Each rule's threshold chosen on val and the test sensitivity / specificity / PPV / NPV
    at it for class ``positive`` against the rest (`one_vs_rest`: class 1 of two classes is
    the CSVs' own numbers, as `evaluate --positive`), keyed
    ``<prefix><rule>.<threshold|sensitivity|specificity|ppv|npv>``; a rule that
    cannot choose (a val split without the class, or of it alone) is appended to ``notes``."""
    pv, yv = one_vs_rest(val.probs, val.labels, positive)
    pt, yt = one_vs_rest(test.probs, test.labels, positive)
    out: dict[str, float | None] = {}
    for rule in CLINICAL_POINTS:
        try:
            t = choose_threshold(OperatingPoint.parse(rule), pv, yv)
        except InputError as exc:  # a val split holding one class: nothing to choose
            notes.append(f"{rule}{what}: {exc}")
            continue
        rates = operating_point_metrics(pt, yt, t)
        out[f"{prefix}{rule}.threshold"] = t
        out.update({f"{prefix}{rule}.{k}": rates[k] for k in CLINICAL_RATES})
    return out


def clinical_table(out: Path, results: dict, dataset: str) -> Table | None:
    """The table of ``dataset``: one row per method label (default setting), each cell the
    mean (std, ddof 0) over the method's seeds as the results table gives it, the value
    alone for one seed; None when the dataset has no finished default run."""
    from ..engine.benchmark import Table

    runs: dict[str, list[dict]] = {}
    for r in results["runs"]:
        label = _default_label(r)
        if r.get("status") == "done" and r.get("dataset") == dataset and label is not None:
            runs.setdefault(label, []).append(r)
    if not runs:
        return None
    points = [f"{rule}.{k}" for rule in CLINICAL_POINTS for k in ("threshold", *CLINICAL_RATES)]
    calibration = ["ece", "ece_after", "temperature"]
    per_method: list[tuple[str, list[dict[str, Any]]]] = []
    notes, classes = [], set()
    for label, rs in runs.items():
        per_seed: list[dict[str, Any]] = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            run_dir = out / str(r.get("run_dir", ""))
            try:
                values, run_notes = run_clinical_values(run_dir)
            except InputError as exc:  # an unreadable CSV: that run noted, the rest shown
                values, run_notes = {}, [str(exc)]
            notes += [f"{label} seed {r['seed']}: {n}" for n in run_notes]
            if values:
                per_seed.append(values)
                classes.add(values["n_classes"])
        per_method.append((label, per_seed))

    def cells(per_seed: list[dict[str, Any]], keys: list[str]) -> list[str]:
        return [fmt_mean_std([v.get(k) for v in per_seed]) for k in keys]

    def seeds_cell(per_seed: list[dict[str, Any]]) -> str:
        # a run without predictions_val.csv (or with one class in it) has a test ECE but
        # no threshold: the cell said 3 while the threshold columns averaged 2
        chosen = sum(any(k.endswith("youden.threshold") for k in v) for v in per_seed)
        n = len(per_seed)
        return str(n) if chosen == n else f"{n} ({chosen} with val thresholds)"

    # one number per cell (PPV and NPV columns beside each rule's sens./spec.): a merged
    # "sens / spec / PPV / NPV" cell of four mean (std) pairs would not read
    rates = ["sens. (test)", "spec. (test)", "PPV (test)", "NPV (test)"]
    header = ["method", "seeds", "Youden: threshold (val)", *rates,
              "sens.=0.9: threshold (val)", *rates, "ECE (test)", "ECE after T", "T (val)"]
    rows = []
    prevalence = _prevalence_note([v for _, ps in per_method for v in ps])
    if not classes - {2}:
        rows = [[label, seeds_cell(ps), *cells(ps, points + calibration)]
                for label, ps in per_method]
    else:
        header.insert(1, "class (vs rest)")
        for label, ps in per_method:
            # the class names of the method's first run read (seeds of one dataset agree)
            names = next((v["classes"] for v in ps if v["n_classes"] > 2), [])
            if not names:  # no run read, or two-class runs in a dataset of more
                rows.append([label, "–", seeds_cell(ps), *cells(ps, points + calibration)])
                continue
            for c, name in enumerate(names):
                # ECE and T are the method's, over all classes: on its first row only, as
                # repeating them on each class's row would read as per-class values
                rows.append([label, str(name), seeds_cell(ps),
                             *cells(ps, [f"{c}/{k}" for k in points]),
                             *(cells(ps, calibration) if c == 0 else [""] * 3)])
        notes.insert(0, f"{', '.join(str(c) for c in sorted(classes - {2}))} classes: "
                        f"no positive class by convention, so one row per class, that class "
                        f"against the rest (one-vs-rest, as causalign evaluate RUN "
                        f"--operating-point RULE --positive CLASS gives it); ECE and "
                        f"temperature scaling cover all classes, on each method's first row")
    if prevalence:
        # before the runs' notes, after the class note: the caption a PPV is read against
        notes.insert(1 if classes - {2} else 0, prevalence)
    return Table(dataset, header, rows, [[False] * (len(header) - 1) for _ in rows], notes)


def _default_label(r: dict) -> str | None:
    """The method label of a run's row, None if the run is no experiment's default setting:
    its first experiment's default role (``roles``), so a run two experiments share under two
    labels keeps one row name — its record's own ``label`` is the last selection's, and the
    row was "erm" after the whole suite, "baseline" after `--only B`; results without roles
    (older versions): the record's label and setting."""
    roles = r.get("roles")
    if not roles:
        return str(r["label"]) if r.get("setting", "default") == "default" else None
    for e in r.get("experiments") or list(roles):
        for lab, setting in roles.get(e, []):
            if setting == "default":
                return str(lab)
    return None


def _prevalence_note(per_run: list[dict[str, Any]]) -> str | None:
    """"test prevalence (PPV and NPV depend on it): malignant 16/32 = 0.500" — of class 1 for
    two classes, of each class for more — from the test labels of the runs read; where the
    runs' test splits differ, the mean (std) of the share over runs. None if none was read."""
    read = [v for v in per_run if "test_counts" in v]
    if not read:
        return None
    names = read[0]["classes"]
    shown = [1] if len(names) == 2 else range(len(names))
    parts = []
    for c in shown:
        counts = {(v["test_counts"][c], sum(v["test_counts"]))
                  for v in read if len(v["test_counts"]) == len(names)}
        if len(counts) == 1:
            k, n = counts.pop()
            parts.append(f"{names[c]} {k}/{n} = {k / n:.3f}" if n else f"{names[c]} –")
        else:  # runs on other test splits (or class counts): their spread, not one count
            share = [v["test_counts"][c] / sum(v["test_counts"]) for v in read
                     if len(v["test_counts"]) == len(names) and sum(v["test_counts"])]
            parts.append(f"{names[c]} {fmt_mean_std(share)} over the runs' test splits")
    return f"test prevalence (PPV and NPV depend on it): {', '.join(parts)}"


def clinical_markdown(out: Path, results: dict) -> str:
    """The section as markdown for tables.md: title, caption and each dataset's table (in the
    order of its first finished run, as report.html) with its notes — a run without
    predictions files is one of them; "" when no run finished. A dataset whose table fails
    gets a line saying so: tables.md must not be lost to it."""
    from ..engine.benchmark import table_markdown

    datasets = clinical_datasets(results)
    if not datasets:
        return ""
    parts = [f"## {CLINICAL_TITLE}", "", CLINICAL_CAPTION, ""]
    for d in datasets:
        try:
            t = clinical_table(out, results, d)
        except Exception as exc:  # a table must not sink tables.md
            parts += [f"operating points for {d} failed: {exc}", ""]
            continue
        if t is not None:
            parts.append(table_markdown(t))
    return "\n".join(parts)


def clinical_datasets(results: dict) -> list[str]:
    """The datasets of the finished runs, in order of their first run: the section's order."""
    datasets: list[str] = []
    for r in results.get("runs", []):
        if r.get("status") == "done" and r.get("dataset") not in datasets:
            datasets.append(r["dataset"])
    return datasets


def caption_html(text: str) -> str:
    """A markdown caption as HTML: escaped, backtick spans as <code>."""
    import html

    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))
