"""Evaluation at realistic image sizes (128-256 px crops) on the CPU: batch sizing and
batch-independent metrics. Timings are in benchmarks/bench_sizes.py."""

from __future__ import annotations

import pytest
import torch

import causalign.engine.evaluate as ev
from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.methods.base import build_method
from causalign.models import build_model


@pytest.fixture(scope="module")
def data128(tmp_path_factory) -> LesionDataset:
    root = tmp_path_factory.mktemp("scale") / "d128"
    generate(root, SynthConfig(n_train=4, n_val=4, n_test=40, size=128, seed=0))
    return LesionDataset(root, "test")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn7", 1, 2, width=4).eval()


def _recording(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = ev.iterate_batches

    def recording(dataset, batch_size, **kw):
        sizes.append(batch_size)
        return real(dataset, batch_size, **kw)

    monkeypatch.setattr(ev, "iterate_batches", recording)
    return sizes


def test_cpu_evaluation_of_large_images_uses_cache_sized_batches(data128, monkeypatch):
    """On the CPU, evaluation ran 128-image batches of 128 px (41 of 224 px): the activations
    left the caches and evaluation took ~2x the CPU time of cache-sized batches (cnn7,
    benchmarks/bench_sizes.py). CPU batches now hold at most EVAL_VALUES_PER_BATCH_CPU
    values; GPU batches are unchanged, and every metric is identical to one big batch."""
    model, method = _model(), build_method("erm", {})
    per_sample = 128 * 128
    assert ev.eval_batch_size(data128, 128, "cpu") == ev.EVAL_VALUES_PER_BATCH_CPU // per_sample
    assert ev.eval_batch_size(data128, 128, torch.device("cpu")) <= 16
    # a GPU (only its name is needed here) keeps the larger cap
    assert ev.eval_batch_size(data128, 128, "cuda") == 128
    assert ev.eval_batch_size(data128, 128) == 128  # no device given: as before

    sizes = _recording(monkeypatch)
    capped = ev.evaluate_split(model, method, data128, "cpu", saliency="gradcam",
                               fractions=(0.01, 0.1))
    ev.predict(model, method, data128, "cpu")
    assert sizes and max(sizes) <= 16, sizes

    monkeypatch.setattr(ev, "EVAL_VALUES_PER_BATCH_CPU", 2 ** 30)  # one batch of all 40
    sizes.clear()
    whole = ev.evaluate_split(model, method, data128, "cpu", saliency="gradcam",
                              fractions=(0.01, 0.1))
    assert sizes == [128]
    assert capped == whole  # to the last digit, loss included


def test_loss_does_not_depend_on_the_batch_size(data128):
    """The loss summed float32 cross-entropies per batch, so evaluating with other batch
    sizes (as the CPU cap does) moved it in its last digits: per-sample losses are now
    summed in float64 over the whole split, the same for any batching."""
    model, method = _model(), build_method("erm", {})
    losses = {b: ev.predict(model, method, data128, "cpu", batch_size=b)[2] for b in (3, 7, 40)}
    assert losses[3] == losses[7] == losses[40], losses
    # and it is the split's mean cross-entropy
    x = method.model_input(data128.batch(torch.arange(len(data128))))
    with torch.no_grad():
        logits = model(x)
    ref = torch.nn.functional.cross_entropy(
        logits.double(), data128.batch(torch.arange(len(data128)))["label"])
    assert losses[40] == pytest.approx(float(ref), rel=1e-6)


def test_bench_step_with_one_value_per_batchnorm_channel_is_one_line(capsys):
    """`causalign bench step --model resnet18 --size 16 --batch-size 1` ended in BatchNorm's
    ValueError traceback ("Expected more than 1 value per channel when training"): one
    image pooled to 1x1. It is now one `error:` line naming --batch-size, exit code 2."""
    from causalign.cli import main
    from causalign.engine.bench import bench_step
    from causalign.errors import ConfigError

    rc = main(["bench", "step", "--model", "resnet18", "--size", "16", "--batch-size", "1",
               "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--batch-size 1" in lines[0] and "BatchNorm" in lines[0], lines[0]
    with pytest.raises(ConfigError, match="larger --batch-size"):
        bench_step("erm", size=16, batch_size=1, steps=1, warmup=0, device="cpu",
                   model="resnet18")


def test_bench_sizes_smoke(tmp_path, monkeypatch):
    """benchmarks/bench_sizes.py at a tiny size: step ratios to ERM with each child's own
    peak RSS, a method that refuses the model recorded as its error line, and evaluation
    phases with deletion running one forward per fraction (not per pixel)."""
    import importlib.util
    from pathlib import Path

    from causalign.metrics import DELETION_FRACTIONS

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sizes.py"
    spec = importlib.util.spec_from_file_location("bench_sizes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sizes.json"
    monkeypatch.setattr("sys.argv", [
        "bench_sizes.py", "--models", "cnn7", "--sizes", "32", "--methods", "rrr,cdep",
        "--eval-n", "4", "--saliency", "gradcam,wbp", "--out", str(out)])
    mod.main()
    import json

    r = json.loads(out.read_text())
    row = r["models"]["cnn7"]["32"]
    assert row["step"]["erm"]["ratio_to_erm"] == 1.0
    assert row["step"]["rrr"]["ratio_to_erm"] > 0 and row["step"]["rrr"]["cpu_s"] > 0
    assert "extra_peak_rss_mb" in row["step"]["cdep"]
    ev_row = row["eval"]
    assert ev_row["deletion_forwards_per_batch"] == [len(DELETION_FRACTIONS)]
    assert set(ev_row["phases_cpu_s"]) == {"saliency_gradcam", "saliency_wbp", "deletion",
                                           "cam_metrics"}
    assert ev_row["n"] == 4 and ev_row["batch_size"] == ev_row["batch_size_gpu_cap"] == 128
    assert ev_row["evaluate_split_gradcam_cpu_s"] > 0
