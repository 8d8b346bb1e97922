"""`causalign compare` on more than two classes: DeLong per class one-vs-rest with Holm's
adjustment over the classes, and file options that name a folder by a trailing slash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_audit_compare_1207f import _write_csv  # the same predictions CSV writer

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics import delong_test, holm_adjust


def test_holm_adjust_by_hand_and_with_untestable_entries():
    # sorted 0.01, 0.03, 0.04 of m = 3 tests: 3·0.01, 2·0.03, max(0.06, 1·0.04)
    assert holm_adjust([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([]) == [] and holm_adjust([None]) == [None]
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        holm_adjust([0.2, float("nan")])


def test_holm_adjust_equals_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 17):
        p = rng.uniform(0, 0.2, m)
        p[rng.integers(m)] = p.min()  # a tie
        want = multitest.multipletests(p, method="holm")[1]
        assert holm_adjust(list(p)) == pytest.approx(list(want), abs=1e-15)


def test_compare_adjusts_one_vs_rest_p_values_over_the_classes(tmp_path, capsys):
    """Before: each class's p_value alone, the note saying "not adjusted"."""
    rng = np.random.default_rng(3)
    n, classes = 60, ("a", "b", "c", "d")
    ids = [f"s{i}" for i in range(n)]
    y = np.arange(n) % 4
    pa = rng.dirichlet([1] * 4, n)
    pb = np.where(np.eye(4, dtype=bool)[y], pa + 0.6, pa)  # B better on every class
    pb /= pb.sum(1, keepdims=True)
    _write_csv(tmp_path / "a.csv", ids, y, pa, classes)
    _write_csv(tmp_path / "b.csv", ids, y, pb, classes)
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) in (0, None)
    r = json.loads(capsys.readouterr().out)
    raw = [delong_test(pa[:, c], pb[:, c], y == c)["p_value"] for c in range(4)]
    got = r["delong_one_vs_rest"]
    assert [got[c]["p_value"] for c in classes] == raw
    assert [got[c]["p_holm"] for c in classes] == pytest.approx(holm_adjust(raw))
    assert all(got[c]["p_holm"] >= got[c]["p_value"] for c in classes)
    assert max(got[c]["p_holm"] / got[c]["p_value"] for c in classes) == pytest.approx(4)
    assert "Holm" in r["delong_note"]


@pytest.mark.parametrize("argv", [
    ["predict", "RUN", "DATA", "--out", "OUT/"],
    ["evaluate", "RUN", "--out", "OUT/"],
    ["evaluate", "RUN", "--predictions", "OUT/"],
    ["evaluate", "RUN", "--reliability", "OUT/"],
    ["compare", "RUN", "RUN", "--out", "OUT/"],
    ["export", "RUN", "--out", "OUT/"],
    ["curves", "RUN", "--out", "OUT/"],
    ["causal", "ccce", "DATA", "--json", "OUT/"],
])
def test_a_file_option_ending_in_a_slash_is_refused(argv, tmp_path, capsys):
    """`predict RUN DATA --out results/` wrote a file named `results` (Path drops the
    slash); now one line naming the option, before any work, and nothing written."""
    out = tmp_path / "results"
    argv = [str(out) + "/" if a == "OUT/" else str(tmp_path / a) if a in ("RUN", "DATA")
            else a for a in argv]
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    option = argv[argv.index(str(out) + "/") - 1]
    assert lines[0].startswith(f"error: {option} {out}/: ends with '/', a folder")
    assert not out.exists()
