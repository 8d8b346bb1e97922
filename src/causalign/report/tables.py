"""Tables: mean (std) over seeds, as in the papers' tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    arr = np.asarray(vals, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


def fmt_mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    m, s = mean_std(values)
    if m is None:
        return "–"
    # std only over two or more actual values: one seed and a missing one is not "(0.000)"
    n = sum(v is not None for v in values)
    return f"{m:.{digits}f} ({s:.{digits}f})" if n > 1 else f"{m:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(results: dict[str, list[dict]], columns: Sequence[tuple[str, str]]) -> str:
    """results: method → list of metrics.json dicts (one per seed); columns: (label, dotted
    key into metrics.json, e.g. 'test.cam_precision')."""
    rows = []
    for method, runs in results.items():
        cells = [method]
        for _, key in columns:
            cells.append(fmt_mean_std([_get(r, key) for r in runs]))
        rows.append(cells)
    return markdown_table(["method", *[c for c, _ in columns]], rows)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
