"""Review of the second batch of 2026-12-07 merges (review6): regressions found there."""

from __future__ import annotations

import numpy as np
import yaml

from causalign.causal.ccce import SmoothedFrequency, ccce_scores
from causalign.engine.config import load_yaml

# an anchor defined as a merge value, itself overriding a merged key, aliased later: valid
# YAML that PyYAML loads (b: {x: 1}); the duplicate-key check saw the node after the outer
# merge had flattened it in place and refused "key 'x' given twice"
_NESTED_MERGE = """\
a:
  <<: &n
    <<: {x: 0}
    x: 1
b: *n
"""


def test_a_merged_anchor_aliased_again_is_not_a_repeated_key():
    assert load_yaml(_NESTED_MERGE) == yaml.safe_load(_NESTED_MERGE)
    assert load_yaml(_NESTED_MERGE)["b"] == {"x": 1}


def test_a_key_really_given_twice_is_still_refused():
    import pytest

    with pytest.raises(yaml.YAMLError, match="given twice"):
        load_yaml("a: &n {x: 0}\nb:\n  <<: *n\n  y: 1\n  y: 2\n")


def test_frequency_model_scores_no_rows():
    # the packed-bytes lookup (ad9b870) raised "cannot reshape array of size 0" on an empty
    # batch, which was an empty result before
    m = SmoothedFrequency().fit(np.array([[1, 0, 1], [0, 0, 1]]), np.array([1, 0]))
    assert m.prob(np.zeros((0, 3))).shape == (0,)
    assert ccce_scores(m, np.zeros((0, 3)), np.zeros(0), [(0,), (1, 2)]).shape == (0, 2)
    np.testing.assert_allclose(m.prob(np.array([[1, 0, 1], [1, 1, 1]])), [0.75, 0.5])


_COLLIDING = """\
name: coll
defaults: {epochs: 1, threads: 1}
datasets:
  ds: {synth: {n_train: 32, n_val: 16, n_test: 16, size: 32}}
experiments:
  a: {datasets: [ds], methods: [rrr], seeds: [0]}
  b: {datasets: [ds], methods: [{name: rrr, set: {method.lam: 5}}], seeds: [0]}
"""


def test_a_colliding_runs_folder_does_not_move_with_the_resolved_parameters(tmp_path,
                                                                          monkeypatch):
    # two runs labelled rrr: the second's folder is suffixed by a hash. 1ca6141 hashed the
    # resolved parameters into it, which renamed the folder of an OUT made before (and would
    # again whenever a method gains a parameter): the finished run was retrained beside it
    import causalign.methods.base as base
    from causalign.engine.benchmark import load_suite, plan

    (tmp_path / "coll.yaml").write_text(_COLLIDING, encoding="utf-8")
    suite = load_suite(tmp_path / "coll.yaml")
    keys = [s.key for s in plan(suite)]
    assert keys[0] == "ds/rrr/seed0" and keys[1].startswith("ds/rrr-")
    real = base.resolved_params
    monkeypatch.setattr(base, "resolved_params", lambda m: {**real(m), "new_option": 1})
    assert [s.key for s in plan(suite)] == keys


def test_setup_fits_scales_without_the_whole_float_copy(tiny_data, monkeypatch):
    # 35ed042's check that the split has images read `hasattr(train_set, "images")` first:
    # the property builds the split's whole float32 copy (4x a uint8 cache), which the
    # chunked `pixel_columns` path right below exists to avoid
    from causalign.data.format import LesionDataset
    from causalign.methods import build_method
    from causalign.models import build_model

    calls = []
    real = LesionDataset.images

    def images(self):
        calls.append(1)
        return real.fget(self)

    monkeypatch.setattr(LesionDataset, "images", property(images))
    ds = LesionDataset(tiny_data, "train")
    method = build_method("causal-align", {"distance": "scaled-l1"})
    method.setup(ds, build_model("cnn7", in_channels=1, num_outputs=2))
    assert method.scale is not None
    assert calls == []
