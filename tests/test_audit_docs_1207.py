"""Shell commands the docs show, run in the order shown (audit 'docs', 2026-12-07)."""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

from test_readme_commands import README, _fenced


def _lines_with_comments(block: str) -> list[tuple[str, str]]:
    """(command, its trailing comment) per line of a bash block, continuations joined."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        m = re.match(r"^(.*?)(?:(?:^|\s)#(.*))?$", line)
        cmd, comment = m.group(1).strip(), (m.group(2) or "")
        if cmd:
            out.append((cmd, comment))
    return out


def test_readme_synth_commands_in_order_do_not_collide() -> None:
    """`causalign data synth OUT` refuses a non-empty OUT (exit 2). A newcomer runs the
    README's blocks top to bottom, so a later block may not synthesise into a folder an
    earlier block already filled (or a folder above it) unless its comment says to skip
    it: the PPI block's `data synth data` failed on the causal-align block's `data/pm`,
    and the hier-align block's `data synth data/pm` on that same folder."""
    made: list[PurePosixPath] = []
    bad = []
    for block in _fenced(README.read_text()):
        for cmd, comment in _lines_with_comments(block):
            toks = shlex.split(cmd)
            if toks[:3] != ["causalign", "data", "synth"] or len(toks) < 4:
                continue
            out = PurePosixPath(toks[3])
            clash = [p for p in made if p == out or out in p.parents]
            if clash and "skip" not in comment.lower():
                bad.append(f"{cmd}  (already written: {', '.join(map(str, clash))})")
            made.append(out)
    assert not bad, "synth into a non-empty folder:\n" + "\n".join(bad)
