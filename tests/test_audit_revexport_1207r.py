"""`causalign export` reviewed as a deployer would use the program: what it accepts (batch
sizes of a multi-view volume run, the oracle's masked input) and what its record says."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import _train  # a 1-epoch width-4 run

from causalign.data.synth import SynthConfig, generate
from causalign.engine.export import export_run
from causalign.engine.trainer import load_run


def _load(path):  # the ExportedProgram itself (test_export's gives its module)
    extra = {"causalign.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra["causalign.json"])


def test_a_multiview_program_takes_more_than_4096_volumes(tmp_path):
    """Regression: the multi-view model's inference chunking (`n > per`, per =
    infer_floats // (D·H·W·width)) was traced as a guard, so the program refused batches
    above 4096 ("Guard failed: x.size()[0] <= 4096", for 32 px, width 8; 8192 for width 4)
    although README promises any batch size and the eager model takes them. Now the batch
    axis has no upper bound and a batch of 4097 gives the eager model's logits."""
    data = tmp_path / "vol"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, depth=4, seed=3))
    run = _train(data, tmp_path / "mv", model="multiview", batch_size=8)
    export_run(run, tmp_path / "mv.pt2")
    program, _ = _load(tmp_path / "mv.pt2")
    batch = program.module().graph.find_nodes(op="placeholder")[-1].meta["val"].shape[0]
    # no upper bound on the batch symbol (it was 8192 for this run)
    upper = program.range_constraints[batch.node.expr].upper
    assert upper > 10 ** 9, upper
    _, model, _, _ = load_run(run, device="cpu")
    x = torch.rand(4097, 1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("region", ["mask", "box"])
def test_an_oracle_program_record_says_which_masking_it_expects(tiny_data, tmp_path, region):
    """Regression: an oracle run's record (and warning) said only "images masked to their
    annotated lesion region": not whether the mask or the box, nor what a sample without a
    pixel mask or without any annotation gets. The program takes `Oracle.model_input`'s
    x·m; the note now names the run's region and the fallbacks."""
    run = _train(tiny_data, tmp_path / "or", method="oracle",
                 method_args={"region": region})
    with pytest.warns(UserWarning, match="oracle"):
        export_run(run, tmp_path / "or.pt2")
    _, rec = _load(tmp_path / "or.pt2")
    note = rec["input_note"]
    if region == "mask":
        assert "0/1 lesion mask" in note and "box where a sample has no mask" in note
    else:
        assert "0/1 lesion box" in note and "mask" not in note.replace("masked", "")
    assert "whole image where nothing is annotated" in note
