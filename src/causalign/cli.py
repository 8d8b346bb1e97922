"""Command line (contract in DESIGN.md). User errors exit 2 with one line on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import CausalignError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Causally aligned medical-image classifiers: train, explain, audit.")
data_app = typer.Typer(no_args_is_help=True, help="Create and inspect datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Micro-benchmarks (print JSON).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True))


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="output dataset folder")],
    n_train: int = 1000, n_val: int = 300, n_test: int = 500, size: int = 64,
    shortcut: Annotated[str, typer.Option(help="plus-minus | intensity | none")] = "plus-minus",
    sites: int = 1, depth: int = 1, seed: int = 0,
    label_noise: float = 0.3,
    overwrite: bool = False,
    examples: Annotated[bool, typer.Option(help="also write examples.png")] = True,
) -> None:
    """Write the synthetic lesion benchmark (defaults = the demo's benchmark)."""
    from .data.format import ensure_empty_or_missing
    from .data.synth import SynthConfig, generate

    cfg = SynthConfig(n_train=n_train, n_val=n_val, n_test=n_test, size=size,
                      shortcut=shortcut, sites=sites, depth=depth, seed=seed,
                      label_noise=label_noise)
    cfg.validate()
    ensure_empty_or_missing(out, overwrite)
    with _progress() as progress:
        generate(out, cfg, progress=progress)
    if examples:
        write_examples(out, out / "examples.png")
    typer.echo(f"wrote {n_train + n_val + n_test} samples to {out}")


def write_examples(data: Path, path: Path, n: int = 16) -> None:
    from .data.format import LesionDataset
    from .report.figures import example_grid

    ds = LesionDataset(data, "train")
    k = min(n, len(ds))
    names = [a[:4] for a in ds.meta.attributes]
    titles = []
    for i in range(k):
        attrs = ds.attributes[i]
        on = [nm for nm, a in zip(names, attrs.tolist(), strict=True) if a == 1]
        titles.append(f"y={ds.meta.classes[int(ds.labels[i])][:6]} " + ",".join(on))
    example_grid(ds.images[:k].numpy(), ds.masks[:k].numpy(), titles, path)


@data_app.command("info")
def data_info_cmd(data: Annotated[Path, typer.Argument(help="dataset folder")]) -> None:
    """Counts per split and class, annotation coverage."""
    from .data.format import dataset_summary

    _echo_json(dataset_summary(data))


@data_app.command("check")
def data_check(data: Annotated[Path, typer.Argument(help="dataset folder")]) -> None:
    """Fully validate every split (files, shapes, labels, NaN/inf)."""
    from .data.format import SPLITS, LesionDataset

    for split in SPLITS:
        ds = LesionDataset(data, split)
        typer.echo(f"{split}: {len(ds)} samples, image {ds.image_shape}, "
                   f"{int(ds.has_mask.sum())} with mask")
    typer.echo("ok")


# ---------------------------------------------------------------------------- train / eval


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="dataset folder")],
    method: Annotated[str | None, typer.Option(help="erm | oracle | causal-align | … "
                                               "(default erm)")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/run"),
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option(help="cnn7 | resnet18 | vgg11 | inception_v3")
                     ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train a classifier with METHOD on DATA; writes config.yaml, history.csv, checkpoints,
    metrics.json into --out."""
    from .engine.config import TrainConfig, apply_overrides, load_config_file, parse_set
    from .engine.trainer import train as run_train

    values: dict = load_config_file(config) if config is not None else {}
    for key, val in (("method", method), ("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                     ("seed", seed), ("model", model), ("device", device)):
        if val is not None:
            values[key] = val
    values.update(parse_set(set_ or []))
    base = TrainConfig()
    if resume and (out / "config.yaml").exists():
        from .engine.trainer import stored_config

        base = stored_config(out)  # continue the stored run; explicit flags must agree
    cfg = apply_overrides(base, values)
    metrics = run_train(data, cfg, out, resume=resume, progress=progress)
    test = metrics.get("test", metrics["val"])
    typer.echo(f"{cfg.method}: test accuracy {test['accuracy']:.3f}, "
               f"cam_precision {_f(test.get('cam_precision'))}; metrics in {out}/metrics.json")


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="run folder")],
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    split: str = "test",
    saliency: Annotated[str | None, typer.Option(help="saliency for localisation metrics")
                        ] = None,
    device: str = "auto",
    out: Annotated[Path | None, typer.Option(help="write the metrics JSON here")] = None,
) -> None:
    """Evaluate a run on a split: accuracy, balanced accuracy, AUC, CAM precision, deletion."""
    from .data.format import LesionDataset
    from .engine.evaluate import evaluate_split
    from .engine.trainer import load_run
    from .io import atomic_write_json

    cfg, model, method, data_path = load_run(run, device=device, data=data)
    ds = LesionDataset(data_path, split)
    dev = next(model.parameters()).device
    with _progress() as progress:
        metrics = evaluate_split(model, method, ds, dev, saliency=saliency or cfg.eval_saliency,
                                 fractions=tuple(cfg.deletion_fractions), progress=progress)
    metrics = {"run": str(run), "data": str(data_path), "split": split, **metrics}
    if out is not None:
        atomic_write_json(out, metrics)
    _echo_json(metrics)


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="run folder")],
    saliency: Annotated[str, typer.Option(help="gradcam | gradient | input-x-gradient | …")
                        ] = "gradcam",
    split: str = "test",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("explanations"),
    limit: Annotated[int | None, typer.Option(help="first N samples")] = 32,
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    device: str = "auto",
) -> None:
    """Saliency maps (.npy) and overlay PNGs for a run's predictions."""
    from .data.format import LesionDataset
    from .engine.trainer import load_run
    from .explain import get_explainer
    from .explain.export import export_saliency

    cfg, model, method, data_path = load_run(run, device=device, data=data)
    get_explainer(saliency, model)  # unknown names fail before any work
    ds = LesionDataset(data_path, split)
    if limit is not None and limit < 1:
        raise CausalignError(f"--limit must be >= 1, got {limit}")
    with _progress() as progress:
        summary = export_saliency(model, method, ds, saliency, out, limit=limit,
                                  device=next(model.parameters()).device, progress=progress)
    typer.echo(f"wrote {summary['n']} maps and overlays to {out}")


# ---------------------------------------------------------------------------- bench / demo


@bench_app.command("step")
def bench_step_cmd(
    method: Annotated[str, typer.Option(help="method to time against ERM")] = "erm",
    size: int = 64, batch_size: int = 64, steps: int = 5, warmup: int = 2,
    device: str = "auto", model: str = "cnn7",
    set_: Annotated[list[str] | None, typer.Option("--set", help="method.key=value")] = None,
) -> None:
    """Time one training step of METHOD and of ERM in this process; prints one JSON object."""
    from .engine.bench import bench_step
    from .engine.config import parse_set

    args = {k.split(".", 1)[1] if k.startswith("method.") else k: v
            for k, v in parse_set(set_ or []).items()}
    typer.echo(json.dumps(bench_step(method, size=size, batch_size=batch_size, steps=steps,
                                     warmup=warmup, device=device, model=model,
                                     method_args=args)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("demo_out"),
    seeds: Annotated[int, typer.Option(help="seeds per method")] = 1,
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "erm,oracle",
    epochs: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Synthetic plus-minus benchmark → train each method → table and overlay figure."""
    from .demo import run_demo

    report = run_demo(out, methods=[m.strip() for m in methods.split(",") if m.strip()],
                      seeds=seeds, epochs=epochs)
    typer.echo(report)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors → one line on stderr and exit code 2, no traceback."""
    import click

    try:
        app(args=argv, standalone_mode=False)
    except CausalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
