"""hier-align's image-level warm start (Eq. 7) and the solver state kept with its cache."""

from __future__ import annotations

import torch
from test_hier_align import INFO, P, _batch

from causalign.engine.config import TrainConfig
from causalign.methods import build_method
from causalign.methods.hier_align import HierAlign

FAST = dict(steps=2, attr_steps=5, cg_iters=3)


def test_state_dict_keeps_each_levels_damping() -> None:
    # Both levels raise their CG damping on negative curvature and keep it for later steps;
    # the checkpoint dropped it, so a resumed run restarted both at method.damping.
    method = HierAlign()
    method.pixel.damping, method.attr.damping = 0.1, 1.0
    again = HierAlign()
    again.load_state_dict(method.state_dict())
    assert (again.pixel.damping, again.attr.damping) == (0.1, 1.0)
    # a checkpoint written before the damping was stored: the configured damping
    old = {k: v for k, v in method.state_dict().items() if "damping" not in k}
    again.load_state_dict(old)
    assert again.pixel.damping == again.attr.damping == method.params.damping


def test_image_warm_start_is_keyed_by_the_aligned_rows_dataset_index() -> None:
    # Measured (report of helper hierwarm): the cached offsets are put and got for the same
    # samples; the attribute level (Eq. 6) never caches. Batches in another order, with only
    # some masks, must warm-start every sample from its own offset.
    method = build_method("hier-align", dict(FAST))
    torch.manual_seed(0)
    model = method.build_model(TrainConfig(width=4), INFO)
    b = _batch(4)
    b["index"] = torch.tensor([7, 2, 9, 4])  # dataset indices in a shuffled order
    b["has_mask"][1] = False  # sample 2: no mask, so no image-level search
    method.loss(model, b)
    cache = method.pixel.cache
    assert cache.cached_ids().tolist() == [4, 7, 9]
    assert len(method.attr.cache) == 0
    x = method.model_input(b)
    a_star = torch.rand(4, P)
    stored, _ = cache.get(torch.tensor([9, 4]), x[[2, 3]])
    res = method.image_counterfactual(model, x[[2, 3]], a_star[[2, 3]], torch.tensor([9, 4]))
    assert res.warm.all()
    # the offsets now held are this search's, for the same rows
    now, hit = cache.get(torch.tensor([4, 9]), x[[3, 2]])
    assert hit.all()
    torch.testing.assert_close(now, (res.u_star - x[[2, 3]])[[1, 0]])
    assert not torch.equal(now, stored[[1, 0]])


def test_hier_aligns_failure_counters_are_warned_like_causal_aligns():
    """hier-align reports its failed solves per level (train_img_cg_dropped, …); only
    causal-align's column names were checked, so an image level whose CG dropped every
    sample (e.g. method.cg_iters=3) trained without its alignment gradient and no warning."""
    from causalign.engine.trainer import numerical_trouble

    history = [{"epoch": 1, "train_img_cg_dropped": 1.0, "train_attr_cg_dropped": 0.0,
                "train_attr_cf_diverged": 0.75, "train_img_cf_diverged": ""},
               {"epoch": 2, "train_img_cg_dropped": 0.2, "train_attr_cf_diverged": 0.0}]
    lines = numerical_trouble(history)
    assert [ln.split(" ", 1)[0] for ln in lines] == ["train_img_cg_dropped",
                                                      "train_attr_cf_diverged"]
    assert lines[0].startswith("train_img_cg_dropped >= 0.5 in 1 of 2 epoch(s) (worst 1.00)")
    assert "method.cg_iters" in lines[0]


def test_data_parallel_merge_keeps_the_largest_damping_of_each_level():
    """Both levels' damping is method state now; the per-epoch merge took the largest only
    for the key named "damping", so hier-align's attr_damping came from rank 0 alone."""
    from causalign.engine.distributed import merge_method_states

    s0 = {"damping": 0.01, "attr_damping": 0.01, "step": 4}
    s1 = {"damping": 0.1, "attr_damping": 1.0, "step": 3}
    merged = merge_method_states([s0, s1], [torch.tensor([0]), torch.tensor([1])])
    assert merged == {"damping": 0.1, "attr_damping": 1.0, "step": 4}
