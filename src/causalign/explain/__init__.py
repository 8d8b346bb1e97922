"""Explainers with one API: `get_explainer(name, model).attribute(x, target=...)`."""

from .base import Explainer, explainer_names, get_explainer, register_explainer, saliency_map

__all__ = ["Explainer", "explainer_names", "get_explainer", "register_explainer", "saliency_map"]
