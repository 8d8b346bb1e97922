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


def test_kci_finds_the_nonlinear_edge_fisher_z_cannot_see(tmp_path):
    """`indep_test="kci"` acts: an attribute that is the square of the feature (zero
    correlation with it) is linked to the image by the kernel test and not by Fisher-z's
    partial correlations."""
    rng = np.random.default_rng(3)
    n = 150
    x = rng.normal(size=(n, 1))
    a = x ** 2 + 0.3 * rng.normal(size=(n, 1))  # X → A, with no linear trace
    # A → Y; a less noisy Y explains A away at this n: KCI then keeps X ⫫ A | Y
    y = a[:, 0] + rng.normal(size=n)
    assert abs(np.corrcoef(x[:, 0], a[:, 0])[0, 1]) < 0.05
    linear = pc_check(x, a, y, ["a0"], n_components=1, alpha=0.01)
    kernel = pc_check(x, a, y, ["a0"], n_components=1, alpha=0.01, indep_test="kci")
    assert linear["indep_test"] == "fisherz" and kernel["indep_test"] == "kci"
    assert linear["attributes_linked_to_image"] == []
    assert kernel["attributes_linked_to_image"] == ["a0"]
    assert kernel["attributes_linked_to_label"] == linear["attributes_linked_to_label"] == ["a0"]


@pytest.mark.parametrize("test", ["gsq", "chisq", "Fisherz"])
def test_unknown_independence_test_is_refused(test):
    rng = np.random.default_rng(0)
    x, a, y = rng.normal(size=(40, 2)), rng.normal(size=(40, 1)), rng.normal(size=40)
    from causalign.errors import ConfigError

    with pytest.raises(ConfigError, match=f"unknown independence test '{test}'; choose "
                                          f"fisherz or kci"):
        pc_check(x, a, y, ["a0"], indep_test=test)


def test_cli_unknown_test_is_refused_before_the_run_is_read(tmp_path, capsys):
    from causalign.cli import main

    rc = main(["causal", "pc", str(tmp_path / "no-such-run"), "--test", "gsq"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and lines == ["error: --test gsq: unknown test; choose fisherz or kci"]


def test_run_pc_check_refuses_a_small_split_before_computing_features(tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    """`causal pc RUN --split val` on 16 samples computed every feature (~12 s on a real
    model) before saying "at least 20 needed"; the count needs only the attributes. With
    `--attributes` the count is over the selected columns."""
    import causalign.causal.pc as pc
    from causalign.cli import main
    from causalign.engine import TrainConfig, train

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4), run,
          progress=False)

    def never(*a, **k):
        raise AssertionError("features computed before the sample count was checked")

    monkeypatch.setattr(pc, "pooled_features", never)
    capsys.readouterr()
    assert main(["causal", "pc", str(run), "--split", "val"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "only 16 fully annotated samples" in lines[0], lines
    assert main(["causal", "pc", str(run), "--split", "val", "--attributes", "nope"]) == 2
    assert "unknown attribute(s) nope" in capsys.readouterr().err
    # a split large enough gets past the count to the features
    with pytest.raises(AssertionError, match="features computed"):
        pc.run_pc_check(run, split="train", out=tmp_path / "pc")
