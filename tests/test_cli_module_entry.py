"""The CLI module run as a script."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_causalign_cli_runs_the_cli():
    """`python -m causalign.cli --help` printed nothing and exited 0 (no main guard)."""
    res = subprocess.run([sys.executable, "-m", "causalign.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "evaluate" in res.stdout
