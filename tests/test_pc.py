"""PC-algorithm check (App. C.5) on data with a known X → A → Y structure."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("causallearn")

from causalign.causal.pc import pc_check, skeleton_check  # noqa: E402


def test_pc_recovers_x_a_y_skeleton(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 3))
    b = np.array([[1.0, 0.0, 0.8], [0.0, 1.0, 0.0], [0.7, 0.0, 1.0]])  # X → A
    a = x @ b + rng.normal(size=(n, 3))
    y = a @ np.array([1.0, 0.0, 1.0]) + rng.normal(size=n)  # A → Y; a1 has no effect
    rep = pc_check(x, a, y, ["a0", "a1", "a2"], n_components=3, alpha=0.01,
                   causal_attributes=["a0", "a2"], figure=tmp_path / "pc.png")
    assert rep["skeleton_consistent"], rep["forbidden_edges"]
    assert rep["attributes_linked_to_label"] == ["a0", "a2"]
    assert rep["label_edges_match_truth"]
    assert set(rep["attributes_linked_to_image"]) == {"a0", "a1", "a2"}
    assert (tmp_path / "pc.png").stat().st_size > 1000


def test_skeleton_check_flags_forbidden_edges():
    groups = {"X1": "X", "a": "A", "b": "A", "Y": "Y"}
    edges = [{"from": "X1", "to": "Y", "type": "--"}, {"from": "a", "to": "b", "type": "->"},
             {"from": "a", "to": "Y", "type": "->"}]
    rep = skeleton_check(edges, groups, causal_attributes=["a", "b"])
    assert not rep["skeleton_consistent"]
    assert len(rep["forbidden_edges"]) == 2
    assert rep["missed_causal"] == ["b"]
