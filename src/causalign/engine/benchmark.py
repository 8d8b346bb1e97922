"""`causalign benchmark SUITE --out DIR`: methods × datasets × seeds × settings from a YAML
suite, resumable, collected into results.csv/json and mean (std) tables (paper 000 Table 1).

A suite (shipped: ``quick``, ``paper``, ``demo`` in causalign/suites/, or any YAML file)::

    name: quick
    defaults: {epochs: 2, width: 8}          # TrainConfig keys (method.<p> too) for every run
    datasets:
      plus-minus: {synth: {shortcut: plus-minus, size: 32, n_train: 64}}   # generated in DIR
      mine: {path: /data/lidc}               # or an existing dataset (relative to the suite file)
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

`--set key=value` applies to every run; a `method.<p>` key goes to the selected methods that
have that parameter (the line says which), and is refused when none has it. A --set that
fails the runs it reaches, names `method`/`seed` (use --methods/--seeds), or contradicts
runs finished in DIR without it, is refused before anything is written; so is a synthetic
dataset in DIR/data generated with other settings than the suite's. Run folders are named
over the whole suite, so --only/--methods/--datasets reuse the same ones.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..data.format import META
from ..errors import CausalignError, ConfigError, did_you_mean, interrupt_behind
from ..io import atomic_write_json, atomic_write_text, folder_lock
from ..report.tables import mean_std
from .config import TrainConfig, apply_overrides, load_yaml, merge_settings
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
# Metrics where less is better: "best per column in bold" took the largest of every metric,
# so a suite listing test.loss put the worst method in bold.
LOWER_IS_BETTER = ("loss", "cam_empty_fraction", "brier", "ece")
# Counts and epochs: no better direction, never bold (the largest best_epoch or n was).
UNRANKED = ("best_epoch", "epochs", "n", "n_annotated", "n_mask")
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
    # the whole suite a `select`ion came from: run folders are named over it, so a run
    # keeps its folder under --only/--methods/--datasets (two runs whose names collide got
    # the plain name in the order met, and `--only B` then took A's finished folder)
    full: Suite | None = None
    # the suite as loaded, before any selection: results and tables show its runs finished
    # in OUT too (a `--methods erm` rerun rewrote them with the erm rows only)
    origin: Suite | None = None
    selection: str = ""  # the options that made this selection, for the summary line


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


def no_duplicates(names: list[str], what: str, hint: str = "") -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{what} '{n}' is listed twice{hint}")
        seen.add(n)


def _no_run_axes(values: Any, where: str) -> None:
    """`method` and `seed` are the runs' own axes: as overrides they were silently replaced
    by each run's method and seed."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys")
    for key, use in (("method", "methods"), ("seed", "seeds")):
        if key in values:
            how = f"--{use}" if where == "--set" else f"the experiment's {use}"
            raise ConfigError(f"{where}: '{key}' is set by each run; use {how}")


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
        elif not isinstance(spec["path"], str) or not spec["path"].strip():
            # `path:` left empty was the folder "None" beside the suite
            raise ConfigError(f"suite {name}: dataset '{dname}': path must be a folder name, "
                              f"got {spec['path']!r}")
    # two names with one slug would share OUT/data/<slug>: the second silently got the
    # first's images
    slugs: dict[str, str] = {}
    for dname in datasets:
        other = slugs.setdefault(_slug(str(dname)), str(dname))
        if other != str(dname):
            raise ConfigError(f"suite {name}: datasets '{other}' and '{dname}' would share the "
                              f"folder data/{_slug(str(dname))}; rename one")
    defaults = raw.get("defaults") or {}
    _no_run_axes(defaults, f"suite {name}: defaults")
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
        no_duplicates(ds, f"experiment '{ename}': dataset")
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
                if not isinstance(m.get("set") or {}, dict):
                    raise ConfigError(f"experiment '{ename}': method '{m['name']}': set maps "
                                      f"config keys to values")
                _no_run_axes(m.get("set") or {}, f"experiment '{ename}': method "
                                                 f"'{m['name']}' set")
                if "label" in m and (m["label"] is None or not str(m["label"]).strip()):
                    # `label:` made the method's row "None"
                    raise ConfigError(f"experiment '{ename}': method '{m['name']}': label is "
                                      f"empty (omit it to use the method's name)")
                methods.append(MethodSpec(str(m["name"]), str(m.get("label", m["name"])),
                                          dict(m.get("set") or {})))
            else:
                raise ConfigError(f"experiment '{ename}': a method is a name or "
                                  f"{{name, label, set}}")
        if not ds or not methods:
            raise ConfigError(f"experiment '{ename}': needs datasets and methods")
        from ..methods.base import method_names

        for m in methods:
            # a method of a later version is skipped (documented), but a misspelling of a
            # registered one (causal_align) was skipped too, with exit code 0
            close = did_you_mean(m.name, method_names()) if m.name not in method_names() else ""
            if close:
                raise ConfigError(f"experiment '{ename}': unknown method '{m.name}'{close}")
        # the table's rows/columns are labels: two methods under one label were averaged
        # together as if they were seeds of one run
        no_duplicates([m.label for m in methods], f"experiment '{ename}': method label",
                       " (give each a distinct label)")
        seeds = [_seed(s, ename) for s in _as_list(e.get("seeds", [0]), f"{ename}.seeds")]
        if not seeds:
            raise ConfigError(f"experiment '{ename}': seeds is empty (omit it for seed 0)")
        if "settings" in e and not e["settings"]:  # as an empty seeds list: not the default
            raise ConfigError(f"experiment '{ename}': settings is empty (omit it for one "
                              f"'default' setting)")
        settings = e.get("settings") or {"default": {}}
        if not isinstance(settings, dict) or not all(isinstance(v, dict) or v is None
                                                     for v in settings.values()):
            raise ConfigError(f"experiment '{ename}': settings map names to override sets")
        settings = {str(k): dict(v or {}) for k, v in settings.items()}
        for sname, sset in settings.items():
            _no_run_axes(sset, f"experiment '{ename}': setting '{sname}'")
        rows = e.get("rows", "method")
        if rows not in ROW_KEYS:
            raise ConfigError(f"experiment '{ename}': rows must be one of {', '.join(ROW_KEYS)}")
        metrics = [str(m) for m in _as_list(e.get("metrics", DEFAULT_METRICS),
                                            f"{ename}.metrics")]
        if not metrics:
            raise ConfigError(f"experiment '{ename}': metrics is empty (omit it for "
                              f"{', '.join(DEFAULT_METRICS)})")
        for metric in metrics:
            _check_metric(ename, metric)
        _check_run_keys(ename, defaults, methods, settings, metrics)
        no_duplicates([str(x) for x in seeds], f"experiment '{ename}': seed")
        _check_reference(ename, e.get("reference"))
        if "title" in e and (e["title"] is None or not str(e["title"]).strip()):
            # `title:` gave the table the heading "None"
            raise ConfigError(f"experiment '{ename}': title is empty (omit it to use the "
                              f"experiment's name)")
        experiments.append(Experiment(ename, str(e.get("title", ename)), ds, methods, seeds,
                                      settings, rows, metrics, e.get("reference")))
    return Suite(str(raw.get("name", name)), str(raw.get("description", "")), defaults,
                 datasets, experiments, root)


# What metrics.json holds per split (causalign.engine.evaluate), for `metrics:` entries:
# a misspelt one (test.acuracy) gave a column of "–" and exit code 0.
METRIC_NAMES = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "loss",
                "brier", "ece", "n", "cam_precision",
                "cam_precision_mask", "cam_mass_in_mask", "saliency_iou", "saliency_dice",
                "cam_empty_fraction", "n_annotated", "n_mask", "attribute_accuracy.mean")
METRIC_SPLITS = ("test", "val", "train")


def _check_reference(experiment: str, ref: Any) -> None:
    """A `reference:` table {source, columns, rows: {name: [values]}}: a malformed one
    (a string, rows as a list) crashed tables.md after every run had trained, and a
    misspelt key (colums) dropped the table's header silently."""
    if ref is None:
        return
    where = f"experiment '{experiment}': reference"
    if not isinstance(ref, dict):
        raise ConfigError(f"{where}: expected {{source, columns, rows}}, got "
                          f"{type(ref).__name__}")
    unknown = sorted(set(map(str, ref)) - {"source", "columns", "rows"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: source, "
                          f"columns, rows" + "".join(did_you_mean(k, ["source", "columns",
                                                                      "rows"])
                                                     for k in unknown))
    cols = ref.get("columns") or []
    if not isinstance(cols, list):
        raise ConfigError(f"{where}: columns must be a list of column names")
    rows = ref.get("rows") or {}
    if not isinstance(rows, dict):
        raise ConfigError(f"{where}: rows must map a row name to its list of values")
    for name, vals in rows.items():
        if not isinstance(vals, list) or len(vals) != len(cols):
            raise ConfigError(f"{where}: row '{name}' must be a list of {len(cols)} value(s), "
                              f"one per column, got {vals!r}")


def _check_metric(experiment: str, metric: str) -> None:
    """Refuse a metric no run's metrics.json can hold (its column would only show "–")."""
    if metric in ("best_epoch", "epochs"):
        return
    split, _, name = metric.partition(".")
    if split in METRIC_SPLITS and (name in METRIC_NAMES
                                   or name.startswith("attribute_accuracy.per_attribute.")):
        return
    if split in METRIC_SPLITS and name.startswith("deletion."):
        frac = name.removeprefix("deletion.")
        try:
            f = float(frac)
        except ValueError:
            f = None
        if f is not None:
            if frac != f"{f:g}":  # metrics.json's key is f"{f:g}": 0.020 found nothing
                raise ConfigError(f"experiment '{experiment}': metric '{metric}': write the "
                                  f"fraction as metrics.json does, {split}.deletion.{f:g}")
            return
    valid = [f"{s}.{n}" for s in METRIC_SPLITS for n in METRIC_NAMES]
    raise ConfigError(f"experiment '{experiment}': unknown metric '{metric}'; valid: "
                      f"<split>.<name> with split {', '.join(METRIC_SPLITS)} and name "
                      f"{', '.join(METRIC_NAMES)}, deletion.<fraction> (e.g. "
                      f"test.deletion.0.02), best_epoch, epochs" + did_you_mean(metric, valid))


def _check_run_keys(experiment: str, defaults: dict[str, Any], methods: list[MethodSpec],
                    settings: dict[str, dict[str, Any]], metrics: list[str]) -> None:
    """Unknown config keys and method parameters in a setting or a method's `set` (or a
    method.<p> in defaults that a method lacks) fail at load, as in `defaults`: they were
    recorded as failed runs, after every other run had trained. Bad values are left to
    `plan` (recorded with the run's name, the others still run)."""
    from ..methods.base import build_method
    from .config import _unknown_key_hint

    fields = set(TrainConfig().to_dict())
    for m in methods:
        params = method_params(m.name)  # None: not registered (skipped)
        for sname, sset in settings.items():
            values = merge_settings(defaults, sset, m.overrides)  # as plan() merges
            where = (f"experiment '{experiment}': method '{m.label}'"
                     + ("" if sname == "default" and len(settings) == 1
                        else f", setting '{sname}'"))
            plain, margs = _split_extra(values)
            for key in plain:
                if key.startswith("model.") or key in fields:
                    continue
                raise ConfigError(f"{where}: unknown config key {key!r}"
                                  + _unknown_key_hint(key, m.name,
                                                      values.get("model", "cnn7")))
            unknown = {k: v for k, v in margs.items() if params is not None and k not in params}
            if unknown:
                try:
                    build_method(m.name, unknown)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            try:
                fractions = apply_overrides(TrainConfig(), plain).deletion_fractions
            except Exception:  # a bad value: plan records it with the run's name
                continue
            computed = {f"{float(f):g}" for f in fractions}
            for metric in metrics:
                frac = metric.partition(".deletion.")[2]
                if frac and frac not in computed:
                    have = ", ".join(sorted(computed, key=float)) or "no fraction"
                    raise ConfigError(f"{where}: metric '{metric}': the runs compute deletion "
                                      f"at {have} only (deletion_fractions)")


def load_suite(name_or_path: str | Path) -> Suite:
    p = suite_path(name_or_path)
    try:
        raw = load_yaml(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a binary file passed by mistake
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_suite(raw, p.parent, p.stem)


def select(suite: Suite, experiments: list[str] | None = None,
           methods: list[str] | None = None, seeds: list[int] | None = None,
           datasets: list[str] | None = None, settings: list[str] | None = None) -> Suite:
    """A sub-suite: only these experiments / methods / seeds / datasets / settings."""
    exps = suite.experiments
    if experiments:
        names = [e.name for e in exps]
        for x in experiments:
            if x not in names:
                raise ConfigError(f"no experiment '{x}' in suite {suite.name} "
                                  f"({', '.join(names)})" + did_you_mean(x, names))
        exps = [e for e in exps if e.name in experiments]
    # a misspelt name (`--methods erm,rrrr`) was silently dropped: the run went on without it
    for option, wanted, known in (
            ("--methods", methods, [x for e in exps for m in e.methods for x in (m.name, m.label)]),
            ("--datasets", datasets, [d for e in exps for d in e.datasets]),
            ("--settings", settings, [k for e in exps for k in e.settings])):
        missing = [x for x in wanted or [] if x not in known]
        if missing:
            where = f"experiment(s) {', '.join(e.name for e in exps)}" if experiments \
                else f"suite {suite.name}"
            raise ConfigError(f"{option}: {', '.join(repr(x) for x in missing)} not in "
                              f"{where} (it has: {', '.join(dict.fromkeys(known))})"
                              + "".join(did_you_mean(x, known) for x in missing))
    out = []
    for e in exps:
        ms = [m for m in e.methods if not methods or m.name in methods or m.label in methods]
        ds = [d for d in e.datasets if not datasets or d in datasets]
        ss = list(seeds) if seeds is not None else e.seeds
        sts = {k: v for k, v in e.settings.items() if not settings or k in settings}
        if ms and ds and sts:
            out.append(Experiment(e.name, e.title, ds, ms, ss, sts, e.rows, e.metrics,
                                  e.reference))
    if not out:
        raise ConfigError("the selection leaves no runs")
    base = suite.full or suite
    whole = Suite(base.name, base.description, base.defaults, base.datasets,
                  [dataclasses.replace(e, seeds=list(seeds)) if seeds is not None else e
                   for e in base.experiments], base.root)
    chosen = " ".join(f"{opt} {','.join(map(str, v))}" for opt, v in (
        ("--only", experiments), ("--methods", methods), ("--seeds", seeds),
        ("--datasets", datasets), ("--settings", settings)) if v is not None)
    return Suite(suite.name, suite.description, suite.defaults, suite.datasets, out,
                 suite.root, full=whole, origin=suite.origin or suite,
                 selection=" ".join(x for x in (suite.selection, chosen) if x))


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
    # experiment -> [(label, setting)] under which this run appears there: a run merged
    # across experiments keeps each experiment's own label (paper's Table 2 labels the
    # Table 1 runs differently; matched by the first label only, its cells were empty)
    roles: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


# Settings added after suites' runs were keyed: at these values (the behaviour before they
# existed) they stay out of a run's identity, so an OUT made before keeps its folders and
# config hashes (a new key would have retrained every finished run beside itself).
_UNKEYED_DEFAULTS = {"class_weight": "none", "sampler": "none"}


def _at_unkeyed_default(key: str, value: Any) -> bool:
    return key in _UNKEYED_DEFAULTS and value == _UNKEYED_DEFAULTS[key]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-") or "run"


def _split_extra(extra: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set values as (plain config keys, method parameters), `method_args={…}` expanded."""
    plain, margs = {}, {}
    for k, v in (extra or {}).items():
        if k.startswith("method."):
            margs[k.split(".", 1)[1]] = v
        elif k == "method_args" and isinstance(v, dict):
            margs.update({str(a): b for a, b in v.items()})
        else:
            plain[k] = v
    return plain, margs


def method_params(name: str) -> list[str] | None:
    """The `method.<p>` parameters of a registered method; None when it is not registered."""
    from ..methods.base import method_class, method_names

    if name not in method_names():
        return None
    return [f.name for f in dataclasses.fields(method_class(name).Params)]


def extra_for_method(extra: dict[str, Any] | None, method: str) -> dict[str, Any]:
    """The --set values one method's runs get: every plain key, and only those method
    parameters the method has (`--set method.lam=3` on a suite with erm and rrr sets rrr's
    λ; erm has no λ, and failing each of its runs would only hide the finished ones)."""
    plain, margs = _split_extra(extra)
    params = method_params(method)
    mine = {f"method.{k}": v for k, v in margs.items() if params is None or k in params}
    return {**plain, **mine}


def plan(suite: Suite, extra: dict[str, Any] | None = None, out: Path | None = None
         ) -> list[RunSpec]:
    """Every distinct run of the suite, in order; duplicates across experiments merged.

    A method parameter in ``extra`` (--set method.<p>) goes to the methods that have it.
    With ``out``, a finished run keeps its folder (`_keep_finished_folders`)."""
    from ..methods.base import build_method, method_names, resolved_params
    from ..models import resolved_model_args

    registered = set(method_names())
    runs: dict[str, RunSpec] = {}
    by_hash: dict[str, str] = {}
    # keys are folders: labels 'ERM' and 'erm' gave two runs one folder on macOS/Windows
    folded: set[str] = set()
    # a selection's runs take the folders the whole suite gives them (Suite.full)
    full_keys = ({s.config_hash: s.key for s in plan(suite.full, extra, out)}
                 if suite.full else {})
    plain_keys: dict[str, str] = {}  # a colliding run's suffixed folder -> the plain one
    for e in suite.experiments:
        for d in e.datasets:
            for m in e.methods:
                mextra = extra_for_method(extra, m.name)
                for sname, sset in e.settings.items():
                    for seed in e.seeds:
                        layers = (suite.defaults, sset, m.overrides, mextra,
                                  {"method": m.name, "seed": seed})
                        values = {k: v for layer in layers for k, v in layer.items()}
                        cfg, err = None, None
                        try:
                            # method_args/model_args merge across the layers (a setting's
                            # method_args replaced the defaults' whole mapping)
                            cfg = apply_overrides(TrainConfig(), merge_settings(*layers))
                            ident = {k: v for k, v in cfg.to_dict().items()
                                     if k not in ("device", "threads")
                                     and not _at_unkeyed_default(k, v)}
                        except Exception as exc:  # recorded, the others still run
                            err = f"{type(exc).__name__}: {exc}"
                            ident = {k: str(v) for k, v in values.items()}
                        # a colliding folder's suffix, from the settings as given: the
                        # resolved identity below renamed such folders (an OUT of an
                        # earlier version was retrained beside its finished runs)
                        named = hashlib.sha256(json.dumps([d, ident], sort_keys=True,
                                                          default=str).encode()).hexdigest()
                        if cfg is not None and m.name in registered:
                            try:  # a bad method parameter fails now, with the run's name
                                method = build_method(cfg.method, cfg.method_args)
                                # resolved, as a finished run is compared: Table 1's `set:
                                # {method.lam: 10}` (the default) and Table 4's plain rrr are
                                # one run, which was trained twice (the 2nd as rrr-<hash>)
                                ident["method_args"] = resolved_params(method)
                                ident["model_args"] = resolved_model_args(cfg.model,
                                                                          cfg.model_args)
                            except Exception as exc:
                                err = f"{type(exc).__name__}: {exc}"
                        h = hashlib.sha256(json.dumps([d, ident], sort_keys=True, default=str)
                                           .encode()).hexdigest()[:12]
                        if h in by_hash:
                            spec = runs[by_hash[h]]
                            if e.name not in spec.experiments:
                                spec.experiments.append(e.name)
                            role = spec.roles.setdefault(e.name, [])
                            if (m.label, sname) not in role:
                                role.append((m.label, sname))
                            continue
                        name = _slug(m.label) + ("" if sname == "default" else f"@{_slug(sname)}")
                        key = full_keys.get(h) or f"{_slug(d)}/{name}/seed{seed}"
                        if key.casefold() in folded:
                            plain = key
                            key = f"{_slug(d)}/{name}-{named[:6]}/seed{seed}"
                            plain_keys[key] = plain
                        skip = None
                        if m.name not in registered:
                            skip = (f"method '{m.name}' is not registered in this version of "
                                    f"causalign (registered: {', '.join(sorted(registered))})")
                        spec = RunSpec(key, d, m.name, m.label, sname, seed, cfg, h, [e.name],
                                       skip_reason=skip, error=None if skip else err,
                                       roles={e.name: [(m.label, sname)]})
                        runs[key] = spec
                        folded.add(key.casefold())
                        by_hash[h] = key
    if out is not None and not suite.full:
        _keep_finished_folders(runs, plain_keys, out)
    return list(runs.values())


def _keep_finished_folders(runs: dict[str, RunSpec], plain_keys: dict[str, str], out: Path
                           ) -> None:
    """Two runs that would share a folder: the first in suite order takes the plain one, the
    other a suffixed one. After an edit to the first (its `set:`), the plain folder's
    finished run belonged to the other: the edited run was refused there ("a finished run
    with other settings") and the unchanged one retrained under the suffix. Swap them."""
    from .trainer import CHECKPOINT, settings_diff

    for suffixed, plain in plain_keys.items():
        moved, holder = runs.get(suffixed), runs.get(plain)
        if moved is None or holder is None or moved.config is None or holder.config is None:
            continue
        run_dir = out / "runs" / plain
        if (_settings_diff(run_dir, holder.config, settings_diff, CHECKPOINT)
                and _settings_diff(run_dir, moved.config, settings_diff, CHECKPOINT) == []):
            moved.key, holder.key = plain, suffixed
    order = list(runs.values())
    runs.clear()
    runs.update((spec.key, spec) for spec in order)


# ---------------------------------------------------------------------------- running


def prepare_dataset(suite: Suite, name: str, out: Path, progress: Progress | None = None) -> Path:
    """Dataset folder for a suite dataset: generated in OUT/data/<name> when synthetic."""
    spec = suite.datasets[name]
    if "path" in spec:
        p = Path(str(spec["path"])).expanduser()  # `~/data` was read as a folder named ~
        return p if p.is_absolute() else (suite.root / p)
    from ..data.synth import generate

    root = out / "data" / _slug(name)
    if (root / META).exists():
        stale = _synth_diff(suite, name, out)
        if stale:
            raise ConfigError(stale)
        return root
    if root.exists():  # an interrupted generation: start it again
        shutil.rmtree(root)
    generate(root, _synth_config(name, spec["synth"]), progress=progress)
    return root


def _synth_diff(suite: Suite, name: str, out: Path) -> str | None:
    """Why OUT/data/<name> is not the suite's synthetic dataset `name` (None when it is or
    does not exist yet). A suite edited between reruns (n_train 64 -> 96) reused the old
    images, and every finished run on them was collected as if trained on the new ones."""
    from ..data.synth import SynthConfig

    spec = suite.datasets[name]
    root = out / "data" / _slug(name)
    if "synth" not in spec or not (root / META).exists():
        return None
    want = dataclasses.asdict(_synth_config(name, spec["synth"]))
    try:
        meta = yaml.safe_load((root / META).read_text(encoding="utf-8")) or {}
        stored = meta["info"]["config"]
        valid = {f.name for f in dataclasses.fields(SynthConfig)}
        # a generator setting added later takes its default (the earlier behaviour)
        have = dataclasses.asdict(SynthConfig(**{k: v for k, v in stored.items()
                                                 if k in valid}))
        have.update({k: v for k, v in stored.items() if k not in valid})
    except Exception:  # not written by the generator: cannot be the suite's dataset
        return (f"{root} does not hold the synthetic dataset '{name}' of the suite (no "
                f"generator settings in {META}); delete it or use another --out")
    diffs = [f"{k} {have.get(k)!r} -> {want.get(k)!r}"
             for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    if not diffs:
        return None
    return (f"{root} holds dataset '{name}' generated with other settings ({'; '.join(diffs)}),"
            f" and the runs in {out / 'runs'} were trained on it; delete both or use another "
            f"--out")


def _missing_path(suite: Suite, name: str) -> str | None:
    """Why the `path:` dataset NAME cannot be a dataset (None when it may be): a missing one
    failed each of its runs in turn, after the other datasets' runs had all trained."""
    spec = suite.datasets[name]
    if "path" not in spec:
        return None
    given = Path(str(spec["path"])).expanduser()
    where = given if given.is_absolute() else suite.root / given
    if (where / META).is_file():
        return None
    what = "does not exist" if not where.exists() else f"has no {META} (not a dataset)"
    hint = ""
    if not given.is_absolute():
        hint = f" (a relative path is taken from the suite file's folder, {suite.root})"
        if (given / META).is_file():
            hint += f"; the one under the current folder is {given.resolve()}: write that"
    return f"dataset '{name}': {where} {what}{hint}"


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


def _history_seconds(run_dir: Path) -> float:
    """Training seconds of the epochs in RUN_DIR/history.csv (0 when there is none)."""
    from .trainer import CHECKPOINT

    if not (run_dir / CHECKPOINT).exists():  # no checkpoint: trained from scratch
        return 0.0
    try:
        with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return 0.0
    total = 0.0
    for row in rows:
        try:
            total += float(row.get("seconds") or 0.0)
        except ValueError:
            continue
    return total


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dataset_dir(suite: Suite, name: str, out: Path) -> Path:
    """Where dataset NAME is (or will be generated), without generating it."""
    spec = suite.datasets[name]
    if "path" in spec:
        p = Path(str(spec["path"])).expanduser()
        return p if p.is_absolute() else suite.root / p
    return out / "data" / _slug(name)


def _data_diff(run_dir: Path, data: Path, digests: dict[str, str | None] | None = None
               ) -> str | None:
    """Why the run in RUN_DIR was not trained on DATA (None when it was, or cannot tell): a
    finished run was collected after its suite's `path:` was pointed at another dataset
    (or a second suite with another dataset of the same name wrote into the same OUT).
    As `train --resume`: dataset.yaml and manifest.csv, then the pixels, masks and labels
    (read once per dataset and DIGESTS, the caller's cache for one benchmark)."""
    from ..data.format import LesionDataset
    from .provenance import content_digest
    from .trainer import _optional_split, dataset_digest_matches, read_run_config

    try:
        stored = read_run_config(run_dir)
    except CausalignError:
        return None  # the settings check names the file
    digest, content = stored.get("data_digest"), stored.get("data_content_digest")
    what = None
    if isinstance(digest, str) and not dataset_digest_matches(data, digest):
        what = "its dataset.yaml and manifest.csv differ"
    elif isinstance(content, str):  # runs from before the digests: nothing to compare
        digests = {} if digests is None else digests
        key = str(data.resolve())
        if key not in digests:
            try:
                digests[key] = content_digest((LesionDataset(data, "train"),
                                               LesionDataset(data, "val"),
                                               _optional_split(data, "test")))
            except Exception:  # unreadable now: the run that trains on it says why; not
                # cached, so a folder generated later in the benchmark is still compared
                return None
        if digests[key] is not None and digests[key] != content:
            what = "same manifest, but its images, masks or labels differ"
    if what is None:
        return None
    return (f"{run_dir} holds a finished run trained on other data than {data} "
            f"({stored.get('data')}: {what}); delete it or use another --out")


# Python's own showwarning (catch_warnings(record=True) restores it and records through
# _showwarnmsg_impl): taken from the module, the CLI may have replaced the attribute already
_SHOW_ORIG = getattr(warnings, "_showwarning_orig", warnings.showwarning)


@contextmanager
def _said_once_per_dataset(said: set[tuple[str, str]], dataset: str, key: str
                           ) -> Iterator[None]:
    """Show each warning raised inside once per dataset, prefixed with the run key that
    first raised it. A dataset's one-class val split was warned by every run trained on it
    (12 identical lines for 2 methods × 2 seeds × 3 settings), naming no dataset."""
    inner = warnings.showwarning

    def once(message, category, filename, lineno, file=None, line=None) -> None:
        if (dataset, str(message)) in said:
            return
        said.add((dataset, str(message)))
        # the trainer's own warnings already name the run (`train(name=key)`)
        text = str(message) if str(message).startswith(f"{key}: ") else f"{key}: {message}"
        if inner is _SHOW_ORIG:  # not replaced (e.g. catch_warnings(record=True)): its sink
            warnings._showwarnmsg_impl(  # type: ignore[attr-defined]
                warnings.WarningMessage(category(text), category, filename, lineno, file,
                                        line))
        else:
            inner(text, category, filename, lineno, file, line)

    warnings.showwarning = once
    try:
        yield
    finally:
        warnings.showwarning = inner


def run_one(spec: RunSpec, data: Path, run_dir: Path,
            digests: dict[str, str | None] | None = None) -> dict:
    """Train (or resume, or just collect) one run; returns its metrics. ``digests``: the
    benchmark's content digest per dataset folder (`_data_diff`), so each is read once."""
    from .trainer import CHECKPOINT, settings_diff, train

    done = run_dir / "metrics.json"
    if done.exists():
        diffs = settings_diff(run_dir, spec.config)
        if diffs:
            raise ConfigError(f"{run_dir} holds a finished run with other settings "
                              f"({'; '.join(diffs)}); delete it or use another --out")
        other = _data_diff(run_dir, data, digests)
        if other:
            raise ConfigError(other)
        m = _load_json(done)
        if m is not None:
            return m
    resume = (run_dir / CHECKPOINT).exists()
    # named: its warnings go to stderr among the other runs' (one process trains them all)
    return train(data, spec.config, run_dir, resume=resume, progress=False, name=spec.key)


def _check_extra(suite: Suite, extra: dict[str, Any], specs: list[RunSpec],
                 log: Callable[[str], None], out: Path | None = None) -> None:
    """Refuse, before any output, --set values that would fail or be ignored by every run
    they reach, or that contradict runs finished in OUT without them; say which methods a
    parameter only some of them have applies to."""
    _no_run_axes(extra, "--set")
    plain, margs = _split_extra(extra)
    try:
        apply_overrides(TrainConfig(), plain)
        if "method_args" in extra and not isinstance(extra["method_args"], dict):
            raise ConfigError("method_args must be a mapping")
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None
    names = list(dict.fromkeys(m.name for e in suite.experiments for m in e.methods))
    params = {n: p for n in names if (p := method_params(n)) is not None}
    for key in margs:
        have = [n for n, p in params.items() if key in p]
        if not have:
            valid = sorted({f"method.{k}" for p in params.values() for k in p})
            if len(valid) > 15:  # the quick suite's ten methods have ~70: name the nearest
                # bare names: with the shared "method." prefix every key looked close
                bare = [v.removeprefix("method.") for v in valid]
                close = difflib.get_close_matches(key, bare, n=5)
                theirs = (f"did you mean {', '.join(f'method.{c}' for c in close)}?" if close else
                          f"{len(valid)} in all, e.g. {', '.join(valid[:8])}, …")
            else:
                theirs = f"theirs: {', '.join(valid) or '(none)'}"
            raise ConfigError(f"--set: method.{key} is a parameter of none of the selected "
                              f"methods ({', '.join(params) or 'none registered'}); {theirs}")
        if len(have) < len(params):
            log(f"--set method.{key} applies to {', '.join(have)} only (not "
                f"{', '.join(n for n in params if n not in have)}: no such parameter)")
    # a value the methods refuse (method.lam=-1), alone or with the suite's own settings:
    # the runs it reaches would all fail alike
    def roles(spec: RunSpec) -> set[tuple]:
        return {(e, lab, st, spec.dataset, spec.seed) for e, rl in spec.roles.items()
                for lab, st in rl}

    base = plan(suite, out=out)
    fine = set().union(*[roles(s) for s in base if not s.error])
    for spec in specs:
        if spec.error and roles(spec) & fine:
            raise ConfigError(f"--set: {spec.key}: {spec.error}")
    if out is None:
        return
    # a --set added to (or changed on) the rerun of a finished OUT: every run it reaches
    # failed as "holds a finished run with other settings", and results.json, tables.md
    # and the report were rewritten with those failures; a run the suite alone still
    # matches is the user's earlier result, not a stale one
    from .trainer import CHECKPOINT, settings_diff

    unchanged = {r for s in base if s.config is not None for r in roles(s)
                 if _settings_diff(out / "runs" / s.key, s.config, settings_diff,
                                   CHECKPOINT) == []}
    for spec in specs:
        if spec.config is None or spec.skip_reason or not roles(spec) & unchanged:
            continue
        diffs = _settings_diff(out / "runs" / spec.key, spec.config, settings_diff, CHECKPOINT)
        if diffs:
            raise ConfigError(f"--set: {out / 'runs' / spec.key} holds a run trained without "
                              f"it ({'; '.join(diffs)}); drop the --set, delete the run, or "
                              f"use another --out")


def _settings_diff(run_dir: Path, cfg: TrainConfig, settings_diff: Callable,
                   checkpoint: str) -> list[str] | None:
    """How a started run in RUN_DIR differs from CFG ([] when it does not); None when RUN_DIR
    holds no started run, or one that cannot be read (the run itself then says why)."""
    if not ((run_dir / "metrics.json").exists() or (run_dir / checkpoint).exists()):
        return None
    try:
        return settings_diff(run_dir, cfg)
    except Exception:
        return None


def run_suite(suite: Suite, out: str | Path, extra: dict[str, Any] | None = None,
              progress: bool = True, report: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every missing run of the suite into OUT and write the results and tables."""
    out = Path(out)
    # One benchmark per OUT at a time: a second one (a job launched twice) resumed each run
    # the first was training, deleted the dataset it was generating and rewrote its
    # results. Each run folder is locked by its trainer too (`causalign train --out`).
    with folder_lock(out, f"causalign benchmark {suite.name} --out {out}"):
        return _run_suite(suite, out, extra, progress, report, log)


def _run_suite(suite: Suite, out: Path, extra: dict[str, Any] | None, progress: bool,
               report: bool, log: Callable[[str], None]) -> dict:
    specs = plan(suite, extra, out)
    if extra:
        # an unknown key or bad value in --set would fail every run alike, and overwrite
        # results.json/tables.md of a finished OUT with failures: stop before any output
        _check_extra(suite, extra, specs, log, out)
    for name in dict.fromkeys(d for e in suite.experiments for d in e.datasets):
        stale = _synth_diff(suite, name, out) or _missing_path(suite, name)  # before any
        if stale:  # output, as --set
            raise ConfigError(stale)
    # a selection (--only/--methods/--seeds/--datasets) decides what runs now; results and
    # tables still show the suite's other runs finished in OUT (they were dropped)
    whole = _whole_suite(suite)
    whole_specs = plan(whole, extra, out) if whole is not None else None
    # content digest per dataset folder, read once per benchmark (a module-level cache kept
    # data rewritten between two benchmarks of one process until it was reset)
    digests: dict[str, str | None] = {}
    earlier, left_out = (_earlier_runs(whole, whole_specs, {s.key for s in specs}, out,
                                       suite.origin, digests)
                         if whole is not None and whole_specs is not None else ({}, 0))

    def shown(recs: list[dict]) -> tuple[Suite, list[dict]]:
        if whole is None or whole_specs is None:
            return suite, recs
        merged = _with_earlier(recs, whole_specs, earlier)
        return _view(suite, whole, merged), merged

    before = _load_json(out / "results.json") or {}
    if isinstance(before, dict) and before.get("suite") not in (None, suite.name):
        # a second suite in the same OUT silently replaced the first one's tables
        warnings.warn(f"{out} held the results of suite '{before['suite']}': results.json, "
                      f"results.csv, tables.md and report.html now show suite '{suite.name}'"
                      f" (the runs of both stay in {out / 'runs'}; give each suite its own "
                      f"--out to keep both tables)", stacklevel=3)
    out.mkdir(parents=True, exist_ok=True)
    handled = sys.exc_info()[1]  # a caller's exception being handled: not an interrupt here
    t0 = time.perf_counter()
    records: list[dict] = []
    said: set[tuple[str, str]] = set()  # (dataset, warning) shown: each said once
    data_paths: dict[str, Path] = {}
    data_errors: dict[str, str] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("benchmark", total=len(specs)) if bar is not None else None
        for spec in specs:
            rec = _record(spec)
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
                        # the run's seconds are its training: generating the dataset was
                        # counted in the first run on it (the first of a fresh OUT took
                        # ~7x the next seed's at 32 px)
                        started = time.perf_counter()
                    run_dir = out / "runs" / spec.key
                    fresh = not (run_dir / "metrics.json").exists()
                    # a run resumed from its checkpoint: add the epochs trained before the
                    # interruption (only this invocation's part was counted, ~half of it)
                    before = _history_seconds(run_dir) if fresh else 0.0
                    with _said_once_per_dataset(said, spec.dataset, spec.key):
                        metrics = run_one(spec, data_paths[spec.dataset], run_dir, digests)
                    if fresh:
                        seconds = time.perf_counter() - started + before
                        atomic_write_json(run_dir / "benchmark_run.json",
                                          {"seconds": seconds, "key": spec.key,
                                           "resumed_after_seconds": before})
                    else:  # collected: the time it took when it was trained
                        seconds = (_load_json(run_dir / "benchmark_run.json") or {}).get(
                            "seconds")
                    rec.update(status="done", metrics=_slim(metrics), trained_now=fresh,
                               seconds=seconds)
                    # the traceback of an earlier failed attempt no longer describes it
                    (run_dir / "error.txt").unlink(missing_ok=True)
                except Exception as exc:  # one failing run is recorded, the rest go on
                    interrupt = interrupt_behind(exc, handled)
                    if interrupt is not None:
                        # Ctrl-C inside a run whose clean-up then failed: recorded as a
                        # failure, the benchmark went on to the next run (and the next
                        # Ctrl-C met the same fate); the interrupt is what happened
                        raise interrupt from None
                    rec.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                               seconds=time.perf_counter() - started)
                    run_dir = out / "runs" / spec.key
                    run_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(run_dir / "error.txt", traceback.format_exc())
            records.append(rec)
            if bar is not None:
                bar.advance(task)
            # results on disk after every run: a killed benchmark still shows what finished
            _write_results(out, *shown(records), time.perf_counter() - t0, final=False)
    view, every = shown(records)
    results = _write_results(out, view, every, time.perf_counter() - t0, final=True)
    from ..report.clinical import clinical_markdown

    # the report's operating points, after the results tables: predictions CSVs only (no
    # model run), so tables.md and the demo's summary.md carry them without --report
    tables = render_tables(view, every)
    clinical = clinical_markdown(out, results)
    atomic_write_text(out / "tables.md", f"{tables}\n{clinical}" if clinical else tables)
    if report:
        from ..report.html import write_report

        results["report"] = str(write_report(out, progress=False))
    n = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "skipped")}
    chosen = f" (selected: {suite.selection})" if suite.selection else ""
    log(f"benchmark {suite.name}{chosen}: {n['done']} done, {n['failed']} failed, "
        f"{n['skipped']} skipped ({sum(bool(r.get('trained_now')) for r in records)} trained "
        f"now) in {time.perf_counter() - t0:.0f} s")
    if whole is not None:
        log(f"  results and tables also show {len(earlier)} finished run(s) of the suite "
            f"outside the selection" + (f"; {left_out} not finished in {out} (or with other "
                                        f"settings) are not shown" if left_out else ""))
    for r in records:
        if r["status"] != "done":
            log(f"  {r['status']}: {r['key']}: {r.get('error') or r.get('reason')}")
    return results


def _whole_suite(suite: Suite) -> Suite | None:
    """The suite a selection came from, each experiment with its own seeds and those of
    --seeds (runs of the suite too); None when SUITE is not a selection."""
    if suite.origin is None:
        return None
    o = suite.origin
    chosen = {e.name: e.seeds for e in (suite.full or suite).experiments}
    return Suite(o.name, o.description, o.defaults, o.datasets,
                 [dataclasses.replace(e, seeds=list(dict.fromkeys(
                     [*e.seeds, *chosen.get(e.name, [])]))) for e in o.experiments], o.root)


def _record(spec: RunSpec) -> dict:
    return {"key": spec.key, "dataset": spec.dataset, "method": spec.method,
            "label": spec.label, "setting": spec.setting, "seed": spec.seed,
            "experiments": list(spec.experiments), "config_hash": spec.config_hash,
            "run_dir": f"runs/{spec.key}",
            "roles": {k: [list(x) for x in v] for k, v in spec.roles.items()}}


def _earlier_runs(whole: Suite, specs: list[RunSpec], selected: set[str], out: Path,
                  origin: Suite | None = None, digests: dict[str, str | None] | None = None
                  ) -> tuple[dict[str, dict], int]:
    """Records of the runs of WHOLE outside the selection that are finished in OUT with the
    same settings (collected, not retrained), and how many runs of ORIGIN (its own seeds,
    not those only --seeds adds) are left out."""
    own = {(e.name, x) for e in (origin or whole).experiments for x in e.seeds}
    from .trainer import CHECKPOINT, settings_diff

    found: dict[str, dict] = {}
    left = 0
    stale: dict[str, str | None] = {}
    for spec in specs:
        if spec.key in selected:
            continue
        run_dir = out / "runs" / spec.key
        if spec.dataset not in stale:  # runs on regenerated data are not the suite's
            stale[spec.dataset] = _synth_diff(whole, spec.dataset, out)
        metrics = None
        if (spec.config is not None and not spec.skip_reason and not spec.error
                and not stale[spec.dataset] and (run_dir / "metrics.json").exists()
                and _settings_diff(run_dir, spec.config, settings_diff, CHECKPOINT) == []
                and not _data_diff(run_dir, _dataset_dir(whole, spec.dataset, out),
                                   digests)):
            metrics = _load_json(run_dir / "metrics.json")
        if metrics is None:
            left += any((e, spec.seed) in own for e in spec.experiments)
            continue
        seconds = (_load_json(run_dir / "benchmark_run.json") or {}).get("seconds")
        found[spec.key] = {**_record(spec), "status": "done", "metrics": _slim(metrics),
                           "trained_now": False, "seconds": seconds, "selected": False}
    return found, left


def _with_earlier(records: list[dict], specs: list[RunSpec],
                  earlier: dict[str, dict]) -> list[dict]:
    """This invocation's records and the earlier finished ones, in the whole suite's order;
    a selected run lists every experiment of the whole suite it belongs to."""
    mine = {r["key"]: r for r in records}
    merged = []
    for spec in specs:
        r = mine.get(spec.key)
        if r is not None and r["config_hash"] == spec.config_hash:
            del mine[spec.key]
            merged.append({**r, "experiments": list(spec.experiments),
                           "roles": {k: [list(x) for x in v] for k, v in spec.roles.items()}})
        elif spec.key in earlier:
            merged.append(earlier[spec.key])
    return merged + list(mine.values())


def _view(suite: Suite, whole: Suite, records: list[dict]) -> Suite:
    """The experiments of WHOLE as results and tables show them: the selected ones, and of
    the others only what has runs in RECORDS (no table of empty rows for a run never made)."""
    sel = {e.name: e for e in suite.experiments}
    exps = []
    for e in whole.experiments:
        s = sel.get(e.name)
        roles = [(lab, st, r["dataset"], r["seed"]) for r in records
                 for lab, st in (r.get("roles") or {}).get(e.name, [])]
        if s is None and not roles:
            continue
        labels = {x[0] for x in roles} | {m.label for m in (s.methods if s else [])}
        names = {x[1] for x in roles} | set(s.settings if s else [])
        ds = {x[2] for x in roles} | set(s.datasets if s else [])
        seeds = {x[3] for x in roles} | set(s.seeds if s else [])
        exps.append(dataclasses.replace(
            e, methods=[m for m in e.methods if m.label in labels],
            datasets=[d for d in e.datasets if d in ds],
            settings={k: v for k, v in e.settings.items() if k in names},
            seeds=[x for x in e.seeds if x in seeds]))
    return Suite(whole.name, whole.description, whole.defaults, whole.datasets, exps,
                 whole.root)


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
    # by fraction, not in the order the runs first name them: runs deleting other fractions
    # (a --set deletion_fractions) put 0.1 before 0.02 when a 0.1-only run came first
    deletion_keys.sort(key=_fraction_order)
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


def _fraction_order(key: str) -> tuple[int, float, str]:
    """Sort key of a deletion column: numeric fractions ascending, anything else after."""
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


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
    # one entry per (label, setting) the run has in this experiment (a merged run may
    # appear under another label than its first experiment's); results without "roles"
    # (older versions) use the run's own label and setting
    mine = [{**r, "label": lab, "setting": st} for r in records if e.name in r["experiments"]
            for lab, st in (r.get("roles") or {}).get(e.name, [(r["label"], r["setting"])])]
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
    # the seeds the note names: a cell averaged over fewer of them (a failed run, or one of
    # another selection not finished) looked like every other cell of "mean over seeds …"
    all_seeds = sorted({r["seed"] for r in mine if r["status"] == "done"})
    short: list[list[bool]] = []
    lacking: list[str] = []
    for rv in axes[row_axis]:
        cells, shorts = [], []
        for metric in e.metrics:
            for ck in col_keys:
                sel = [r for r in mine if field(r, row_axis) == rv and r["status"] == "done"
                       and all(field(r, a) == v for a, v in zip(col_axes, ck, strict=True))]
                got = [(r["seed"], get_path(r.get("metrics") or {}, metric)) for r in sel]
                got = [(sd, v) for sd, v in got if isinstance(v, (int, float))]
                vals = [v for _, v in got]
                m, s = mean_std(vals)
                cells.append((m, s, len(vals)))
                missing = [sd for sd in all_seeds if sd not in {sd for sd, _ in got}]
                shorts.append(bool(vals) and bool(missing))
                if vals and missing:
                    where = " ".join([rv, *ck])
                    text = f"{where}: seed {', '.join(map(str, missing))}"
                    if text not in lacking:
                        lacking.append(text)
        values.append(cells)
        short.append(shorts)
        labels.append(rv)
    competing = [i for i, lab in enumerate(labels)
                 if not (row_axis == "method" and _method_of(e, lab) in NOT_COMPETING)]
    bold = [[False] * len(values[0]) for _ in values] if values else []
    per_metric = len(col_keys)  # columns run metric-major: metric × col_keys
    for j in range(len(values[0]) if values else 0):
        cand = [(values[i][j][0], i) for i in competing if values[i][j][0] is not None]
        name = e.metrics[j // per_metric].rsplit(".", 1)[-1]
        if len(cand) > 1 and name not in UNRANKED:
            lower = name in LOWER_IS_BETTER
            best = (min if lower else max)(v for v, _ in cand)
            for v, i in cand:
                # ties as the cells print them (_fmt_cell's 3 decimals): |v - best| < 5e-4
                # bolded 0.700 beside a bold 0.701, and left one of two 0.700s plain
                if f"{v:.3f}" == f"{best:.3f}":
                    bold[i][j] = True
    rows = []
    for lab, cells, marks in zip(labels, values, short, strict=True):
        rows.append([lab] + [_fmt_cell(m, s, n) + ("†" if mark else "")
                             for (m, s, n), mark in zip(cells, marks, strict=True)])
    notes = []
    if lacking:
        notes.append(f"† over fewer seeds, without {'; '.join(lacking)}")
    # a 3-class (BUSI) table's AUC sat beside a ROC legend of one AUC per class with
    # nothing saying it is their macro average
    multi = sorted({str(r["dataset"]) for r in mine if r["status"] == "done"
                    and any(len(((r.get("metrics") or {}).get(sp) or {}).get("recall_per_class")
                                or []) > 2 for sp in ("val", "test"))})
    if multi and any(m.rsplit(".", 1)[-1] == "auc" for m in e.metrics):
        notes.append(f"AUC on {', '.join(multi)} (more than two classes): the macro average "
                     f"of each class's one-vs-rest AUC (metrics.json's auc)")
    once = list({r["key"]: r for r in mine}.values())  # a run under two labels: noted once
    missing = [r for r in once if r["status"] != "done"]
    for r in missing:
        notes.append(f"{r['key']}: {r['status']} — {r.get('error') or r.get('reason')}")
    warned: dict[tuple[str, str], list[str]] = {}  # (dataset, warning) -> its runs' keys
    for r in once:  # e.g. "no test split: test metrics omitted" (why its cells are empty)
        note = (r.get("metrics") or {}).get("note") if r["status"] == "done" else None
        if note:
            notes.append(f"{r['key']}: {note}")
        if r["status"] == "done":  # a finished run whose alignment term was mostly skipped
            for w in r["metrics"].get("warnings", []):
                warned.setdefault((str(r.get("dataset")), w), []).append(r["key"])
            # the test split's saliency fell back to WBP (gradcam on volumes, or on a 1x1
            # layer): its CAM columns are WBP's, not the eval_saliency the suite asked for
            sal = (r["metrics"].get("test") or {}).get("saliency_note")
            if sal:
                warned.setdefault((str(r.get("dataset")), f"test: {sal}"), []).append(
                    r["key"])
    # one note per dataset and warning: a dataset's one-class val split was listed once per
    # run on it (18 identical notes for 2 datasets x 3 methods x 2 seeds)
    for (_, w), keys in warned.items():
        who = keys[0] if len(keys) == 1 else f"{keys[0]} and {len(keys) - 1} other run(s)"
        notes.append(f"{who}: warning: {w}")
    seeds = sorted({r["seed"] for r in mine if r["status"] == "done"})
    if seeds:
        # which std: numpy's population std (report.tables.mean_std), not the sample one
        notes.insert(0, f"mean (std) over seeds {', '.join(map(str, seeds))} (std with "
                        f"ddof 0); best per "
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
