"""Engine: config, trainer, checkpoints, evaluation."""

from .config import TrainConfig, apply_overrides, parse_set
from .evaluate import evaluate_split, iterate_batches, quick_metrics
from .export import export_run
from .inference import Predictions, predict_images
from .trainer import Trainer, load_run, train

__all__ = ["TrainConfig", "apply_overrides", "parse_set", "evaluate_split", "iterate_batches",
           "quick_metrics", "Trainer", "load_run", "train", "export_run", "Predictions",
           "predict_images"]
