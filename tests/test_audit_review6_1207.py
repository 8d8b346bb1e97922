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
