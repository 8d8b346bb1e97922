"""The counterfactual change as a saliency map, behind the same Captum-style interface as the
other explainers:

    maps = CounterfactualSaliency(model).attribute(images, target=labels)   # (N, C, *spatial)

The map is |x0 − x*|, where x* = argmin CE(f(x), y*) + α·d(x, x0) and y* is the class the
target is turned into (binary: the other class; multi-class: the most likely class other than
the target), i.e. where the image must change to stop being the target class (paper 000,
Fig. 9). ``signed=True`` returns x0 − x* instead: positive where the pixel's current value
supports the target against y*, the sign convention of a gradient map. The search is
`CounterfactualGenerator`'s (its settings are this explainer's keyword arguments), so these
maps are what causal-align's alignment term and `causalign counterfactual` measure.

Unlike gradient maps this one is a search result, not a function of the weights that autograd
can follow: ``create_graph=True`` is refused. ``flipped`` holds, after each call, which
samples' x* reached y* (a map whose search did not flip the prediction shows where the change
went, not what suffices), and ``diverged`` which searches diverged (their maps are zero; the
first call with one warns, later calls do not, so a command warns once, not once per batch).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..errors import InputError
from .base import Explainer, Target, check_inputs, register_explainer, shape_errors
from .counterfactual import CounterfactualGenerator


class CounterfactualDivergedWarning(UserWarning, RuntimeWarning):
    """Some counterfactual searches diverged. A UserWarning, so the command line prints it as
    causalign's other warnings (one `warning: …` line), and a RuntimeWarning, as it was."""


@register_explainer("counterfactual")
class CounterfactualSaliency(Explainer):
    """|x0 − x*| (or x0 − x* with ``signed``): the change a counterfactual search makes to
    move each input from ``target`` to another class. Keyword arguments go to
    `CounterfactualGenerator` (alpha, steps, lr, distance, scale, optimizer, space,
    autoencoder, polish, ...); its target rule is fixed to "other"."""

    def __init__(self, model: nn.Module, *, signed: bool = False, **search: object) -> None:
        super().__init__(model)
        if "target_rule" in search or "warm_start" in search:
            key = "target_rule" if "target_rule" in search else "warm_start"
            raise InputError(f"CounterfactualSaliency sets {key} itself (the explained class "
                             f"is `target`; maps are not cached between calls)")
        self.signed = bool(signed)
        self.generator = CounterfactualGenerator(model, target_rule="other", **search)
        self.flipped: Tensor | None = None
        # which samples' searches diverged, after each call; said once per explainer
        # (`evaluate` and `explain` call once per batch: one warning each, counts differing)
        self.diverged: Tensor | None = None
        self._warned_diverged = False

    def attribute(self, inputs: Tensor, target: Target = None,
                  create_graph: bool = False) -> Tensor:
        if create_graph:
            raise InputError("the counterfactual map is the result of a search, not "
                             "differentiable in the model's weights; create_graph=True needs "
                             "a gradient map (wbp, gradient, input-x-gradient)")
        check_inputs(inputs, target, self.model)
        with shape_errors(self.model, inputs, self.name):
            target = self._target(inputs, target)
        # labels = the explained class; the "other" rule turns each into y* != target
        result = self.generator.generate(inputs, labels=target, report=True)
        self.flipped = result.flipped
        self.diverged = result.diverged
        n_diverged = int(result.diverged.sum())
        if n_diverged and not self._warned_diverged:
            self._warned_diverged = True
            # x* was reset to x0: an all-zero map, not a NaN one
            warnings.warn(f"{n_diverged} of {len(inputs)} counterfactual searches diverged "
                          f"(NaN/inf); their maps are zero (said once per explainer; "
                          f"`.diverged` marks them after every call)",
                          CounterfactualDivergedWarning, stacklevel=2)
        change = inputs.detach() - result.x_star
        return change if self.signed else change.abs()
