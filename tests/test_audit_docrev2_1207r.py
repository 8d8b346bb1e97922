"""README review of the session's late changes (evaluate --temperature, the clinical table,
the report's seed-averaged ROC, curves' guidance terms, the counterfactual flip line): the
CLI table rows of the commands touched name every option their `--help` shows, and the
prose of those parts says what the tool does, not what it did before."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# without the fenced blocks, whose ``` would pair with the prose's backticks
README = re.sub(r"```.*?```", "", (Path(__file__).resolve().parents[1] / "README.md").read_text(),
                flags=re.S)


@pytest.mark.parametrize("phrase", [
    "their panel as before",          # curves row: the hier-align panel's title
    "500 samples, as before",         # compare/evaluate ROC legends
    "0.15 s before the bands",        # report ROC section timing
    "Brier and ECE were bolded",      # tables.md's bold rule
])
def test_no_change_history_in_touched_parts(phrase):
    """These sentences described a change ("as before", "were") instead of the behaviour."""
    assert phrase not in re.sub(r"\s+", " ", README)
