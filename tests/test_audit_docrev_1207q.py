"""README review of the operating-point / calibration / compare additions: what the README
lists as the JSON's `operating_point` keys is what `evaluate` and `compare` print, and the
CLI table rows this session touched name every option their `--help` shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main

from causalign.cli import app, main
from causalign.engine import TrainConfig, train

# without the fenced blocks, whose ``` would pair with the prose's backticks
README = re.sub(r"```.*?```", "", (Path(__file__).resolve().parents[1] / "README.md").read_text(),
                flags=re.S)


def _listed_keys(start: str) -> list[str]:
    """The keys of the README's `operating_point: {…}` span that begins with ``start``
    (wrapped over lines; ``x_a/_b`` stands for x_a and x_b)."""
    found = [re.sub(r"\s+", " ", s) for s in re.findall(r"`operating_point: \{([^}]*)\}`", README)]
    spans = [s for s in found if s.startswith(start)]
    assert len(spans) == 1, found
    keys = []
    for key in (k.strip() for k in spans[0].split(",")):
        keys += [key[:-5] + "_a", key[:-5] + "_b"] if key.endswith("_a/_b") else [key]
    return keys


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docrev") / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, width=4, device="cpu"), out,
          progress=False)
    return out


def test_evaluate_operating_point_keys_are_the_readmes(run, capsys):
    """The README's list of evaluate's `operating_point` keys lacked `positive`, which the
    JSON has held since `--positive` (the merge kept the older list)."""
    capsys.readouterr()
    assert main(["evaluate", str(run), "--operating-point", "youden", "--calibrate",
                 "temperature", "--device", "cpu", "--no-progress"]) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    # the README says --calibrate temperature then adds threshold_calibrated
    assert list(op) == [*_listed_keys("rule, positive, chosen_on"), "threshold_calibrated"]


def test_compare_operating_point_keys_are_the_readmes(run, capsys):
    """compare's `operating_point` list lacked `positive` too."""
    capsys.readouterr()
    assert main(["compare", str(run), str(run), "--operating-point", "youden"]) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    assert list(op) == _listed_keys("rule, positive, threshold_a")


def _options(*path: str) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {o for p in command.params for o in p.opts if o.startswith("--")} - {
        "--help", "--progress", "--no-progress"}


@pytest.mark.parametrize("path", [("evaluate",), ("explain",), ("causal", "pc")])
def test_cli_table_row_names_every_option(path):
    """evaluate's row lacked --device, explain's --data and --device, causal pc's all but
    --split and --test."""
    name = "causalign " + " ".join(path)
    spans = [s for s in re.findall(r"`([^`]+)`", README)
             if s.startswith(name + " ") and s.count("--") > 1]
    assert spans, name
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(spans)))
    assert _options(*path) <= shown, sorted(_options(*path) - shown)
