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


def test_cf_localisation_commands_write_the_file_they_cite() -> None:
    """cf_localisation.py writes --out (default benchmarks/results/cf_localisation.json) and
    a .md beside it, replacing both. Three commands in docs/causal_align_investigation.md
    gave no --out but cited another stored file (cf_localisation_eps, _pixel_vs_smooth,
    interior_causes/cf_localisation_calcification): run as written they overwrote the
    stored results of the 'where the change goes' table with another experiment."""
    from test_readme_commands import DOCS

    default = "benchmarks/results/cf_localisation"
    bad = []
    for doc in DOCS:
        text = re.sub(r"\s+", " ", doc.read_text())
        for m in re.finditer(r"`python benchmarks/cf_localisation\.py ([^`]*)`", text):
            out = re.search(r"--out (\S+)", m.group(1))
            if out and out.group(1).isupper():  # a placeholder (JSON): the reader chooses
                continue
            cited = re.search(r"`((?:benchmarks/results/)?[\w/]*cf_localisation[\w]*)\.",
                              text[m.end():m.end() + 400])
            if cited is None:
                continue
            written = out.group(1).rsplit(".", 1)[0] if out else default
            if not written.endswith(cited.group(1)):
                bad.append(f"{doc.name}: {m.group(0)[:70]}… writes {written}.*, "
                           f"cites {cited.group(1)}")
    assert not bad, "\n".join(bad)


def test_fd_hvp_probe_default_out_follows_seed_and_dtype(tmp_path, monkeypatch) -> None:
    """docs/causal_align_solvers.md runs `fd_hvp_probe.py --seed S` for seeds 0-2 and cites
    fd_hvp_probe/seed{0,1,2}.json and seed0_float64.json, but --out defaulted to seed0.json
    for every seed and dtype: seeds 1 and 2 (and the float64 run) replaced seed 0's file."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("fd_probe_docs",
                                                  root / "benchmarks" / "fd_hvp_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    small = ["--size", "32", "--align-batch", "2", "--erm-steps", "1", "--warm-visits", "1",
             "--fd-eps", "1e-2", "--caps", "", "--directions", "1"]
    mod.main(["--seed", "1", "--float64", *small])  # one run: both parts of the name
    written = sorted(p.name for p in (tmp_path / "benchmarks/results/fd_hvp_probe").iterdir())
    assert written == ["seed1_float64.json"]


def test_bench_causal_align_reruns_name_their_out() -> None:
    """bench_causal_align.py's --out defaults to the stored default sweep
    (benchmarks/results/causal_align_sweep.json), which a rerun with other options replaces
    (finished rows are reused only for identical options). Six reruns in the docs whose
    results are stored elsewhere (causal_align_sweep_rerun_2026-12-05/) gave no --out."""
    from test_readme_commands import DOCS

    bad = []
    for doc in DOCS:
        text = re.sub(r"\s+", " ", doc.read_text())
        for m in re.finditer(r"`python benchmarks/bench_causal_align\.py([^`]*)`", text):
            if "causal_align_sweep_rerun" in text[m.end():m.end() + 300] \
                    and "--out" not in m.group(1):
                bad.append(f"{doc.name}: {m.group(0)}")
        # the same for the step table: its default is the README's stored table
        for m in re.finditer(r"`python benchmarks/causal_align_step_table\.py([^`]*)`", text):
            if "causal_align_moonshot" in text[m.end():m.end() + 300] \
                    and "--out" not in m.group(1):
                bad.append(f"{doc.name}: {m.group(0)}")
    assert not bad, "\n".join(bad)
