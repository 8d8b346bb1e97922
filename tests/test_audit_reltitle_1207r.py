"""`evaluate --reliability` with temperature scaling names where its T came from: the
"after" panel read "after T=0.5" alike for a T fitted on val and one given with
`--temperature` (another site's), which a reader of the figure alone could not tell apart."""

from __future__ import annotations

import json

import pytest
import test_operating_point

import causalign.report.figures as figures
from causalign.cli import main

erm_run = test_operating_point.erm_run  # the 2-epoch ERM run on the tiny benchmark


@pytest.mark.parametrize(("flags", "source"), [
    (["--temperature", "0.5"], "given"), (["--calibrate", "temperature"], "fitted on val")])
def test_after_panel_names_the_temperatures_source(erm_run, tmp_path, capsys, monkeypatch,
                                                   flags, source):
    seen: list[list[str]] = []
    real = figures.reliability_diagram
    monkeypatch.setattr(figures, "reliability_diagram", lambda panels, path, **k: (
        seen.append(list(panels)), real(panels, path, **k))[1])
    assert main(["evaluate", str(erm_run), "--reliability", str(tmp_path / "r.png"),
                 "--device", "cpu", "--no-progress", "--saliency", "gradient",
                 *flags]) in (0, None)
    t = json.loads(capsys.readouterr().out)["calibration"]["temperature"]
    ((before, after),) = seen
    assert before.endswith(", before")
    assert after.endswith(f", after T={t:.3g} ({source})")
