"""The report's "Operating points and calibration" table: what a clinical reader asks after
the results table — sensitivity and specificity at a threshold chosen on val, and whether the
probabilities are calibrated — from each run's predictions_val.csv and predictions_test.csv
alone (no model run), as `causalign evaluate --operating-point RULE --calibrate temperature`
computes them: threshold chosen on val (`choose_threshold`), rates on test
(`operating_point_metrics`), T fitted on val (`fit_temperature`), test ECE before and after
(`apply_temperature`, 15 bins as metrics.json).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..metrics.calibration import apply_temperature, fit_temperature
from ..metrics.classification import expected_calibration_error
from ..metrics.operating_point import OperatingPoint, choose_threshold, operating_point_metrics
from .tables import fmt_mean_std

if TYPE_CHECKING:
    from ..engine.benchmark import Table

# the rules of the table, in its column order: Youden's J and a screening point
CLINICAL_POINTS = ("youden", "sensitivity=0.9")


def run_clinical_values(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """One run's values for the table: ``{"n_classes", "<rule>.threshold" / ".sensitivity" /
    ".specificity", "ece", "ece_after", "temperature"}`` (a value None where it cannot be
    computed) and the notes saying why. A run without predictions_test.csv gives ({},
    [note]); without predictions_val.csv, only the test ECE (nothing to choose or fit on)."""
    from ..engine.evaluate import read_predictions

    test_csv, val_csv = run_dir / "predictions_test.csv", run_dir / "predictions_val.csv"
    if not test_csv.is_file():
        # runs from before the predictions files (or collected without them): said, no crash
        return {}, ["no predictions_test.csv (a run older than the predictions files)"]
    test = read_predictions(test_csv)
    values: dict[str, Any] = {"n_classes": test.probs.shape[1],
                              "ece": expected_calibration_error(test.probs, test.labels)}
    if not val_csv.is_file():
        return values, ["no predictions_val.csv: no threshold chosen, no temperature fitted"]
    val = read_predictions(val_csv)
    if val.probs.shape[1] != test.probs.shape[1]:
        return values, [f"predictions_val.csv has {val.probs.shape[1]} classes, "
                        f"predictions_test.csv {test.probs.shape[1]}"]
    notes: list[str] = []
    if test.probs.shape[1] == 2:
        for rule in CLINICAL_POINTS:
            try:
                t = choose_threshold(OperatingPoint.parse(rule), val.probs, val.labels)
            except InputError as exc:  # a val split holding one class: nothing to choose
                notes.append(f"{rule}: {exc}")
                continue
            rates = operating_point_metrics(test.probs, test.labels, t)
            values.update({f"{rule}.threshold": t, f"{rule}.sensitivity": rates["sensitivity"],
                           f"{rule}.specificity": rates["specificity"]})
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


def clinical_table(out: Path, results: dict, dataset: str) -> Table | None:
    """The table of ``dataset``: one row per method label (default setting), each cell the
    mean (std, ddof 0) over the method's seeds as the results table gives it, the value
    alone for one seed; None when the dataset has no finished default run."""
    from ..engine.benchmark import Table

    runs: dict[str, list[dict]] = {}
    for r in results["runs"]:
        if (r.get("status") == "done" and r.get("dataset") == dataset
                and r.get("setting", "default") == "default"):
            runs.setdefault(str(r["label"]), []).append(r)
    if not runs:
        return None
    cols = [*(f"{rule}.{k}" for rule in CLINICAL_POINTS
              for k in ("threshold", "sensitivity", "specificity")),
            "ece", "ece_after", "temperature"]
    rows, notes, classes = [], [], set()
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
        rows.append([label, str(len(per_seed)),
                     *(fmt_mean_std([v.get(c) for v in per_seed]) for c in cols)])
    if classes - {2}:
        notes.insert(0, f"{', '.join(str(c) for c in sorted(classes - {2}))} classes: "
                        f"no positive class, so no operating point here (one class "
                        f"against the rest: causalign evaluate RUN --operating-point RULE "
                        f"--positive CLASS, one-vs-rest); ECE and temperature scaling apply")
    header = ["method", "seeds", "Youden: threshold (val)", "sens. (test)", "spec. (test)",
              "sens.=0.9: threshold (val)", "sens. (test)", "spec. (test)", "ECE (test)",
              "ECE after T", "T (val)"]
    return Table(dataset, header, rows, [[False] * (len(header) - 1) for _ in rows], notes)

