"""A library call must not change the caller's process (audit 2026-12-06, hidden global
state). Users call causalign from notebooks between their own code: every public entry point
is run between two snapshots of process-wide state (torch's threads, RNGs, dtype, grad and
anomaly modes, deterministic/TF32/matmul flags, autocast; numpy's and Python's RNGs; warnings
filters, logging, matplotlib's backend, rcParams and open figures, signal handlers,
sys.excepthook, os.environ, cwd, sys.path, umask) and, where it takes a model, of the model
(train/eval flags, parameters, buffers, .grad, requires_grad, hooks, instance attributes).
Any difference fails the test."""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

# Imported here, before any snapshot: some dependencies change process state once, when
# first imported (sklearn sets KMP_* environment variables, scipy adds warnings filters,
# rich draws from Python's RNG). That is theirs, and happens at most once per process.
import captum.attr  # noqa: F401
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import rich.progress  # noqa: F401
import scipy.stats  # noqa: F401
import sklearn.metrics  # noqa: F401
import torch
import torch.nn.functional as F
import zennit.composites  # noqa: F401
from torch import nn

import causalign.cli as cli
from causalign.causal.pc import plot_graph
from causalign.data import LesionDataset, SynthConfig, generate
from causalign.engine import evaluate_split, load_run, train
from causalign.explain import CounterfactualGenerator, explainer_names, get_explainer
from causalign.implicit import batched_cg, implicit_gradient
from causalign.metrics import cam_precision, classification_metrics, deletion_scores
from causalign.models import SevenLayerCNN
from causalign.report import figures

_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGALRM, signal.SIGPIPE]
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _loggers() -> dict:
    # a logger first created by a call (getLogger of a lazily imported module) in its
    # default state changes nothing; levels, handlers and propagation of any logger do
    loggers = {"": logging.getLogger()}
    loggers.update((k, v) for k, v in logging.Logger.manager.loggerDict.items()
                   if isinstance(v, logging.Logger))
    return {k: (v.level, list(v.handlers), v.propagate, v.disabled)
            for k, v in loggers.items()
            if (v.level, v.handlers, v.propagate, v.disabled) != (logging.NOTSET, [], True, False)
            or k == ""}


def process_state() -> dict:
    from torch.nn.modules import module as nn_module

    c = torch.backends.cudnn
    return {
        "torch threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "torch RNG": torch.get_rng_state(),
        "numpy RNG": np.random.get_state()[1].tolist() + [np.random.get_state()[2]],
        "python RNG": random.getstate(),
        "default dtype": torch.get_default_dtype(),
        "grad/inference mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        "anomaly mode": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "cudnn flags": (c.enabled, c.benchmark, c.deterministic, c.allow_tf32),
        "cuda matmul flags": (torch.backends.cuda.matmul.allow_tf32,
                              torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     torch.is_autocast_enabled("cuda")),
        "torch function modes": torch._C._len_torch_function_stack(),
        "global module hooks": [len(getattr(nn_module, n)) for n in sorted(dir(nn_module))
                                if n.startswith("_global_")
                                and isinstance(getattr(nn_module, n), dict)],
        "numpy errstate": np.geterr(),
        "warnings filters": list(warnings.filters),
        "warnings.showwarning": warnings.showwarning,
        "logging": _loggers(),
        "matplotlib backend": matplotlib.get_backend(),
        "matplotlib rcParams": {k: repr(v) for k, v in matplotlib.rcParams.items()
                                if k != "backend"},
        "open figures": plt.get_fignums(),
        "signal handlers": [signal.getsignal(s) for s in _SIGNALS],
        "os.environ": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "umask": _umask(),
        "std streams": (sys.stdout, sys.stderr, sys.stdin),
        "exception hooks": (sys.excepthook, sys.displayhook, threading.excepthook,
                            sys.unraisablehook),
        "recursion limit": sys.getrecursionlimit(),
        "gc": (gc.isenabled(), gc.get_threshold()),
    }


def model_state(model: nn.Module) -> dict:
    out: dict = {}
    for name, m in model.named_modules():
        out[f"{name}.training"] = m.training
        out[f"{name}.__dict__"] = sorted(m.__dict__)  # e.g. a patched forward left behind
        out[f"{name}.hooks"] = [len(getattr(m, h)) for h in _HOOK_DICTS]
    for name, p in model.named_parameters():
        out[name] = (p.detach().clone(), p.requires_grad,
                     None if p.grad is None else p.grad.clone(), len(p._backward_hooks or {}),
                     id(p))
    out.update((f"buffer {n}", b.clone()) for n, b in model.named_buffers())
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return (isinstance(b, tuple | list) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def changes(before: dict, after: dict) -> list[str]:
    return [k for k in before if not _same(before[k], after[k])]


# --------------------------------------------------------------------------- fixtures


def _cnn(in_channels: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = SevenLayerCNN(in_channels, 2, width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            p.grad = torch.full_like(p, 0.5)  # a caller's accumulated gradient
        for m in model.modules():  # non-trivial running statistics, so a change shows
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    next(model.parameters()).requires_grad_(False)  # a frozen first layer
    return model.train()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("glob") / "run"
    train(tiny_data, {"method": "erm", "epochs": 1, "batch_size": 16, "width": 4,
                      "threads": 1}, run, progress=False)
    return run


def _callers_excepthook(*args) -> None:  # a crash reporter's, rich.traceback's, ...
    sys.__excepthook__(*args)


@pytest.fixture
def notebook_like():
    """A matplotlib backend other than Agg (as a notebook's inline one is) and an exception
    hook of the caller's own; both put back afterwards."""
    backend, hook = matplotlib.get_backend(), sys.excepthook
    matplotlib.use("svg")
    sys.excepthook = _callers_excepthook
    yield
    matplotlib.use(backend)
    sys.excepthook = hook


def _batch(tiny_data: Path, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = LesionDataset(tiny_data, "test")
    x = torch.stack([ds[i]["image"] for i in range(n)])
    y = torch.tensor([int(ds[i]["label"]) for i in range(n)])
    mask = torch.stack([ds[i]["mask"] for i in range(n)]).reshape(n, *x.shape[-2:])
    return x, y, mask


# --------------------------------------------------------------------------- entry points
# Each entry: (tiny_data, trained run, tmp_path) -> (call, model or None).


def _cli(*args: str) -> Callable[[], None]:
    def call() -> None:
        assert cli.main(list(args)) == 0

    return call


def _entry_cli_synth(data, run, tmp):
    return _cli("data", "synth", str(tmp / "d"), "--n-train", "8", "--n-val", "4", "--n-test",
                "4", "--size", "32", "--no-progress"), None


def _entry_cli_train(data, run, tmp):
    return _cli("train", str(data), "--method", "erm", "--epochs", "1", "--out",
                str(tmp / "r"), "--batch-size", "16", "--set", "width=4",
                "--set", "threads=1", "--no-progress"), None


def _entry_cli_evaluate(data, run, tmp):
    return _cli("evaluate", str(run)), None


def _entry_cli_counterfactual(data, run, tmp):
    return _cli("counterfactual", str(run), "--out", str(tmp / "cf"), "--limit", "2",
                "--steps", "5", "--no-progress"), None


def _entry_cli_bench_profile(data, run, tmp):
    return _cli("bench", "step", "--method", "erm", "--size", "32", "--batch-size", "4",
                "--steps", "1", "--warmup", "0", "--threads", "1", "--profile"), None


def _entry_train_api(data, run, tmp):
    return (lambda: train(data, {"method": "erm", "epochs": 1, "batch_size": 16, "width": 4,
                                 "seed": 7, "deterministic": True, "threads": 1},
                          tmp / "r", progress=False)), None


def _entry_load_run(data, run, tmp):
    return (lambda: load_run(run, device="cpu")), None


def _entry_evaluate_split(data, run, tmp):
    _, model, method, _ = load_run(run, device="cpu")
    model.train()
    return (lambda: evaluate_split(model, method, LesionDataset(data, "test"), "cpu")), model


def _entry_counterfactual_generator(data, run, tmp):
    x, y, _ = _batch(data)
    model = _cnn(x.shape[1])
    return (lambda: CounterfactualGenerator(model, steps=3).generate(x, labels=y)), model


def _entry_counterfactual_newton(data, run, tmp):
    x, y, _ = _batch(data)
    model = _cnn(x.shape[1])
    return (lambda: CounterfactualGenerator(model, steps=2, optimizer="newton")
            .generate(x, labels=y)), model


def _entry_implicit_gradient(data, run, tmp):
    x, y, _ = _batch(data)
    model = _cnn(x.shape[1]).eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def obj(u: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(u), y, reduction="sum") + 0.5 * (u - x).square().sum()

    return (lambda: implicit_gradient(obj, x.clone(), params, torch.ones_like(x),
                                      cg_max_iter=3, damping=0.1)), model


def _entry_batched_cg(data, run, tmp):
    a = 2 * torch.eye(5).expand(2, 5, 5)
    return (lambda: batched_cg(lambda p: torch.einsum("nij,nj->ni", a, p), torch.ones(2, 5),
                               max_iter=5, verify=True)), None


def _entry_metrics(data, run, tmp):
    x, y, mask = _batch(data)
    model = _cnn(x.shape[1])
    maps = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))

    def call() -> None:
        deletion_scores(model, x, maps, y)
        cam_precision(maps, mask)
        classification_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 0]))

    return call, model


def _entry_synth_generate(data, run, tmp):
    return (lambda: generate(tmp / "g", SynthConfig(n_train=4, n_val=2, n_test=2, size=32,
                                                    seed=1))), None


def _entry_figures(data, run, tmp):
    x, _, mask = _batch(data)
    images, masks = x.numpy(), mask.numpy()

    def call() -> None:
        figures.example_grid(images, masks, ["a"] * 4, tmp / "grid.png")
        figures.overlay(images[0], masks[0], masks[0], tmp / "overlay.png", title="t")
        figures.counterfactual_grid(images, images + 0.1, masks, tmp / "cf.png")
        plot_graph([{"from": "x", "to": "y", "type": "->"}], {"x": "X", "y": "Y"},
                   tmp / "graph.png")

    return call, None


def _explainer_entry(name: str):
    def entry(data, run, tmp):
        x, y, _ = _batch(data)
        model = _cnn(x.shape[1])
        return (lambda: get_explainer(name, model).attribute(x, target=y)), model

    return entry


ENTRIES = {
    "cli data synth": _entry_cli_synth,
    "cli train": _entry_cli_train,
    "cli evaluate": _entry_cli_evaluate,
    "cli counterfactual": _entry_cli_counterfactual,
    "cli bench step --profile": _entry_cli_bench_profile,
    "train (Python API)": _entry_train_api,
    "load_run": _entry_load_run,
    "evaluate_split": _entry_evaluate_split,
    "CounterfactualGenerator adam": _entry_counterfactual_generator,
    "CounterfactualGenerator newton": _entry_counterfactual_newton,
    "implicit_gradient": _entry_implicit_gradient,
    "batched_cg": _entry_batched_cg,
    "metrics": _entry_metrics,
    "synth generate": _entry_synth_generate,
    "figure writers": _entry_figures,
    **{f"explainer {n}": _explainer_entry(n) for n in explainer_names()},
}


@pytest.mark.parametrize("name", list(ENTRIES))
def test_entry_point_leaves_the_process_and_the_model_as_it_found_them(
        name, tiny_data, trained, tmp_path, notebook_like):
    call, model = ENTRIES[name](tiny_data, trained, tmp_path)
    torch.manual_seed(1234)  # the caller's own seeds, which a call must not reset or consume
    np.random.seed(1234)
    random.seed(1234)
    before = process_state()
    threads = set(threading.enumerate())
    model_before = model_state(model) if model is not None else None
    call()
    assert changes(before, process_state()) == []
    left = [t for t in set(threading.enumerate()) - threads if (t.join(2.0), t.is_alive())[1]]
    assert left == []  # a thread the call started and left running (a progress refresher)
    if model is not None:
        assert changes(model_before, model_state(model)) == []


def test_import_causalign_changes_nothing():
    """``import causalign`` (the package; subpackages import torch and friends lazily)."""
    code = ("import os, random, sys, warnings; s = random.getstate(); "
            "f = list(warnings.filters); e = dict(os.environ); h = sys.excepthook; "
            "import causalign, causalign.cli; "
            "assert random.getstate() == s and warnings.filters == f and "
            "dict(os.environ) == e and sys.excepthook is h and 'matplotlib' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
