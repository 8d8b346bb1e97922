"""Explainers with one API: `get_explainer(name, model).attribute(x, target=...)`, and the
counterfactual generator x* = argmin CE(f(x), y*) + α·d(x, x0) (`CounterfactualGenerator`)."""

from .base import Explainer, explainer_names, get_explainer, register_explainer, saliency_map
from .counterfactual import CounterfactualGenerator, CounterfactualResult
from .counterfactual_map import CounterfactualSaliency

__all__ = ["CounterfactualGenerator", "CounterfactualResult", "CounterfactualSaliency",
           "Explainer", "explainer_names", "get_explainer", "register_explainer", "saliency_map"]
