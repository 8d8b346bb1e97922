"""Shared fixtures: a tiny synthetic dataset written once per session."""

from __future__ import annotations

import os

import pytest
import torch

from causalign.data.synth import SynthConfig, generate

# Variables a CI service or a developer's shell may set that change what the tests read:
# FORCE_COLOR (set by many CI workflows) and TTY_COMPATIBLE/TTY_INTERACTIVE make rich take a
# captured stderr for a terminal (live redraws with cursor codes instead of one line per task),
# COLUMNS/LINES narrow rich's lines, CAUSALIGN_TRACEBACK=1 turns every one-line error into a
# traceback. Removed for the whole session (before any import reads them), so the spawned
# `causalign` processes inherit the same neutral environment; a test sets one where it tests it.
NEUTRAL_ENV_REMOVED = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES",
                       "CAUSALIGN_TRACEBACK")
for _name in NEUTRAL_ENV_REMOVED:
    os.environ.pop(_name, None)


def pytest_configure(config):
    # Many unit tests call a method on a hand-made batch without setup() on purpose; the
    # once-per-object warning that says so is tested where it matters (pytest.warns records
    # it whatever this filter says) and would only fill the CI log here.
    config.addinivalue_line("filterwarnings",
                            r"ignore:.*setup\(\) was not called:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    # Tiny tensors: one thread avoids oversubscription on the 2-core CI machine (intra-op
    # threads only spin on them). Per module, so a test that changes it does not leak.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """32 px plus-minus benchmark: 48 train / 16 val / 16 test."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, SynthConfig(n_train=48, n_val=16, n_test=16, size=32, seed=3))
    return root
