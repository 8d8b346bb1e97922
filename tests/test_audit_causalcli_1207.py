"""Audit (causalcli): hier-align / `causal ccce` / `causal pc` on real-format attributes."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.causal.ccce import (
    MonotoneLogistic,
    SmoothedFrequency,
    causal_attribution,
    subsets,
)
from causalign.errors import CausalignError


class _CountingLogistic(MonotoneLogistic):
    """A monotone logistic P(Y | A) that counts (and caps) its evaluations."""

    calls = 0

    def prob(self, a: np.ndarray) -> np.ndarray:
        type(self).calls += 1
        if type(self).calls > 50:
            raise AssertionError("CCCE evaluated the label model once per subset")
        return super().prob(a)


def _cub_like(p: int = 312, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = (rng.random((n, p)) < 0.3).astype(np.float64)
    y = (a[:, :3].sum(1) > 0).astype(np.int64)
    a[0, 5] = np.nan
    return a, y


def test_ccce_on_cubs_312_attributes_does_not_enumerate_five_million_subsets() -> None:
    """CUB's 312 attributes have 5,062,148 subsets of size <= 3: the enumeration called the
    label model once per subset (minutes, and n x 5e6 float64 scores: GBs), in setup of
    hier-align and in every validation batch. The logistic model's CCCE grows with the
    summed weights of the switched attributes, so the top-k search is exact."""
    a, y = _cub_like()
    m = _CountingLogistic()
    m.weights = np.zeros(312)
    m.weights[:3] = [3.0, 2.0, 1.0]
    m.weights[100] = 0.5
    m.bias = -2.0
    _CountingLogistic.calls = 0
    res = causal_attribution(m, a, y, max_size=3, tol=0.01)
    assert _CountingLogistic.calls <= 4  # P(Y | a) and one per subset size
    assert not res.known[0] and res.subset[0] == -1
    assert len(res.sets) == 312 + 312 * 311 // 2 + 312 * 311 * 310 // 6
    for i in np.flatnonzero(res.subset >= 0):  # r marks exactly the indexed subset
        assert set(np.flatnonzero(res.r[i])) == set(res.sets[res.subset[i]])
        assert res.score[i] > 0
    # a malignant-type sample (y = 1) whose only weighted attribute is 0 (attribute 0, w 3)
    i = next(i for i in range(1, len(y)) if y[i] == 1 and a[i, 0] == 1)
    assert res.r[i, 0]


def test_ccce_top_k_search_equals_the_enumeration() -> None:
    """Same subsets, scores and r as enumerating every subset (weights with ties)."""

    class Enumerated:  # no index_weights: the enumeration path
        def __init__(self, m: MonotoneLogistic) -> None:
            self.m = m

        def prob(self, a: np.ndarray) -> np.ndarray:
            return self.m.prob(a)

    rng = np.random.default_rng(3)
    for _ in range(20):
        p = int(rng.integers(1, 7))
        a = (rng.random((25, p)) < 0.5).astype(np.float64)
        a[rng.random((25, p)) < 0.05] = np.nan
        y = rng.integers(0, 2, 25)
        m = MonotoneLogistic(weights=np.round(rng.exponential(1, p) * (rng.random(p) < .7),
                                              1), bias=float(rng.normal()))
        for tol in (0.0, 0.01, 0.3):
            fast = causal_attribution(m, a, y, tol=tol)
            slow = causal_attribution(Enumerated(m), a, y, tol=tol)
            assert np.array_equal(fast.subset, slow.subset)
            assert np.array_equal(fast.r, slow.r)
            assert np.array_equal(fast.score, slow.score, equal_nan=True)
            assert list(fast.sets) == subsets(p, 3)


def test_ccce_frequency_model_over_hundreds_of_attributes_is_refused_in_one_line() -> None:
    a, y = _cub_like()
    m = SmoothedFrequency().fit(a[1:], y[1:])
    calls = 0
    prob = m.prob

    def counted(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        assert calls < 50, "enumerated millions of subsets"
        return prob(x)

    m.prob = counted  # type: ignore[method-assign]
    with pytest.raises(CausalignError, match="312 attributes .* logistic") as err:
        causal_attribution(m, a, y)
    assert "\n" not in str(err.value)


def test_pc_leaves_out_an_attribute_constant_on_the_split() -> None:
    """Real LIDC splits: no calcified nodule among 23 patients makes 'calcification' constant.
    The whole check stopped on it ("constant variable(s) calcification") and the CLI has no
    way to leave an attribute out; a constant attribute has no edge, so it is listed."""
    pytest.importorskip("causallearn")
    from causalign.causal.pc import pc_check

    rng = np.random.default_rng(0)
    n = 60
    feats = rng.normal(size=(n, 5))
    spic = (feats[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    y = np.where(rng.random(n) < 0.1, 1 - spic, spic)
    a = np.column_stack([np.zeros(n), spic, np.ones(n)])
    a[3, 1] = np.nan
    rep = pc_check(feats, a, y, ["calcification", "spiculation", "texture"],
                   causal_attributes=["calcification", "spiculation"])
    assert rep["constant_attributes"] == ["calcification", "texture"]
    assert rep["n"] == n - 1
    nodes = {e["from"] for e in rep["edges"]} | {e["to"] for e in rep["edges"]}
    assert "spiculation" in nodes and not nodes & {"calcification", "texture"}
    assert rep["truly_causal"] == ["spiculation"]
    with pytest.raises(CausalignError, match="every attribute is constant"):
        pc_check(feats, a[:, [0, 2]], y, ["calcification", "texture"])


def _write(root, attributes: list[str], rows: list[tuple[int, list[float]]]):
    from causalign.data.format import DatasetMeta, DatasetWriter

    with DatasetWriter(root, DatasetMeta("lidc-like", ["benign", "malignant"],
                                         attributes)) as w:
        for y, a in rows:
            w.add(np.zeros((1, 8, 8), np.float32), label=y, split="train", attributes=a)
    return root


def _fake_run(run, data, method: str, params: dict | None = None):
    import yaml

    run.mkdir()
    cfg = {"data": str(data), "method": method, "method_params": params or {}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_causal_ccce_on_a_run_folder_uses_its_dataset_and_ccce_settings(tmp_path, capsys
                                                                        ) -> None:
    """`causal ccce RUN` said "RUN/dataset.yaml: missing (RUN is not a causalign dataset)";
    now the run's dataset is attributed with the CCCE settings a hier-align run aligned
    to (here the frequency model, |S| <= 1), and a run on data without attributes is
    refused in one line."""
    from causalign.cli import main

    rng = np.random.default_rng(1)
    rows = []
    for _ in range(30):
        a = (rng.random(3) < 0.5).astype(float)
        rows.append((int(a[0] or a[1]), list(a)))
    data = _write(tmp_path / "lidc", ["spiculation", "lobulation", "margin"], rows)
    run = _fake_run(tmp_path / "run", data, "hier-align",
                    {"ccce_model": "frequency", "ccce_max_size": 1, "ccce_tol": 0.01})
    out_json = tmp_path / "r.json"
    assert main(["causal", "ccce", str(run), "--json", str(out_json)]) == 0
    import json

    rep = json.loads(out_json.read_text())
    assert rep["label_model"] == "frequency" and rep["max_size"] == 1
    assert rep["data"] == str(data)
    assert set(rep["causal_frequency"]) == {"spiculation", "lobulation", "margin"}
    capsys.readouterr()
    # a flag still wins over the run's setting
    assert main(["causal", "ccce", str(run), "--model", "logistic"]) == 0
    assert "logistic P(Y|A), |S| <= 1" in capsys.readouterr().out

    plain = _write(tmp_path / "plain", [], [(0, []), (1, [])])
    erm = _fake_run(tmp_path / "erm", plain, "erm")
    assert main(["causal", "ccce", str(erm)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "declares no attributes" in err[0], err


def _protective(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LIDC as imported: spiculation raises malignancy, calcification (1 = calcified, a
    benign sign) lowers it, lobulation a little raises it."""
    rng = np.random.default_rng(seed)
    spic, calc, lob = (rng.random((3, n)) < np.array([[0.4], [0.3], [0.5]])).astype(float)
    z = 2.5 * spic - 3.0 * calc + 0.5 * lob - 1.0
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return np.column_stack([spic, calc, lob]), y


def test_ccce_report_warns_when_an_attribute_lowers_the_label() -> None:
    """CCCE assumes monotonicity (seed 000 §4.3): a protective attribute is fitted weight
    0 and attributed 0.000, a silent "not causal" however strongly it predicts y."""
    from causalign.causal.ccce import attribution_report, format_attribution_report

    names = ["spiculation", "calcification", "lobulation"]
    a, y = _protective()
    rep = attribution_report(a, y, names)
    assert rep["fitted_weights"]["calcification"] == 0.0
    assert list(rep["monotonicity_violating"]) == ["calcification"]
    assert rep["monotonicity_violating"]["calcification"] < -1
    assert rep["monotonicity_p_value"] < 1e-6
    text = format_attribution_report(rep)
    assert "monotonicity" in text and "calcification (unconstrained weight" in text
    # recoded (1 = not calcified, the suspicious state): no warning, and it is attributed
    a2 = a.copy()
    a2[:, 1] = 1 - a2[:, 1]
    rep2 = attribution_report(a2, y, names)
    assert rep2["monotonicity_violating"] == {}
    assert rep2["causal_frequency"]["calcification"] > 0.2


def test_hier_align_setup_warns_about_a_protective_attribute() -> None:
    from types import SimpleNamespace

    import torch
    from torch import nn

    from causalign.methods import build_method

    a, y = _protective()
    split = SimpleNamespace(attributes=torch.tensor(a, dtype=torch.float32),
                            labels=torch.tensor(y),
                            meta=SimpleNamespace(attributes=["spiculation", "calcification",
                                                             "lobulation"]))
    with pytest.warns(UserWarning, match="calcification lower P.Y=1. when present"):
        build_method("hier-align").setup(split, nn.Linear(3, 2))


CUB_ATTRS = ["has_bill_shape::curved_(up_or_down)", "has_wing_color::blue",
             "has_wing_color::brown", "has_size::small_(5_-_9_in)"]


def _cub_with_attributes(root):
    """write_cub's 13 images plus the official attribute files: attributes.txt beside
    CUB_200_2011/, attributes/image_attribute_labels.txt inside (one 6-field line, as the
    official file has; image 2's attribute 3 'not visible'; image 5 has no lines)."""
    from fixtures_real import write_cub

    info = write_cub(root)
    (root / "attributes.txt").write_text(
        "".join(f"{i} {n}\n" for i, n in enumerate(CUB_ATTRS, 1)))
    lines = []
    for iid in range(1, 14):
        if iid == 5:
            continue
        for aid in range(1, 5):
            present = int((iid + aid) % 3 == 0)
            certainty = 1 if (iid, aid) == (2, 3) else 3
            extra = " 0" if (iid, aid) == (4, 2) else ""
            lines.append(f"{iid} {aid} {present} {certainty}{extra} 7.5\n")
    (root / "CUB_200_2011" / "attributes").mkdir()
    (root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt").write_text(
        "".join(lines))
    return info


def test_cub_import_carries_the_312_attribute_files_through_to_ccce(tmp_path, capsys) -> None:
    """The CUB importer wrote `attributes: []`: a user with the download could not train
    hier-align or run CCCE on CUB's attributes at all ("needs attribute annotations")."""
    from causalign.cli import main
    from causalign.data.format import LesionDataset, read_meta

    _cub_with_attributes(tmp_path / "src")
    out = tmp_path / "cub"
    assert main(["data", "import", "cub", str(tmp_path / "src"), str(out), "--size", "16",
                 "--classes", "1,2", "--cub-attributes", "all", "--no-progress"]) == 0
    meta = read_meta(out)
    assert meta.attributes == CUB_ATTRS
    values = {}
    for split in ("train", "val", "test"):
        try:
            ds = LesionDataset(out, split)
        except Exception:  # an empty split
            continue
        for rec, a in zip(ds.records, ds.attributes.numpy(), strict=True):
            values[int(rec.id.split("_")[1])] = a
    assert values[1].tolist() == [0.0, 1.0, 0.0, 0.0]  # (1 + aid) % 3 == 0: aid 2
    assert np.isnan(values[2][2]) and values[2][0] == 1.0  # not visible → missing
    assert values[4][1] == 1.0  # the 6-field line is read
    assert np.isnan(values[5]).all()  # no lines: not annotated
    capsys.readouterr()
    assert main(["causal", "ccce", str(out)]) == 0
    assert "has_wing_color::blue" in capsys.readouterr().out


def test_cub_attribute_selection_by_ids_and_names(tmp_path, capsys) -> None:
    """A selection by id range and name; an unknown attribute is one line."""
    from causalign.cli import main
    from causalign.data.format import read_meta

    _cub_with_attributes(tmp_path / "src")
    out2 = tmp_path / "cub2"
    assert main(["data", "import", "cub", str(tmp_path / "src"), str(out2), "--size", "16",
                 "--classes", "1,2", "--cub-attributes", "1-2,has_size::small_(5_-_9_in)",
                 "--no-progress"]) == 0
    assert read_meta(out2).attributes == [CUB_ATTRS[0], CUB_ATTRS[1], CUB_ATTRS[3]]
    capsys.readouterr()
    assert main(["data", "import", "cub", str(tmp_path / "src"), str(tmp_path / "cub3"),
                 "--cub-attributes", "has_tail::none", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown CUB attribute 'has_tail::none'" in err[0]


def test_pc_refuses_more_variables_than_samples_and_selects_attributes() -> None:
    """CUB's 312 attributes on 34 samples: causal-learn only warned ("number of features is
    much larger than the sample size") and ran for minutes on an undefined Fisher-z test.
    Now one line naming the counts, and `select` (`causal pc --attributes`) picks a few,
    dropping rows only for missing values of the chosen attributes."""
    pytest.importorskip("causallearn")
    from causalign.causal.pc import pc_check
    from causalign.errors import InputError

    rng = np.random.default_rng(0)
    n, p = 30, 40
    feats = rng.normal(size=(n, 6))
    a = (rng.random((n, p)) < 0.5).astype(np.float64)
    y = np.where(rng.random(n) < 0.15, 1 - a[:, 0], a[:, 0])
    a[:10, 30] = np.nan  # missing only in an attribute that is not selected
    names = [f"has_part::{j}" for j in range(p)]
    with pytest.raises(CausalignError, match=r"44 variables .* for 20 samples") as err:
        pc_check(feats, a, y, names)
    assert "\n" not in str(err.value)
    rep = pc_check(feats, a, y, names, select=["has_part::0", "has_part::1"])
    assert rep["n"] == n
    assert {e["from"] for e in rep["edges"]} | {e["to"] for e in rep["edges"]} <= \
        {"X1", "X2", "X3", "has_part::0", "has_part::1", "Y"}
    with pytest.raises(InputError, match=r"unknown attribute\(s\) wings; .*\(40 in all\)"):
        pc_check(feats, a, y, names, select=["wings"])


def test_folder_csv_with_ordinal_attribute_scores_is_refused_in_one_line(tmp_path, capsys
                                                                          ) -> None:
    """Radiologists' 1-5 scores written as attr_ columns: 9 of 12 rows were skipped as "bad
    attribute value" and the 3 imported were those scored 1 ("none" on the scale), stored
    as present."""
    from PIL import Image

    from causalign.cli import main

    src = tmp_path / "src"
    src.mkdir()
    lines = ["image,label,attr_spiculation,attr_margin\n"]
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(src / f"i{i}.png")
        lines.append(f"i{i}.png,{['benign', 'malignant'][i % 2]},{i % 5 + 1},{i % 2}\n")
    (src / "labels.csv").write_text("".join(lines))
    rc = main(["data", "import", "folder", str(src), str(tmp_path / "out"), "--csv",
               "labels.csv", "--size", "8", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "attr_spiculation holds scores" in err[0] and "9 of 12" in err[0]
    assert not (tmp_path / "out" / "dataset.yaml").exists()


def test_ccce_report_names_a_one_class_split() -> None:
    """A small real val split with only benign nodules: the table said only that no subset
    has an effect, not why."""
    from causalign.causal.ccce import attribution_report, format_attribution_report

    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = format_attribution_report(attribution_report(a, np.zeros(3, np.int64),
                                                        ["spiculation", "margin"]))
    assert "every fully annotated sample has label 0" in text
