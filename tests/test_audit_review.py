"""Review of 8c77963..ac43c68 (helper audit): regressions found and fixed.

* data-parallel training weighted a logged subset mean named in `LossOutput.part_weights`
  (causal-align's align, hier-align's img_/attr_align) by the global batch size in
  history.csv, while one process weights it by the subset's size: the two disagreed;
* `implicit_argmin` refused params that are sibling outputs of one autograd node
  (``a, b = theta.unbind(0)``; ``c = b * 2`` taken for "computed from a");
* a folder CSV image whose rows give a mask for one lesion and only a box for another was
  stored with the box of the box-only row alone: the masked lesion lay outside the box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from test_distributed import rendezvous  # the same rendezvous helper
from test_distributed_methods import _history
from torch import nn

from causalign.data.format import LesionDataset
from causalign.data.importers import run_import
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, Trainer
from causalign.implicit import implicit_argmin
from causalign.methods.base import LossOutput, method_class, register_method

# ----------------------------------------------------------------- implicit_argmin siblings


def test_sibling_outputs_of_one_node_are_not_nested_params():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    a, b = theta.unbind(0)  # one UnbindBackward node, two outputs
    c = b * 2.0  # computed from b, not from a

    def inner(x):  # x* = a + c
        return (0.5 * (x - a - c) ** 2).sum()

    x_star = implicit_argmin(inner, (a + c).detach().view(1, 1), [a, c])
    x_star.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([1.0, 2.0]))
    # a param really computed from another one is still refused
    with pytest.raises(ValueError, match="computed from params"):
        implicit_argmin(inner, torch.zeros(1, 1), [a, a * 2.0])


# ----------------------------------------------------------------- folder CSV merge


def test_merged_rows_with_a_mask_and_a_box_store_a_box_holding_both(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c in "ab":
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(
                src / c / f"img_{i}.png")
    m = np.zeros((16, 16), np.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m).save(src / "m0.png")
    rows = "".join(f"{c}/img_{i}.png,{c},m0.png,,,,\n{c}/img_{i}.png,{c},,10,10,14,14\n"
                   for c in "ab" for i in range(4))
    (src / "list.csv").write_text("image,label,mask,box_x0,box_y0,box_x1,box_y1\n" + rows)
    run_import("folder", src, tmp_path / "out", {"size": 16, "csv": "list.csv"})
    ds = LesionDataset(tmp_path / "out", "train")
    assert len(ds) > 0
    for i in range(len(ds)):
        d = ds[i]
        mask, box = d["mask"][0].bool(), d["box_mask"][0].bool()
        assert int(mask.sum()) == 16
        assert not bool((mask & ~box).any())  # the masked lesion is inside the box
        assert bool(box[10:14, 10:14].all())  # and so is the box-only one


# ----------------------------------------------------------------- data-parallel shares


class _Tiny(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _register() -> None:
    from causalign.methods.base import _METHODS

    if "audit-subset-mean" in _METHODS:
        return

    class SubsetMean(method_class("erm")):
        """CE, plus a logged mean over the label-1 samples (a subset of the batch, as
        causal-align's align over its aligned samples), weighted by that subset's size."""

        def build_model(self, cfg, info):
            torch.manual_seed(cfg.seed)
            return _Tiny(info.in_channels, info.num_classes)

        def loss(self, model, batch):
            ce = F.cross_entropy(model(batch["image"]), batch["label"])
            sel = batch["label"] == 1
            k = int(sel.sum())
            parts = {"ce": float(ce.detach()), "n_sel": float(k)}
            if k == 0:
                return LossOutput(ce, parts, means={"sel_mean": (ce * 0.0, 0)})
            value = batch["image"].flatten(1).mean(1)[sel].mean() * 100.0
            parts["sel_mean"] = float(value)
            return LossOutput(ce, parts, means={"sel_mean": (ce * 0.0, k)},
                              part_weights={"sel_mean": k})

    SubsetMean.subset_means = True
    register_method("audit-subset-mean")(SubsetMean)


def _cfg() -> TrainConfig:
    return TrainConfig(method="audit-subset-mean", epochs=1, batch_size=5, seed=0,
                       device="cpu", threads=1, eval_saliency="gradient",
                       deletion_fractions=[0.1])


def _worker(rank: int, world: int, store: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    _register()
    dist.init_process_group("gloo", init_method=store, rank=rank,
                            world_size=world)
    try:
        Trainer(data, _cfg(), out, progress=False).fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore")
def test_data_parallel_subset_mean_is_weighted_as_in_one_process(tmp_path):
    data = tmp_path / "data"
    # 11 samples, global batch 5: chunks 3+2, 3+2, 1+0
    generate(data, SynthConfig(n_train=11, n_val=4, n_test=4, size=32, seed=3))
    _register()
    Trainer(data, _cfg(), tmp_path / "single", progress=False).fit()
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, rendezvous(tmp_path), str(data), str(tmp_path / "ddp")),
                       nprocs=2, join=True, start_method="fork")
    single, ddp = _history(tmp_path / "single"), _history(tmp_path / "ddp")
    for rs, rd in zip(single, ddp, strict=True):
        assert float(rd["train_sel_mean"]) == pytest.approx(float(rs["train_sel_mean"]),
                                                            rel=1e-5)


def _csv_tree(src: Path, n: int = 10) -> None:
    rng = np.random.default_rng(0)
    for c in "ab":
        (src / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(
                src / c / f"img_{i}.png")


def test_merged_rows_take_a_split_given_on_one_row_only(tmp_path):
    from causalign.data.format import read_manifest

    src = tmp_path / "src"
    _csv_tree(src, 6)
    rows = "".join(f"{c}/img_{i}.png,{c},\n" for c in "ab" for i in range(6))
    rows += "a/img_0.png,a,train\n"  # a 2nd lesion row of img_0, its split filled in
    (src / "list.csv").write_text("image,label,split\n" + rows)
    s = run_import("folder", src, tmp_path / "out", {"size": 16, "csv": "list.csv"})
    assert s["skipped"]["n"] == 0  # the image was dropped: "different splits"
    recs = read_manifest(tmp_path / "out")
    assert len(recs) == 12
    assert [r.split for r in recs if r.label == 0 and r.id.endswith("img_0")] == ["train"]


@pytest.mark.parametrize("seed", range(4))
def test_merged_rows_keep_the_group_given_on_one_row_only(tmp_path, seed):
    from causalign.data.format import read_manifest

    src = tmp_path / "src"
    _csv_tree(src)
    # patient P: a/img_0..4; img_0's first row leaves the group empty, its second names P
    rows = "a/img_0.png,a,\na/img_0.png,a,P\n"
    rows += "".join(f"a/img_{i}.png,a,P\n" for i in range(1, 5))
    rows += "".join(f"a/img_{i}.png,a,Q{i}\n" for i in range(5, 10))
    rows += "".join(f"b/img_{i}.png,b,R{i}\n" for i in range(10))
    (src / "list.csv").write_text("image,label,group\n" + rows)
    run_import("folder", src, tmp_path / "out", {"size": 16, "csv": "list.csv", "seed": seed})
    split = {r.id: r.split for r in read_manifest(tmp_path / "out") if r.label == 0}
    patient = {v for k, v in split.items() if any(k.endswith(f"img_{i}") for i in range(5))}
    assert len(patient) == 1  # a group never straddles two splits
