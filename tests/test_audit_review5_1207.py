"""Review of the 1207 commits (review5): regressions found by trying to break them."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.causal import ccce as C


def test_ccce_scores_calls_the_model_once_per_chunk_not_once_per_subset() -> None:
    # the frequency model (no top-k form) went through ~100 µs of call overhead per subset:
    # 20 samples over 100 attributes took 160 s under the 5e7-evaluation cap
    rng = np.random.default_rng(0)
    a = (rng.random((6, 12)) < 0.4).astype(float)
    y = (a[:, :2].sum(1) > 0).astype(int)
    model = C.fit_label_model(a, y, "frequency")
    calls = []
    prob = model.prob

    class Counting:
        def prob(self, x: np.ndarray) -> np.ndarray:
            calls.append(len(x))
            return prob(x)

    sets = C.subsets(12, 3)
    got = C.ccce_scores(Counting(), a, y, sets)
    assert len(calls) <= 3, len(calls)  # 1 base call + a chunk; it was 1 + 298
    # the same numbers as scoring each subset by itself
    for j in (0, 5, 100, len(sets) - 1):
        ref = C.ccce_scores(model, a, y, [sets[j]])[:, 0]
        np.testing.assert_array_equal(got[:, j], ref)


def test_frequency_prob_matches_the_table_formula_and_keeps_widths_apart() -> None:
    a = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], float)
    y = np.array([1, 0, 0, 1])
    m = C.SmoothedFrequency(smoothing=1.0).fit(a, y)
    q = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], float)
    pi = 0.5
    want = [(1 + pi) / 3, pi, (1 + pi) / 2, (0 + pi) / 2]
    np.testing.assert_allclose(m.prob(q), want)
    # [1, 0, 1, 0, 0] packs to the byte of [1, 0, 1]: a 5-wide row is unseen (prior)
    np.testing.assert_allclose(m.prob(np.array([[1, 0, 1, 0, 0]], float)), [pi])
    m0 = C.SmoothedFrequency(smoothing=0.0).fit(a, y)  # n + k = 0 for unseen: the prior
    np.testing.assert_allclose(m0.prob(q), [0.5, pi, 1.0, 0.0])
    m.fit(a, 1 - y)  # a refit is seen (the packed table is rebuilt)
    np.testing.assert_allclose(m.prob(q[:1]), [(1 + pi) / 3])


@pytest.mark.parametrize("comb", [[], [0, 0], [7], [0, 1, 2, 3], [-1]])
def test_subsets_rank_refuses_what_is_not_one_of_its_subsets(comb: list[int]) -> None:
    # rank([]) gave len(self), rank([0, 0]) the index of (0, 1), rank([-1]) that of (0,)
    with pytest.raises(ValueError, match="not a subset"):
        C.Subsets(5, 3).rank(comb)


def test_lazy_sets_compare_equal_to_the_list_they_replace() -> None:
    a = np.array([[1, 0, 1], [0, 1, 1]], float)
    y = np.array([1, 0])
    res = C.causal_attribution(C.fit_label_model(a, y), a, y, max_size=2)
    assert res.sets == C.subsets(3, 2)  # it was a list; the lazy Subsets compared False
    assert res.sets == C.Subsets(3, 2) and res.sets != C.Subsets(3, 1)
    assert C.Subsets(3, 5) == C.subsets(3, 5)


def test_monotonicity_check_no_alarm_for_an_attribute_coded_as_anothers_complement() -> None:
    # not_a1 = 1 - a1 with a1 raising P(Y=1): the monotone fit (w_a1 = d, w_not_a1 = 0) fits
    # exactly as well as the free one (d/2, -d/2); the penalised losses differed by the L2
    # term alone, and 2n times that read as a violation (p = 0.003, not_a1 'violating')
    rng = np.random.default_rng(1)
    n = 2000
    a1 = (rng.random(n) < 0.5).astype(float)
    a3 = (rng.random(n) < 0.5).astype(float)
    y = (rng.random(n) < 1 / (1 + np.exp(-(3 * a1 + a3 - 2)))).astype(int)
    check = C.monotonicity_check(np.stack([a1, 1 - a1, a3], 1), y, ["a1", "not_a1", "a3"])
    assert check["violating"] == {}
    assert check["p_value"] is None or check["p_value"] > 0.05
    # a genuinely protective attribute is still found
    y3 = (rng.random(n) < 1 / (1 + np.exp(-(-3 * a1 + a3)))).astype(int)
    found = C.monotonicity_check(np.stack([a1, a3], 1), y3, ["a1", "a3"])
    assert list(found["violating"]) == ["a1"] and found["p_value"] < 1e-10


def test_cub_attribute_selection_refuses_a_reversed_range() -> None:
    from causalign.data.importers.cub import select_attributes
    from causalign.errors import DataError

    names = {str(i): f"has_x::v{i}" for i in range(1, 21)}
    assert select_attributes("1-3,has_X::V5", names) == ["1", "2", "3", "5"]
    with pytest.raises(DataError, match="empty id range '15-1'"):
        select_attributes("15-1,3", names)  # it gave ['3']: attributes 1..15 dropped


def test_pc_check_leaves_out_a_constant_fractional_attribute() -> None:
    pytest.importorskip("causallearn")
    from causalign.causal.pc import pc_check

    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    a = np.column_stack([(y + (rng.random(n) < 0.2)) % 2, np.full(n, 0.7)]).astype(float)
    feats = rng.normal(size=(n, 4)) + y[:, None]
    # std of a constant 0.7 column is 1e-16, not 0: it was kept and the check failed
    rep = pc_check(feats, a, y, ["spic", "soft"], n_components=2)
    assert rep["constant_attributes"] == ["soft"]


def test_folder_import_refuses_a_score_column_whose_most_common_score_is_1(tmp_path, capsys
                                                                          ) -> None:
    # LIDC-like spiculation: 13 of 20 nodules scored 1 ("none"), the rest 2-5: 7 of 20
    # outside [0, 1] passed the "mostly outside" rule; the 7 rows were skipped and the 13
    # imported with spiculation present
    from PIL import Image

    from causalign.cli import main

    src = tmp_path / "src"
    src.mkdir()
    scores = [1] * 13 + [2, 3, 4, 5, 2, 3, 5]
    lines = ["image,label,attr_spiculation\n"]
    for i, sc in enumerate(scores):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(src / f"i{i}.png")
        lines.append(f"i{i}.png,{['benign', 'malignant'][i % 2]},{sc}\n")
    (src / "labels.csv").write_text("".join(lines))
    rc = main(["data", "import", "folder", str(src), str(tmp_path / "out"), "--csv",
               "labels.csv", "--size", "8", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "attr_spiculation holds scores" in err[0] and "7 of 20" in err[0]
    assert not (tmp_path / "out" / "dataset.yaml").exists()


def test_cub_class_selection_names_its_own_flag_for_a_reversed_range() -> None:
    # the class list's copy of the range check said "--cub-attributes" for `--classes 15-1`
    from causalign.data.importers.cub import select_classes
    from causalign.errors import DataError

    classes = {str(i): f"{i:03d}.Bird_{i}" for i in range(1, 21)}
    assert select_classes("1-2,bird_5", classes) == ["1", "2", "5"]
    with pytest.raises(DataError, match="^--classes: empty id range '15-1'"):
        select_classes("15-1,3", classes)
