"""Data-parallel training: 2 CPU processes (gloo) reproduce the single-process run.

The global batches are the single-process ones (11 samples, global batch 5: chunks 3+2, 3+2
and 1+0, so unequal and empty shards are exercised). Every step's reduced gradients and the
final weights must equal a single process's. The methods cover both gradient paths: ERM
through DistributedDataParallel's hooks, and — through the all-reduce after backward — an
input-gradient penalty (double backward), causal-align (implicit gradient via
torch.autograd.grad) and PPI (double backward through the WBP map). The models have no
BatchNorm: with it, each rank normalises with its own chunk's statistics (DDP's behaviour
without SyncBatchNorm, which has no CPU kernel), so equality would not be expected.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, Trainer
from causalign.engine.distributed import all_reduce_gradients, shard_indices
from causalign.methods.base import LossOutput, Method, method_class, register_method

METHODS = {
    "erm-nobn": {},
    "gradpen-nobn": {},
    "causal-align-nobn": {"warm_start": False, "steps": 3, "cg_iters": 3},
    "ppi-nobn": {"ad_weight": 0.0},  # L_ad's derangement is drawn per rank's chunk
}


class TinyNet(nn.Module):
    """conv-ReLU-conv-ReLU-GAP-linear, no BatchNorm (piecewise linear, so WBP works)."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4, k)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _tiny(cfg, info):
    torch.manual_seed(cfg.seed)
    return TinyNet(info.in_channels, info.num_classes)


def _register() -> None:
    erm = method_class("erm")
    if "erm-nobn" in _registered():
        return

    class ERMNoBN(erm):
        def build_model(self, cfg, info):
            return _tiny(cfg, info)

    class GradPenalty(Method):
        """CE + ‖∂CE/∂x outside the mask‖² (RRR-like): its gradient needs double backward."""

        def build_model(self, cfg, info):
            return _tiny(cfg, info)

        def loss(self, model, batch):
            x = batch["image"].clone().requires_grad_(True)
            ce_i = F.cross_entropy(model(x), batch["label"], reduction="none")
            ce = ce_i.mean()
            # per-sample input gradients (of the summed CE), so the loss is a per-sample mean
            (g,) = torch.autograd.grad(ce_i.sum(), x, create_graph=True)
            pen = (g * (1 - batch["mask"])).square().flatten(1).sum(1).mean() * 100
            return LossOutput(ce + pen, {"ce": float(ce.detach()), "pen": float(pen.detach())})

    class CANoBN(method_class("causal-align")):
        def build_model(self, cfg, info):
            return _tiny(cfg, info)

    class PPINoBN(method_class("ppi")):
        def build_model(self, cfg, info):
            return _tiny(cfg, info)

    for name, cls in (("erm-nobn", ERMNoBN), ("gradpen-nobn", GradPenalty),
                      ("causal-align-nobn", CANoBN), ("ppi-nobn", PPINoBN)):
        register_method(name)(cls)


def _registered() -> list[str]:
    from causalign.methods.base import _METHODS

    return list(_METHODS)


class RecordingTrainer(Trainer):
    """Keeps a copy of every step's (reduced) gradients, taken just before optimizer.step."""

    def _setup(self) -> None:
        super()._setup()
        self.recorded: list[list[torch.Tensor | None]] = []
        step = self.optimizer.step

        def recording_step(*args, **kwargs):
            self.recorded.append([None if p.grad is None else p.grad.detach().clone()
                                  for p in self.model.parameters()])
            return step(*args, **kwargs)

        self.optimizer.step = recording_step


def _cfg(method: str) -> TrainConfig:
    return TrainConfig(method=method, epochs=2, batch_size=5, seed=0, device="cpu",
                       threads=1, eval_saliency="gradient", deletion_fractions=[0.1],
                       method_args=dict(METHODS[method]))


def _fit(data, method, out):
    trainer = RecordingTrainer(data, _cfg(method), out, progress=False)
    metrics = trainer.fit()
    return trainer, metrics


def join_gloo(rank: int, world: int, store: str, register: Callable[[], None] | None = None,
              timeout: timedelta | None = None) -> None:
    """A spawned worker's start: one thread, the test module's methods registered (its
    ``register``), then the gloo process group meeting at ``store`` (`rendezvous`)."""
    torch.set_num_threads(1)
    if register is not None:
        register()
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            **({} if timeout is None else {"timeout": timeout}))


def _worker(rank: int, world: int, store: str, data: str, root: str) -> None:
    join_gloo(rank, world, store, _register)
    try:
        for method in METHODS:
            trainer, _ = _fit(data, method, f"{root}/{method}")
            torch.save(trainer.recorded, f"{root}/{method}.grads.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rendezvous(folder: Path) -> str:
    """Where two forked workers meet: a file store in the test's folder. A free TCP port
    found by binding port 0 is released before rank 0 binds it again, and anything on the
    machine may take it meanwhile (DistNetworkError EADDRINUSE, by chance); a file store has
    no such window. (torchrun, in the slow tests, runs --standalone: its agent keeps port 0.)"""
    path = Path(folder) / "gloo-rendezvous"
    assert not path.exists()  # FileStore needs a fresh file
    return path.as_uri()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    generate(data, SynthConfig(n_train=11, n_val=4, n_test=4, size=32, seed=3))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert k not in os.environ
    _register()
    # Single-process references first: they also import everything the workers need, so the
    # forked workers start warm (a spawned interpreter re-imports torch: ~10 s on 2 cores).
    single = {m: _fit(data, m, root / "single" / m) for m in METHODS}
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, rendezvous(root), str(data), str(root / "ddp")),
                       nprocs=2, join=True, start_method="fork")
    return data, root, single


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_single_process(two_process_runs, method):
    data, root, runs = two_process_runs
    single, metrics = runs[method]
    tmp_path = root / "single" / method
    ddp_dir = root / "ddp" / method
    for r in (0, 1):  # every rank applied the same reduced gradients
        grads = torch.load(root / "ddp" / f"{method}.grads.rank{r}.pt", weights_only=False)
        assert len(grads) == len(single.recorded) == 6  # 3 steps × 2 epochs
        for step, (a, b) in enumerate(zip(grads, single.recorded, strict=True)):
            for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
                assert (ga is None) == (gb is None), (step, i)
                if ga is not None:
                    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), \
                        (method, r, step, i, (ga - gb).abs().max())
    ck_d = torch.load(ddp_dir / "checkpoint.pt", weights_only=False)
    ck_s = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for k, v in ck_s["model"].items():
        assert torch.allclose(ck_d["model"][k], v, rtol=1e-4, atol=1e-5), (method, k)
    # rank 0 wrote the run; metrics reduced over ranks equal the single-process ones
    hist_d = (ddp_dir / "history.csv").read_text().splitlines()
    hist_s = (tmp_path / "history.csv").read_text().splitlines()
    assert hist_d[0] == hist_s[0]
    col = hist_s[0].split(",")
    for row_d, row_s in zip(hist_d[1:], hist_s[1:], strict=True):
        for name, a, b in zip(col, row_d.split(","), row_s.split(","), strict=True):
            # method parts such as n_align are per-chunk counts; losses/metrics are means
            if (name in ("train_loss", "train_accuracy") or name.startswith("val_")) and a:
                assert float(a) == pytest.approx(float(b), rel=1e-3, abs=1e-4), name
    m_d = json.loads((ddp_dir / "metrics.json").read_text())
    assert m_d["val"]["n"] == 4 and m_d["test"]["accuracy"] == metrics["test"]["accuracy"]


def _register_warning_method() -> None:
    if "erm-warns" in _registered():
        return
    erm = method_class("erm")

    class ERMWarns(erm):
        """Warns once at setup (the same on every rank) and at its first loss (per rank)."""

        def build_model(self, cfg, info):
            return _tiny(cfg, info)

        def setup(self, train_set, model):
            warnings.warn("setup warning", stacklevel=2)

        def loss(self, model, batch):
            if not getattr(self, "_said", False):
                self._said = True
                warnings.warn(f"loss warning of rank {dist.get_rank()}", stacklevel=2)
            return super().loss(model, batch)

    register_method("erm-warns")(ERMWarns)


def _warning_worker(rank: int, world: int, store: str, data: str, root: str) -> None:
    join_gloo(rank, world, store, _register_warning_method)
    try:
        cfg = TrainConfig(method="erm-warns", epochs=1, batch_size=4, seed=0, device="cpu",
                          threads=1, eval_saliency="gradient", deletion_fractions=[0.1])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Trainer(data, cfg, f"{root}/run", progress=False).fit()
            # (an import during fit, sympy's, may add its own filter: only ours is checked)
            filters_kept = ("ignore", None, Warning, None, 0) not in warnings.filters
        Path(f"{root}/warnings.rank{rank}.json").write_text(json.dumps(
            {"messages": [str(w.message) for w in seen], "filters_kept": filters_kept}))
    finally:
        dist.destroy_process_group()


def test_setup_warnings_are_said_by_rank_0_only(tmp_path):
    """Under torchrun every rank printed the same setup warnings (data checks, method
    settings) once per rank. Rank 0 says them; a warning from a rank's own training step is
    still shown on that rank, and the caller's warning filters are as they were."""
    import torch.multiprocessing as mp

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=3))
    _register_warning_method()
    mp.start_processes(_warning_worker, args=(2, rendezvous(tmp_path), str(data), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    seen = [json.loads((tmp_path / f"warnings.rank{r}.json").read_text()) for r in (0, 1)]
    assert "setup warning" in seen[0]["messages"]
    assert "setup warning" not in seen[1]["messages"]
    for r in (0, 1):
        assert f"loss warning of rank {r}" in seen[r]["messages"]
        assert seen[r]["filters_kept"]


def test_shards_cover_the_global_batch():
    idx = torch.randperm(11)
    for world in (1, 2, 3, 4):
        parts = [shard_indices(idx, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), idx)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_all_reduce_gradients_single_rank_group(tmp_path):
    # A world of one: the reduction is the identity and unused parameters keep grad None.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        (a * torch.arange(3.0)).sum().backward()
        all_reduce_gradients([a, b], 1)
        assert torch.equal(a.grad, torch.arange(3.0)) and b.grad is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three fresh interpreters per rank (~1 min on 2 cores)
def test_torchrun_cli_two_processes_and_resume(tmp_path):
    """The documented command: `torchrun --nproc-per-node 2 -m causalign train ...`; rank 0
    alone writes and reports; `--resume` of the finished run reloads it through rank 0."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this interpreter")
    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=24, n_val=8, n_test=8, size=32, seed=3))
    run = tmp_path / "run"
    # --standalone: torchrun's agent binds port 0 and keeps it (no free-port race)
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m",
           "causalign", "train", str(data), "--out", str(run), "--epochs", "2",
           "--batch-size", "8", "--device", "cpu", "--set", "width=4", "--set", "threads=1",
           "--set", "eval_saliency=gradient", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("test accuracy") == 1  # rank 0 reports
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["test"]["n"] == 8
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["test"] == metrics["test"]
