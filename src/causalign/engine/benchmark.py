"""`causalign benchmark SUITE --out DIR`: methods × datasets × seeds × settings from a YAML
suite, resumable, collected into results.csv/json and mean (std) tables (paper 000 Table 1).

A suite (shipped: ``quick``, ``paper``, ``demo`` in causalign/suites/, or any YAML file)::

    name: quick
    defaults: {epochs: 2, width: 8}          # TrainConfig keys (method.<p> too) for every run
    datasets:
      plus-minus: {synth: {shortcut: plus-minus, size: 32, n_train: 64}}   # generated in DIR
      mine: {path: /data/lidc}               # or an existing dataset (relative to the suite)
    experiments:
      table1:
        title: Comparison with baselines
        datasets: [plus-minus]
        methods: [erm, {name: rrr, label: Ross et al. (2017), set: {method.lam: 10}}]
        seeds: [0, 1, 2]
        settings: {default: {}}              # named override sets (Table 7: distances …)
        rows: method                         # method | dataset | setting
        metrics: [test.cam_precision, test.accuracy]

Every (dataset, resolved config, seed) is one run, trained once even when several experiments
list it, in DIR/runs/<dataset>/<label>[@setting]/seed<k>. A run whose metrics.json exists is
not rerun; one with a checkpoint resumes from it (a killed benchmark continues where it
stopped). A failing run is recorded with its error and the others go on; a method that is not
registered (yet) is recorded as skipped with the reason. Outputs: DIR/results.json,
DIR/results.csv, DIR/tables.md and (by default) DIR/report.html.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..data.format import META
from ..errors import CausalignError, ConfigError
from ..io import atomic_write_json, atomic_write_text
from ..report.tables import mean_std
from .config import TrainConfig, apply_overrides
from .progress import progress_bar

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..data.synth import SynthConfig

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
ROW_KEYS = ("method", "dataset", "setting")
DEFAULT_METRICS = ["test.cam_precision", "test.accuracy"]
METRIC_LABELS = {
    "test.cam_precision": "CAM precision", "test.accuracy": "accuracy",
    "test.balanced_accuracy": "balanced acc", "test.auc": "AUC",
    "test.cam_mass_in_mask": "CAM mass in mask", "test.cam_precision_mask": "CAM prec. (mask)",
    "test.saliency_iou": "saliency IoU", "test.deletion.0.02": "deletion@2%",
}
# Rows never shown in bold: the oracle sees only the annotation, it is a ceiling, not a rival.
NOT_COMPETING = ("oracle",)


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A YAML file, or the name of a shipped suite."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: suite file not found")
        return p
    shipped = SUITES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"unknown suite '{name_or_path}': not a file, and not a shipped suite "
                      f"({', '.join(shipped_suites())})")


@dataclass
class MethodSpec:
    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    title: str
    datasets: list[str]
    methods: list[MethodSpec]
    seeds: list[int]
    settings: dict[str, dict[str, Any]]
    rows: str
    metrics: list[str]
    reference: dict[str, Any] | None = None


@dataclass
class Suite:
    name: str
    description: str
    defaults: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    experiments: list[Experiment]
    root: Path  # folder of the suite file (relative dataset paths)


def _as_list(v, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, dict)):
        return [v]
    if isinstance(v, list):
        return v
    raise ConfigError(f"{what}: expected a list, got {type(v).__name__}")


def _seed(value: Any, experiment: str) -> int:
    """A suite seed: a whole number >= 0 (int("a") was a traceback, int(1.5) silently 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"experiment '{experiment}': seeds must be whole numbers >= 0, "
                          f"got {value!r}")
    return value


def parse_suite(raw: dict, root: Path, name: str = "suite") -> Suite:
    if not isinstance(raw, dict):
        raise ConfigError(f"suite {name}: expected a mapping")
    unknown = set(raw) - {"name", "description", "defaults", "datasets", "experiments"}
    if unknown:
        raise ConfigError(f"suite {name}: unknown key(s) {', '.join(sorted(unknown))}")
    datasets = raw.get("datasets") or {}
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"suite {name}: 'datasets' must map names to {{synth: …}} or "
                          f"{{path: …}}")
    for dname, spec in datasets.items():
        if not isinstance(spec, dict) or len(set(spec) & {"synth", "path"}) != 1:
            raise ConfigError(f"suite {name}: dataset '{dname}' needs exactly one of "
                              f"'synth' or 'path'")
        if "synth" in spec:  # bad generator settings fail now, not when the first run needs them
            _synth_config(dname, spec["synth"])
    defaults = raw.get("defaults") or {}
    apply_overrides(TrainConfig(), defaults)  # unknown keys fail now, not after hours
    exps_raw = raw.get("experiments") or {}
    if not isinstance(exps_raw, dict) or not exps_raw:
        raise ConfigError(f"suite {name}: 'experiments' must map names to experiments")
    experiments = []
    for ename, e in exps_raw.items():
        if not isinstance(e, dict):
            raise ConfigError(f"experiment '{ename}': expected a mapping")
        bad = set(e) - {"title", "datasets", "methods", "seeds", "settings", "rows", "metrics",
                        "reference"}
        if bad:
            raise ConfigError(f"experiment '{ename}': unknown key(s) {', '.join(sorted(bad))}")
        ds = [str(d) for d in _as_list(e.get("datasets"), f"{ename}.datasets")]
        for d in ds:
            if d not in datasets:
                raise ConfigError(f"experiment '{ename}': dataset '{d}' is not defined "
                                  f"(defined: {', '.join(datasets)})")
        methods = []
        for m in _as_list(e.get("methods"), f"{ename}.methods"):
            if isinstance(m, str):
                methods.append(MethodSpec(m, m))
            elif isinstance(m, dict) and "name" in m:
                extra = set(m) - {"name", "label", "set"}
                if extra:
                    raise ConfigError(f"experiment '{ename}': method entry keys are name, "
                                      f"label, set (got {', '.join(sorted(extra))})")
                methods.append(MethodSpec(str(m["name"]), str(m.get("label", m["name"])),
                                          dict(m.get("set") or {})))
            else:
                raise ConfigError(f"experiment '{ename}': a method is a name or "
                                  f"{{name, label, set}}")
        if not ds or not methods:
            raise ConfigError(f"experiment '{ename}': needs datasets and methods")
        seeds = [_seed(s, ename) for s in _as_list(e.get("seeds", [0]), f"{ename}.seeds")]
        if not seeds:
            raise ConfigError(f"experiment '{ename}': seeds is empty (omit it for seed 0)")
        settings = e.get("settings") or {"default": {}}
        if not isinstance(settings, dict) or not all(isinstance(v, dict) or v is None
                                                     for v in settings.values()):
            raise ConfigError(f"experiment '{ename}': settings map names to override sets")
        settings = {str(k): dict(v or {}) for k, v in settings.items()}
        rows = e.get("rows", "method")
        if rows not in ROW_KEYS:
            raise ConfigError(f"experiment '{ename}': rows must be one of {', '.join(ROW_KEYS)}")
        metrics = [str(m) for m in _as_list(e.get("metrics", DEFAULT_METRICS),
                                            f"{ename}.metrics")]
        experiments.append(Experiment(ename, str(e.get("title", ename)), ds, methods, seeds,
                                      settings, rows, metrics, e.get("reference")))
    return Suite(str(raw.get("name", name)), str(raw.get("description", "")), defaults,
                 datasets, experiments, root)


def load_suite(name_or_path: str | Path) -> Suite:
    p = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a binary file passed by mistake
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_suite(raw, p.parent, p.stem)


def select(suite: Suite, experiments: list[str] | None = None,
           methods: list[str] | None = None, seeds: list[int] | None = None,
           datasets: list[str] | None = None) -> Suite:
    """A sub-suite: only these experiments / methods / seeds / datasets."""
    exps = suite.experiments
    if experiments:
        names = [e.name for e in exps]
        for x in experiments:
            if x not in names:
                raise ConfigError(f"no experiment '{x}' in suite {suite.name} "
                                  f"({', '.join(names)})")
        exps = [e for e in exps if e.name in experiments]
    out = []
    for e in exps:
        ms = [m for m in e.methods if not methods or m.name in methods or m.label in methods]
        ds = [d for d in e.datasets if not datasets or d in datasets]
        ss = list(seeds) if seeds is not None else e.seeds
        if ms and ds:
            out.append(Experiment(e.name, e.title, ds, ms, ss, e.settings, e.rows, e.metrics,
                                  e.reference))
    if not out:
        raise ConfigError("the selection leaves no runs")
    return Suite(suite.name, suite.description, suite.defaults, suite.datasets, out,
                 suite.root)


# ---------------------------------------------------------------------------- planning


@dataclass
class RunSpec:
    key: str  # stable id: dataset/label[@setting]/seed<k>
    dataset: str
    method: str
    label: str
    setting: str
    seed: int
    config: TrainConfig | None
    config_hash: str
    experiments: list[str]
    skip_reason: str | None = None
    error: str | None = None  # invalid configuration (recorded as a failed run)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-") or "run"


def plan(suite: Suite, extra: dict[str, Any] | None = None) -> list[RunSpec]:
    """Every distinct run of the suite, in order; duplicates across experiments merged."""
    from ..methods.base import method_names

    registered = set(method_names())
    runs: dict[str, RunSpec] = {}
    by_hash: dict[str, str] = {}
    for e in suite.experiments:
        for d in e.datasets:
            for m in e.methods:
                for sname, sset in e.settings.items():
                    for seed in e.seeds:
                        values = {**suite.defaults, **sset, **m.overrides, **(extra or {}),
                                  "method": m.name, "seed": seed}
                        cfg, err = None, None
                        try:
                            cfg = apply_overrides(TrainConfig(), values)
                            ident = {k: v for k, v in cfg.to_dict().items()
                                     if k not in ("device", "threads")}
                        except Exception as exc:  # recorded, the others still run
                            err = f"{type(exc).__name__}: {exc}"
                            ident = {k: str(v) for k, v in values.items()}
                        h = hashlib.sha256(json.dumps([d, ident], sort_keys=True, default=str)
                                           .encode()).hexdigest()[:12]
                        if h in by_hash:
                            spec = runs[by_hash[h]]
                            if e.name not in spec.experiments:
                                spec.experiments.append(e.name)
                            continue
                        name = _slug(m.label) + ("" if sname == "default" else f"@{_slug(sname)}")
                        key = f"{_slug(d)}/{name}/seed{seed}"
                        if key in runs:
                            key = f"{_slug(d)}/{name}-{h[:6]}/seed{seed}"
                        skip = None
                        if m.name not in registered:
                            skip = (f"method '{m.name}' is not registered in this version of "
                                    f"causalign (registered: {', '.join(sorted(registered))})")
                        spec = RunSpec(key, d, m.name, m.label, sname, seed, cfg, h, [e.name],
                                       skip_reason=skip, error=None if skip else err)
                        runs[key] = spec
                        by_hash[h] = key
    return list(runs.values())


# ---------------------------------------------------------------------------- running


def prepare_dataset(suite: Suite, name: str, out: Path, progress: Progress | None = None) -> Path:
    """Dataset folder for a suite dataset: generated in OUT/data/<name> when synthetic."""
    spec = suite.datasets[name]
    if "path" in spec:
        p = Path(spec["path"])
        return p if p.is_absolute() else (suite.root / p)
    from ..data.synth import generate

    root = out / "data" / _slug(name)
    if (root / META).exists():
        return root
    if root.exists():  # an interrupted generation: start it again
        shutil.rmtree(root)
    generate(root, _synth_config(name, spec["synth"]), progress=progress)
    return root


def _synth_config(name: str, settings: dict | None) -> SynthConfig:
    """The validated generator settings of a suite's synthetic dataset."""
    from ..data.synth import SynthConfig

    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"dataset '{name}': synth settings must be a mapping")
    valid = [f.name for f in dataclasses.fields(SynthConfig)]
    unknown = sorted(set(settings or {}) - set(valid))
    if unknown:
        raise ConfigError(f"dataset '{name}': unknown synth setting(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(valid)}")
    cfg = SynthConfig(**(settings or {}))
    try:
        cfg.validate()
    except CausalignError as exc:
        raise ConfigError(f"dataset '{name}': {exc}") from None
    return cfg


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(spec: RunSpec, data: Path, run_dir: Path) -> dict:
    """Train (or resume, or just collect) one run; returns its metrics."""
    from .trainer import CHECKPOINT, settings_diff, train

    done = run_dir / "metrics.json"
    if done.exists():
        diffs = settings_diff(run_dir, spec.config)
        if diffs:
            raise ConfigError(f"{run_dir} holds a finished run with other settings "
                              f"({'; '.join(diffs)}); delete it or use another --out")
        m = _load_json(done)
        if m is not None:
            return m
    resume = (run_dir / CHECKPOINT).exists()
    return train(data, spec.config, run_dir, resume=resume, progress=False)


def run_suite(suite: Suite, out: str | Path, extra: dict[str, Any] | None = None,
              progress: bool = True, report: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every missing run of the suite into OUT and write the results and tables."""
    out = Path(out)
    if extra:
        # an unknown key or bad value in --set would fail every run alike, and overwrite
        # results.json/tables.md of a finished OUT with failures: stop before any output
        try:
            apply_overrides(TrainConfig(), extra)
        except ConfigError as exc:
            raise ConfigError(f"--set: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(suite, extra)
    t0 = time.perf_counter()
    records: list[dict] = []
    data_paths: dict[str, Path] = {}
    data_errors: dict[str, str] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("benchmark", total=len(specs)) if bar is not None else None
        for spec in specs:
            rec = {"key": spec.key, "dataset": spec.dataset, "method": spec.method,
                   "label": spec.label, "setting": spec.setting, "seed": spec.seed,
                   "experiments": spec.experiments, "config_hash": spec.config_hash,
                   "run_dir": f"runs/{spec.key}"}
            if bar is not None:
                bar.update(task, description=f"{spec.key}")
            if spec.skip_reason:
                rec.update(status="skipped", reason=spec.skip_reason)
            elif spec.error:  # invalid settings: error.txt too, where the CLI's summary
                rec.update(status="failed", error=spec.error)  # line sends the reader
                atomic_write_text(out / "runs" / spec.key / "error.txt", spec.error + "\n")
            else:
                started = time.perf_counter()
                try:
                    if spec.dataset in data_errors:
                        raise ConfigError(data_errors[spec.dataset])
                    if spec.dataset not in data_paths:
                        try:
                            data_paths[spec.dataset] = prepare_dataset(suite, spec.dataset,
                                                                       out)
                        except Exception as exc:
                            data_errors[spec.dataset] = f"dataset '{spec.dataset}': {exc}"
                            raise
                    run_dir = out / "runs" / spec.key
                    fresh = not (run_dir / "metrics.json").exists()
                    metrics = run_one(spec, data_paths[spec.dataset], run_dir)
                    if fresh:
                        seconds = time.perf_counter() - started
                        atomic_write_json(run_dir / "benchmark_run.json",
                                          {"seconds": seconds, "key": spec.key})
                    else:  # collected: the time it took when it was trained
                        seconds = (_load_json(run_dir / "benchmark_run.json") or {}).get(
                            "seconds")
                    rec.update(status="done", metrics=_slim(metrics), trained_now=fresh,
                               seconds=seconds)
                except Exception as exc:  # one failing run is recorded, the rest go on
                    rec.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                               seconds=time.perf_counter() - started)
                    run_dir = out / "runs" / spec.key
                    run_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(run_dir / "error.txt", traceback.format_exc())
            records.append(rec)
            if bar is not None:
                bar.advance(task)
            # results on disk after every run: a killed benchmark still shows what finished
            _write_results(out, suite, records, time.perf_counter() - t0, final=False)
    results = _write_results(out, suite, records, time.perf_counter() - t0, final=True)
    tables = render_tables(suite, records)
    atomic_write_text(out / "tables.md", tables)
    if report:
        from ..report.html import write_report

        results["report"] = str(write_report(out, progress=False))
    n = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "skipped")}
    log(f"benchmark {suite.name}: {n['done']} done, {n['failed']} failed, "
        f"{n['skipped']} skipped ({sum(bool(r.get('trained_now')) for r in records)} trained "
        f"now) in {time.perf_counter() - t0:.0f} s")
    for r in records:
        if r["status"] != "done":
            log(f"  {r['status']}: {r['key']}: {r.get('error') or r.get('reason')}")
    return results


def _slim(metrics: dict) -> dict:
    keep = ("method", "best_epoch", "epochs", "val", "test", "train", "note", "warnings")
    return {k: metrics[k] for k in keep if k in metrics}


CSV_METRICS = ["accuracy", "balanced_accuracy", "auc", "cam_precision", "cam_precision_mask",
               "cam_mass_in_mask", "saliency_iou"]


def _write_results(out: Path, suite: Suite, records: list[dict], seconds: float,
                   final: bool) -> dict:
    results = {"suite": suite.name, "description": suite.description,
               "complete": final, "seconds": seconds,
               "experiments": [{"name": e.name, "title": e.title, "rows": e.rows,
                                "metrics": e.metrics, "datasets": e.datasets,
                                "methods": [{"name": m.name, "label": m.label,
                                             "set": m.overrides} for m in e.methods],
                                "settings": e.settings, "seeds": e.seeds,
                                "reference": e.reference}
                               for e in suite.experiments],
               "runs": records}
    atomic_write_json(out / "results.json", results)
    deletion_keys: list[str] = []
    for r in records:
        for k in ((r.get("metrics") or {}).get("test") or {}).get("deletion", {}) or {}:
            if k not in deletion_keys:
                deletion_keys.append(k)
    header = ["key", "dataset", "method", "label", "setting", "seed", "status",
              *[f"test_{m}" for m in CSV_METRICS], *[f"test_deletion@{k}" for k in deletion_keys],
              "val_accuracy", "best_epoch", "seconds", "experiments", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in records:
        met = r.get("metrics") or {}
        test = met.get("test") or {}
        row = [r["key"], r["dataset"], r["method"], r["label"], r["setting"], r["seed"],
               r["status"], *[_num(test.get(m)) for m in CSV_METRICS],
               *[_num((test.get("deletion") or {}).get(k)) for k in deletion_keys],
               _num((met.get("val") or {}).get("accuracy")), met.get("best_epoch", ""),
               _num(r.get("seconds")), ";".join(r["experiments"]),
               r.get("error") or r.get("reason") or ""]
        w.writerow(row)
    atomic_write_text(out / "results.csv", buf.getvalue())
    return results


def _num(v) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


# ---------------------------------------------------------------------------- tables


def get_path(d: dict, dotted: str) -> Any:
    """Dotted lookup; the deletion key holds dots ('test.deletion.0.02')."""
    if ".deletion." in dotted:
        head, frac = dotted.split(".deletion.", 1)
        d = get_path(d, head + ".deletion")
        return d.get(frac) if isinstance(d, dict) else None
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    notes: list[str]


def experiment_table(e: Experiment, records: list[dict]) -> Table:
    """Rows = methods (or datasets/settings), columns = metric × (the other axes with more
    than one value); cells mean (std) over seeds; best per column in bold (not the oracle)."""
    mine = [r for r in records if e.name in r["experiments"]]
    axes = {"method": [m.label for m in e.methods], "dataset": e.datasets,
            "setting": list(e.settings)}
    row_axis = e.rows
    col_axes = [a for a in ("dataset", "setting", "method") if a != row_axis and
                len(axes[a]) > 1]

    def field(r: dict, axis: str) -> str:
        return r["label"] if axis == "method" else r[axis]

    col_keys: list[tuple] = [()]
    for a in col_axes:
        col_keys = [k + (v,) for k in col_keys for v in axes[a]]
    header = [row_axis]
    for metric in e.metrics:
        for ck in col_keys:
            name = METRIC_LABELS.get(metric, metric.removeprefix("test."))
            header.append(" ".join([name, *ck]))
    values: list[list[tuple[float | None, float | None, int]]] = []
    labels: list[str] = []
    for rv in axes[row_axis]:
        cells = []
        for metric in e.metrics:
            for ck in col_keys:
                sel = [r for r in mine if field(r, row_axis) == rv and r["status"] == "done"
                       and all(field(r, a) == v for a, v in zip(col_axes, ck, strict=True))]
                vals = [get_path(r.get("metrics") or {}, metric) for r in sel]
                vals = [v for v in vals if isinstance(v, (int, float))]
                m, s = mean_std(vals)
                cells.append((m, s, len(vals)))
        values.append(cells)
        labels.append(rv)
    competing = [i for i, lab in enumerate(labels)
                 if not (row_axis == "method" and _method_of(e, lab) in NOT_COMPETING)]
    bold = [[False] * len(values[0]) for _ in values] if values else []
    for j in range(len(values[0]) if values else 0):
        cand = [(values[i][j][0], i) for i in competing if values[i][j][0] is not None]
        if len(cand) > 1:
            best = max(v for v, _ in cand)
            for v, i in cand:
                if abs(v - best) < 5e-4:
                    bold[i][j] = True
    rows = []
    for lab, cells in zip(labels, values, strict=True):
        rows.append([lab] + [_fmt_cell(m, s, n) for m, s, n in cells])
    notes = []
    missing = [r for r in mine if r["status"] != "done"]
    for r in missing:
        notes.append(f"{r['key']}: {r['status']} — {r.get('error') or r.get('reason')}")
    for r in mine:  # e.g. "no test split: test metrics omitted" (why its cells are empty)
        note = (r.get("metrics") or {}).get("note") if r["status"] == "done" else None
        if note:
            notes.append(f"{r['key']}: {note}")
        if r["status"] == "done":  # a finished run whose alignment term was mostly skipped
            notes += [f"{r['key']}: warning: {w}" for w in r["metrics"].get("warnings", [])]
    seeds = sorted({r["seed"] for r in mine if r["status"] == "done"})
    if seeds:
        notes.insert(0, f"mean (std) over seeds {', '.join(map(str, seeds))}; best per "
                        f"column in bold" + (" (the oracle, a ceiling, is not ranked)"
                                             if any(_method_of(e, lab) in NOT_COMPETING
                                                    for lab in labels) else ""))
    return Table(e.title, header, rows, bold, notes)


def _method_of(e: Experiment, label: str) -> str:
    for m in e.methods:
        if m.label == label:
            return m.name
    return label


def _fmt_cell(m, s, n) -> str:
    if m is None:
        return "–"
    return f"{m:.3f} ({s:.3f})" if n > 1 else f"{m:.3f}"


def table_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    for row, bold in zip(t.rows, t.bold, strict=True):
        cells = [row[0]] + [f"**{c}**" if b else c for c, b in zip(row[1:], bold, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def reference_markdown(e: Experiment) -> str:
    ref = e.reference
    if not ref:
        return ""
    cols = ref.get("columns", [])
    lines = [f"Paper's numbers for reference ({ref.get('source', 'paper')}):", "",
             "| " + " | ".join(["row", *cols]) + " |", "|" + "|".join("---" for _ in
                                                                   range(len(cols) + 1)) + "|"]
    for name, vals in (ref.get("rows") or {}).items():
        lines.append("| " + " | ".join([name, *map(str, vals)]) + " |")
    return "\n".join(lines) + "\n"


def experiments_from_results(results: dict) -> list[Experiment]:
    """The experiments as results.json stores them (for a report built later)."""
    return [Experiment(e["name"], e["title"], e["datasets"],
                       [MethodSpec(m["name"], m["label"], m.get("set") or {})
                        for m in e["methods"]], e["seeds"], e["settings"], e["rows"],
                       e["metrics"], e.get("reference"))
            for e in results.get("experiments", [])]


def render_tables(suite: Suite, records: list[dict]) -> str:
    parts = [f"# Benchmark suite `{suite.name}`", ""]
    if suite.description:
        parts += [suite.description, ""]
    for e in suite.experiments:
        parts.append(table_markdown(experiment_table(e, records)))
        ref = reference_markdown(e)
        if ref:
            parts.append(ref)
    return "\n".join(parts)
