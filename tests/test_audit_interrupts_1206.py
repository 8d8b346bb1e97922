"""Audit 2026-12-06 (issue #3 surfaces): interruption, reruns and the file system around
`causalign counterfactual` and its latent-space autoencoder.

- a SIGKILL during an atomic write leaves ``.NAME.<random>.tmp``; no rerun removed it (the
  trainer already cleans its own, `remove_stale_temporaries`);
- `explain` and `counterfactual` into one --out overwrote each other's summary.json and
  grid.png, leaving the other's maps beside a summary that does not describe them;
- `counterfactual --space latent --autoencoder FILE` with an autoencoder of other channels
  failed inside the first search, naming no file, after OUT's summary.json was removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.errors import CausalignError
from causalign.explain.counterfactual_export import (
    AUTOENCODER_SOURCE,
    CounterfactualSettings,
    _images_fingerprint,
    export_counterfactuals,
    resolve_autoencoder,
)
from causalign.explain.export import export_saliency
from causalign.methods import build_method
from causalign.models import build_model
from causalign.models.autoencoder import ConvAutoencoder, save_autoencoder

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def setup(tiny_data):
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    return model, build_method("erm"), LesionDataset(tiny_data, "test")


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("interrupts") / "rün 1"  # a space and a non-ASCII letter
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--set", "threads=1",
                 "--no-progress"]) == 0
    return run


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


# ------------------------------------------------------- SIGKILL mid-write, then rerun


_KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from causalign.data.format import LesionDataset
    from causalign.explain.counterfactual_export import CounterfactualSettings, \\
        export_counterfactuals
    from causalign.methods import build_method
    from causalign.models import build_model

    data, out = sys.argv[1:3]
    real = os.replace
    def replace(src, dst, *a, **k):  # SIGKILL with the second x* complete in its temporary
        if str(dst).endswith(os.sep + "cf" + os.sep + sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    os.replace = replace
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    export_counterfactuals(model, build_method("erm"), LesionDataset(data, "test"),
                           CounterfactualSettings(steps=2), out, limit=3)
""")


def test_counterfactual_sigkill_mid_write_leaves_no_temporary_after_rerun(setup, tiny_data,
                                                                          tmp_path):
    model, method, ds = setup
    out = tmp_path / "cf out"
    victim = f"{ds.records[1].id}.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(tiny_data), str(out),
                           victim], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _temporaries(out)
    assert left and left[0].startswith(f".{victim}.")  # what a real SIGKILL leaves
    assert not (out / "summary.json").exists()
    summary = export_counterfactuals(model, method, ds, CounterfactualSettings(steps=2), out,
                                     limit=3)
    assert _temporaries(out) == []
    assert summary["n"] == 3 and (out / "summary.json").exists()


def test_remove_temporaries_touches_only_the_named_files(tmp_path):
    from causalign.io import remove_temporaries

    for name in (".a.npy.k3j_x9q0.tmp", ".b.npy.abcdefgh.tmp", "a.npy", ".a.npy",
                 ".notes.txt.abcdefgh.tmp", ".a.npy.sha256.pending.abcdefgh.tmp"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".a.npy.dir00000.tmp").mkdir()  # not a file: kept
    removed = remove_temporaries(tmp_path, ["a.npy", "a.npy.sha256.pending"])
    assert sorted(p.name for p in removed) == [".a.npy.k3j_x9q0.tmp",
                                               ".a.npy.sha256.pending.abcdefgh.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".a.npy", ".a.npy.dir00000.tmp", ".b.npy.abcdefgh.tmp", ".notes.txt.abcdefgh.tmp",
        "a.npy"]
    assert remove_temporaries(tmp_path / "missing", ["a.npy"]) == []


def test_out_autoencoder_temporaries_removed_on_rerun(tmp_path):
    images = torch.rand(4, 1, 8, 8)
    out = tmp_path / "out"
    out.mkdir()
    save_autoencoder(out / "autoencoder.pt", ConvAutoencoder(1, width=4, latent_channels=2))
    (out / AUTOENCODER_SOURCE).write_text(json.dumps(
        {"train_images_sha256": _images_fingerprint(images)}))
    # what a SIGKILL during save_autoencoder / the json's write leaves
    for name in (".autoencoder.pt.q1w2e3r4.tmp", ".autoencoder.pt.sha256.pending.q1w2e3r4.tmp",
                 f".{AUTOENCODER_SOURCE}.q1w2e3r4.tmp"):
        (out / name).write_bytes(b"\0" * 64)
    ae, where = resolve_autoencoder(None, images, "cpu", None, out)
    assert where == str(out / "autoencoder.pt")  # the recorded one, reused
    assert _temporaries(out) == []


# ------------------------------------------------ two export commands into one folder


def test_counterfactual_refuses_an_explain_folder_and_the_reverse(setup, tmp_path):
    model, method, ds = setup
    a, b = tmp_path / "a", tmp_path / "b"
    export_saliency(model, method, ds, "gradient", a, limit=4)
    before = (a / "summary.json").read_text()
    with pytest.raises(CausalignError, match=r"causalign explain.*summary\.json"):
        export_counterfactuals(model, method, ds, CounterfactualSettings(steps=2), a, limit=2)
    assert (a / "summary.json").read_text() == before  # explain's, untouched
    assert not (a / "cf").exists()

    export_counterfactuals(model, method, ds, CounterfactualSettings(steps=2), b, limit=2)
    before = (b / "summary.json").read_text()
    with pytest.raises(CausalignError, match=r"causalign counterfactual.*summary\.json"):
        export_saliency(model, method, ds, "gradient", b, limit=2)
    assert (b / "summary.json").read_text() == before
    assert not (b / "maps").exists()


def test_export_into_a_folder_of_another_export_whose_files_are_gone_is_allowed(setup,
                                                                               tmp_path):
    model, method, ds = setup
    (tmp_path / ".causalign-explain.json").write_text(json.dumps(["summary.json", "grid.png"]))
    summary = export_counterfactuals(model, method, ds, CounterfactualSettings(steps=2),
                                     tmp_path, limit=1)
    assert summary["n"] == 1


# ------------------------------------------- --autoencoder FILE of the wrong channels


def test_counterfactual_wrong_channel_autoencoder_one_line_before_any_output(tiny_run,
                                                                             tmp_path, capsys):
    out = tmp_path / "cf"
    base = ["counterfactual", str(tiny_run), "--out", str(out), "--limit", "2", "--steps", "1",
            "--no-progress"]
    assert main(base) == 0
    summary = (out / "summary.json").read_text()
    ae3 = tmp_path / "rgb ae.pt"
    save_autoencoder(ae3, ConvAutoencoder(3, width=4, latent_channels=2))
    capsys.readouterr()
    assert main(base + ["--space", "latent", "--autoencoder", str(ae3)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ae3) in err and "3-channel" in err, err
    assert (out / "summary.json").read_text() == summary  # the earlier export is intact


def test_resolve_autoencoder_checks_channels_of_the_file(tmp_path):
    ae3 = tmp_path / "ae3.pt"
    save_autoencoder(ae3, ConvAutoencoder(3, width=4, latent_channels=2))
    with pytest.raises(CausalignError, match=r"ae3\.pt: autoencoder takes 3-channel"):
        resolve_autoencoder(None, torch.rand(2, 1, 8, 8), "cpu", ae3, tmp_path / "out")
    ae, where = resolve_autoencoder(None, torch.rand(2, 3, 8, 8), "cpu", ae3, tmp_path / "out")
    assert where == str(ae3)


# ------------------------------------- benchmarks/causal_align_grad_in_training.py rerun


def _grad_probe_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "causal_align_grad_in_training.py"
    spec = importlib.util.spec_from_file_location("causal_align_grad_in_training_1206", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grad_in_training_interrupted_mid_probe_resumes_on_rerun(tiny_data, tmp_path,
                                                                monkeypatch, capsys):
    """Interrupted while probing epoch 1 (its checkpoint written), the rerun failed with a
    traceback: "OUT/run: already holds a run (pass --resume ...)", an option the script has
    not, and the probe rows were lost. Now it resumes and ends where an uninterrupted call
    ends."""
    from causalign.engine.trainer import CHECKPOINT, load_checkpoint

    probe = _grad_probe_script()
    args = ["--epochs", "2", "--probe-epochs", "1,2", "--probe-n", "2", "--ks", "1",
            "--ref-steps", "3", "--ref-polish", "0", "--threads", "0",
            "--set=width=4", "--set=batch_size=16", "--set=deletion_fractions=[0.1]",
            "--set=method.steps=2", "--set=method.align_batch=4"]
    real = probe.measure

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe.main([str(tiny_data), "--out", str(tmp_path / "a"), *args])
    assert (tmp_path / "a" / "run" / CHECKPOINT).exists()
    monkeypatch.setattr(probe, "measure", real)
    probe.main([str(tiny_data), "--out", str(tmp_path / "a"), *args])
    probe.main([str(tiny_data), "--out", str(tmp_path / "b"), *args])  # uninterrupted
    a, b = (json.loads((tmp_path / n / "grad_in_training.json").read_text()) for n in "ab")
    assert a["complete"] and [r["epoch"] for r in a["probes"]] == [1, 2]
    for ra, rb in zip(a["probes"], b["probes"], strict=True):
        assert ra["run"]["cosine_to_ref"] == pytest.approx(rb["run"]["cosine_to_ref"])
    wa, wb = (load_checkpoint(tmp_path / n / "run" / CHECKPOINT)["model"] for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)

    # other options into the same --out: one line, not a traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        probe.main([str(tiny_data), "--out", str(tmp_path / "a"), *args, "--seed", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a run of a call with other options" in err and "Traceback" not in err


# --------------------------------------------- JSON-writing #3 benchmarks: --out under a file


def _load_benchmark(name: str, monkeypatch):
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_1206_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["causal_align_step_table", "bench_causal_align",
                                  "fd_hvp_probe", "warm_cosine_probes"])
def test_benchmark_out_under_a_file_is_one_line_before_any_work(name, tmp_path, monkeypatch,
                                                                capsys):
    """--out FILE/x.json was a FileExistsError traceback from the folder's mkdir."""
    mod = _load_benchmark(name, monkeypatch)
    for work in ("bench_step", "setup"):
        if hasattr(mod, work):
            monkeypatch.setattr(mod, work, lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "f").write_text("a file")
    argv = ["--out", str(tmp_path / "f" / "x.json")]
    if name == "bench_causal_align":  # reads sys.argv
        monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        mod.main() if name == "bench_causal_align" else mod.main(argv)
    assert exit_.value.code == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------- an autoencoder destination under a file


@pytest.mark.parametrize("via", ["counterfactual", "train"])
def test_autoencoder_destination_under_a_file_names_the_file(via, tiny_data, tiny_run,
                                                            tmp_path, capsys):
    """"error: F: cannot create the folder for the autoencoder (File exists)" read as if F
    were a folder that exists; now it says F is a file."""
    f = tmp_path / "f"
    f.write_text("a file")
    dest = f / "ae.pt"
    if via == "counterfactual":
        argv = ["counterfactual", str(tiny_run), "--out", str(tmp_path / "cf"), "--limit", "1",
                "--steps", "1", "--space", "latent", "--autoencoder", str(dest),
                "--no-progress"]
    else:
        argv = ["train", str(tiny_data), "--method", "causal-align", "--out",
                str(tmp_path / "run"), "--epochs", "1", "--set", "width=4", "--set",
                "method.space=latent", "--set", f"method.autoencoder={dest}", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{f} is a file, not a folder" in err, err


@pytest.mark.parametrize("checkpointed", [True, False])
def test_an_interrupted_train_says_how_to_continue(tiny_data, tmp_path, monkeypatch, capsys,
                                                    checkpointed):
    """Ctrl-C during `causalign train` printed only "interrupted"; with a checkpoint written
    the user had to know about --resume. Now the line before names the command that goes
    on; before the first checkpoint (a plain rerun starts over) no hint."""
    import causalign.engine.trainer as trainer

    out = tmp_path / "run"

    def interrupted_train(data, cfg, run_dir, **kw):
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpointed:
            (run_dir / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted_train)
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(out),
                 "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted"
    if checkpointed:
        assert err[:-1] == [f"{out}: its last checkpoint is kept; `causalign train {tiny_data} "
                            f"--out {out} --resume` continues it"]
    else:
        assert err[:-1] == []
