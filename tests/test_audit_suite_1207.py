"""Audit (own benchmark suites): mistakes in a hand-written suite are refused when it is
loaded, with one line, before any dataset is generated or run trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from causalign.cli import main
from causalign.engine import benchmark as bm

HEAD = """\
name: mine
defaults: {epochs: 1, width: 4, batch_size: 16, threads: 1}
datasets:
  pm: {synth: {n_train: 8, n_val: 4, n_test: 4, size: 32}}
"""


def _write(tmp_path: Path, body: str, head: str = HEAD) -> Path:
    p = tmp_path / "mine.yaml"
    p.write_text(head + body, encoding="utf-8")
    return p


def _refused(tmp_path: Path, capsys, suite: Path, needle: str) -> None:
    out = tmp_path / "out"
    assert main(["benchmark", str(suite), "--out", str(out), "--no-progress",
                 "--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()  # nothing generated, nothing trained


@pytest.mark.parametrize("body, needle", [
    # a second experiment pasted under the first one's name replaced it silently
    ("experiments:\n  t1: {datasets: [pm], methods: [erm]}\n"
     "  t1: {datasets: [pm], methods: [oracle]}\n",
     "key 't1' given twice (lines 6 and 7)"),
    # ... and so did a repeated key inside a flow mapping (the first setting's value lost)
    ("experiments:\n  t1: {datasets: [pm], methods: [erm], settings: {a: {epochs: 1}, "
     "a: {epochs: 2}}}\n", "key 'a' given twice (line 6)"),
])
def test_a_key_given_twice_is_refused(tmp_path, capsys, body, needle):
    _refused(tmp_path, capsys, _write(tmp_path, body), needle)


def test_yaml_merge_keys_still_override(tmp_path):
    body = ("experiments:\n  t1: &base {datasets: [pm], methods: [erm], seeds: [0]}\n"
            "  t2:\n    <<: *base\n    seeds: [1]\n")
    suite = bm.load_suite(_write(tmp_path, body))
    assert [e.seeds for e in suite.experiments] == [[0], [1]]
