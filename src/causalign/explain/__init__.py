"""Explainers with one API: `get_explainer(name, model).attribute(x, target=...)`, and the
counterfactual generator x* = argmin CE(f(x), y*) + α·d(x, x0) (`CounterfactualGenerator`)."""

from .base import Explainer, explainer_names, get_explainer, register_explainer, saliency_map
from .counterfactual import CounterfactualGenerator, CounterfactualResult

__all__ = ["CounterfactualGenerator", "CounterfactualResult", "Explainer", "explainer_names",
           "get_explainer", "register_explainer", "saliency_map"]
