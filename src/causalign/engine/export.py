"""Export a run's classifier for deployment: a `torch.export` program (`.pt2`).

The program is the run's best model in eval mode, logits out, with a dynamic batch axis (and
a dynamic depth for volume runs), saved with `torch.export.save` together with what a
deployment needs to feed it: the run's `config.yaml` and a `causalign.json` record (classes,
the image shape and intensity range it was trained on, method, model, weights). It runs
without causalign installed:

    extra = {"causalign.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    logits = program.module()(images)  # (N, C, H, W) float32, as the run's dataset holds them

Before saving, the program's logits are compared with the eager model's on random inputs of
two batch sizes: an export that traced something else is refused, not written.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CausalignError
from ..io import atomic_write_file
from .trainer import load_run, read_run_config

# |Δ logit| between the exported program and the eager model above which the export is
# refused: both run the same float32 kernels, measured 0.0 for cnn7, resnet18, vgg11,
# bagnet17 and multiview
EXPORT_TOLERANCE = 1e-4


def export_run(run: str | Path, out: str | Path, data: str | Path | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Export ``run``'s best model to ``out`` (written atomically) and return the record
    saved with it, plus ``max_abs_diff``: the largest |Δ logit| to the eager model on the
    check inputs. ``data``: the dataset, when the run's has moved (as for `load_run`)."""
    run, out = Path(run), Path(out)
    cfg, model, method, _data_path = load_run(run, device="cpu", data=data)
    raw = read_run_config(run)
    shape = raw.get("data_image_shape")
    if not (isinstance(shape, list) and len(shape) in (3, 4)
            and all(isinstance(v, int) and v > 0 for v in shape)):
        raise CausalignError(f"{run / 'config.yaml'}: records no image shape "
                             f"(data_image_shape; a run trained before it was recorded); "
                             f"train it again to export it")
    note = None
    if cfg.method == "oracle":  # `Oracle.model_input`: the images it was trained on
        # which region and fallbacks: "masked to their lesion region" left a deployer to
        # guess the mask or the box, and what an unannotated image gets
        region = ("0/1 lesion box (" if method.params.region == "box" else
                  "0/1 lesion mask (the lesion's box where a sample has no mask, ")
        region += "the whole image where nothing is annotated)"
        note = (f"the oracle's model was trained on images multiplied by their {region}; "
                f"the program expects such images (x·m, as `Oracle.model_input`)")
        warnings.warn(f"{run}: {note}", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *shape, generator=gen)
    # AUTO, not Dim("batch", min=1): the multi-view model's slice pooling bounds the batch
    # (and depth) axes, and export refused the open range ("Constraints violated")
    dims: dict[int, Any] = {0: torch.export.Dim.AUTO}
    if len(shape) == 4:  # a volume's depth may differ from the training volumes'
        dims[2] = torch.export.Dim.AUTO
    try:
        with warnings.catch_warnings():
            # the multi-view model keeps its last forward's slice attention as attributes
            # for the explainers; not part of the program, and torch warns of them
            warnings.filterwarnings("ignore", message="The tensor attributes .* were "
                                                      "assigned during export")
            program = torch.export.export(model, (example,), dynamic_shapes=(dims,))
    except Exception as exc:  # a model torch.export cannot trace: one line, not torch's page
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CausalignError(f"{run}: torch.export could not trace {type(model).__name__} "
                             f"({type(exc).__name__}: {first})") from exc
    diff = 0.0
    exported = program.module()
    checks = [(n, *shape) for n in (1, 3)]  # other batch sizes than the example's
    if len(shape) == 4:  # and other depths
        checks += [(2, shape[0], depth, *shape[2:]) for depth in (1, shape[1] + 2)]
    with torch.no_grad():
        for check in checks:
            x = torch.randn(*check, generator=gen)
            try:
                d = float((exported(x) - model(x)).abs().max())
                # NaN kept: max(0.0, nan) is 0.0, and a program whose logits were NaN
                # passed the tolerance check with max_abs_diff 0
                diff = d if math.isnan(d) or math.isnan(diff) else max(diff, d)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CausalignError(f"{run}: the exported program does not take inputs of "
                                     f"shape {tuple(check)} ({type(exc).__name__}: {first}); "
                                     f"not written") from exc
    if not diff <= EXPORT_TOLERANCE:
        raise CausalignError(f"{run}: the exported program's logits differ from the model's "
                             f"by {diff:.3g} (more than {EXPORT_TOLERANCE}); not written")
    record = {
        "format": "torch.export",
        "torch_version": torch.__version__,
        "run": str(run),
        "method": cfg.method,
        "model": cfg.model,
        "model_class": type(model).__name__,
        "input_shape": ["batch", *shape] if len(shape) == 3
        else ["batch", shape[0], "depth", *shape[2:]],
        "input_dtype": "float32",
        "outputs": "logits (softmax gives the class probabilities)",
        **({"input_note": note} if note else {}),
        "classes": raw.get("data_classes"),
        "data_intensity": raw.get("data_intensity"),
        # how raw 12/16-bit or HU files were mapped into that range (`causalign predict`
        # applies it; None: 8-bit or synthetic data, value / 255)
        "data_intensity_scale": raw.get("data_intensity_scale"),
        **getattr(model, "causalign_weights", {}),
    }
    config_text = (run / "config.yaml").read_text(encoding="utf-8")

    def write(fh: Any) -> None:
        buffer = io.BytesIO()  # torch.export.save wants a seekable file; the rename is ours
        torch.export.save(program, buffer, extra_files={
            "causalign.json": json.dumps(record, indent=1), "config.yaml": config_text})
        fh.write(buffer.getvalue())

    atomic_write_file(out, write)
    return {**record, "max_abs_diff": diff, "out": str(out)}
