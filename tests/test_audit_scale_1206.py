"""Scale audit: start-up passes over the whole training split (per-pixel scales, ...) must not
build the split as float32/float64 at once, and must give the numbers they gave before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset
from causalign.explain import counterfactual as cf


def _write(root, images, masks=True) -> LesionDataset:
    w = DatasetWriter(root, DatasetMeta("t", ["a", "b"]), image_format="npy")
    for k, img in enumerate(images):
        m = np.zeros(img.shape[-2:], np.uint8)
        m[1:3, 1:3] = 1
        w.add(img, label=k % 2, split="train", mask=m if masks else None)
    w.add(images[0], label=0, split="val")
    w.close()
    return LesionDataset(root, "train")


def _count_images_accesses(monkeypatch) -> list[str]:
    """`LesionDataset.images` (the whole split as float32) patched to record each access
    (the split's name) in the returned list."""
    calls: list[str] = []
    whole = LesionDataset.images

    def counted(self):
        calls.append(self.split)
        return whole.fget(self)

    monkeypatch.setattr(LesionDataset, "images", property(counted))
    return calls


def _images(kind: str, n: int, rng) -> list[np.ndarray]:
    shape = (n, 3, 5, 7)
    if kind == "uint8":
        a = rng.integers(0, 256, shape).astype(np.uint8)
        a[0, 0, 0, :2] = (0, 255)  # both ends of the range
        a[:, 0, 1, 1] = 7  # a constant pixel: MAD 0, floored
        return list(a)
    if kind == "uint16":
        return list(rng.integers(0, 65536, shape).astype(np.uint16))
    return list(rng.random(shape, dtype=np.float32))


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("n", [1, 2, 9, 10])
@pytest.mark.parametrize("distance", ["scaled-l1", "scaled-l2"])
def test_distance_scale_of_a_split_equals_that_of_its_float_images(tmp_path, monkeypatch, kind,
                                                                   n, distance):
    """A split read chunk by chunk (8-bit: by level counts) gives the scale of its whole
    `.images`, bit for bit, in chunks of a few columns too."""
    ds = _write(tmp_path / "d", _images(kind, n, np.random.default_rng(n)))
    assert ds.stored_dtype == np.dtype(kind)
    want = cf.distance_scale(ds.images, distance)
    if distance == "scaled-l1":  # std over few columns may round otherwise (a last-bit change)
        monkeypatch.setattr(cf, "_SCALE_MIN_COLUMNS", 1)
        monkeypatch.setattr(cf, "_SCALE_CHUNK_VALUES", 4 * n)  # 4 of the 105 columns at once
    got = cf.distance_scale(ds, distance)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (3, 5, 7)
    assert torch.equal(got, want)


def test_mad_of_8bit_levels_equals_the_sorted_median_on_every_level():
    """`_mad_uint8` against `_median0` on columns that hold all 256 levels, ties and
    even/odd counts."""
    g = torch.Generator().manual_seed(0)
    for n in (255, 256, 257, 4):
        u = torch.randint(0, 256, (n, 64), dtype=torch.uint8, generator=g)
        u[:, 0] = torch.arange(n) % 256
        u[:, 1] = 200
        x = (u.to(torch.float32) / 255.0).double()
        want = cf._median0((x - cf._median0(x)).abs())
        assert torch.equal(cf._mad_uint8(u), want)


def test_distance_scale_tensor_counts_every_nan_across_chunks(monkeypatch):
    monkeypatch.setattr(cf, "_SCALE_MIN_COLUMNS", 1)
    monkeypatch.setattr(cf, "_SCALE_CHUNK_VALUES", 4)
    x = torch.rand(4, 1, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    with pytest.raises(Exception, match="2 NaN/inf"):
        cf.distance_scale(x, "scaled-l1")


def test_causal_align_setup_never_builds_the_whole_split_as_floats(tmp_path, monkeypatch):
    """setup() of a scaled distance took `train_set.images` (4x the uint8 cache) and then
    float64 copies of it and the median's (3.9 GB peak for 5000 gray 128 px images, from
    a 1.0 GB run); the scale now comes from the cache chunk by chunk, the same numbers."""
    from causalign.methods.base import build_method
    from causalign.models.cnn import SevenLayerCNN

    ds = _write(tmp_path / "d", _images("uint8", 6, np.random.default_rng(0)))
    want = cf.distance_scale(ds.images, "scaled-l1")
    calls = _count_images_accesses(monkeypatch)
    method = build_method("causal-align", {"distance": "scaled-l1"})
    method.setup(ds, SevenLayerCNN(in_channels=3, num_outputs=2, width=4))
    assert calls == [] and torch.equal(method.scale, want)


def test_pixel_columns_are_copies(tmp_path):
    """Editing the columns leaves the cache (and later batches) as they were."""
    ds = _write(tmp_path / "d", _images("float32", 3, np.random.default_rng(1)))
    before = ds.images
    for stored in (False, True):
        cols = ds.pixel_columns(0, 10, stored=stored)
        assert cols.shape == (3, 10)
        cols.zero_()
    assert torch.equal(ds.images, before)


def test_warm_start_cache_state_dict_holds_the_rows_once(monkeypatch):
    """state_dict gathered the rows in chunks and then torch.cat them: the chunks and the
    result were two host copies of the cache (+537 MB at each checkpoint of a 313 MB
    cache). The rows now go straight into one tensor, in id order, as before."""
    cache = cf.WarmStartCache(capacity=600)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(600, generator=g)[:530]  # rows stored in another order than ids
    offsets = torch.rand(530, 1, 3, 4, generator=g)
    keep = torch.ones(530, dtype=torch.bool)
    keep[::7] = False
    cache.put(ids, offsets, keep)
    concatenated = []
    real_cat = torch.cat

    def spy(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        concatenated.append(out.numel())
        return out

    monkeypatch.setattr(torch, "cat", spy)
    state = cache.state_dict()
    monkeypatch.setattr(torch, "cat", real_cat)
    assert not any(n >= offsets[keep].numel() for n in concatenated)
    order = ids[keep].sort()
    assert torch.equal(state["ids"], order.values)
    assert torch.equal(state["offsets"], offsets[keep][order.indices])
    assert state["offsets"].is_contiguous() and state["offsets"].device.type == "cpu"
    # and a cache loaded from it hands the same offsets back
    again = cf.WarmStartCache()
    again.load_state_dict(state)
    got, hit = again.get(ids, offsets)
    assert torch.equal(hit, keep) and torch.equal(got[keep], offsets[keep])


def test_warm_start_cache_grows_without_a_zeros_block_and_a_concatenation(monkeypatch):
    """Doubling by torch.cat([rows, zeros]) held the old rows, the zeros and the result at
    once: 2x the cache (+521 MB for a 256 MB cache), 1.5x now; the rows survive growth."""
    real_cat = torch.cat
    big = []

    def spy(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        if out.dim() > 1:  # the offsets (rows, *sample shape); the id tables are 1-d
            big.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "cat", spy)
    cache = cf.WarmStartCache(capacity=40)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 1, 3, 3, generator=g) for _ in range(10)]
    for k, x in enumerate(batches):
        cache.put(torch.arange(4 * k, 4 * k + 4), x, torch.ones(4, dtype=torch.bool))
    monkeypatch.setattr(torch, "cat", real_cat)
    assert big == []
    assert cache.offsets.shape[0] == 40
    got, hit = cache.get(torch.arange(40), torch.zeros(40, 1, 3, 3))
    assert hit.all() and torch.equal(got, real_cat(batches))


def test_distance_scale_of_huge_finite_values_is_no_nan_error():
    """The NaN/inf count runs only where a chunk's sum is not finite; a sum that overflows
    on finite values must still give a scale, not a refusal."""
    x = torch.full((4, 1, 2, 2), 1e308, dtype=torch.float64)
    x[0] = -1e308
    s = cf.distance_scale(x, "scaled-l2")
    assert s.dtype == torch.float64 and torch.isfinite(s).all()


def test_loading_a_warm_start_cache_gathers_no_copy_of_its_rows(monkeypatch):
    """load_state_dict puts every row with keep all true: ``offsets[keep]`` copied the
    loaded cache once more (peak +519 MB resuming a 256 MB cache, +264 MB now)."""
    g = torch.Generator().manual_seed(0)
    state = {"ids": torch.arange(0, 60, 2), "offsets": torch.rand(30, 1, 3, 3, generator=g),
             "targets": torch.ones(30, dtype=torch.long)}
    gathered = []
    real = torch.Tensor.__getitem__

    def spy(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool and self.dim() > 1:
            gathered.append(tuple(self.shape))
        return real(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
    cache = cf.WarmStartCache(capacity=60)
    cache.load_state_dict(state)
    monkeypatch.setattr(torch.Tensor, "__getitem__", real)
    assert gathered == []
    got, hit = cache.get(state["ids"], state["offsets"], target=state["targets"])
    assert hit.all() and torch.equal(got, state["offsets"])
    # a put that drops rows still stores only the kept ones
    keep = torch.arange(30) % 3 != 0
    cache.put(state["ids"], state["offsets"] + 1, keep)
    got, hit = cache.get(state["ids"], state["offsets"])
    assert torch.equal(hit, keep) and torch.equal(got[keep], state["offsets"][keep] + 1)


def test_cli_counterfactual_scaled_distance_reads_the_split_in_chunks(tiny_data, tmp_path,
                                                                      monkeypatch):
    """`causalign counterfactual --distance scaled-l1` built the training split's whole
    float32 copy for its scales; it now hands the split itself to `distance_scale`."""
    import json

    from causalign.cli import main

    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--no-progress"]) == 0
    calls = _count_images_accesses(monkeypatch)
    out = tmp_path / "cf"
    assert main(["counterfactual", str(run), "--out", str(out), "--limit", "2", "--steps", "3",
                 "--distance", "scaled-l1", "--no-progress"]) == 0
    assert calls == []
    assert json.loads((out / "summary.json").read_text())["n_generated"] == 2


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32"])
def test_autoencoder_from_a_split_equals_that_from_its_float_images(tmp_path, kind):
    """`train_autoencoder` reads a dataset split a batch at a time: the same autoencoder
    (bit for bit) as from the split's whole float32 `.images`, which it no longer needs."""
    from causalign.models.autoencoder import train_autoencoder

    ds = _write(tmp_path / "d", _images(kind, 9, np.random.default_rng(3)))
    a = train_autoencoder(ds.images, epochs=2, batch_size=4, width=4, latent_channels=2)
    b = train_autoencoder(ds, epochs=2, batch_size=4, width=4, latent_channels=2)
    assert a.train_mse == b.train_mse
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_latent_setup_does_not_build_the_split_as_float32(tmp_path, monkeypatch):
    """causal-align's latent setup trained its autoencoder on `train_set.images`, a whole
    float32 copy (4x a uint8 cache: ~157 GB for 50k RGB 512 px images); it now reads the
    split a batch at a time, and fits the autoencoder it fitted before."""
    from causalign.methods.base import build_method
    from causalign.models.autoencoder import train_autoencoder
    from causalign.models.cnn import SevenLayerCNN

    ds = _write(tmp_path / "d", _images("uint8", 6, np.random.default_rng(4)))
    want = train_autoencoder(ds.images)
    calls = _count_images_accesses(monkeypatch)
    method = build_method("causal-align", {"space": "latent", "distance": "l2"})
    method.setup(ds, SevenLayerCNN(in_channels=3, num_outputs=2, width=4))
    assert calls == []
    got = method.autoencoder.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.state_dict().items())


def test_image_batch_is_a_copy(tmp_path):
    ds = _write(tmp_path / "d", _images("float32", 4, np.random.default_rng(5)))
    before = ds.images
    x = ds.image_batch(torch.tensor([2, 0]))
    assert torch.equal(x, before[[2, 0]])
    x.zero_()
    assert torch.equal(ds.images, before)


def test_counterfactual_latent_helpers_read_a_split_by_chunks(tmp_path, monkeypatch):
    """`causalign counterfactual --space latent` built the training split's float32
    `.images` for its autoencoder, its fingerprint and the low-flip hint's variance; the
    split is now read chunk by chunk, with the fingerprint recorded before (an autoencoder
    an earlier call saved into OUT is still reused) and the same variance."""
    from causalign.explain import counterfactual_export as ce

    ds = _write(tmp_path / "d", _images("uint8", 300, np.random.default_rng(6)))
    whole = ds.images
    old = np.ascontiguousarray(whole.numpy())
    h = __import__("hashlib").sha256(f"{old.shape} {old.dtype}".encode())
    h.update(old.tobytes())
    old_var = float(whole.float().var(0).mean())
    calls = _count_images_accesses(monkeypatch)
    assert ce._images_fingerprint(ds) == h.hexdigest() == ce._images_fingerprint(whole)
    assert ce.mean_pixel_variance(ds) == pytest.approx(old_var, rel=1e-5)
    assert ce.mean_pixel_variance(whole) == pytest.approx(old_var, rel=1e-5)
    assert calls == []
