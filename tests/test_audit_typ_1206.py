"""Audit (static typing and API signatures, 2026-12-06): regression tests."""

from __future__ import annotations

from causalign.explain.counterfactual_export import attribute_change_rates


def test_attribute_change_rate_names_with_spaces() -> None:
    # attribute names may hold spaces (dataset.yaml only strips them); the rate was read
    # off the first word of "<name> <before>→<after>", crediting "bill shape" to "bill"
    recs = [{"attributes_changed": ["bill shape 0.91→0.12"]}, {"attributes_changed": []}]
    rates = attribute_change_rates(recs, ["bill", "bill shape", "wing"])
    assert rates["attribute_change_rate"] == {"bill": 0.0, "bill shape": 0.5, "wing": 0.0}
