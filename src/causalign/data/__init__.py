"""Data: the on-disk dataset format, the synthetic lesion benchmark, importers."""

from .format import DatasetMeta, DatasetWriter, LesionDataset, dataset_summary, read_meta
from .synth import SynthConfig, generate

__all__ = ["DatasetMeta", "DatasetWriter", "LesionDataset", "dataset_summary", "read_meta",
           "SynthConfig", "generate"]
