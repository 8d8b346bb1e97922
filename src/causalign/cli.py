"""Command line (contract in DESIGN.md). User errors exit 2 with one line on stderr."""

from __future__ import annotations

import codecs
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import CausalignError, did_you_mean, interrupt_behind

if TYPE_CHECKING:
    from .engine.config import TrainConfig

# -h as well as --help: `causalign train -h` was "No such option: -h"
_CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  context_settings=_CONTEXT,
                  help="Causally aligned medical-image classifiers: train, explain, audit.")
data_app = typer.Typer(no_args_is_help=True, context_settings=_CONTEXT,
                       help="Create and inspect datasets.")
bench_app = typer.Typer(no_args_is_help=True, context_settings=_CONTEXT,
                        help="Micro-benchmarks (print JSON).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
causal_app = typer.Typer(no_args_is_help=True, context_settings=_CONTEXT,
                        help="Causal attribution (CCCE) and the PC-algorithm check.")
app.add_typer(causal_app, name="causal")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"causalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print the version and exit (also recorded in each run's config.yaml)")] = False,
          ) -> None:
    """Causally aligned medical-image classifiers: train, explain, audit."""


# The names --help offers (cli.py imports no torch, so not read from the registries;
# tests/test_audit_cli_1206.py checks them against methods, models and explainers).
METHODS_HELP = ("erm | oracle | causal-align | hier-align | ppi | rrr | cdep | chang | icnn | "
                "bagnet")
MODELS_HELP = ("cnn7 | resnet18 | vgg11 | inception_v3 | bagnet9 | bagnet13 | bagnet17 | "
               "bagnet33 | multiview (volumes)")
SALIENCY_HELP = ("gradcam | gradient | input-x-gradient | wbp | lrp-epsilon | lrp-gamma | "
                 "lrp-alpha-beta | lrp-flat | lrp-w-square | lrp-zbox | counterfactual")
DEMO_METHODS = "erm, oracle, rrr, causal-align, hier-align, ppi"  # suites/demo.yaml
_SET = "KEY=VALUE"  # --set's metavar: typer showed <list[str]>
# --bootstrap-seed of `evaluate` and `compare`: one declaration, one help text
BootstrapSeed = Annotated[int, typer.Option(help="seed of the bootstrap resamples")]
# the class an operating point calls positive (`evaluate`, `compare`, `predict`)
Positive = Annotated[str | None, typer.Option(
    metavar="CLASS",
    help="the class the operating point calls positive, one-vs-rest: a class name of the "
         "run's dataset or its index (default: class 1 of two classes; required for more)")]


def _progress(enabled: bool = True):
    from .engine.progress import progress_bar

    return progress_bar(enabled, remaining=False)


def _echo_json(obj, indent: int | None = 2) -> None:
    """JSON on stdout, standard like the files (`finite_or_null`: no bare NaN/Infinity)."""
    from .io import finite_or_null

    typer.echo(json.dumps(finite_or_null(obj), indent=indent, allow_nan=False))


# ---------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="output dataset folder")],
    n_train: Annotated[int, typer.Option(help="training samples")] = 1000,
    n_val: Annotated[int, typer.Option(help="validation samples")] = 300,
    n_test: Annotated[int, typer.Option(help="test samples")] = 500,
    size: Annotated[int, typer.Option(help="image side in px (>= 32)")] = 64,
    shortcut: Annotated[str, typer.Option(help="plus-minus | intensity | none")] = "plus-minus",
    sites: Annotated[int, typer.Option(help="acquisition sites")] = 1,
    depth: Annotated[int, typer.Option(help="slices per volume (1: 2D images)")] = 1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    label_noise: Annotated[float, typer.Option(help="σ of the noise in the label rule")] = 0.3,
    weights: Annotated[str, typer.Option(
        help="the label rule's attribute weights, NAME=W,… (unnamed: 0); default: "
             "spiculation 2, margin 1.5, lobulation 1, texture 0.7, subtlety 0.4")] = "",
    overwrite: Annotated[bool, typer.Option(help="write into OUT even if it is not empty")] = False,
    examples: Annotated[bool, typer.Option(help="also write examples.png")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Write the synthetic lesion benchmark (defaults = the demo's benchmark)."""
    from .data.format import ensure_empty_or_missing
    from .data.synth import SynthConfig, generate, parse_weights

    cfg = SynthConfig(n_train=n_train, n_val=n_val, n_test=n_test, size=size,
                      shortcut=shortcut, sites=sites, depth=depth, seed=seed,
                      label_noise=label_noise,
                      causal_weights=parse_weights(weights) if weights else None)
    cfg.validate()
    from .io import folder_lock

    # one writer: the same synth launched twice (a job array) interleaved two writes of
    # every file and both passed the emptiness check
    with folder_lock(out, f"causalign data synth {out}"):
        ensure_empty_or_missing(out, overwrite)
        with _progress(progress) as bar:
            generate(out, cfg, progress=bar)
        if examples:
            write_examples(out, out / "examples.png")
        else:  # with --overwrite, an earlier examples.png would show the old samples
            (out / "examples.png").unlink(missing_ok=True)
    typer.echo(f"wrote {n_train + n_val + n_test} samples to {out}")


def write_examples(data: Path, path: Path, n: int = 16) -> None:
    import torch

    from .data.format import LesionDataset
    from .report.figures import example_grid

    ds = LesionDataset(data, "train", limit=n)  # the first n only (not a 20000-image split)
    k = min(n, len(ds))
    names = [a[:4] for a in ds.meta.attributes]
    titles = []
    for i in range(k):
        attrs = ds.attributes[i]
        on = [nm for nm, a in zip(names, attrs.tolist(), strict=True) if a == 1]
        titles.append(f"y={ds.meta.classes[int(ds.labels[i])][:6]} " + ",".join(on))
    # the first k items only: `.images`/`.masks` would convert the whole split to float
    first = ds.batch(torch.arange(k))
    example_grid(first["image"].numpy(), first["mask"].numpy(), titles, path)


@data_app.command("info")
def data_info_cmd(data: Annotated[Path, typer.Argument(help="dataset folder")]) -> None:
    """Counts per split and class, annotation coverage."""
    from .data.format import dataset_summary

    _echo_json(dataset_summary(data))


@data_app.command("check")
def data_check(data: Annotated[Path, typer.Argument(help="dataset folder")]) -> None:
    """Fully validate every split (files, shapes, labels, NaN/inf); warn of leakage between
    splits (a group/patient in two splits, identical images in two splits)."""
    from .data.format import SPLITS, LesionDataset, check_split_channels, split_leaks

    first = None
    datasets = []
    for split in SPLITS:
        ds = LesionDataset(data, split)
        if first is None:
            first = ds
        else:  # one model takes every split: one channel count
            check_split_channels(ds, first.image_shape[0], f"split '{first.split}' has")
        datasets.append(ds)
        typer.echo(f"{split}: {len(ds)} samples, image {ds.image_shape}, "
                   f"{int(ds.has_mask.sum())} with mask")
    # a leak is not a format error (the data still trains), so a warning, not a failure
    for line in split_leaks(datasets):
        typer.echo(f"warning: {line}")
    typer.echo("ok")


def _split_for_model(data_path: Path, split: str, limit: int | None = None,
                     run: Path | None = None, pick: str = "first"):
    """``split`` of ``data_path`` (its first ``limit`` samples), refused in one line when its
    images have another channel count than the model `load_run` built (from the dataset's
    first image): it failed inside the first convolution with a traceback. With ``run``, a
    warning when its pixel values lie far from those the run was trained on, or its images
    have another size."""
    from .data.format import LesionDataset, check_split_channels
    from .engine.trainer import (
        data_info_from_disk,
        warn_other_geometry,
        warn_other_intensity,
    )

    ds = LesionDataset(data_path, split, limit=limit, pick=pick)
    check_split_channels(ds, data_info_from_disk(data_path).in_channels,
                         "the run's model takes")
    if run is not None:
        warn_other_intensity(run, ds)
        warn_other_geometry(run, ds)
    return ds


def _warn_unannotated_input(method: Any, ds: Any) -> None:
    """One warning line when a method that classifies the annotated area alone (the
    oracle's x·m) is used on samples without annotation: they are classified from their
    full image. On another site without masks the oracle's accuracy fell 0.77 -> 0.54 (AUC
    0.854 -> 0.609) with n_annotated 0 in the JSON as the only trace."""
    if not getattr(method, "annotated_input", False):
        return
    missing = int((~ds.has_box_or_mask).sum())
    if missing:
        warnings.warn(f"{ds.root} ({ds.split}): {missing} of {len(ds)} samples have no mask "
                      f"or box; the {method.name} model classifies those from the full image, "
                      f"not the annotated area it was trained on", stacklevel=2)


def _only(kinds: str) -> str:
    """Which kinds use an option, as its --help starts. Not "[lidc] ": typer's rich help
    reads a bracketed word as a markup tag and dropped it (--min-readers showed no text)."""
    return ", ".join(kinds.split()) + " only: "


@data_app.command("import")
def data_import(
    kind: Annotated[str, typer.Argument(help="lidc | cbis-ddsm | busi | brats | cub | "
                                             "decoy-mnist | folder")],
    src: Annotated[Path, typer.Argument(help="the dataset in its own on-disk layout")],
    out: Annotated[Path, typer.Argument(help="output dataset folder (resumed if interrupted)")],
    size: Annotated[int | None, typer.Option(help="output side in px (default per kind: "
                                                  "lidc 64, cub 224, decoy-mnist 28, else 128)")
                    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of random splits (default 0)")] = None,
    shortcut: Annotated[str | None, typer.Option(help="plus-minus | intensity | none: the "
                                                      "paper's shortcut, in training images "
                                                      "(default none)")] = None,
    val_frac: Annotated[float | None, typer.Option(help="fraction for val (default per kind: "
                                                        "lidc 0.2, busi brats folder 0.15, "
                                                        "else 0.1)")] = None,
    test_frac: Annotated[float | None, typer.Option(help=_only(
        "lidc busi brats folder") + "fraction for test (default lidc 0.2, else 0.15; the "
                                    "other kinds keep their official test split)")] = None,
    classes: Annotated[str | None, typer.Option(help=_only("busi cub folder")
                                                + "classes to keep, in label order (default "
                                                  "busi benign,malignant; others all)")
                       ] = None,
    label: Annotated[str | None, typer.Option(help=_only("lidc")
                                              + "malignancy | presence (default malignancy)")
                     ] = None,
    mask_rule: Annotated[str | None, typer.Option(help=_only("lidc")
                                                  + "auto | consensus | union (default auto)")
                         ] = None,
    window: Annotated[str | None, typer.Option(help=_only("lidc")
                                               + "HU window LOW,HIGH (default -1000,400)")
                      ] = None,
    spacing: Annotated[float | None, typer.Option(help=_only("lidc")
                                                  + "mm per output pixel (default 1.0)")] = None,
    cluster_mm: Annotated[float | None, typer.Option(help=_only("lidc")
                                                     + "readers' marks closer than this (mm) "
                                                       "are one nodule (default 5)")] = None,
    min_readers: Annotated[int | None, typer.Option(help=_only("lidc")
                                                    + "skip nodules marked by fewer readers, "
                                                      "1..4 (default 1)")] = None,
    drop_uncertain: Annotated[bool | None, typer.Option(
        "--drop-uncertain", help=_only("lidc") + "skip nodules with median "
                                                        "malignancy 3")] = None,
    patches_csv: Annotated[str | None, typer.Option(help=_only("lidc")
                                                    + "CSV of pre-cropped patches")] = None,
    abnormality: Annotated[str | None, typer.Option(help=_only("cbis-ddsm")
                                                    + "mass | calc | both (default mass)")
                           ] = None,
    context: Annotated[float | None, typer.Option(help=_only("cbis-ddsm cub")
                                                  + "crop margin per side, × box side "
                                                    "(default cbis-ddsm 0.5, cub 0.15)")
                       ] = None,
    cub_attributes: Annotated[str | None, typer.Option(
        help=_only("cub") + "none | all | attribute ids, ranges or names (e.g. "
                            "'1-15,has_wing_color::blue'): CUB's 312 binary attributes "
                            "(default none)")] = None,
    dup_threshold: Annotated[int | None, typer.Option(help=_only("busi")
                                                      + "pHash bits for near-duplicates "
                                                        "(default 4)")] = None,
    drop_duplicates: Annotated[bool | None, typer.Option(
        "--drop-duplicates", help=_only("busi") + "keep one image per near-duplicate "
                                                         "group")] = None,
    task: Annotated[str | None, typer.Option(help=_only("brats")
                                             + "tumor | grade | enhancing (default tumor)")
                    ] = None,
    mode: Annotated[str | None, typer.Option(help=_only("brats")
                                             + "slices | volumes (default slices)")] = None,
    modalities: Annotated[str | None, typer.Option(help=_only("brats")
                                                   + "channels, a subset of t1,t1ce,t2,flair "
                                                     "(default all four)")] = None,
    region: Annotated[str | None, typer.Option(help=_only("brats")
                                               + "mask: wt | tc | et (default wt)")] = None,
    slices_per_subject: Annotated[int | None, typer.Option(help=_only("brats")
                                                           + "tumour slices kept per subject "
                                                             "(default 8)")] = None,
    min_tumor_px: Annotated[int | None, typer.Option(help=_only("brats")
                                                     + "tumour pixels that make a slice "
                                                       "positive (default 100)")] = None,
    depth: Annotated[int | None, typer.Option(help=_only("brats")
                                              + "slices per volume (--mode volumes; default "
                                                "32)")] = None,
    mask: Annotated[str | None, typer.Option(help=_only("cub")
                                             + "auto | box | segmentation | none (default "
                                               "auto)")] = None,
    crop: Annotated[str | None, typer.Option(help=_only("cub") + "image | box "
                                                                        "(default image)")
                    ] = None,
    mask_dilate: Annotated[int | None, typer.Option(help=_only("decoy-mnist")
                                                    + "px the digit mask is dilated by, 0..5 "
                                                      "(default 1)")] = None,
    shade_step: Annotated[int | None, typer.Option(help=_only("decoy-mnist")
                                                   + "grey-level step of the decoy swatch "
                                                     "per class, 1..28 (default 25)")] = None,
    csv: Annotated[str | None, typer.Option(help=_only("folder")
                                            + "CSV listing images/labels/masks/boxes")] = None,
    color: Annotated[str | None, typer.Option(help=_only("folder") + "gray | rgb "
                                                                         "(default gray)")
                     ] = None,
    mask_suffix: Annotated[str | None, typer.Option(help=_only("folder")
                                                    + "a mask is <image><suffix>* (default "
                                                      "_mask)")] = None,
    image_format: Annotated[str | None, typer.Option(help="png | npy (2D images; default "
                                                          "png)")] = None,
    limit: Annotated[int | None, typer.Option(help="at most N items per split (a quick look)")
                     ] = None,
    overwrite: Annotated[bool, typer.Option(help="discard a previous import in OUT")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Convert a real dataset (in its own layout) into a causalign dataset; resumable.

    Prints counts per split and class, mask coverage and every skipped item with its reason;
    the same summary is saved as OUT/import_summary.json."""
    given = {k: v for k, v in locals().items()
             if k not in ("kind", "src", "out", "overwrite", "progress") and v is not None}
    from contextlib import nullcontext

    from .data.importers import format_summary, run_import
    from .io import folder_lock

    # one writer: a second import into OUT (or a resume while the first still runs)
    # replayed the same journal and wrote every file twice
    with folder_lock(out, f"causalign data import {kind} {out}"), \
            (_progress() if progress else nullcontext()) as bar:
        summary = run_import(kind, src, out, given, overwrite=overwrite, progress=bar)
    typer.echo(format_summary(summary))


# ---------------------------------------------------------------------------- train / eval


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="dataset folder")],
    method: Annotated[str | None, typer.Option(help=f"{METHODS_HELP} (default erm)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/METHOD-seedS)")
                   ] = None,
    # defaults shown in --help are TrainConfig's (None here: --config and a --resume'd run's
    # stored settings apply unless a flag is given); tests/test_cli_contract.py compares them
    epochs: Annotated[int | None, typer.Option(help="training epochs (default 12)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per step, over all "
                                                        "processes (default 64)")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 0.001)")
                  ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default 0)")] = None,
    model: Annotated[str | None, typer.Option(help=f"{MODELS_HELP} (default cnn7)")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:K "
                                                    "(default auto)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar=_SET, help="override any config key (repeatable; method.<name>=value "
        "for the method, model.<option>=value for the model's options); a key the method "
        "lacks is refused with its settings and their defaults")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train a classifier with METHOD on DATA.

    Writes config.yaml, history.csv, checkpoints and metrics.json into --out.

    `--resume` continues an interrupted run from its last checkpoint.

    Settings without a flag, as --set KEY=VALUE or in --config (default): width (16),
    weight_decay (0), scheduler cosine | none (cosine), select_metric auc |
    balanced_accuracy | accuracy | loss (auc), eval_saliency (gradcam), deletion_fractions
    ([0.002, 0.01, 0.02, 0.1, 0.2]), deletion_fill (0: the value deleted pixels take; -1000
    for CT in HU), class_weight none | balanced | one weight per class, e.g. [1, 3]: of the
    classification cross-entropy (none), sampler none | balanced: each epoch's training
    samples, a shuffled pass or drawn with replacement equally per class (none),
    bn_recalibrate (true), train_eval_samples (0:
    train_accuracy on the whole training split, else on a fixed random subset of that
    many), augment none | dihedral (none),
    init, a run folder or .pt file to start from (none: random weights), deterministic
    (false), threads (0: torch's), amp (false), compile (false), sync_bn (false); and
    method.<name> for the method's settings (a misspelt one lists them with their
    defaults), model.<option> for the model's."""
    from .engine.config import (
        TrainConfig,
        apply_overrides,
        load_config_file,
        merge_settings,
        parse_set,
        valid_keys,
    )
    from .engine.trainer import RUN_METADATA
    from .engine.trainer import train as run_train

    values: dict = load_config_file(config) if config is not None else {}
    recorded = values.get("method_params"), values.get("method")  # before it is dropped
    recorded_init = values.get("init"), values.get("init_source")
    for key in RUN_METADATA:  # a run's resolved config.yaml works as --config: its
        values.pop(key, None)  # provenance (dataset, versions, resolved params) is no setting
    unknown = [k for k in values if k not in valid_keys() and k != "method_args"
               and not str(k).startswith(("method.", "model."))]
    if unknown:  # name the file: the same key from --set would read alike
        raise CausalignError(f"{config}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(valid_keys())}, method.<parameter>, "
                             f"model.<option>"
                             + "".join(did_you_mean(k, valid_keys()) for k in unknown))
    flags = {key: val for key, val in (("method", method), ("epochs", epochs),
                                        ("batch_size", batch_size), ("lr", lr), ("seed", seed),
                                        ("model", model), ("device", device))
             if val is not None}
    sets = parse_set(set_ or [])
    _refuse_conflicts(flags, sets)
    # method_args/model_args merge per parameter: `--set method_args={…}` replaced the
    # --config file's whole mapping
    values = merge_settings(values, flags, sets)
    base = TrainConfig()
    if out is None:  # one folder per method and seed: a second run must not hit the first's
        name, run_seed = values.get("method", base.method), values.get("seed", base.seed)
        out = Path("runs") / f"{name}-seed{run_seed}"
    if resume and (out / "config.yaml").exists():
        from .engine.trainer import stored_config

        base = stored_config(out)  # continue the stored run; explicit flags must agree
        # another method: refused here, before the stored method.* settings are checked
        # against it ("unknown parameter(s) alpha, eps for method 'oracle'" hid the cause)
        # (a finished run without its checkpoint: the trainer's message says that)
        if (values.get("method", base.method) != base.method
                and ((out / "checkpoint.pt").exists() or not (out / "metrics.json").exists())):
            raise CausalignError(f"{out}: --resume continues the stored run, but these "
                                 f"settings differ: method '{base.method}' -> "
                                 f"'{values['method']}' (use a new --out)")
    cfg = apply_overrides(base, values)
    if config is not None and not resume:  # a resume compares with the run's own record
        _warn_unread_method_params(config, *recorded, cfg, merge_settings(sets))
        if "init" not in sets:  # given anew on the command line: on purpose
            _warn_other_init(config, *recorded_init, cfg)
    finished = resume and (out / "metrics.json").is_file()  # train() returns its metrics
    # metrics.json's warnings repeat the setup's one-class notes, already warned before
    # training: each printed twice on stderr; the closing list skips what was shown
    warned: set[str] = set()
    try:
        with _warnings_noted(warned):
            metrics = run_train(data, cfg, out, resume=resume, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say how to go on ("interrupted" follows)
        if os.environ.get("RANK", "0") == "0" and (out / "checkpoint.pt").is_file():
            typer.echo(f"{out}: its last checkpoint is kept; `causalign train {data} --out "
                       f"{out} --resume` continues it", err=True)
        raise
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    if finished:
        typer.echo(f"{out}: already finished ({metrics['epochs']} epoch(s)), nothing to resume",
                   err=True)
    # a dataset without a test split reports val metrics: say so, not "test accuracy"
    split = "test" if "test" in metrics else "val"
    shown = metrics[split]
    # balanced accuracy and AUC beside accuracy: on imbalanced data accuracy alone reads
    # well for a model that predicts the majority class (0.852 at balanced accuracy 0.500)
    typer.echo(f"{cfg.method}: {split} accuracy {shown['accuracy']:.3f}, balanced accuracy "
               f"{_f(shown.get('balanced_accuracy'))}, AUC {_f(shown.get('auc'))}, "
               f"cam_precision {_f(shown.get('cam_precision'))}"
               + ("" if split == "test" else " (no test split)")
               + f"; metrics in {out}/metrics.json")
    for line in metrics.get("warnings", []):
        if line not in warned:
            typer.echo(f"warning: {line}", err=True)


@contextmanager
def _warnings_noted(shown: set[str]) -> Iterator[None]:
    """Add the text of each warning shown inside the block to `shown` (and show it as
    before)."""
    inner = warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None) -> None:
        shown.add(str(message))
        inner(message, category, filename, lineno, file, line)

    warnings.showwarning = note
    try:
        yield
    finally:
        warnings.showwarning = inner


def _warn_unread_method_params(config: Path, recorded: object, recorded_method: object,
                               cfg: TrainConfig, sets: dict) -> None:
    """A run's config.yaml passed as --config: its method_params is a record, not read, so
    a run trained by a version with other defaults (causal-align's cg_iters 3 -> 0), or a
    method_params edited in place of method_args, trained with other hyper-parameters than
    the record shows, silently. Say which, and how to keep the recorded values."""
    from .methods.base import build_method, method_class, params_diff, resolved_params

    if not isinstance(recorded, dict) or recorded_method != cfg.method:
        return  # no record, or one of another method (--method X): nothing to compare
    cls = method_class(cfg.method)
    given = set(sets.get("method_args", {}))  # changed on purpose on the command line
    now = resolved_params(build_method(cfg.method, cfg.method_args))
    keys = [k for k in now if k not in given and k not in cls.placement_params
            and k in recorded and recorded[k] != now[k]]
    if not keys:
        return
    diffs = params_diff({k: recorded[k] for k in keys}, {k: now[k] for k in keys})
    again = " ".join(f"--set method.{k}={_yaml_value(recorded[k])}" for k in keys)
    warnings.warn(f"{config}: method_params records other values than this run uses: "
                  f"{'; '.join(diffs)} (method_params is a record, only method_args is "
                  f"read: a default changed since that run, or an edit); to train with the "
                  f"recorded values add {again}", stacklevel=2)


def _warn_other_init(config: Path, init: object, recorded: object, cfg: TrainConfig) -> None:
    """A run's config.yaml passed as --config keeps `init` as given: rerun from another
    folder (a relative path, another person's runs/) or after its source run was resumed
    (a new best.pt) it started from other weights than the run did, silently."""
    from .engine.trainer import init_source

    if (not isinstance(recorded, dict) or not cfg.init or cfg.init != init
            or not isinstance(recorded.get("sha256"), str)):
        return  # no record (older run, no init), or another init
    now = init_source(cfg.init)
    if now is None or now["sha256"] == recorded["sha256"]:
        return  # missing: the trainer's error names it
    warnings.warn(f"{config}: init {cfg.init} now resolves to {now['path']} (sha256 "
                  f"{now['sha256']}), not the weights the recorded run started from "
                  f"({recorded.get('path')}, sha256 {recorded['sha256']}): this run starts "
                  f"from other weights; --set init=FILE names the original", stacklevel=2)


def _yaml_value(value: object) -> str:
    """``value`` as --set reads it back (YAML flow style, one line)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix(
        "\n...").strip()


def _refuse_conflicts(flags: dict, sets: dict) -> None:
    """`--epochs 2 --set epochs=5` named two values for one setting; --set used to win
    silently (e.g. `--method erm --set method=oracle` trained the oracle)."""
    from .engine.config import TrainConfig, apply_overrides
    from .errors import ConfigError

    for key in flags.keys() & sets.keys():
        try:  # compare as the config reads them: `--lr 0.001` agrees with `--set lr=1e-3`
            same = (getattr(apply_overrides(TrainConfig(), {key: flags[key]}), key)
                    == getattr(apply_overrides(TrainConfig(), {key: sets[key]}), key))
        except ConfigError:
            continue  # an invalid value: the full check below names it
        if not same:
            option = "--" + key.replace("_", "-")
            raise CausalignError(f"{option} {flags[key]} and --set {key}={sets[key]} "
                                 f"conflict; give one of them")


def _file_option(option: str, example: str) -> Callable[[str], Path]:
    """A parser for a file-path option that keeps what `Path` drops: `--out results/` (a
    folder, by its trailing slash) wrote a file named `results`."""
    def parse(value: str) -> Path:
        if value.endswith(("/", os.sep)):
            raise CausalignError(f"{option} {value}: ends with '/', a folder; give a file "
                                 f"path (e.g. {value}{example})")
        return Path(value)
    return parse


def _check_output_file(option: str, path: Path, what: str) -> None:
    """Refuse an output file path that cannot be written (a folder, a path under a file,
    or in a folder the user may not write) before the work whose result it would hold."""
    if path.is_dir():
        raise CausalignError(f"{option} {path}: is a folder; give a file path for {what}")
    for parent in path.parents:  # the nearest existing ancestor must be a writable folder
        if parent.exists():
            if not parent.is_dir():
                raise CausalignError(f"{option} {path}: {parent} is a file, not a folder")
            # `export --out RO/m.pt2` traced the model (~20 s) before its temporary file
            # failed with "Permission denied"
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CausalignError(f"{option} {path}: {parent} is not writable")
            return


def _refuse_run_record(run: Path, **outputs: Path | None) -> None:
    """Refuse an output path that is one of the run's own files: `--out RUN/metrics.json`
    replaced the training's test metrics (which benchmark tables and `curves` read) with
    this evaluation's, and `--predictions RUN/config.yaml` made the run unloadable."""
    from .engine.trainer import BEST, CHECKPOINT, RESUMES, RUN_OUTPUTS

    # and the checkpoints' digests (replaced, every later load failed "checksum mismatch"),
    # the resume log and a benchmark's record of the run
    records = (*RUN_OUTPUTS, f"{CHECKPOINT}.sha256", f"{BEST}.sha256", RESUMES,
               "benchmark_run.json")
    for option, path in outputs.items():
        if path is None:
            continue
        for name in records:
            if _same_file(path, run / name):
                raise CausalignError(f"--{option} {path}: is the run's own {name}; give a "
                                     f"path outside the run's records (e.g. "
                                     f"{run / ('eval_' + path.stem + path.suffix)})")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file (also through '.', '..' or a link)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _other_dataset(run: Path, data: Path | None) -> Path | None:
    """``data`` resolved when `--data` names a dataset other than the one RUN was trained on
    (another site), else None: what a split chosen on ("val") and a figure refer to."""
    if data is None:
        return None
    from .engine.trainer import read_run_config

    stored = read_run_config(run).get("data")
    if isinstance(stored, str) and stored and _same_file(Path(stored), data):
        return None
    return data.resolve()


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="run folder")],
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    saliency: Annotated[str | None, typer.Option(help=f"saliency for localisation metrics: "
                                                      f"{SALIENCY_HELP} (default: the run's "
                                                      f"eval_saliency)")
                        ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    out: Annotated[Path | None, typer.Option(
        parser=_file_option("--out", "metrics.json"), metavar="<path>",
        help="also write the metrics JSON here")] = None,
    predictions: Annotated[Path | None, typer.Option(
        parser=_file_option("--predictions", "predictions.csv"), metavar="<path>",
        help="also write each sample's prediction here (CSV: id, site, label, predicted, "
             "p_<class>)")] = None,
    bootstrap: Annotated[int, typer.Option(
        help="also give percentile 95 % intervals (ci95) of accuracy, balanced accuracy, AUC, "
             "sensitivity, specificity, Brier, ECE, CAM precision and the other localisation "
             "and deletion means from N stratified bootstrap resamples (0: none; at least "
             "100, 1000 is usual)")] = 0,
    bootstrap_seed: BootstrapSeed = 0,
    reliability: Annotated[Path | None, typer.Option(
        parser=_file_option("--reliability", "reliability.png"), metavar="<path>",
        help="also draw the split's reliability diagram here (.png, .pdf or .svg; --n-bins "
             "bins of the predicted class's probability against accuracy, ECE in the "
             "title)")] = None,
    n_bins: Annotated[int, typer.Option(
        help="bins of the ECE (its interval, the reliability diagram): 15 (Guo et al.), as "
             "training's metrics.json; another number is recorded as ece_bins")] = 15,
    roc: Annotated[Path | None, typer.Option(
        parser=_file_option("--roc", "roc.png"), metavar="<path>",
        help="also draw the split's ROC curve here (.png, .pdf or .svg; AUC in the legend, "
             "the argmax's point and any --operating-point marked; with --bootstrap N, "
             "the curve's pointwise 95 % band)")] = None,
    operating_point: Annotated[str | None, typer.Option(
        metavar="RULE",
        help="also give sensitivity, specificity, PPV and NPV at a threshold on the "
             "--positive class's probability (one-vs-rest), chosen on the val split by "
             "RULE: youden, sensitivity=S (the best specificity with sensitivity ≥ S), "
             "specificity=S; or threshold=T, fixed")] = None,
    positive: Positive = None,
    calibrate: Annotated[str | None, typer.Option(
        metavar="METHOD",
        help="also give the split's NLL, Brier and ECE after post-hoc calibration fitted on "
             "the val split: temperature (one T > 0 minimising the val NLL of "
             "softmax(logits / T), Guo et al. 2017); accuracy and AUC stay the model's; "
             "with --predictions, also columns pcal_<class> and calibration_temperature")
                         ] = None,
    temperature: Annotated[float | None, typer.Option(
        help="as --calibrate temperature with this T > 0 given, not fitted (a site without "
             "a val split, or another site's T carried over, e.g. the T `evaluate "
             "--calibrate temperature` fitted on the development site); not with "
             "--calibrate")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Evaluate a run on a split: accuracy, balanced accuracy, AUC, sensitivity/specificity,
    Brier score, ECE, CAM precision, deletion; with --bootstrap N, their 95 % intervals;
    with --reliability FILE, the reliability diagram; with --operating-point RULE, the
    rates at a threshold chosen on the val split; with --calibrate temperature, the
    calibration after temperature scaling fitted on the val split (--temperature T: at a
    given T)."""
    from .engine.evaluate import VOLUME_UNSUPPORTED, evaluate_split
    from .engine.evaluate import predict as predict_split
    from .engine.trainer import load_run
    from .io import atomic_write_json
    from .metrics.calibration import (
        CALIBRATION_METHODS,
        calibrated_threshold,
        check_temperature,
        fit_temperature,
    )
    from .metrics.operating_point import choose_threshold, one_vs_rest

    # before loading the run: a bad count failed only after the whole evaluation
    _check_bootstrap_options(bootstrap, bootstrap_seed)
    _check_n_bins(n_bins)
    point = _parse_operating_point(operating_point)
    _check_positive_used(positive, point, "--operating-point RULE")
    if calibrate is not None and calibrate not in CALIBRATION_METHODS:
        raise CausalignError(f"--calibrate {calibrate}: unknown method; choose from "
                             f"{', '.join(CALIBRATION_METHODS)}")
    if temperature is not None:  # before the run is read, worded as `predict --temperature`
        try:
            check_temperature(temperature)
        except CausalignError as e:
            raise CausalignError(f"--temperature: {e}") from None
        if calibrate is not None:  # one T: fitted on val or given, never both
            raise CausalignError(f"--temperature {temperature:g} and --calibrate {calibrate} "
                                 f"both set the temperature: give one (--calibrate fits T on "
                                 f"val, --temperature applies the T given)")
    if out is not None:  # fail before the evaluation, not after it
        _check_output_file("--out", out, "the metrics JSON")
    if predictions is not None:
        _check_output_file("--predictions", predictions, "the predictions CSV")
        # one file for both: the JSON was written over the CSV, exit 0, predictions lost
        if out is not None and _same_file(out, predictions):
            raise CausalignError(f"--out {out} and --predictions {predictions} name the same "
                                 f"file; give the metrics JSON and the predictions CSV "
                                 f"different paths")
    if reliability is not None:
        _check_figure_file("--reliability", reliability)
    if roc is not None:
        _check_figure_file("--roc", roc)
    _refuse_one_file(out=out, predictions=predictions, reliability=reliability, roc=roc)
    _refuse_run_record(run, out=out, predictions=predictions, reliability=reliability,
                       roc=roc)
    cfg, model, method, data_path = load_run(run, device=device, data=data)
    ds = _split_for_model(data_path, split, run=run)
    _warn_unannotated_input(method, ds)
    if saliency in VOLUME_UNSUPPORTED and len(ds.image_shape) == 4:
        # asked for by name: refused as `explain` does (it exited 0 with WBP's numbers and a
        # note inside the JSON); the run's own eval_saliency still falls back to WBP
        raise CausalignError(f"--saliency {saliency} needs 2D images; this dataset holds "
                             f"volumes (use wbp, gradient or lrp-epsilon)")
    dev = next(model.parameters()).device
    saliency = saliency or cfg.eval_saliency
    options = _run_explainer_kwargs(run, method, data_path, dev, [saliency])
    # another site's val split chooses the threshold and T, and its test split is drawn:
    # "val" and "RUN (test)" alone read as the run's own (site A's) split
    other = _other_dataset(run, data)
    where = {} if other is None else {"chosen_on_data": str(other)}
    # the figures' label: the run folder's name (its full path made a long legend entry)
    from .report.figures import short_path_labels

    run_name = short_path_labels([run])[0]
    figure_title = (f"{run_name} ({split})" if other is None
                    else f"{run_name} ({split} of {data})")
    positive_index = None
    if point is not None:  # a three-class run without --positive is refused before any pass
        positive_index = _positive_index(positive, ds.meta.classes, f"--operating-point {point}")
        if (calibrate is not None or temperature is not None) and len(ds.meta.classes) > 2:
            from .metrics.calibration import refuse_calibrated_threshold

            scaling = ("--calibrate temperature" if calibrate is not None
                       else f"--temperature {temperature:g}")
            refuse_calibrated_threshold(f"--operating-point {point} with {scaling}",
                                        len(ds.meta.classes), "run them separately")
    with _progress(progress) as bar:
        threshold, chosen, chosen_by = None, {"chosen_on": None}, None
        val_predictions = None  # the val split's (probs, labels), predicted once for both

        def on_val(option: str) -> tuple:  # option: what is chosen on val, for errors
            nonlocal val_predictions
            if val_predictions is None:
                try:
                    val = ds if split == "val" else _split_for_model(data_path, "val")
                except CausalignError as e:
                    raise CausalignError(f"{option} the val split: {e}") from None
                val_predictions = predict_split(model, method, val, dev, progress=bar)[:2]
            return val_predictions

        if point is not None and not point.chooses:
            threshold = point.target
        elif point is not None:
            # on validation, never on the split reported: a threshold tuned on the test
            # split gives an optimistic sensitivity/specificity pair
            p_val, y_val = on_val(f"--operating-point {point} chooses its threshold on")
            try:  # on the positive class against the rest (class 1 of two classes)
                threshold = choose_threshold(point, *one_vs_rest(p_val, y_val,
                                                                 positive_index))
            except CausalignError as e:
                raise CausalignError(f"--operating-point {point} on split 'val' of "
                                     f"{data_path}: {e}") from None
            chosen = {"chosen_on": "val", "n_chosen_on": int(len(y_val))}
            if split != "val":  # chosen on the split reported: no independent val to resample
                chosen_by = (point, p_val, y_val)
        if calibrate is not None:  # else `temperature` is the one given, or None
            # on validation too: T fitted on the split reported flatters its ECE
            p_val, y_val = on_val(f"--calibrate {calibrate} fits its temperature on")
            try:
                temperature = fit_temperature(p_val, y_val)
            except CausalignError as e:
                raise CausalignError(f"--calibrate {calibrate} on split 'val' of "
                                     f"{data_path}: {e}") from None
        metrics = evaluate_split(model, method, ds, dev, saliency=saliency,
                                 fractions=tuple(cfg.deletion_fractions), progress=bar,
                                 deletion_fill=cfg.deletion_fill,
                                 explainer_kwargs=options.get(saliency),
                                 predictions=predictions, bootstrap=bootstrap,
                                 bootstrap_seed=bootstrap_seed, reliability=reliability,
                                 reliability_title=figure_title, ece_bins=n_bins,
                                 threshold=threshold, roc=roc, temperature=temperature,
                                 chosen_by=chosen_by, positive=positive_index,
                                 temperature_source=None if temperature is None else
                                 "fitted on val" if calibrate is not None else "given")
    if calibrate is not None:
        fitted = metrics.pop("calibration")
        metrics["calibration"] = {"method": calibrate, "temperature": fitted.pop("temperature"),
                                  "chosen_on": "val", "n_chosen_on": int(len(y_val)),
                                  **where, **fitted}
        if split == "val":
            metrics["calibration"]["note"] = ("fitted on the split it reports: its "
                                              "calibration is optimistic")
    elif temperature is not None:  # given: nothing was fitted, so no chosen_on
        fitted = metrics.pop("calibration")
        metrics["calibration"] = {"method": "temperature",
                                  "temperature": fitted.pop("temperature"),
                                  "temperature_given": True, **fitted}
    if point is not None:
        # the rule and where it was chosen before the rates, as a reader asks
        metrics["operating_point"] = {"rule": str(point),
                                      "positive": ds.meta.classes[positive_index], **chosen,
                                      **(where if point.chooses else {}),
                                      **metrics["operating_point"]}
        # the threshold is chosen and applied on the model's own probabilities, never the
        # temperature-scaled ones (as `predict --threshold` applies it, --temperature or
        # not): said here, with where it lies on the calibrated p₁ for a reader of those
        metrics["operating_point"]["probabilities"] = "uncalibrated"
        if temperature is not None:
            metrics["operating_point"]["threshold_calibrated"] = calibrated_threshold(
                threshold, temperature)
        if split == "val" and point.chooses:
            metrics["operating_point"]["note"] = ("chosen on the split it reports: its "
                                                  "rates are optimistic")
    metrics = {"run": str(run), "data": str(data_path), "split": split, **metrics,
               **_search_record(options)}
    if out is not None:
        atomic_write_json(out, metrics)
    _echo_json(metrics)


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="run folder")],
    inputs: Annotated[list[Path], typer.Argument(
        help="a causalign dataset folder (alone; its --split), or image files / folders of "
             "them (PNG, JPEG, BMP, TIFF, NPY, DICOM .dcm; mask files skipped), preprocessed "
             "as the run's importer stores them at the run's image size; for a run on BraTS "
             "volumes, raw subject folders (NIfTI)", metavar="INPUT...")],
    out: Annotated[Path, typer.Option(
        parser=_file_option("--out", "predictions.csv"), metavar="<path>",
        help="predictions CSV (id, source, site, label, predicted, p_<class>, "
             "predicted_class, data_warning)")],
    split: Annotated[str | None, typer.Option(
        help="train | val | test of a dataset folder input (default test); not for plain "
             "files")] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    saliency: Annotated[str | None, typer.Option(
        help=f"also each image's saliency map ({SALIENCY_HELP}), into --maps")] = None,
    maps: Annotated[Path | None, typer.Option(
        help="folder for the maps (as `explain --out`: maps/<id>.npy, overlays/<id>.png, "
             "grid.png, summary.json with each map's explained class and the provenance); "
             "with --threshold, maps of called_class")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="also call each image at this probability of the --positive class (class 1 of "
             "two classes; below it, the likeliest other class) (column called_class; e.g. "
             "the threshold `evaluate --operating-point` chose); predicted stays the argmax; "
             "always on the model's own, uncalibrated probability, also with --temperature)"
    )] = None,
    positive: Positive = None,
    temperature: Annotated[float | None, typer.Option(
        help="calibrated probabilities softmax(logits / T), T > 0: the temperature `evaluate "
             "--calibrate temperature` fitted on val (column temperature)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Class probabilities of a run's model on new, unlabelled images (one CSV row each)."""
    import numpy as np

    from .engine.inference import predict_images

    if batch_size < 1:
        raise CausalignError(f"--batch-size {batch_size}: must be 1 or more")
    if threshold is not None:
        from .metrics.operating_point import check_probability

        try:
            check_probability(threshold)
        except CausalignError as e:
            raise CausalignError(f"--threshold: {e}") from None
    if temperature is not None:  # before any image is read
        from .metrics.calibration import check_temperature

        try:
            check_temperature(temperature)
        except CausalignError as e:
            raise CausalignError(f"--temperature: {e}") from None
    _check_output_file("--out", out, "the predictions CSV")
    _refuse_run_record(run, out=out)
    with _progress(progress) as bar:
        result = predict_images(run, inputs, split=split, batch_size=batch_size,
                                device=device, progress=bar, saliency=saliency, maps=maps,
                                threshold=threshold, temperature=temperature,
                                positive=positive)
    for message in result.warnings.values():  # one line per check, not one per image
        warnings.warn(message, stacklevel=1)
    result.write_csv(out)
    # files of the folders given that were not read (masks, broken links, other files)
    left = "; skipped " + ", ".join(f"{n} {why}" for why, n in result.skipped.items()) \
        if result.skipped else ""
    def tally(classes) -> str:
        counts = np.bincount(classes, minlength=len(result.classes))
        return ", ".join(f"{c}: {int(n)}" for c, n in zip(result.classes, counts,
                                                           strict=False))

    called = "" if threshold is None else f"; at {threshold:g}: {tally(result.called)}"
    scaled = "" if temperature is None else f"; probabilities at T={temperature:g}"
    typer.echo(f"{len(result.ids)} images -> {out} ({tally(result.predicted)}{called}"
               f"{scaled}){left}")


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="run folder")],
    saliency: Annotated[str, typer.Option(help=f"{SALIENCY_HELP} | all (every method, "
                                               f"side by side)")
                        ] = "gradcam",
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("explanations"),
    limit: Annotated[int | None, typer.Option(help="N samples (N past the split's size: all)")
                     ] = 32,
    pick: Annotated[str, typer.Option(help="which N: first (manifest order) | balanced (the "
                                           "classes in turn)")] = "first",
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Saliency maps (.npy) and overlay PNGs for a run's predictions.

    `--saliency all` writes each method into DIR/<name>/ and all maps into DIR/all_saliency.png."""
    from .engine.evaluate import VOLUME_UNSUPPORTED
    from .engine.provenance import output_provenance
    from .engine.trainer import load_run
    from .explain import get_explainer
    from .explain.export import export_saliency
    from .io import folder_lock

    _check_pick(pick)
    cfg, model, method, data_path = load_run(run, device=device, data=data)
    if saliency != "all":
        get_explainer(saliency, model)  # unknown names fail before any work
    if limit is not None and limit < 1:
        raise CausalignError(f"--limit must be >= 1, got {limit}")
    # only the samples explained are read: --limit 32 (the default) read and validated a
    # whole 20000-image split first (minutes)
    ds = _split_for_model(data_path, split, limit, run=run, pick=pick)
    _warn_unannotated_input(method, ds)
    volumes = len(ds.image_shape) == 4
    if volumes and saliency in VOLUME_UNSUPPORTED:
        raise CausalignError(f"--saliency {saliency} needs 2D images; this dataset holds "
                             f"volumes (use wbp, gradient or lrp-…)")
    dev = next(model.parameters()).device
    if saliency == "all":
        from .report.saliency import saliency_comparison, saliency_names

        names = saliency_names(volumes)
        if "gradcam" in names and len(ds):
            import torch

            from .explain.gradcam import GradCAM

            first = {k: v.to(dev) for k, v in ds.batch(torch.arange(1)).items()}
            if GradCAM(model).constant_map(method.model_input(first)):
                # a 1x1 Grad-CAM layer (resnet18 under 33 px) refuses; the others still run
                names.remove("gradcam")
                typer.echo("note: gradcam left out: its layer is 1x1 at this image size "
                           "(a constant map)", err=True)
        options = _run_explainer_kwargs(run, method, data_path, dev, names)
        record = {"pick": pick, "provenance": output_provenance(run, model, data_path, ds, dev)}
        with folder_lock(out, f"causalign explain --out {out}"), _progress(progress) as bar:
            for name in names:
                export_saliency(model, method, ds, name, out / name, limit=limit, device=dev,
                                progress=bar, explainer_kwargs=options.get(name),
                                record=record)
            import numpy as np

            # the figure's cases are the first of those just exported: their saved maps,
            # not a second computation of every method's
            shown = min(6, limit or 6, len(ds))
            saved = {name: np.stack([np.load(out / name / "maps" / f"{ds.records[i].id}.npy")
                                     for i in range(shown)]) for name in names}
            saliency_comparison(model, method, ds, out / "all_saliency.png", names=names,
                                limit=shown, device=dev, explainer_kwargs=options,
                                maps=saved)
        typer.echo(f"wrote maps of {len(names)} methods to {out}/<method>/ and "
                   f"{out / 'all_saliency.png'}")
        return
    options = _run_explainer_kwargs(run, method, data_path, dev, [saliency])
    with _progress(progress) as bar:
        summary = export_saliency(model, method, ds, saliency, out, limit=limit,
                                  device=dev, progress=bar,
                                  explainer_kwargs=options.get(saliency),
                                  record={"pick": pick, "provenance": output_provenance(
                                      run, model, data_path, ds, dev)})
    typer.echo(f"wrote {summary['n']} maps and overlays to {out}")


def _run_explainer_kwargs(run: Path, method: Any, data_path: Path, device: Any,
                         names: list[str]) -> dict[str, dict[str, Any]]:
    """{"counterfactual": its search settings} when ``names`` include the counterfactual
    map: the run's search (`explainer_options_for_run`), as `causalign counterfactual RUN`
    uses; it took the generic defaults, whatever α or distance the run was trained with."""
    if "counterfactual" not in names:
        return {}
    from .explain.counterfactual_export import explainer_options_for_run

    return {"counterfactual": explainer_options_for_run(run, method, data_path, device)}


def _search_record(options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The counterfactual map's search settings for metrics.json (tensors left out)."""
    search = options.get("counterfactual")
    if search is None:
        return {}
    return {"counterfactual_search": {k: v for k, v in search.items()
                                      if isinstance(v, (int, float, str))}}


@app.command()
def counterfactual(
    run: Annotated[Path, typer.Argument(help="run folder")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("counterfactuals"),
    limit: Annotated[int | None, typer.Option(help="N samples (N past the split's size: all)")
                     ] = 32,
    pick: Annotated[str, typer.Option(help="which N: first (manifest order) | balanced (the "
                                           "classes in turn)")] = "first",
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    alpha: Annotated[float | None, typer.Option(
        help="weight α of the distance (default 0.01, or the run's)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimiser steps (default 100)")] = None,
    lr: Annotated[float | None, typer.Option(help="step size (default 0.01)")] = None,
    optimizer: Annotated[str | None, typer.Option(
        help="adam | ista (proximal gradient: sparse x* for the l1 distances) | newton "
             "(Gauss-Newton + line search: few steps, --lr unused) (default adam, or the "
             "run's)")] = None,
    distance: Annotated[str | None, typer.Option(
        help="l1 | scaled-l1 | l2 | scaled-l2 (default l1, or the run's)")] = None,
    space: Annotated[str | None, typer.Option(
        help="pixel | latent | smooth (x0 + Gaussian blur of a perturbation) (default pixel, "
             "or the run's)")] = None,
    smooth_sigma: Annotated[float | None, typer.Option(
        help="smooth space: blur σ in pixels (default 1, or the run's)")] = None,
    autoencoder: Annotated[Path | None, typer.Option(
        help="latent space: autoencoder file; when missing, a space=latent run's own (from "
             "its checkpoint) or one trained on the run's training split is saved here")
                           ] = None,
    eps: Annotated[float | None, typer.Option(
        help="smoothing ε of the l1 distance √(δ²+ε²)−ε (default 0.01, or the run's); changes "
             "below ε cost like l2, so a smaller ε (1e-4) with --optimizer newton gives "
             "sparser x*")] = None,
    bounds: Annotated[str, typer.Option(
        help="keep x* within an intensity range: 'data' (the images' range: [0, 1] for "
             "8/16-bit PNGs and synthetic data, else the observed min..max), 'LO,HI', or "
             "'none' (unbounded, as causal-align trains)")] = "data",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Counterfactual x* flipping each prediction: triptych PNGs, x* and summary.json.

    Each triptych is original | x* | signed change (red = increase, blue = decrease).

    A causal-align run lends its α, distance, ε, space, smooth σ, target rule and inner
    optimizer (with its Gauss-Newton polish steps), not its steps or step size; a hier-align
    run those of its image level (α₁)."""
    from .data.format import LesionDataset
    from .engine.provenance import output_provenance
    from .engine.trainer import load_run, same_dataset
    from .explain.counterfactual import DISTANCES, OPTIMIZERS, SPACES
    from .explain.counterfactual_export import (
        check_counterfactual_folder,
        export_counterfactuals,
        recorded_training_range,
        resolve_autoencoder,
        run_training_data,
        settings_for_run,
        splits_range,
    )
    from .io import folder_lock

    _check_pick(pick)
    fixed_bounds = _parse_bounds(bounds)  # before loading anything: a typo fails at once
    if limit is not None and limit < 1:
        raise CausalignError(f"--limit must be >= 1, got {limit}")
    if steps is not None and steps < 1:
        raise CausalignError(f"--steps must be >= 1, got {steps}")
    if distance is not None and distance not in DISTANCES:
        raise CausalignError(f"unknown distance '{distance}'; valid: {', '.join(DISTANCES)}"
                             + did_you_mean(distance, DISTANCES))
    if space is not None and space not in SPACES:
        raise CausalignError(f"unknown space '{space}'; valid: {', '.join(SPACES)}"
                             + did_you_mean(space, SPACES))
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise CausalignError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}"
                             + did_you_mean(optimizer, OPTIMIZERS))
    if smooth_sigma is not None and not smooth_sigma > 0:
        raise CausalignError(f"--smooth-sigma must be > 0, got {smooth_sigma}")
    if eps is not None and not eps > 0:
        raise CausalignError(f"--eps must be > 0, got {eps}")
    # inf passed the generator's ">= 0" / "> 0" checks and ended as "lr": Infinity in
    # summary.json (not valid JSON), every counterfactual diverged
    for name, value in (("--alpha", alpha), ("--lr", lr), ("--smooth-sigma", smooth_sigma),
                        ("--eps", eps)):
        if value is not None and math.isinf(value):
            raise CausalignError(f"{name} must be finite, got {value}")
    cfg, model, method, data_path = load_run(run, device=device, data=data)
    settings = settings_for_run(method, alpha=alpha, steps=steps, lr=lr, distance=distance,
                                space=space, optimizer=optimizer, smooth_sigma=smooth_sigma,
                                eps=eps)
    if autoencoder is not None and settings.space != "latent":  # it was silently unused
        raise CausalignError(f"--autoencoder is used only with --space latent; this search "
                             f"is in {settings.space} space")
    if smooth_sigma is not None and settings.space != "smooth":  # as silently unused
        raise CausalignError(f"--smooth-sigma is used only with --space smooth; this search "
                             f"is in {settings.space} space")
    # as silently unused: eps smooths only the l1, and Gauss-Newton takes no step size
    if eps is not None and settings.distance not in ("l1", "scaled-l1"):
        raise CausalignError(f"--eps is used only with an l1 distance (it smooths the l1); "
                             f"this search uses {settings.distance}")
    if lr is not None and settings.optimizer == "newton":
        raise CausalignError("--lr is used only with --optimizer adam or ista; newton takes "
                             "no step size (its line search sets each step)")
    if settings.space == "latent" and settings.distance.startswith("scaled"):
        raise CausalignError(f"distance '{settings.distance}' is per pixel; --space latent "
                             f"takes l1 or l2")
    ds = _split_for_model(data_path, split, run=run)
    if settings.space == "latent" and len(ds.image_shape) == 4:
        raise CausalignError(f"--space latent takes 2D images (its autoencoder is 2D); "
                             f"{data_path} holds volumes {tuple(ds.image_shape)}: use "
                             f"--space pixel or smooth")
    dev = next(model.parameters()).device
    # The training split as one float32 tensor only where it is needed (per-pixel scales, the
    # autoencoder): every call built it (4x the uint8 cache; twice for --split train), and
    # loaded the training split even for explicit --bounds and an l1 search of 4 images
    need_train = settings.distance.startswith("scaled") or settings.space == "latent"
    reference = run_training_data(run, data_path) if need_train else data_path
    recorded = None  # the training split's range, when the run recorded it
    if split == "train" and same_dataset(reference, data_path):
        train_ds = ds
    elif need_train:
        # the run's own training split, as `explain --saliency counterfactual` takes it:
        # with --data OTHER the other site's gave another per-pixel scale (change inside the
        # annotation 0.600 -> 0.598 for the same 16 images), and a test-only site was refused
        train_ds = LesionDataset(reference, "train")
    elif fixed_bounds is None:
        # only for the bounds: another site's test-only dataset (--data) has no training
        # split, and an l1 search of its images was refused as "split 'train' is empty";
        # the range the run recorded of its own training split spares reading it
        from .engine.trainer import _optional_split

        recorded = recorded_training_range(run, data_path)
        train_ds = None if recorded is not None else _optional_split(data_path, "train")
    else:
        train_ds = None
    # per-pixel scales and the autoencoder read the split's cache chunk by chunk (its
    # `.images` is a whole float32 copy)
    train_images = train_ds if need_train else None
    # the range the summary's out-of-range count is taken against, and x*'s bounds (read
    # batch by batch)
    # from --data's own splits whatever the distance: a scaled search's training split is
    # the run's (`reference`), and with --data OTHER it gave the bounds too, so the same
    # float images were bounded to [44.7, 1000] under scaled-l1 and [44.7, 600] under l1
    bounds_train = train_ds
    if fixed_bounds is None and need_train and not same_dataset(reference, data_path):
        from .engine.trainer import _optional_split

        bounds_train = ds if split == "train" else _optional_split(data_path, "train")
    valid_range = fixed_bounds or splits_range(*((ds,) if bounds_train is None
                                                 or bounds_train is ds
                                                 else (bounds_train, ds)),
                                               also=recorded)
    settings.bounds = None if bounds.strip().lower() == "none" else valid_range
    if pick == "balanced" and limit is not None:  # after the range, which the whole split sets
        from .data.format import balanced_pick

        ds = ds.restricted(sorted(balanced_pick(ds.labels, limit)))
    # held from the autoencoder on: it is saved into OUT too (`folder_lock`)
    with folder_lock(out, f"causalign counterfactual --out {out}"), _progress(progress) as bar:
        ae = None
        if settings.space == "latent":
            # its autoencoder can take minutes to train: a folder the export refuses is
            # refused first
            check_counterfactual_folder(out, ds, limit)
            ae, settings.autoencoder = resolve_autoencoder(run, train_images, dev,
                                                           autoencoder, out, bar)
        summary = export_counterfactuals(model, method, ds, settings, out, limit=limit,
                                         device=dev, train_images=train_images,
                                         autoencoder=ae, progress=bar,
                                         valid_range=valid_range,
                                         provenance=output_provenance(run, model,
                                                                      data_path, ds, dev))
    lo, hi = summary["valid_range"]
    if summary["n_diverged"]:  # exit 0 with "flip rate 0.000" hid that nothing was searched
        typer.echo(f"warning: {summary['n_diverged']} of {summary['n_generated']} "
                   f"counterfactual searches diverged (x* not finite; the original is kept "
                   f"as their x*): lower --lr or keep --bounds", err=True)
    low = _low_flip_warning(summary, settings, getattr(ae, "train_mse", None),
                            train_images)
    if low:
        typer.echo(low, err=True)
    typer.echo(f"wrote {summary['n_generated']} counterfactuals to {out}: flip rate "
               f"{_f(summary['flip_rate'])}, change inside the annotation "
               f"{_f(summary['change_in_mask'])}, x* values outside [{lo:g}, {hi:g}]: "
               f"{summary['n_out_of_range']}")
    by = summary.get("by_transition") or {}
    if len(by) > 1:  # one overall rate hides a prediction→target pair the search cannot reach
        from .report.figures import class_name

        def pair(key: str) -> str:
            # the summary's keys are class indices; the line names them as the figures do
            # (BUSI's "normal→benign", not "0→1"), the index where no name is known
            return "→".join(class_name(ds, int(k)) if k.isdigit() else k
                            for k in key.split("→"))

        typer.echo("flip rate by prediction→target: " + ", ".join(
            f"{pair(k)} {_f(v['flip_rate'])} (n {v['n']})"
            for k, v in sorted(by.items(), key=lambda kv: kv[1]["flip_rate"])[:8]))
    rates = summary.get("attribute_change_rate")
    if rates:  # hierarchical run: which predicted attributes the counterfactuals changed
        typer.echo("attributes changed (share of counterfactuals, â → a*): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])))


LOW_FLIP_RATE = 0.5  # below it `counterfactual` says why x* may not flip and what to try


def _low_flip_warning(summary: dict, settings: Any, ae_mse: float | None,
                      train_images: Any) -> str | None:
    """One warning line when fewer than half the searched counterfactuals flipped the
    prediction (None otherwise). "flip rate 0.000" alone read like a result: measured, a
    2-epoch hier-align model (logit gap 0.1, |∂CE/∂x| < α everywhere) and a latent search
    through an autoencoder that reconstructs worse than the mean image flipped none, which
    a smaller α or a better autoencoder changes; the line names the flip rate, the mean
    target probability and those remedies."""
    n, rate = summary.get("n_generated") or 0, summary.get("flip_rate")
    n_ok = n - (summary.get("n_diverged") or 0)
    if rate is None or n_ok <= 0 or rate >= LOW_FLIP_RATE:
        return None  # nothing searched, or every search diverged (warned above)
    flipped = round(rate * n)
    # newton only where it is not what just ran (it was suggested after a newton search)
    newton = getattr(settings, "optimizer", "") == "newton"
    hint = (f"try a smaller --alpha (now {settings.alpha:g})"
            + (f" or more --steps (now {settings.steps})" if newton else
               f", more --steps (now {settings.steps}) or --optimizer newton"))
    # unflipped searches that returned x itself (distance exactly 0) with a step past the
    # images' whole intensity range: every step overshoots, so none beat the start
    # (--optimizer ista --lr 1e20). The line blamed α and --steps, never the step size
    stuck = sum(1 for r in summary.get("samples") or []
                if not r.get("flipped") and not r.get("diverged") and r.get("distance") == 0)
    lo, hi = summary.get("valid_range") or (0.0, 1.0)
    if stuck and 2 * stuck >= n_ok - flipped and getattr(settings, "optimizer", "") != "newton" \
            and settings.lr > hi - lo:
        return (f"warning: only {flipped} of {n} counterfactuals flipped the prediction and "
                f"{stuck} search(es) never left x: --lr {settings.lr:g} steps past the images' "
                f"whole intensity range ({hi - lo:g}), so every step overshot and none improved "
                f"on the start; try a smaller --lr (default 0.01)")
    from .methods.causal_align import INTENSITY_SPAN_WARN

    if settings.space != "latent" and hi - lo > INTENSITY_SPAN_WARN:
        # HU / 0..255 data: --lr and --alpha are in units of a [0, 1] image, so x* hardly
        # moves (a 10-step search moved 0.004 HU), and the line blamed only α and --steps
        hint += (f"; the images span {lo:g}..{hi:g}, but --lr ({settings.lr:g}) and --alpha "
                 f"are in units of [0, 1] images: rescale the images to [0, 1], or scale "
                 f"--lr up and --alpha down with the range")
    if settings.space == "latent" and ae_mse is not None and train_images is not None:
        from .explain.counterfactual_export import mean_pixel_variance

        var = mean_pixel_variance(train_images)  # the mean image's MSE
        if ae_mse > 0.5 * var:
            hint += (f"; the autoencoder reconstructs the training images poorly (MSE "
                     f"{ae_mse:.3g} against {var:.3g} for their mean image): give a better "
                     f"one with --autoencoder, or use --space pixel or smooth")
    return (f"warning: only {flipped} of {n} counterfactuals flipped the prediction (mean "
            f"target probability {summary['mean_target_prob']:.3f}): the model's output moves "
            f"too little for the cost α·d (a nearly constant model may not flip at all); "
            f"{hint}")


def _parse_bounds(text: str) -> tuple[float, float] | None:
    """`counterfactual --bounds`: 'data' / 'none' → None (decided from the data), 'LO,HI' →
    the pair; anything else one clear line."""
    word = text.strip().lower()
    if word in ("data", "none"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CausalignError(f"--bounds must be 'data', 'none' or 'LO,HI' with finite "
                             f"LO < HI, got '{text}'")
    return lo, hi


@app.command("export")
def export_model(
    run: Annotated[Path, typer.Argument(help="run folder")],
    out: Annotated[Path | None, typer.Option(
        parser=_file_option("--out", "model.pt2"), metavar="<path>",
        help="the program file (default RUN/model.pt2)")] = None,
    data: Annotated[Path | None, typer.Option(
        help="dataset, when the run's has moved (only its class names are read)")] = None,
) -> None:
    """Export the run's best model as a torch.export program (.pt2) for deployment: logits
    of float32 images, any batch size; the run's config and classes saved inside."""
    from .engine.export import export_run

    out = run / "model.pt2" if out is None else out
    _check_output_file("--out", out, "the exported program")
    _refuse_run_record(run, out=out)
    _echo_json(export_run(run, out, data=data))


# ---------------------------------------------------------------------------- causal


@causal_app.command("ccce")
def causal_ccce(
    data: Annotated[Path, typer.Argument(
        help="dataset folder (with attributes), or a run folder: its dataset, and for a "
             "hier-align run the CCCE settings it trained with")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "train",
    model: Annotated[str | None, typer.Option(
        help="P(Y|A): logistic | frequency (default logistic, or the run's)")] = None,
    max_size: Annotated[int | None, typer.Option(
        help="largest attribute subset (default 3, or the run's)")] = None,
    tol: Annotated[float | None, typer.Option(
        help="smallest subset within tol of the best (default 0.01, or the run's)")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", parser=_file_option("--json", "ccce.json"), metavar="<path>",
        help="also write JSON here")] = None,
) -> None:
    """CCCE causal attribution (seed 000 §4.3): how often each attribute is causal.

    On the synthetic benchmark it also reports how often the chosen subsets are truly causal."""
    from .causal.ccce import dataset_attribution_report, format_attribution_report
    from .io import atomic_write_json

    data, run_params = _ccce_source(data)
    model = model if model is not None else str(run_params.get("ccce_model", "logistic"))
    max_size = max_size if max_size is not None else int(run_params.get("ccce_max_size", 3))
    tol = tol if tol is not None else float(run_params.get("ccce_tol", 0.01))
    if not (math.isfinite(tol) and tol >= 0):  # a negative tol admits no subset at all
        raise CausalignError(f"--tol must be a finite number >= 0, got {tol}")
    if json_out is not None:  # fail before the attribution, not after it
        _check_output_file("--json", json_out, "the JSON report")
    rep = dataset_attribution_report(data, split, kind=model, max_size=max_size, tol=tol)
    if json_out is not None:
        atomic_write_json(json_out, rep)
    typer.echo(format_attribution_report(rep))


def _ccce_source(path: Path) -> tuple[Path, dict]:
    """(dataset folder, the run's method settings) for `causal ccce`'s argument. A run folder
    (config.yaml, no dataset.yaml) gave "RUN/dataset.yaml: missing (RUN is not a causalign
    dataset)": the dataset it trained on is used, and a hier-align run's ccce_* settings, so
    the table is the attribution r that run aligned to."""
    from .engine.trainer import read_run_config

    if (path / "dataset.yaml").exists() or not (path / "config.yaml").is_file():
        return path, {}
    raw = read_run_config(path)
    stored = raw.get("data")
    if not (isinstance(stored, str) and stored):
        raise CausalignError(f"{path / 'config.yaml'}: names no dataset (pass the dataset "
                             f"folder instead of the run)")
    if not Path(stored).is_dir():
        raise CausalignError(f"{stored}: the run's dataset folder does not exist (moved? pass "
                             f"the dataset folder instead of the run)")
    params = raw.get("method_params") if raw.get("method") == "hier-align" else None
    return Path(stored), params if isinstance(params, dict) else {}


@causal_app.command("pc")
def causal_pc(
    run: Annotated[Path, typer.Argument(help="run folder (a trained model)")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    components: Annotated[int, typer.Option(help="principal components of the features")] = 3,
    alpha: Annotated[float, typer.Option(help="significance level of the CI tests")] = 0.01,
    test: Annotated[str, typer.Option(
        help="conditional-independence test: fisherz (partial correlation, assumes linear "
             "Gaussian relations; fast) | kci (kernel test, no such assumption; seconds to "
             "minutes at a few hundred samples)")] = "fisherz",
    out: Annotated[Path | None, typer.Option(help="output folder (default RUN/pc)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "cpu",
    attributes: Annotated[str | None, typer.Option(
        help="comma-separated attribute names to include (default all)")] = None,
    progress: Annotated[bool, typer.Option(
        help="show causal-learn's progress bar during the search (on a terminal only)")
    ] = True,
) -> None:
    """PC algorithm (causal-learn): checks the learnt skeleton against X → A → Y.

    Runs on pooled image features, attributes and label; draws the graph (seed 000 App. C.5)."""
    from .causal.pc import PC_TESTS, run_pc_check
    from .engine.progress import is_tty

    if components < 1:  # no feature node: the X -> A -> Y check has no X
        raise CausalignError(f"--components must be >= 1, got {components}")
    if not 0 < alpha < 1:  # causal-learn asserts it (an AssertionError traceback)
        raise CausalignError(f"--alpha must lie in (0, 1), got {alpha}")
    from .data.importers.base import parse_list

    if test not in PC_TESTS:  # before the run's features are computed
        raise CausalignError(f"--test {test}: unknown test; choose {' or '.join(PC_TESTS)}")
    rep = run_pc_check(run, split=split, data=data, n_components=components, alpha=alpha,
                       indep_test=test, out=out, device=device,
                       attributes=parse_list(attributes) if attributes is not None else None,
                       # tqdm's redraws would fill a log file with carriage-return lines
                       show_progress=progress and is_tty(sys.stderr))
    typer.echo(f"PC on {rep['n']} samples: {rep['n_edges']} edges "
               f"{rep['edges_by_kind']}; skeleton consistent with X -> A -> Y: "
               f"{rep['skeleton_consistent']}")
    if rep["forbidden_edges"]:
        typer.echo(f"forbidden edges: {', '.join(rep['forbidden_edges'])}")
    if rep.get("constant_attributes"):
        typer.echo(f"left out (constant on the {split} split, so no edge): "
                   f"{', '.join(rep['constant_attributes'])}")
    typer.echo(f"attributes linked to the label: {', '.join(rep['attributes_linked_to_label'])}"
               + (f" (truly causal: {', '.join(rep['truly_causal'])})"
                  if "truly_causal" in rep else ""))
    typer.echo(f"figure: {rep['figure']}")


# ---------------------------------------------------------------------------- bench / demo


@bench_app.command("step")
def bench_step_cmd(
    method: Annotated[str, typer.Option(help=f"method to time against ERM: {METHODS_HELP}")
                      ] = "erm",
    size: Annotated[int, typer.Option(help="image side in px")] = 64,
    depth: Annotated[int, typer.Option(help="slices per volume (1: 2D images; >= 4 for "
                                            "--model multiview)")] = 1,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 64,
    classes: Annotated[int, typer.Option(help="classes (model outputs, label range)")] = 2,
    steps: Annotated[int, typer.Option(help="timed steps (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    model: Annotated[str, typer.Option(help=MODELS_HELP)] = "cnn7",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar=_SET,
                                                  help="method.<name>=value (repeatable)")
                    ] = None,
    profile: Annotated[bool, typer.Option(help="also profile the method's steps: ms per "
                                               "step in the counterfactual search, CG, ...")
                       ] = False,
) -> None:
    """Time one training step of METHOD and of ERM in this process; prints one JSON object."""
    import torch

    from .engine.bench import bench_step
    from .engine.config import _same_setting, parse_set

    if threads < 0:
        raise CausalignError(f"--threads must be >= 0 (0: torch's default), got {threads}")
    args: dict[str, object] = {}
    for key, value in parse_set(set_ or []).items():
        name = key.split(".", 1)[1] if key.startswith("method.") else key
        # `--set steps=3 --set method.steps=4`: one parameter, and the last one won silently
        if name in args and not _same_setting(args[name], value):
            raise CausalignError(f"--set method.{name} given twice ({args[name]!r} and "
                                 f"{value!r}, as '{name}' and 'method.{name}'); give one")
        args[name] = value
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = bench_step(method, size=size, batch_size=batch_size, steps=steps,
                            warmup=warmup, device=device, model=model, method_args=args,
                            profile=profile, depth=depth, classes=classes)
    finally:
        torch.set_num_threads(saved)
    _echo_json(result, indent=None)  # one line, as documented


@app.command()
def benchmark(
    suite: Annotated[str, typer.Argument(help="suite YAML file, or a shipped suite: quick | "
                                              "paper | demo")],
    out: Annotated[Path, typer.Option(help="output folder (runs, results, report)")],
    only: Annotated[str | None, typer.Option(help="comma-separated experiments to run")
                    ] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods (names or "
                                                     "labels) to keep")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds (replace the "
                                                   "suite's)")] = None,
    datasets: Annotated[str | None, typer.Option(help="comma-separated datasets to keep")
                        ] = None,
    settings: Annotated[str | None, typer.Option(help="comma-separated settings (named "
                                                      "override sets) to keep")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar=_SET,
                                                  help="config key=value for every run "
                                                       "(repeatable)")
                    ] = None,
    report: Annotated[bool, typer.Option(help="write OUT/report.html")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Methods × datasets × seeds × settings from SUITE; resumable.

    Finished runs are collected and interrupted ones resume.

    Writes results.csv/json, tables.md and report.html."""
    from .engine.benchmark import load_suite, run_suite, select
    from .engine.config import parse_set

    def split(option: str, v: str | None) -> list[str] | None:
        if v is None:
            return None
        names = [x.strip() for x in v.split(",") if x.strip()]
        if not names:  # `--methods ,` ran the whole suite (an empty list selects all), and
            # `--seeds ,` ran nothing and exited 0
            raise CausalignError(f"{option} names nothing, got '{v}' (give a comma-separated "
                                 f"list)")
        return names

    only_list, method_list = split("--only", only), split("--methods", methods)
    dataset_list, seed_names = split("--datasets", datasets), split("--seeds", seeds)
    setting_list = split("--settings", settings)
    try:
        seed_list = [int(x) for x in seed_names] if seed_names is not None else None
    except ValueError:
        raise CausalignError(f"--seeds expects integers, got '{seeds}'") from None
    if seed_list is not None and any(s < 0 for s in seed_list):
        # else every run fails alike, after overwriting the results of a finished OUT
        raise CausalignError(f"--seeds must be >= 0, got '{seeds}'")
    st = load_suite(suite)
    if any(x is not None for x in (only_list, method_list, seed_list, dataset_list,
                                   setting_list)):
        st = select(st, only_list, method_list, seed_list, dataset_list, setting_list)
    results = run_suite(st, out, extra=parse_set(set_ or []), progress=progress,
                        report=report, log=typer.echo)
    typer.echo((out / "tables.md").read_text(encoding="utf-8"))
    typer.echo(f"results: {out / 'results.csv'}" +
               (f"\nreport: {results['report']}" if results.get("report") else ""))
    _fail_on_failed_runs(results["runs"], out)


def _refuse_one_file(**outputs: Path | None) -> None:
    """Two output options naming one file: the later write replaced the earlier's output,
    exit 0."""
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name_a, a) in enumerate(given):
        for name_b, b in given[i + 1:]:
            if _same_file(a, b):
                raise CausalignError(f"--{name_a.replace('_', '-')} {a} and "
                                     f"--{name_b.replace('_', '-')} {b} name the same file; "
                                     f"give each output its own path")


def _delong_title(result: dict) -> str:
    """The ROC figure's title in `compare`: the AUC difference and DeLong's p."""
    test = result.get("delong") or {}
    if "p_value" not in test:
        return "ROC curves (one-vs-rest per class)"
    return (f"AUC {test['auc_a']:.3f} vs {test['auc_b']:.3f}, DeLong p = "
            f"{test['p_value']:.3g}")


def _check_figure_file(option: str, path: Path) -> None:
    """A figure path matplotlib can write (by suffix), in a folder that can hold it."""
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CausalignError(f"{option} {path}: give a .png, .pdf or .svg file")
    _check_output_file(option, path, "the figure")


def _compared_predictions(source: Path, split: str) -> tuple[Path, Any]:
    """The predictions CSV ``source`` names (a run folder's predictions_<split>.csv, or the
    file itself) and its rows; one line saying how to make it when a run lacks it."""
    from .data.format import SPLITS
    from .engine.evaluate import read_predictions

    if split not in SPLITS:
        raise CausalignError(f"--split {split}: give one of {', '.join(SPLITS)}")
    csv_path = source / f"predictions_{split}.csv" if source.is_dir() else source
    if source.is_dir() and not csv_path.is_file():
        raise CausalignError(f"{source}: no predictions_{split}.csv (training writes val and "
                             f"test); make it with `causalign evaluate {source} --split {split}"
                             f" --predictions FILE.csv` and compare the CSV files")
    if not source.exists():
        raise CausalignError(f"{source}: no such run folder or predictions CSV")
    return csv_path, read_predictions(csv_path)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="run folder (its predictions_<split>.csv) or "
                                               "a predictions CSV (evaluate --predictions)")],
    run_b: Annotated[Path, typer.Argument(help="the other run folder or predictions CSV")],
    split: Annotated[str | None, typer.Option(
        help="train | val | test: the run folders' predictions_<split>.csv (default test; "
             "training writes val and test; a CSV file given is read as it is)")] = None,
    out: Annotated[Path | None, typer.Option(
        parser=_file_option("--out", "compare.json"), metavar="<path>",
        help="also write the JSON here")] = None,
    reliability: Annotated[Path | None, typer.Option(
        parser=_file_option("--reliability", "reliability.png"), metavar="<path>",
        help="also draw both runs' reliability diagrams here (.png, .pdf or .svg)")] = None,
    roc: Annotated[Path | None, typer.Option(
        parser=_file_option("--roc", "roc.png"), metavar="<path>",
        help="also draw both runs' ROC curves on one axes here (.png, .pdf or .svg; "
             "one-vs-rest per class for more than two; each run's argmax point (two "
             "classes) and any --operating-point threshold marked, on the --positive "
             "class's curve against the rest)")] = None,
    n_bins: Annotated[int, typer.Option(
        help="bins of the ECE and the reliability diagrams (15: Guo et al., as "
             "metrics.json)")] = 15,
    operating_point: Annotated[str | None, typer.Option(
        metavar="RULE",
        help="also compare sensitivity and specificity at a threshold on the --positive "
             "class's probability (one-vs-rest; McNemar on the positives, on the negatives), "
             "chosen by RULE on each run folder's own predictions_val.csv: youden, "
             "sensitivity=S, specificity=S; or threshold=T for both, threshold=TA,TB one "
             "per run (CSV inputs too)")] = None,
    positive: Positive = None,
    bootstrap: Annotated[int, typer.Option(
        help="also give paired percentile 95 % intervals of B − A of accuracy, balanced "
             "accuracy, AUC, Brier score and ECE (ci95_difference) and, with "
             "--operating-point, of sensitivity and specificity (thresholds fixed), from N "
             "stratified bootstrap resamples of the compared split, each scoring both runs "
             "(0: none; at least 100, 1000 is usual)")] = 0,
    bootstrap_seed: BootstrapSeed = 0,
) -> None:
    """Paired comparison of two runs on the same samples, from their saved predictions:
    accuracies and AUCs, DeLong's test of the AUC difference (binary; one-vs-rest per class
    for more) and McNemar's test of the accuracy difference; with --operating-point RULE,
    both runs' sensitivity and specificity at a threshold and McNemar's test of each; with
    --bootstrap N, paired 95 % intervals of the differences B − A. Both must hold the same
    sample ids with the same labels and classes."""
    import numpy as np

    from .io import atomic_write_json
    from .metrics import (
        classification_metrics,
        holm_adjust,
        mcnemar_test,
        paired_bootstrap_ci,
    )

    pair = _threshold_pair(operating_point)
    point = _parse_operating_point(operating_point if pair is None else
                                   f"threshold={pair[0]!r}")
    _check_positive_used(positive, point, "--operating-point RULE")
    _check_bootstrap_options(bootstrap, bootstrap_seed)
    if point is not None:
        csv_inputs = [str(r) for r in (run_a, run_b) if r.is_file()]
        if point.chooses and csv_inputs:
            # a CSV carries one split: choosing on it would tune on the split reported
            raise CausalignError(f"--operating-point {point} chooses each run's threshold on "
                                 f"its run folder's predictions_val.csv; {csv_inputs[0]} is a "
                                 f"CSV file: give threshold=T (or two run folders)")

    if split is not None and run_a.is_file() and run_b.is_file():
        # two CSV files are read as they are: `--split val` printed their comparison, exit 0
        raise CausalignError(f"--split {split}: not used, {run_a} and {run_b} are predictions "
                             f"CSV files (read as they are; --split picks a run folder's "
                             f"predictions_<split>.csv)")
    split = "test" if split is None else split
    _check_n_bins(n_bins)
    if out is not None:
        _check_output_file("--out", out, "the comparison JSON")
    if reliability is not None:
        _check_figure_file("--reliability", reliability)
    if roc is not None:
        _check_figure_file("--roc", roc)
    _refuse_one_file(out=out, reliability=reliability, roc=roc)
    for given, path in (("out", out), ("reliability", reliability), ("roc", roc)):
        for source in (run_a, run_b):
            if path is None:
                continue
            if source.is_dir():
                _refuse_run_record(source, **{given: path})
            elif _same_file(path, source):
                raise CausalignError(f"--{given} {path}: is the predictions CSV being "
                                     f"compared; give another path")
    file_a, a = _compared_predictions(run_a, split)
    file_b, b = _compared_predictions(run_b, split)
    if a.probs.shape[1] != b.probs.shape[1]:
        raise CausalignError(f"{file_a} has {a.probs.shape[1]} classes, {file_b} "
                             f"{b.probs.shape[1]}: not the same task")
    if a.classes != b.classes:
        # labels are indices into each file's class order: p_malignant,p_benign was read
        # position by position, B's AUC taken off the other class's column
        raise CausalignError(f"{file_a} has classes {a.classes}, {file_b} {b.classes}: "
                             f"not the same class names in the same order")
    positive_index = None
    if point is not None:  # class 1 of two classes; more need --positive
        # the rule as given: a pair was parsed as its first value, threshold=TA alone
        rule = operating_point if pair is not None else point
        positive_index = _positive_index(positive, a.classes, f"--operating-point {rule}")
    ids_a, ids_b = set(a.ids), set(b.ids)
    only_a = next((i for i in a.ids if i not in ids_b), None)
    only_b = next((i for i in b.ids if i not in ids_a), None)
    if only_a is not None or only_b is not None:
        first, there, missing = ((only_a, file_a, file_b) if only_a is not None
                                 else (only_b, file_b, file_a))
        raise CausalignError(f"the runs' predictions cover different samples: id {first!r} "
                             f"is in {there} but not in {missing} ({len(a.ids)} and "
                             f"{len(b.ids)} rows)")
    # the same samples in another order (another manifest order): B's rows in A's order
    where = {i: k for k, i in enumerate(b.ids)}
    order = np.array([where[i] for i in a.ids])
    probs_b, labels_b = b.probs[order], b.labels[order]
    other_data = _other_datasets(run_a, run_b)
    differ = np.flatnonzero(a.labels != labels_b)
    if len(differ):
        k = int(differ[0])
        raise CausalignError(f"the runs' predictions disagree on the label of {len(differ)} "
                             f"sample(s), first id {a.ids[k]!r}: {a.labels[k]} in {file_a}, "
                             f"{labels_b[k]} in {file_b}"
                             + (f" ({other_data})" if other_data else ""))
    if other_data:
        warnings.warn(f"{other_data}: the same ids may name other images; compare "
                      f"predictions of one dataset (`causalign evaluate RUN --data DATA "
                      f"--predictions FILE.csv` for each run)", stacklevel=1)
    y = a.labels
    metrics_a = classification_metrics(a.probs, y, n_bins)
    metrics_b = classification_metrics(probs_b, y, n_bins)
    result: dict[str, Any] = {
        "a": str(run_a), "b": str(run_b), "predictions_a": str(file_a),
        "predictions_b": str(file_b), "n": len(y), "classes": a.classes,
        "accuracy_a": metrics_a["accuracy"], "accuracy_b": metrics_b["accuracy"],
        # the point of ci95_difference.balanced_accuracy (what an imbalanced set compares)
        "balanced_accuracy_a": metrics_a["balanced_accuracy"],
        "balanced_accuracy_b": metrics_b["balanced_accuracy"],
        "auc_a": metrics_a["auc"], "auc_b": metrics_b["auc"],
        # calibration beside discrimination (its difference's interval: --bootstrap N)
        "brier_a": metrics_a["brier"], "brier_b": metrics_b["brier"],
        "ece_a": metrics_a["ece"], "ece_b": metrics_b["ece"], "ece_bins": n_bins,
    }
    n_classes = a.probs.shape[1]
    if n_classes == 2:
        result["delong"] = _delong_or_reason(a.probs, probs_b, y)
    else:
        # a macro AUC's difference has no DeLong variance: each class one-vs-rest instead
        result["delong"] = None
        per_class = {name: _delong_or_reason(a.probs[:, c], probs_b[:, c], y == c)
                     for c, name in enumerate(a.classes)}
        # one test per class is several looks at one comparison: each class's p read at
        # 0.05 alone rejects some class far more often than 5 % when the runs are equal
        adjusted = holm_adjust([r.get("p_value") for r in per_class.values()])
        for r, p_holm in zip(per_class.values(), adjusted, strict=True):
            if "error" not in r:
                r["p_holm"] = p_holm
        result["delong_one_vs_rest"] = per_class
        result["delong_note"] = ("more than two classes: DeLong per class one-vs-rest; "
                                 "p_holm: Holm-adjusted over the classes (p_value: each "
                                 "test alone)")
    result["mcnemar"] = mcnemar_test(a.predicted, probs_b.argmax(axis=1), y)
    if bootstrap:
        # the one test of the calibration difference (and a second look at the others)
        result.update(paired_bootstrap_ci(a.probs, probs_b, y, bootstrap, bootstrap_seed,
                                          ece_bins=n_bins))
    if point is not None:
        result["operating_point"] = _compare_operating_point(point, run_a, run_b, a.probs,
                                                             probs_b, y, split, pair,
                                                             bootstrap, bootstrap_seed,
                                                             positive_index, a.classes)
        # a `predict --temperature` CSV holds scaled probabilities: the threshold lands on
        # them, not on the model's own p where `evaluate` chose it (its threshold_calibrated)
        for which, source, read in (("a", file_a, a), ("b", file_b, b)):
            if read.temperature is not None:
                result["operating_point"][f"temperature_{which}"] = read.temperature
                warnings.warn(f"{source} holds probabilities scaled by temperature "
                              f"{read.temperature:g} (predict --temperature): --operating-point "
                              f"applies its threshold to them; a threshold `evaluate` chose is "
                              f"on the uncalibrated ones (its threshold_calibrated is on these)",
                              stacklevel=1)
    # figure labels: the paths' shortest distinct tails (erm/seed0, rrr/seed0), full paths
    # repeated per class covered the curves; the JSON's "a" and "b" keep the full paths
    from .report.figures import short_path_labels

    label_a, label_b = short_path_labels([run_a, run_b])
    if reliability is not None:
        from .report.figures import reliability_diagram

        reliability_diagram({label_a: (a.probs, y), label_b: (probs_b, y)}, reliability,
                            n_bins=n_bins)
        result["reliability"] = str(reliability)
    if roc is not None:
        from .report.figures import roc_figure

        # the argmax's point on each curve and, with --operating-point, each run's threshold
        marks: dict[str, list[tuple[str, float]]] = {}
        curves = {label_a: (a.probs, y), label_b: (probs_b, y)}
        title = _delong_title(result)
        if positive_index is not None and (n_classes != 2 or positive_index != 1):
            from .metrics.operating_point import one_vs_rest

            # the curves the thresholds lie on: the positive class's against the rest
            curves = {k: one_vs_rest(p, y, positive_index) for k, (p, _) in curves.items()}
            name = a.classes[positive_index]
            # more than two classes: the drawn curve's own DeLong test, not "per class"
            title = (_delong_title({"delong": result["delong_one_vs_rest"][name]})
                     if n_classes != 2 else title) + f" · {name} vs rest"
        for which, run in (("a", label_a), ("b", label_b)):
            marks[run] = [("p ≥ 0.5 (argmax)", 0.5)] if n_classes == 2 else []
            if "operating_point" in result:
                t = result["operating_point"][f"threshold_{which}"]
                marks[run].append((f"{point} (p ≥ {t:.3g})" if point.chooses
                                   else f"p ≥ {t:.3g} (fixed)", t))
        roc_figure(curves, roc, title=title, points=marks,
                   class_names={k: a.classes for k in curves})
        result["roc"] = str(roc)
    if out is not None:
        atomic_write_json(out, result)
    _echo_json(result)


def _check_bootstrap_options(bootstrap: int, bootstrap_seed: int) -> None:
    """--bootstrap N and --bootstrap-seed S refused in one line (`evaluate`, `compare`)."""
    from .metrics.classification import MIN_BOOTSTRAP

    if bootstrap < 0:
        raise CausalignError(f"--bootstrap {bootstrap}: give a number of resamples (at least "
                             f"{MIN_BOOTSTRAP}; 0 for none)")
    if 0 < bootstrap < MIN_BOOTSTRAP:
        raise CausalignError(f"--bootstrap {bootstrap}: too few resamples for a 95 % "
                             f"interval; give at least {MIN_BOOTSTRAP} (1000 is usual)")
    if bootstrap_seed < 0:
        raise CausalignError(f"--bootstrap-seed {bootstrap_seed}: must be 0 or more")
    if bootstrap_seed and not bootstrap:  # no resample is drawn: the seed was silently unread
        raise CausalignError(f"--bootstrap-seed {bootstrap_seed} is used only with --bootstrap "
                             f"N (the resamples it seeds); add --bootstrap 1000")


def _parse_operating_point(text: str | None) -> Any:
    """--operating-point RULE as an `OperatingPoint` (None when not given), refused in one
    line naming the option (`evaluate`, `compare`)."""
    from .metrics.operating_point import OperatingPoint

    if text is None:
        return None
    try:
        return OperatingPoint.parse(text)
    except CausalignError as e:
        raise CausalignError(f"--operating-point: {e}") from None


def _threshold_pair(text: str | None) -> tuple[float, float] | None:
    """`compare --operating-point threshold=TA,TB`: each run's own fixed threshold (e.g. the
    one `evaluate` chose on its development site's val split, for another site's CSVs), each
    checked as ``threshold=T`` is; None for any other rule."""
    from .metrics.operating_point import OperatingPoint

    if text is None or "," not in text:
        return None
    head, _, values = text.partition("=")
    if head.strip().lower() != "threshold":
        return None  # `_parse_operating_point` names the accepted forms
    parts = values.split(",")
    if len(parts) != 2:
        raise CausalignError(f"--operating-point {text}: give two thresholds, "
                             f"threshold=TA,TB (one per run), or threshold=T for both")
    try:
        a, b = (OperatingPoint.parse(f"threshold={v}").target for v in parts)
    except CausalignError as e:
        raise CausalignError(f"--operating-point: {e}") from None
    return float(a), float(b)


def _check_positive_used(positive: str | None, point: Any, needs: str) -> None:
    """--positive given without what it picks the class of: refused (it was unread)."""
    if positive is not None and point is None:
        raise CausalignError(f"--positive {positive} is used only with {needs} (the class "
                             f"it calls positive); add {needs}")


def _positive_index(positive: str | None, classes: Any, option: str) -> int:
    """--positive CLASS as the class's index (`positive_class`; class 1 of two classes
    by default), refused in one line naming the run's classes."""
    from .metrics.operating_point import positive_class

    try:
        return positive_class(positive, [str(c) for c in classes])
    except CausalignError as e:
        raise CausalignError(f"{option if positive is None else '--positive'}: {e}") from None


def _compare_operating_point(point: Any, run_a: Path, run_b: Path, probs_a: Any,
                             probs_b: Any, labels: Any, split: str,
                             pair: tuple[float, float] | None = None, bootstrap: int = 0,
                             bootstrap_seed: int = 0, positive: int = 1,
                             classes: Any = None) -> dict[str, Any]:
    """`compare --operating-point`: each run's threshold (chosen on its own
    predictions_val.csv, the fixed one, or ``pair``: one fixed threshold per run) and
    `paired_operating_point` at them; with ``bootstrap``, `paired_operating_point_ci`'s
    intervals of the differences. All on class ``positive`` against the rest
    (`one_vs_rest`; two classes, positive 1: as they are)."""
    from .engine.evaluate import read_predictions
    from .metrics import paired_operating_point, paired_operating_point_ci
    from .metrics.operating_point import OperatingPoint, choose_threshold, one_vs_rest

    probs_a, _ = one_vs_rest(probs_a, labels, positive)
    probs_b, labels = one_vs_rest(probs_b, labels, positive)

    thresholds: list[float] = []
    rule = str(point)
    if pair is not None:  # the rule as given, each value in threshold=T's exact form
        short = [str(OperatingPoint("threshold", t)).partition("=")[2] for t in pair]
        rule, thresholds = f"threshold={short[0]},{short[1]}", list(pair)
    for run in (run_a, run_b) if pair is None else ():
        if not point.chooses:
            thresholds.append(float(point.target))
            continue
        val_csv = run / "predictions_val.csv"
        if not val_csv.is_file():
            # an `evaluate --predictions` CSV cannot stand in: the run's own file name is
            # a run record `evaluate` refuses to write, and CSV inputs choose nothing
            raise CausalignError(f"--operating-point {point} chooses each run's threshold on "
                                 f"its predictions_val.csv; {run} has none (training writes "
                                 f"it): give threshold=T (`causalign evaluate {run} "
                                 f"--operating-point {point}` prints the run's own)")
        val = read_predictions(val_csv)
        try:
            thresholds.append(choose_threshold(point, *one_vs_rest(val.probs, val.labels,
                                                                   positive)))
        except CausalignError as e:
            raise CausalignError(f"--operating-point {point} on {val_csv}: {e}") from None
    compared = {"rule": rule, "positive": classes[positive] if classes else str(positive),
                "threshold_a": thresholds[0], "threshold_b": thresholds[1],
                "chosen_on": "val" if point.chooses else None,
                **paired_operating_point(probs_a, probs_b, labels, *thresholds)}
    if bootstrap:
        # one test resample scores both runs; the thresholds stay fixed (not re-chosen)
        compared.update(paired_operating_point_ci(probs_a, probs_b, labels, *thresholds,
                                                  n=bootstrap, seed=bootstrap_seed))
    if point.chooses and split == "val":
        compared["note"] = "chosen on the split it reports: its rates are optimistic"
    return compared


def _check_pick(pick: str) -> None:
    """--pick refused in one line before the run is loaded."""
    from .data.format import PICKS

    if pick not in PICKS:
        raise CausalignError(f"--pick {pick}: give one of {', '.join(PICKS)}"
                             + did_you_mean(pick, PICKS))


def _check_n_bins(n_bins: int) -> None:
    """--n-bins refused in one line before any work (the ECE's own check said "n_bins")."""
    if n_bins < 1:
        raise CausalignError(f"--n-bins {n_bins}: give a number of bins of at least 1 (15 "
                             f"is usual)")


def _other_datasets(run_a: Path, run_b: Path) -> str | None:
    """Why two run folders' predictions CSVs are of different samples though their ids agree
    (`data synth` names every dataset's samples test_00000…): their config.yaml records
    other dataset contents (data_content_digest). None for CSV files or unrecorded digests."""
    from .engine.trainer import read_run_config

    if not (run_a.is_dir() and run_b.is_dir()):
        return None
    digests = [read_run_config(r).get("data_content_digest") for r in (run_a, run_b)]
    if None in digests or digests[0] == digests[1]:
        return None
    return f"{run_a} and {run_b} were trained on different datasets (data_content_digest)"


def _delong_or_reason(probs_a: Any, probs_b: Any, labels: Any) -> dict[str, Any]:
    """DeLong's result, or ``{"error": why}`` where the split cannot give one (fewer than
    two samples of a class): McNemar and the accuracies still stand."""
    from .errors import InputError
    from .metrics import delong_test

    try:
        return delong_test(probs_a, probs_b, labels)
    except InputError as exc:
        return {"error": str(exc)}


def _fail_on_failed_runs(runs: list[dict], out: Path) -> None:
    """Exit non-zero (after every output is written) when a run failed, so scripts notice."""
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        first = failed[0]
        raise CausalignError(f"{len(failed)} of {len(runs)} runs failed, e.g. {first['key']}: "
                             f"{first.get('error')} (tracebacks: {out}/runs/<run>/error.txt)")


@app.command()
def curves(
    runs: Annotated[list[Path], typer.Argument(help="run folders (their history.csv)")],
    out: Annotated[Path | None, typer.Option(
        parser=_file_option("--out", "curves.png"), metavar="<path>",
        help="figure file (default: RUN/curves.png for one run; needed for several)")] = None,
) -> None:
    """Per-epoch training curves of one or more runs side by side: training loss, validation
    AUC, accuracy and each method's guidance terms (causal-align's alignment term, RRR's,
    PPI's…; `Method.guidance_terms`) where a run logged them."""
    from .engine.trainer import _stored_history
    from .report.figures import short_path_labels, training_curves

    if out is None:
        if len(runs) > 1:
            raise CausalignError(f"give --out FILE for the figure of {len(runs)} runs")
        out = runs[0] / "curves.png"
    _check_figure_file("--out", out)
    histories: dict[str, list[dict]] = {}
    seen: set[Path] = set()
    # labels: the runs' paths below their common folder (runs/erm/seed0, runs/rrr/seed0),
    # as `compare`'s figures name theirs
    for run, label in zip(runs, short_path_labels(runs), strict=True):
        if not run.is_dir():
            raise CausalignError(f"{run}: not a run folder")
        rows = _stored_history(run)
        if not rows:
            raise CausalignError(f"{run}: no history.csv rows (not a training run, or no "
                                 f"epoch finished yet)")
        if run.resolve() in seen:
            raise CausalignError(f"{run}: given twice")
        seen.add(run.resolve())
        histories[label] = rows
    training_curves(histories, out)
    typer.echo(f"wrote {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("demo_out"),
    seeds: Annotated[int, typer.Option(help="seeds per method")] = 1,
    methods: Annotated[str | None, typer.Option(help=f"comma-separated methods of "
                                                     f"{METHODS_HELP} (default: the demo "
                                                     f"suite's: {DEMO_METHODS})")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs of every run (default: the "
                                                    "demo suite's)")] = None,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Synthetic plus-minus benchmark → train each method → tables and report.html."""
    from .demo import run_demo

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    report = run_demo(out, methods=names, seeds=seeds, epochs=epochs, progress=progress)
    typer.echo(report)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    _fail_on_failed_runs(results["runs"], out)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors → one line on stderr and exit code 2, no traceback.

    causalign's own UserWarnings (amp/compile fallbacks, sync_bn in one process) print as
    one `warning: …` line like the trainer's, not as Python's two lines of file path and
    source; other packages' warnings keep Python's format, which says where they come from."""
    package = Path(__file__).resolve().parent
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(package):
            print(f"warning: {_one_line(str(message))}", file=file or sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    # typer's Typer.__call__ replaces sys.excepthook for good (with a hook that calls the
    # one it saw at import), so an in-process call (a notebook, a test) lost the caller's
    # own hook; restored on the way out, before a bug's traceback goes up to it.
    excepthook = sys.excepthook
    try:
        with warnings.catch_warnings(), _sigterm_as_interrupt(), \
                _unencodable_output_escaped(), _plain_help_when_narrow():
            warnings.showwarning = show
            return _main(argv)
    finally:
        sys.excepthook = excepthook


# Narrower than this, --help is click's plain layout instead of typer's rich tables. The tables
# keep six columns (required mark, option, short, --no- form, type, help) at any width and cut
# what does not fit with "…": at 60 columns `--smooth-sigma` showed as `--smooth-sig…`, the
# `--no-` forms as `--no-progr…`, and the choice lists as `input-x-grad…` / `counterfactu…`;
# at 40 `--saliency` as `--sali…`. Click's layout wraps instead and never cuts a name.
RICH_HELP_MIN_WIDTH = 80


def _help_width() -> int:
    """The width the help is laid out for: TERMINAL_WIDTH (typer's own setting), COLUMNS,
    else stdout's terminal; 80 off a terminal (what rich assumes there too)."""
    import shutil

    value = os.environ.get("TERMINAL_WIDTH", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return shutil.get_terminal_size((80, 24)).columns


@contextmanager
def _plain_help_when_narrow() -> Iterator[None]:
    """Typer reads the root app's markup mode when it builds the commands, on every call; set
    for this call only (an in-process caller's `app` keeps its own)."""
    previous = app.rich_markup_mode
    if _help_width() < RICH_HELP_MIN_WIDTH:
        app.rich_markup_mode = None
    try:
        yield
    finally:
        app.rich_markup_mode = previous


def _escape_unencodable(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Codec error handler: a file name's undecodable bytes (lone surrogates, PEP 383) go out
    as the bytes they were, as 'surrogateescape' does; any other character the encoding lacks
    as a backslash escape (\\u2192), as 'backslashreplace' does. Character by character: the
    encoder hands over a run of both at once ('→' then a file name's byte)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += char.encode("ascii", "backslashreplace")
    return bytes(out), exc.end


codecs.register_error("causalign-escape", _escape_unencodable)


@contextmanager
def _unencodable_output_escaped() -> Iterator[None]:
    """Output redirected to a file or pipe on Windows is cp1252 with errors 'strict': a
    '→' in the help or '…' in a message ended `causalign --help > help.txt` with a
    UnicodeEncodeError traceback. Such characters print as escapes instead (\\u2192).
    Also under LC_ALL=C with UTF-8 mode off (PYTHONUTF8=0, or a Python before 3.7): stdout
    is ASCII with errors 'surrogateescape', which raises on '×' as 'strict' does, so
    `causalign --help` ended in a traceback there too."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="causalign-escape")
                changed.append((stream, errors))
            except (ValueError, OSError):  # e.g. a closed stream: left as it is
                pass
    try:
        yield
    finally:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError):
                pass


_SIGNALLED: list[int] = []  # set by the SIGTERM handler, read when the command has ended


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, like Ctrl-C: `finally` clean-ups run (an
    atomic write removes its temporary) and the command ends with one line."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's or `kill`'s SIGTERM used to end the process at once, silently. Not
    under torchrun: it stops the other ranks with SIGTERM after local rank 0 printed the
    job's one error line, and they must stay silent."""
    import signal
    import threading

    if "WORLD_SIZE" in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        _SIGNALLED.append(signum)
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGNALLED.clear()


def _interrupted() -> int:
    if _SIGNALLED:  # SIGTERM: the shell's code for a process it ended, 128 + 15
        typer.echo("terminated", err=True)
        return 143
    typer.echo("interrupted", err=True)
    return 130


def _refuse_empty_arguments(args: list[str]) -> None:
    """An empty argument is refused unless its option's default is empty too
    (`data synth --weights ""`): as a path it meant the current folder, so `--out ""` (an
    unset shell variable) wrote a run's files into the working directory and `data synth ""`
    a dataset there."""
    if all(arg.strip() and not arg.endswith("=") for arg in args):
        return  # the usual case: nothing to look up
    import typer.main

    command: Any = typer.main.get_command(app)
    for arg in args:  # the subcommand the arguments address (`data synth`, `bench step`)
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None and not arg.startswith("-"):
            break
        command = sub or command
    options = {name: param for param in getattr(command, "params", [])
               for name in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))
               if name.startswith("-")}

    def refuse(option: str) -> None:
        param = options.get(option)
        if param is not None and param.default == "":
            return  # an empty value is this option's own default
        hint = " ('.' is the current folder)" if option in _PATH_OPTIONS else ""
        raise CausalignError(f"{option} is empty; give a value{hint}")

    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if eq and name.startswith("--") and not value.strip():
            refuse(name)
        elif not arg.strip():
            before = args[i - 1] if i else ""
            param = options.get(before)
            if param is not None and not getattr(param, "is_flag", False):
                refuse(before)
            else:  # a positional argument, or a stray one after a flag
                raise CausalignError(f"argument {i + 1} is empty; give a value (as a path, "
                                     f"'.' is the current folder)")


_PATH_OPTIONS = ("--out", "--data", "--config", "--json", "--autoencoder")


def _main(argv: list[str] | None) -> int:
    try:  # recent typer (0.29 here) vendors click; its parser raises these, not click's
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions
    ClickException = click_exceptions.ClickException
    # click >= 8.2: a bare group (`causalign data`) raises this with its help as the message
    # (empty in typer's rich layout, which printed the help itself)
    no_args_help: Any = getattr(click_exceptions, "NoArgsIsHelpError", ())

    handled = sys.exc_info()[1]  # the caller's, if called in an except block: not ours
    try:
        _refuse_empty_arguments(sys.argv[1:] if argv is None else argv)
        # Without standalone mode, recent typer turns Ctrl-C into a returned exit code (130)
        # instead of raising; older versions raise KeyboardInterrupt (handled below).
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:
            return _interrupted() if code == 130 else code
    except CausalignError as exc:
        if interrupt_behind(exc, handled) is not None and not _traceback_wanted():
            return _interrupted()  # an error reported while Ctrl-C unwound (see below)
        _hold_back(exc)
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except no_args_help as exc:  # the plain layout's help (narrow terminal): as the rich one
        if exc.format_message():
            typer.echo(exc.format_message())
        return exc.exit_code
    except ClickException as exc:  # unknown command or option, missing argument, bad value
        message = exc.format_message()
        if message:  # empty when a bare group printed its help (no_args_is_help)
            _hold_back(exc)
            command = getattr(getattr(exc, "ctx", None), "command_path", None)
            if command is None:  # e.g. "--epochs requires an argument" carries no context
                command = _command_path(sys.argv[1:] if argv is None else argv)
            typer.echo(f"error: {_one_line(message)} (see `{command} --help`)", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as exc:
        if interrupt_behind(exc, handled) is not None and not _traceback_wanted():
            return _interrupted()  # a clean-up's failure after Ctrl-C (see below)
        if exc.errno is None or _traceback_wanted():
            raise  # not the operating system refusing a path: a bug, keep its traceback
        # an output folder under a file, a missing or read-only location, a full disk
        where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        typer.echo(f"error: {_one_line(where + ': ' if where else '')}{_os_problem(exc)}",
                   err=True)
        return 2
    except Exception as exc:
        if interrupt_behind(exc, handled) is not None and not _traceback_wanted():
            # Ctrl-C landed inside a library whose clean-up then failed (torch.save's zip
            # writer): the interrupt is what happened, not the clean-up's error
            return _interrupted()
        # too large a --size or --batch-size: numpy raises MemoryError, torch a RuntimeError
        # (CPU) or OutOfMemoryError (CUDA); a traceback of the allocation helps nobody
        if not _out_of_memory(exc) or _traceback_wanted():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"error: out of memory: {_one_line(first)} (a smaller --size or "
                   f"--batch-size needs less)", err=True)
        return 2
    return 0


def _command_path(argv: list[str]) -> str:
    """`causalign data synth` for ["data", "synth", "x", "--size"]: the (sub)command whose
    --help explains the options, found by walking the command tree along the arguments."""
    cmd = typer.main.get_command(app)
    path = ["causalign"]
    for token in argv:
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is None:
            break
        cmd = sub
        path.append(token)
    return " ".join(path)


def _traceback_wanted() -> bool:
    """CAUSALIGN_TRACEBACK=1 (or true/yes/on); 0, false, no, off or empty keep it off."""
    value = os.environ.get("CAUSALIGN_TRACEBACK", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _os_problem(exc: OSError) -> str:
    """The operating system's reason, said plainly where its words mislead: mkdir of a path
    that is a file reports "File exists", and a path under a file "Not a directory"."""
    import errno

    name = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, str | bytes) else None
    if (name is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR) and name.exists()
            and not name.is_dir()):
        return "exists and is not a folder"
    if name is not None and exc.errno == errno.ENOTDIR:
        for parent in name.parents:  # the nearest ancestor that exists: a file, not a folder
            if parent.exists():
                if not parent.is_dir():
                    return f"{exc.strerror} ({parent} is a file, not a folder)"
                break
    return str(exc.strerror)


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never import torch just to look
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _hold_back(exc: BaseException) -> None:
    """torchrun: one `error:` line per job, not one per rank (see hold_back_user_error).
    Outside torchrun (no WORLD_SIZE), torch is not imported on this path."""
    if "WORLD_SIZE" in os.environ:
        from .engine.distributed import hold_back_user_error

        hold_back_user_error(exc)


def _one_line(msg: str) -> str:
    """Escape control and line-separator characters (a file name or CSV cell can hold
    them), so a user error is always exactly one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _reflow_help(*apps: typer.Typer) -> None:
    """Join the lines of each paragraph of the commands' docstrings. Typer's help keeps the
    line breaks of every paragraph after the first, so a wrapped docstring printed as broken
    lines (`counterfactual --help`: "a hier-align run those of its" / "image level"); a
    paragraph that starts with \\b keeps its lines (click's convention)."""
    for a in apps:
        for info in a.registered_commands:
            cb = info.callback
            if cb is not None and cb.__doc__:
                paragraphs = inspect.cleandoc(cb.__doc__).split("\n\n")
                cb.__doc__ = "\n\n".join(p if p.startswith("\b") else " ".join(p.split())
                                         for p in paragraphs)


_reflow_help(app, data_app, bench_app, causal_app)


if __name__ == "__main__":  # `python -m causalign.cli` printed nothing and exited 0
    sys.exit(main())
