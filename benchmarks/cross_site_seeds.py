"""Mean (std) over seeds of several `cross_site.py` results (one JSON per seed).

    python benchmarks/cross_site_seeds.py RESULT_SEED0.json RESULT_SEED1.json ... \
        [--out benchmarks/results/cross_site_seeds.json]

Per method: the AUC matrix averaged element-wise over seeds, and the summary figures of each
seed (mean, in-site mean, cross-site mean, in − cross gap) as mean (std, ddof 0). Writes JSON
and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from causalign.io import atomic_write_json, atomic_write_text

FIGURES = ("mean", "in_site_mean", "cross_site_mean", "gap_in_minus_cross")
# cross_site.py options every seed's result must share (sizes.per_site_test varies by seed)
# (image_size: absent, so None for all, in results from before it was recorded)
SETTINGS = ("sites", "epochs", "shortcut", "ppi_overrides", "image_size", "sizes.train",
            "sizes.val", "sizes.test")


def _setting(result: dict, key: str):
    head, _, rest = key.partition(".")
    value = result.get(head)
    return value.get(rest) if rest and isinstance(value, dict) else value


def _nulls(a: np.ndarray | float):
    """NaN → None (JSON null), elementwise, as nested lists for arrays."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 0:
        return None if np.isnan(a) else float(a)
    return [_nulls(v) for v in a]


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def summarize(results: list[dict]) -> dict:
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the results repeat a seed: {seeds}")
    # the table is labelled with the first result's settings: results of other settings
    # (a seed run with other --epochs or --set) would be averaged under that label
    for r in results[1:]:
        diffs = [f"{k} {_setting(results[0], k)!r} vs {_setting(r, k)!r}" for k in SETTINGS
                 if _setting(r, k) != _setting(results[0], k)]
        if diffs:
            raise SystemExit(f"seed {r['seed']} was run with other settings than seed "
                             f"{results[0]['seed']} ({'; '.join(diffs)})")
    out: dict = {"benchmark": "cross_site_seeds", "seeds": seeds,
                 "sites": results[0]["sites"], "epochs": results[0]["epochs"],
                 "ppi_overrides": results[0].get("ppi_overrides")}
    for method in ("erm", "ppi"):
        # cross_site.py writes null for a cell without an AUC (one class in that test
        # split); such cells and figures are left out of the mean, not turned into NaN
        mats = np.array([r[method]["auc"] for r in results], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cell → null
            out[method] = {"auc_mean": _nulls(np.nanmean(mats, 0)),
                           "auc_std": _nulls(np.nanstd(mats, 0))}
            for f in FIGURES:
                vals = [r[method][f] for r in results]
                arr = np.array(vals, dtype=float)
                out[method][f] = {"mean": _nulls(np.nanmean(arr)),
                                  "std": _nulls(np.nanstd(arr)), "values": vals}
    return out


def markdown(s: dict) -> str:
    lines = [f"Cross-site AUC, {s['sites']} synthetic sites, {s['epochs']} epochs, seeds "
             f"{', '.join(map(str, s['seeds']))}: mean (std) over seeds.", "",
             "| figure | ERM | PPI |", "|---|---|---|"]
    for f in FIGURES:
        cells = [f"{_cell(s[m][f]['mean'])} ({_cell(s[m][f]['std'])})" for m in ("erm", "ppi")]
        lines.append(f"| {f.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "cross_site_seeds.json")
    args = ap.parse_args()
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(f"no such result file: {', '.join(missing)}")
    results = []
    for p in args.results:
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SystemExit(f"{p}: not JSON ({exc})") from None
        missing = [k for k in ("seed", "sites", "epochs", "erm", "ppi")
                   if not isinstance(r, dict) or k not in r]
        if missing:  # another script's result: it was a KeyError traceback
            raise SystemExit(f"{p}: not a cross_site.py result (no {', '.join(missing)})")
        results.append(r)
    s = summarize(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, s)
    md = markdown(s)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
