"""GPU speed paths, checked on the CPU: bf16 autocast only where it is safe, torch.compile
only for plain-forward methods, and the GPU benchmark skipping cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from causalign.engine import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def _conv_dtypes(trainer: Trainer) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def _trainer(data, out, **kw) -> Trainer:
    cfg = TrainConfig(**{**dict(method="erm", epochs=1, batch_size=16, width=4, seed=0,
                                device="cpu", eval_saliency="gradient",
                                deletion_fractions=[0.1]), **kw})
    t = Trainer(data, cfg, out, progress=False)
    t._setup()
    return t


def _one_step(t: Trainer) -> float:
    """One training step the way `Trainer._train_epoch` takes it (4 samples: bf16 convolution
    is slow on CPUs without native support)."""
    batch = t.train_set.batch(torch.arange(4))
    with t._autocast():
        out = t.method(t.train_model, batch)
    t.optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    t.optimizer.step()
    return float(out.total.detach())


# on a CPU without native bf16 the trainer says amp is emulated there (tested in
# test_audit_combo_1207b); this test checks what amp does, wherever it runs
@pytest.mark.filterwarnings("ignore:amp. this CPU has no native bf16")
def test_amp_runs_the_classifier_in_bf16(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path / "amp", amp=True)
    seen = _conv_dtypes(t)
    loss = _one_step(t)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in t.model.parameters())  # float32 master weights and gradients
    ref = _trainer(tiny_data, tmp_path / "fp32")
    seen_ref = _conv_dtypes(ref)
    _one_step(ref)
    assert seen_ref and all(d == torch.float32 for d in seen_ref)


def test_amp_keeps_counterfactual_inner_loop_float32(tiny_data, tmp_path):
    with pytest.warns(UserWarning, match="amp: method 'causal-align' keeps float32"):
        t = _trainer(tiny_data, tmp_path / "ca", method="causal-align", amp=True,
                     method_args={"steps": 2, "cg_iters": 2})
    assert t.method.amp_dtype == torch.bfloat16  # for its own classifier_autocast regions
    seen = _conv_dtypes(t)
    _one_step(t)
    # forward for CE, the inner Adam steps and the CG Hessian-vector products: all float32
    assert len(seen) > 3 and all(d == torch.float32 for d in seen)


def test_classifier_autocast_helper(tiny_data):
    from causalign.methods import build_method

    m = build_method("ppi")
    lin = nn.Linear(3, 2)
    with m.classifier_autocast("cpu"):
        assert lin(torch.ones(1, 3)).dtype == torch.float32  # amp off: no-op
    m.amp_dtype = torch.bfloat16
    with m.classifier_autocast("cpu"):
        assert lin(torch.ones(1, 3)).dtype == torch.bfloat16


def test_compile_is_refused_for_double_backward_methods(tiny_data, tmp_path):
    with pytest.warns(UserWarning, match="compile: method 'ppi'"):
        t = _trainer(tiny_data, tmp_path / "c", method="ppi", compile=True)
    assert t.train_model is t.model


@pytest.mark.slow
def test_compile_erm_trains(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path / "c", compile=True)
    assert t.train_model is not t.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = t._train_epoch(1, None)
    assert torch.isfinite(torch.tensor(row["train_loss"]))


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA skip")
def test_gpu_benchmark_skips_without_cuda(tmp_path, capsys, monkeypatch):
    bench = _load_bench("bench_gpu")
    out = tmp_path / "gpu.json"
    monkeypatch.setattr("sys.argv", ["bench_gpu.py", "--out", str(out)])
    assert bench.main() == 0
    assert "skipped, no CUDA device" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # two fresh interpreters
def test_memory_benchmark_measures_a_step():
    bench = _load_bench("bench_memory")
    small = bench.measure("erm", 32, 4, "cpu")
    big = bench.measure("erm", 32, 64, "cpu")
    assert 0 < small["peak_step_mib"] < big["peak_step_mib"], (small, big)
