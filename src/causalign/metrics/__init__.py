"""Metrics: classification (with calibration and bootstrap intervals), paired tests of two
models (DeLong, McNemar), localisation of saliency, deletion faithfulness."""

from .calibration import apply_temperature, fit_temperature
from .classification import (
    BOOTSTRAP_METRICS,
    ECE_BINS,
    PAIRED_BOOTSTRAP_METRICS,
    bootstrap_ci,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    paired_bootstrap_ci,
    reliability_bins,
)
from .faithfulness import DELETION_FRACTIONS, deletion_scores
from .localization import cam_precision, iou_dice, mass_in_mask, normalize_maps, rank_accuracy
from .paired import (
    MCNEMAR_EXACT_BELOW,
    delong_test,
    holm_adjust,
    mcnemar_test,
    paired_operating_point,
    paired_operating_point_ci,
)
from .roc import roc_at, roc_band

__all__ = ["classification_metrics", "brier_score", "expected_calibration_error",
           "bootstrap_ci", "BOOTSTRAP_METRICS", "paired_bootstrap_ci", "PAIRED_BOOTSTRAP_METRICS",
           "ECE_BINS", "deletion_scores",
           "DELETION_FRACTIONS", "cam_precision", "mass_in_mask", "iou_dice", "normalize_maps",
           "rank_accuracy", "delong_test", "holm_adjust", "mcnemar_test", "MCNEMAR_EXACT_BELOW",
           "paired_operating_point", "paired_operating_point_ci", "roc_at", "roc_band",
           "reliability_bins", "fit_temperature", "apply_temperature"]
