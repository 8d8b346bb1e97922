"""The warm-start cache of causal-align / hier-align (`WarmStartCache`): compact rows, the
same offsets as a plain per-id store, and `method.cache_device`."""

from __future__ import annotations

import pytest
import torch

from causalign.errors import ConfigError
from causalign.explain.counterfactual import WarmStartCache
from causalign.methods import build_method


def _play(cache: WarmStartCache, steps: int, seed: int, n_ids: int = 120) -> dict:
    """Random puts (some samples forgotten) and gets, each get checked against a dict."""
    g = torch.Generator().manual_seed(seed)
    ref: dict[int, torch.Tensor] = {}
    for step in range(steps):
        n = int(torch.randint(1, 9, (1,), generator=g))
        ids = torch.randperm(n_ids, generator=g)[:n]
        if step % 2:
            off = torch.randn(n, 1, 3, 3, generator=g)
            keep = torch.rand(n, generator=g) > 0.3
            cache.put(ids, off, keep)
            for i, o, k in zip(ids.tolist(), off, keep.tolist(), strict=True):
                if k:
                    ref[i] = o.clone()
                else:
                    ref.pop(i, None)
        else:
            got, hit = cache.get(ids, torch.zeros(n, 1, 3, 3))
            assert hit.tolist() == [i in ref for i in ids.tolist()]
            for i, o, h in zip(ids.tolist(), got, hit.tolist(), strict=True):
                assert torch.equal(o, ref[i] if h else torch.zeros(1, 3, 3))
    return ref


@pytest.mark.parametrize("capacity", [None, 50, 200])
def test_cache_hands_back_exactly_what_was_stored_and_checkpoints_it_by_id(capacity):
    cache = WarmStartCache(capacity)
    ref = _play(cache, 300, seed=capacity or 0)
    assert len(cache) == len(ref)
    state = cache.state_dict()
    assert state["ids"].tolist() == sorted(ref)  # ascending ids, as checkpoints had them
    for i, off in zip(state["ids"].tolist(), state["offsets"], strict=True):
        assert torch.equal(off, ref[i])
    again = WarmStartCache()
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["offsets"], state["offsets"])
    assert torch.equal(again.get(state["ids"], state["offsets"])[0], state["offsets"])


def test_cache_holds_rows_for_the_samples_it_stored_not_for_every_id_up_to_the_largest():
    """A split where one image in ten has a mask: the dense table held a row for every id
    up to the largest (10000 rows here for 1000 samples)."""
    cache = WarmStartCache(capacity=10_000)
    like = torch.zeros(8, 1, 16, 16)
    for ids in torch.arange(0, 10_000, 10).split(8):
        cache.put(ids, torch.randn(len(ids), 1, 16, 16), torch.ones(len(ids), dtype=torch.bool))
    assert len(cache) == 1000
    row_bytes = like[0].numel() * like.element_size()
    assert cache.offsets.shape[0] <= 1024
    # offsets of ≤ 1024 samples plus an 8-byte id table entry per id of the split
    assert cache.nbytes <= 1024 * (row_bytes + 1 + 8) + 10_000 * 8
    assert cache.nbytes < 0.15 * 10_000 * row_bytes


def test_cache_device_setting_is_checked_and_reaches_the_cache():
    method = build_method("causal-align", {"cache_device": "cpu"})
    assert method.cache.device == torch.device("cpu")
    assert build_method("causal-align", {}).cache.device is None
    hier = build_method("hier-align", {"cache_device": "cpu"})
    assert hier.pixel.cache.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="method.cache_device must be model or cpu, got 'gpu'"):
        build_method("causal-align", {"cache_device": "gpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_cache_serves_cuda_searches_with_the_same_offsets():
    on_gpu, on_host = WarmStartCache(), WarmStartCache(device="cpu")
    ids = torch.tensor([3, 1, 4], device="cuda")
    off = torch.randn(3, 1, 4, 4, device="cuda")
    for cache in (on_gpu, on_host):
        cache.put(ids, off, torch.ones(3, dtype=torch.bool, device="cuda"))
    assert on_host.offsets.device.type == "cpu" and on_gpu.offsets.device.type == "cuda"
    got_gpu, hit_gpu = on_gpu.get(ids, off)
    got_host, hit_host = on_host.get(ids, off)
    assert got_host.device == off.device and hit_host.device == off.device
    assert torch.equal(got_gpu, got_host) and torch.equal(hit_gpu, hit_host)
