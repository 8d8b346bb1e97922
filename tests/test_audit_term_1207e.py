"""Audit: terminals and output streams (ASCII locales, narrow terminals, NO_COLOR, pipes)."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path

import causalign.cli  # noqa: F401  (registers the "causalign-escape" codec error handler)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess[bytes]:
    """`python -m causalign.cli ARGS` with stdout/stderr captured (not a terminal); the
    locale variables and PYTHONIOENCODING are cleared so ``env`` alone decides the encoding."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("LANG", "LC_ALL", "LC_CTYPE", "PYTHONIOENCODING", "PYTHONUTF8",
                         "NO_COLOR", "TERM")}
    base["PYTHONPATH"] = SRC + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "causalign.cli", *args],
                          capture_output=True, env={**base, **env}, timeout=120)


def test_help_in_the_c_locale_without_utf8_mode_prints_instead_of_crashing():
    # LC_ALL=C with UTF-8 mode off: stdout is ASCII with errors 'surrogateescape', which
    # raised on the '×' of `benchmark`'s summary: a UnicodeEncodeError traceback, exit 1
    res = _cli(["--help"], LC_ALL="C", PYTHONUTF8="0")
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-600:]
    assert b"Traceback" not in res.stderr
    assert b"Methods \\xd7 datasets" in res.stdout  # the '×' escaped, the line kept


def test_escape_handler_keeps_undecodable_file_name_bytes_and_escapes_the_rest():
    # a file name's undecodable byte (PEP 383 surrogate) goes out as itself, as under
    # 'surrogateescape'; a character ASCII lacks as a backslash escape
    text = "a\u2192" + os.fsdecode(b"\xff") + "b"
    assert codecs.lookup_error("causalign-escape") is not None
    assert text.encode("ascii", "causalign-escape") == b"a\\u2192\xffb"


def test_help_in_a_narrow_terminal_shows_every_option_name_whole():
    # typer's rich tables cut what did not fit at 60 columns: `--smooth-sig…`, `--no-progr…`
    res = _cli(["counterfactual", "--help"], COLUMNS="60")
    assert res.returncode == 0, res.stderr.decode()[-600:]
    text = res.stdout.decode()
    for name in ("--smooth-sigma", "--no-progress", "--autoencoder"):
        assert name in text
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 60


def test_bare_group_in_a_narrow_terminal_prints_its_help_not_an_error_line():
    # click's layout puts the help in the exception's message: it came out as one
    # `error: Usage: …\n…` line on stderr
    res = _cli(["data"], COLUMNS="40")
    assert b"error" not in res.stderr
    assert b"synth" in res.stdout and b"Usage:" in res.stdout


def test_narrow_help_layout_is_set_for_one_call_only(monkeypatch, capsys):
    from causalign.cli import app, main

    before = app.rich_markup_mode
    monkeypatch.setenv("COLUMNS", "50")
    assert main(["data", "--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert app.rich_markup_mode == before
