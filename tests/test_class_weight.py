"""The `class_weight` setting: per-class weights of every method's classification CE.

none (default) must leave every result as it was; balanced is sklearn's n / (C · count_c) on
the training labels; an explicit list needs one finite weight > 0 per class. The numbers used
are recorded in config.yaml (class_weight_values) and kept by --resume.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_cli_edges import _assert_user_error, _run

from causalign.data.format import LesionDataset
from causalign.engine import TrainConfig, train
from causalign.engine.config import apply_overrides, parse_set, resolve_class_weight
from causalign.engine.distributed import global_step
from causalign.engine.trainer import Trainer
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.models.cnn import SevenLayerCNN

W = [0.75, 3.0]  # an explicit weighting: class 1 three times class 0's 0.75


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(epochs=1, width=4, batch_size=16, device="cpu", threads=1,
                       eval_saliency="gradient", deletion_fractions=[0.1], **kw)


# ------------------------------------------------------------------ resolving the weights


def test_balanced_is_n_over_classes_times_count_and_zero_for_an_absent_class():
    labels = [0] * 6 + [1] * 2  # class 2 declared, no training sample
    assert resolve_class_weight("balanced", torch.tensor(labels), 3) == pytest.approx(
        [8 / (3 * 6), 8 / (3 * 2), 0.0])
    assert resolve_class_weight("balanced", [0, 1, 1, 1], 2) == pytest.approx([2.0, 2 / 3])
    assert resolve_class_weight("none", [0, 1], 2) is None


def test_an_explicit_list_is_taken_as_floats_and_needs_one_weight_per_class():
    cfg = apply_overrides(TrainConfig(), parse_set(["class_weight=[1, 3e-1]"]))
    assert cfg.class_weight == [1.0, 0.3]
    assert resolve_class_weight(cfg.class_weight, [0, 1], 2) == [1.0, 0.3]
    with pytest.raises(ConfigError, match=r"lists 2 weight\(s\), but the dataset has 3 "
                                          r"classes \(a, b, c\)"):
        resolve_class_weight([1, 2], [0], 3, ["a", "b", "c"])


@pytest.mark.parametrize("value,needle", [
    ("[1, 0]", "every weight must be a finite number > 0"),
    ("[1, -2]", "every weight must be a finite number > 0"),
    ("[1, .nan]", "every weight must be a finite number > 0"),
    ("[1, .inf]", "every weight must be a finite number > 0"),
    ("[1, 1e40]", "every weight must be a finite number > 0"),
    ("[1, true]", "every weight must be a finite number > 0"),
    ("[1, x]", "every weight must be a finite number > 0"),
    ("[]", "class_weight must be none, balanced or a list"),
    ("3", "class_weight must be none, balanced or a list"),
    ("Balanced", "did you mean 'balanced'?"),
])
def test_a_bad_class_weight_is_refused_in_one_line(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("?", r"\?")):
        apply_overrides(TrainConfig(), parse_set([f"class_weight={value}"]))


def test_the_cli_refuses_a_list_of_the_wrong_length_before_training(tiny_data, tmp_path,
                                                                    capsys):
    rc, _, err = _run(capsys, "train", tiny_data, "--out", tmp_path / "run", "--epochs", "1",
                      "--set", "class_weight=[1, 2, 3]")
    _assert_user_error(rc, err, "class_weight lists 3 weight(s), but the dataset has 2 "
                                "classes (benign, malignant)")
    assert not (tmp_path / "run").exists()
    rc, _, err = _run(capsys, "train", tiny_data, "--out", tmp_path / "run",
                      "--set", "class_weight=[1, -1]")
    _assert_user_error(rc, err, "class_weight: every weight must be a finite number > 0")


# ------------------------------------------------------------------ the methods' CE


def _batch(tiny_data, n=12):
    ds = LesionDataset(tiny_data, "train")
    batch = ds.batch(torch.arange(n))
    assert len(torch.unique(batch["label"])) == 2  # both classes: weights matter
    return batch


@pytest.mark.parametrize("name,part,args", [
    ("erm", "ce", {}),
    ("causal-align", "ce", {"steps": 1, "cg_iters": 1}),
    ("ppi", "cls", {"warmup_epochs": 0}),
])
def test_the_methods_ce_is_pytorchs_weighted_cross_entropy(tiny_data, name, part, args):
    batch = _batch(tiny_data)
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()  # eval: the same logits on every forward
    method = build_method(name, args)
    if name == "ppi":
        method.on_epoch_start(1)
    with torch.no_grad():
        logits = model(batch["image"])
    plain = float(method(model, batch).parts[part])
    assert plain == pytest.approx(float(F.cross_entropy(logits, batch["label"])), rel=1e-6)
    method.set_class_weight(W)
    weighted = float(method(model, batch).parts[part])
    want = F.cross_entropy(logits, batch["label"], weight=torch.tensor(W))
    assert weighted == pytest.approx(float(want), rel=1e-6)
    assert abs(weighted - plain) > 1e-4  # the weights acted


@pytest.mark.parametrize("name,args,calls", [
    ("erm", {}, ["batch"]),
    ("oracle", {}, ["batch"]),
    ("bagnet", {"patch": 9}, ["batch"]),
    ("rrr", {}, ["batch"]),
    ("cdep", {}, ["batch"]),
    ("icnn", {}, ["batch"]),
    ("hier-align", {"lam1": 0.0, "lam2": 0.0}, ["batch"]),  # CE; not the attribute BCE
    # chang: CE and the factual images' CE (x_f keeps the lesion, label y); not L_cf
    ("chang", {}, ["batch", "subset"]),
    # ppi: L_cls and L_ad (CE of y on an image with another image's region removed)
    ("ppi", {"warmup_epochs": 0, "con_weight": 1.0, "ad_weight": 1.0}, ["batch", "subset"]),
])
def test_every_methods_classification_terms_go_through_the_weighted_ce(
        tiny_data, monkeypatch, name, args, calls):
    from causalign.engine.trainer import data_info
    from causalign.methods.base import Method

    ds = LesionDataset(tiny_data, "train")
    batch = _batch(tiny_data, 6)
    method = build_method(name, args)
    torch.manual_seed(0)
    model = method.build_model(_cfg(method=name, method_args=args), data_info(ds))
    if name == "ppi":
        method.on_epoch_start(1)
    seen = []
    real = Method.ce

    def spy(self, logits, y, *, batch_term=True):
        out = real(self, logits, y, batch_term=batch_term)
        want = F.cross_entropy(logits, y, weight=torch.tensor(W))
        assert torch.allclose(out, want, rtol=1e-6), (name, out, want)
        seen.append("batch" if batch_term else "subset")
        return out

    monkeypatch.setattr(Method, "ce", spy)
    method.set_class_weight(W)
    method(model, batch)
    assert seen == calls


def test_data_parallel_ranks_add_up_to_the_single_process_weighted_mean(tiny_data):
    """The trainer scales rank r's loss by m_r·world/N and averages over ranks: the sum of
    (m_r/N)·loss_r must be the global batch's weighted mean, also with chunks of different
    class mixes (a mean of per-rank weighted means is not)."""
    ds = LesionDataset(tiny_data, "train")
    idx = torch.arange(11)  # chunks of 6 and 5
    y = ds.labels[idx]
    torch.manual_seed(0)
    logits = torch.randn(11, 2, dtype=torch.float64)
    method = build_method("erm")
    method.set_class_weight(W)
    want = F.cross_entropy(logits, y, weight=torch.tensor(W, dtype=torch.float64))
    total, naive = 0.0, 0.0
    for rank in (0, 1):
        method.global_step = global_step(ds, idx, rank, 2)
        part = method.global_step.local(torch.arange(11))
        loss = method.ce(logits[part], y[part])
        total += len(part) / 11 * loss
        naive += len(part) / 11 * F.cross_entropy(logits[part], y[part],
                                                   weight=torch.tensor(W, dtype=torch.float64))
    assert float(total) == pytest.approx(float(want), rel=1e-12)
    assert abs(float(naive) - float(want)) > 1e-6  # the per-rank means would differ


# ------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cw")
    absent = train(tiny_data, _cfg(), root / "absent", progress=False)
    none = train(tiny_data, _cfg(class_weight="none"), root / "none", progress=False)
    balanced = train(tiny_data, _cfg(class_weight="balanced"), root / "balanced",
                     progress=False)
    return root, absent, none, balanced


def test_none_leaves_a_run_bit_identical(runs):
    root, absent, none, balanced = runs
    assert json.dumps(absent, sort_keys=True) == json.dumps(none, sort_keys=True)
    a = torch.load(root / "absent" / "best.pt", weights_only=True)["model"]
    b = torch.load(root / "none" / "best.pt", weights_only=True)["model"]
    c = torch.load(root / "balanced" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the weighting changed the training
    cfg = yaml.safe_load((root / "none" / "config.yaml").read_text())
    assert cfg["class_weight"] == "none" and "class_weight_values" not in cfg


def test_config_yaml_records_the_balanced_weights_of_the_training_labels(runs, tiny_data):
    root = runs[0]
    cfg = yaml.safe_load((root / "balanced" / "config.yaml").read_text())
    y = LesionDataset(tiny_data, "train").labels
    n, counts = len(y), torch.bincount(y, minlength=2).tolist()
    assert cfg["class_weight"] == "balanced"
    assert cfg["class_weight_values"] == pytest.approx([n / (2 * c) for c in counts])


def test_resume_keeps_the_recorded_weights(runs, tiny_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[0] / "balanced", run)
    text = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    recorded = cfg["class_weight_values"]
    # as if the balanced rule had changed since the run started: the run keeps its numbers
    edited = [2.5, 0.5]
    assert edited != pytest.approx(recorded)
    lines = text.splitlines()
    at = lines.index("class_weight_values:")
    lines[at + 1:at + 3] = [f"- {v}" for v in edited]
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    (run / "metrics.json").unlink()  # the final evaluation is redone, from the checkpoint
    trainer = Trainer(tiny_data, _cfg(class_weight="balanced"), run, resume=True,
                      progress=False)
    trainer.fit()
    assert trainer.method.class_weight.tolist() == edited
    assert yaml.safe_load((run / "config.yaml").read_text())["class_weight_values"] == edited


def test_a_default_class_weight_does_not_change_benchmark_run_keys(tmp_path, monkeypatch):
    """Finished benchmark runs are found by their config hash: a setting added at its
    default must hash as before it existed (else every OUT would retrain)."""
    from causalign.engine import benchmark as bm
    from causalign.engine.config import TrainConfig as TC

    (tmp_path / "s.yaml").write_text(
        "name: s\ndatasets: {ds: {synth: {n_train: 8, n_val: 4, n_test: 4, size: 32}}}\n"
        "defaults: {epochs: 1}\n"
        "experiments:\n"
        "  a: {datasets: [ds], methods: [erm, rrr], seeds: [0, 1]}\n"
        "  b: {datasets: [ds], methods: [{name: erm, label: erm-bal, "
        "set: {class_weight: balanced}}], seeds: [0]}\n", encoding="utf-8")
    suite = bm.load_suite(tmp_path / "s.yaml")
    now = {s.key: s.config_hash for s in bm.plan(suite)}
    real = TC.to_dict
    # this version without the setting: its to_dict has no class_weight
    monkeypatch.setattr(TC, "to_dict", lambda self: {k: v for k, v in real(self).items()
                                                     if k != "class_weight"})
    before = {s.key: s.config_hash for s in bm.plan(suite)}
    plain = [k for k in now if "erm-bal" not in k]
    assert {k: now[k] for k in plain} == {k: before[k] for k in plain}
    weighted = next(k for k in now if "erm-bal" in k)
    assert now[weighted] not in {now[k] for k in plain}  # a setting, so another run
