"""Causal attribution (CCCE) of attributes to labels and the PC-algorithm graph check."""

from .ccce import (
    CCCEResult,
    MonotoneLogistic,
    SmoothedFrequency,
    attribution_report,
    causal_attribution,
    ccce_scores,
    fit_label_model,
    subsets,
)

__all__ = ["CCCEResult", "MonotoneLogistic", "SmoothedFrequency", "attribution_report",
           "causal_attribution", "ccce_scores", "fit_label_model", "subsets"]
