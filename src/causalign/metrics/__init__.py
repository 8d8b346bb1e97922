"""Metrics: classification, localisation of saliency, deletion faithfulness."""

from .classification import classification_metrics
from .faithfulness import DELETION_FRACTIONS, deletion_scores
from .localization import cam_precision, iou_dice, mass_in_mask, normalize_maps, rank_accuracy

__all__ = ["classification_metrics", "deletion_scores", "DELETION_FRACTIONS", "cam_precision",
           "mass_in_mask", "iou_dice", "normalize_maps", "rank_accuracy"]
