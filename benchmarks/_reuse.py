"""Reuse of a benchmark script's earlier outputs only when they are what is asked for now.

The scripts keep their synthetic dataset and finished runs so that they can be interrupted
and rerun; a rerun with other options must not pick those up silently, or its tables would
label the old results with the new settings. Each check stops the script with one line
naming the folder, the setting that differs and the option to change (``flag``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml

from causalign.data.format import MANIFEST, META
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig
from causalign.engine.config import apply_overrides
from causalign.engine.trainer import (
    dataset_digest_matches,
    read_run_config,
    same_dataset,
    settings_diff,
)
from causalign.errors import CausalignError
from causalign.methods import build_method
from causalign.methods.base import resolved_params


def one_line_errors(main: Callable[..., None]) -> Callable[..., None]:
    """A script's ``main`` with the CLI's contract for user errors: a CausalignError (a
    missing dataset or run folder, an unknown --set key) stops it with one ``error:`` line
    and exit status 1 instead of a traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> None:
        try:
            main(*args, **kwargs)
        except CausalignError as exc:
            raise SystemExit(f"error: {exc}") from None
    return wrapped


def synth_or_reuse(root: Path, synth: SynthConfig, flag: str) -> None:
    """Generate the synthetic dataset ``synth`` into ROOT, or reuse the one there if it was
    generated with the same options (the manifest is written last: its presence means a
    finished generation)."""
    if not (root / MANIFEST).exists():
        generate(root, synth)
        return
    try:
        meta = yaml.safe_load((root / META).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        meta = None  # unreadable: no stored options, so every one differs below
    info = meta.get("info") if isinstance(meta, dict) else None
    stored = info.get("config") if isinstance(info, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    diffs = [f"{k}: {stored.get(k)} there, {v} asked" for k, v in asdict(synth).items()
             if stored.get(k) != v]
    if diffs:
        raise SystemExit(f"{root} was generated with other options ({'; '.join(diffs)}); "
                         f"use another {flag}")


def check_finished_run(run: Path, cfg: TrainConfig, flag: str, data: Path | None = None,
                       state: str = "finished") -> None:
    """Stop unless the finished RUN was trained with ``cfg`` (device and threads aside) and,
    when ``data`` is given, on that dataset (or a copy of it). ``state`` words the message
    (an interrupted run about to be continued is checked the same way)."""
    try:
        diffs = settings_diff(run, cfg)
        stored = read_run_config(run).get("data")
    except CausalignError as exc:  # an edited or foreign config.yaml: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
    if data is not None and isinstance(stored, str) and stored and not same_dataset(
            Path(stored), Path(data)):
        diffs.append(f"data {stored} -> {data}")
    if diffs:
        raise SystemExit(f"{run}: {state} with other settings ({'; '.join(diffs)}); "
                         f"use another {flag}")


def check_template_run(run: Path, method: str, epochs: int, data: Path, flag: str) -> None:
    """Stop unless RUN, a finished run named by a template option (``flag``), is a ``method``
    run of ``epochs`` epochs on ``data`` (or a copy of it). Only these three are compared:
    such runs come from elsewhere (the demo's), trained with their own other settings; but
    a run of another dataset or length would be tabled beside this script's runs under this
    script's --data and --epochs."""
    try:
        stored = read_run_config(run)
    except CausalignError as exc:
        raise SystemExit(f"error: {exc}") from None
    diffs = []
    if stored.get("method") != method:
        diffs.append(f"method {stored.get('method')} -> {method}")
    if stored.get("epochs") != epochs:
        diffs.append(f"epochs {stored.get('epochs')} -> {epochs} (--epochs)")
    where, digest = stored.get("data"), stored.get("data_digest")
    # or its digest: a run whose dataset folder has moved since (--data the new place)
    # names a folder that is gone, and was refused as another dataset
    if not ((isinstance(where, str) and where and same_dataset(Path(where), Path(data)))
            or (isinstance(digest, str) and dataset_digest_matches(Path(data), digest))):
        diffs.append(f"data {where} -> {data}")
    if diffs:
        raise SystemExit(f"{run}: {flag} names a run with other settings ({'; '.join(diffs)})")


def check_overrides(method: str, sets: dict) -> dict:
    """Refuse a --set typo before anything is trained (a CausalignError, one line under
    `one_line_errors`): the PPI runs come after the ERM ones, so an unknown key was
    reported only once ERM's training of the first seed or site had finished. Returns the
    method's resolved parameters under ``sets``."""
    cfg = apply_overrides(TrainConfig(method=method), sets)
    return resolved_params(build_method(cfg.method, cfg.method_args))
