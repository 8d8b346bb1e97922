"""Configuration audit (helper cfg, 2026-12-07): one setting given twice, and method_args /
model_args across the layers of a run's settings (--config, --set; a suite's defaults,
settings, method set:, --set)."""

from __future__ import annotations

import pytest

from causalign.cli import main
from causalign.engine import trainer as trainer_mod
from causalign.engine.benchmark import parse_suite, plan
from causalign.engine.config import (
    TrainConfig,
    apply_overrides,
    load_config_file,
    parse_set,
)
from causalign.errors import CausalignError, ConfigError


def _one_error_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _captured_train(monkeypatch) -> list[TrainConfig]:
    """`causalign train`'s resolved config, without training."""
    seen: list[TrainConfig] = []

    def fake_train(data, cfg, out, resume=False, progress=True):
        seen.append(cfg)
        return {"epochs": cfg.epochs, "test": {"accuracy": 0.5, "cam_precision": None}}

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    return seen


# ------------------------------------------------------------ a key given twice in a YAML


def test_config_file_with_a_key_given_twice_is_refused(tmp_path, capsys):
    # PyYAML keeps the last silently: `epochs: 2` appended to a config.yaml that says
    # `epochs: 12` trained 2 epochs, or 12 if appended the other way round
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 12\nlr: 0.01\nepochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'epochs' given twice \(lines 1 and 3\)"):
        load_config_file(cfg)
    line = _one_error_line(capsys, ["train", str(tmp_path / "data"), "--config", str(cfg),
                                    "--out", str(tmp_path / "run"), "--no-progress"])
    assert str(cfg) in line and "'epochs' given twice" in line
    assert not (tmp_path / "run").exists()
    # nested and flow mappings too
    cfg.write_text("method: rrr\nmethod_args: {lam: 1, lam: 10}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'lam' given twice \(line 2\)"):
        load_config_file(cfg)
    # a YAML merge key followed by overrides is no duplicate
    cfg.write_text("base: &b {lam: 1}\nmethod_args:\n  <<: *b\n  lam: 2\n", encoding="utf-8")
    assert load_config_file(cfg)["method_args"] == {"lam": 2}


def test_run_config_and_suite_with_a_key_given_twice_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: erm\nseed: 0\nseed: 1\n", encoding="utf-8")
    with pytest.raises(CausalignError, match="'seed' given twice"):
        trainer_mod.read_run_config(run)
    from causalign.engine.benchmark import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: {a: {synth: {size: 32}}}\nexperiments:\n"
                     "  t: {datasets: [a], methods: [erm]}\n"
                     "  t: {datasets: [a], methods: [rrr]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'t' given twice"):
        load_suite(suite)


def test_set_given_twice_with_different_values_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--set epochs given twice \(2 and 5\)"):
        parse_set(["epochs=2", "epochs=5"])
    assert parse_set(["epochs=2", " epochs=2"]) == {"epochs": 2}  # the same value: harmless
    with pytest.raises(ConfigError, match="--set method_args: key 'lam' given twice"):
        parse_set(["method_args={lam: 1, lam: 2}"])
    line = _one_error_line(capsys, ["train", str(tmp_path / "data"), "--set", "epochs=2",
                                    "--set", "epochs=5", "--out", str(tmp_path / "r")])
    assert "--set epochs given twice" in line


def test_a_method_setting_given_both_ways_in_one_mapping_is_refused(tmp_path):
    # which won depended on the order of the keys
    for values in ({"method": "rrr", "method_args": {"lam": 2}, "method.lam": 3},
                   {"method": "rrr", "method.lam": 3, "method_args": {"lam": 2}}):
        with pytest.raises(ConfigError, match="method.lam given twice"):
            apply_overrides(TrainConfig(), values)
    same = apply_overrides(TrainConfig(), {"method": "rrr", "method_args": {"lam": 2},
                                           "method.lam": 2.0})
    assert same.method_args == {"lam": 2}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: multiview\nmodel_args: {tau: 2}\nmodel.tau: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{cfg}: model.tau given twice"):
        load_config_file(cfg)


# ------------------------------------------------------------ method_args across layers


def test_set_method_args_merges_with_the_config_files(tmp_path, monkeypatch):
    # `--set method_args={alpha: …}` replaced the --config file's whole method_args: its
    # lam and steps were dropped without a word
    seen = _captured_train(monkeypatch)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: causal-align\nmethod_args: {lam: 2, steps: 3}\n"
                   "model_args: {}\n", encoding="utf-8")
    rc = main(["train", str(tmp_path / "data"), "--config", str(cfg), "--set",
               "method_args={alpha: 0.02}", "--set", "method.steps=4", "--out",
               str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    assert seen[0].method_args == {"lam": 2, "steps": 4, "alpha": 0.02}


def test_merge_settings_later_layers_win_per_parameter():
    from causalign.engine.config import merge_settings

    merged = merge_settings({"epochs": 3, "method_args": {"lam": 2, "steps": 3}},
                            {"method.steps": 5, "model_args": {"tau": 2}},
                            {"epochs": 4, "method_args": {"alpha": 0.1}, "model.tau": 3})
    assert merged == {"epochs": 4, "method_args": {"lam": 2, "steps": 5, "alpha": 0.1},
                      "model_args": {"tau": 3}}


def test_benchmark_setting_method_args_merge_with_the_suite_defaults(tmp_path):
    # a setting's (or a method's set:) method_args replaced the defaults' whole mapping:
    # every run of the 'l2' setting trained with the default λ, not the suite's 5
    raw = {"name": "s", "defaults": {"epochs": 1, "method_args": {"lam": 5}},
           "datasets": {"a": {"synth": {"size": 32}}},
           "experiments": {"t": {"datasets": ["a"],
                                 "methods": [{"name": "causal-align",
                                              "set": {"method_args": {"steps": 3}}}],
                                 "settings": {"l2": {"method_args": {"distance": "l2"}}}}}}
    [spec] = plan(parse_suite(raw, tmp_path, "s"), {"method_args": {"alpha": 0.02}})
    assert spec.error is None, spec.error
    assert spec.config.method_args == {"lam": 5, "distance": "l2", "steps": 3, "alpha": 0.02}


# ------------------------------------------------------------ a run's method_params record


def _run_config(tmp_path, **params) -> object:
    """A causal-align run's config.yaml (as written) whose method_params record ``params``
    over this version's defaults."""
    import yaml

    from causalign.methods.base import build_method, resolved_params

    record = {**resolved_params(build_method("causal-align", {"steps": 2})), **params}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": "/elsewhere", "method": "causal-align",
                                    "epochs": 1, "method_args": {"steps": 2},
                                    "method_params": record}), encoding="utf-8")
    return path


def test_config_whose_method_params_differ_from_the_run_warns(tmp_path, monkeypatch, capsys):
    # method_params is only a record: a colleague's run trained when cg_iters defaulted to 3
    # (or a method_params edited in place of method_args) was reproduced with the current
    # defaults, silently
    seen = _captured_train(monkeypatch)
    path = _run_config(tmp_path, cg_iters=3, lam=2.0)
    rc = main(["train", str(tmp_path / "data"), "--config", str(path), "--out",
               str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert seen[0].method_args == {"steps": 2}  # still a record only: not read
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1, err
    assert "method.cg_iters 3 -> 0" in warning[0] and "method.lam 2.0 -> 1.0" in warning[0]
    assert "--set method.lam=2.0 --set method.cg_iters=3" in warning[0]
    # following the advice trains with the recorded values, and says nothing more
    rc = main(["train", str(tmp_path / "data"), "--config", str(path), "--set",
               "method.lam=2.0", "--set", "method.cg_iters=3", "--out",
               str(tmp_path / "r2"), "--no-progress"])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    assert seen[1].method_args == {"steps": 2, "lam": 2.0, "cg_iters": 3}


def test_config_whose_method_params_agree_or_of_another_method_is_quiet(tmp_path, monkeypatch,
                                                                        capsys):
    seen = _captured_train(monkeypatch)
    path = _run_config(tmp_path)
    for extra in ([], ["--set", "method.lam=3"], ["--method", "hier-align"]):
        rc = main(["train", str(tmp_path / "data"), "--config", str(path), *extra, "--out",
                   str(tmp_path / f"r{len(seen)}"), "--no-progress"])
        assert rc == 0 and "warning" not in capsys.readouterr().err
    assert seen[1].method_args == {"steps": 2, "lam": 3}


# ------------------------------------------------------------ YAML 1.1 booleans for names


def test_a_yaml_boolean_or_list_for_a_string_setting_is_named(tmp_path, capsys):
    # `augment: no` was refused as "got 'False'" (the user wrote no such thing), and
    # `init: off` / `init: [a, b]` looked for checkpoints named 'False' / "['a', 'b']"
    with pytest.raises(ConfigError, match=r"augment: expected a string, got the boolean "
                                          r"False \(YAML reads an unquoted yes/no/on/off"):
        apply_overrides(TrainConfig(), parse_set(["augment=no"]))
    with pytest.raises(ConfigError, match="init: expected a string, got the boolean False"):
        apply_overrides(TrainConfig(), {"init": False})
    with pytest.raises(ConfigError, match=r"init: expected str, got \['a', 'b'\]"):
        apply_overrides(TrainConfig(), {"init": ["a", "b"]})
    assert apply_overrides(TrainConfig(), {"augment": "dihedral"}).augment == "dihedral"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("init: off\n", encoding="utf-8")
    line = _one_error_line(capsys, ["train", str(tmp_path / "data"), "--config", str(cfg),
                                    "--out", str(tmp_path / "r")])
    assert "init: expected a string, got the boolean False" in line


# ------------------------------------------------------------ the init weights' provenance


def _weights_file(path, seed: int):
    import torch

    from causalign.models import build_model

    torch.manual_seed(seed)
    torch.save({"model": build_model("cnn7", 1, 2, width=4).state_dict()}, path)
    return path


def test_run_records_the_init_weights_and_reads_back(tiny_data, tmp_path, monkeypatch):
    # init is kept as given (R1, ../pretrained): the same config.yaml rerun from another
    # folder, or after the source run was resumed (a new best.pt), started from other weights
    # with nothing recorded to tell
    import hashlib

    import yaml

    from causalign.engine.trainer import Trainer, stored_config

    init = _weights_file(tmp_path / "init.pt", 0)
    monkeypatch.chdir(tmp_path)
    Trainer(tiny_data, {"epochs": 1, "width": 4, "threads": 1, "init": "init.pt"},
            tmp_path / "run", progress=False).fit()
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert stored["init"] == "init.pt"
    assert stored["init_source"] == {
        "path": str(init.resolve()),
        "sha256": hashlib.sha256(init.read_bytes()).hexdigest()[:16]}
    assert stored_config(tmp_path / "run").init == "init.pt"  # metadata, not a setting
    seen = _captured_train(monkeypatch)
    assert main(["train", str(tiny_data), "--config", str(tmp_path / "run" / "config.yaml"),
                 "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert seen[0].init == "init.pt"


def test_config_whose_init_weights_changed_warns(tmp_path, monkeypatch, capsys):
    import hashlib

    import yaml

    seen = _captured_train(monkeypatch)
    init = _weights_file(tmp_path / "init.pt", 0)
    recorded = {"path": "/elsewhere/init.pt",
                "sha256": hashlib.sha256(init.read_bytes()).hexdigest()[:16]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": "erm", "init": str(init),
                                    "init_source": recorded}), encoding="utf-8")
    argv = ["train", str(tmp_path / "data"), "--config", str(path), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 0  # the same weights: quiet
    assert "warning" not in capsys.readouterr().err
    _weights_file(init, 1)  # the source replaced (its run resumed, another person's file)
    assert main([*argv, "--out", str(tmp_path / "r2")]) == 0
    err = capsys.readouterr().err
    assert f"init {init} now resolves to {init.resolve()}" in err, err
    assert f"sha256 {recorded['sha256']}" in err and err.count("warning: ") == 1
    # init given anew on the command line: on purpose, nothing to say
    assert main([*argv, "--set", f"init={init}", "--out",
                 str(tmp_path / "r3")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert len(seen) == 3


def test_trainer_takes_a_run_config_yaml_loaded_whole(tiny_data, tmp_path):
    # the Python API's mapping is read "as --config reads", but a run's config.yaml loaded
    # with yaml.safe_load failed as "unknown config key 'data'"
    import yaml

    from causalign.engine.trainer import Trainer

    text = ("data: /elsewhere\ndata_digest: 0123\ncausalign_version: 0.1.0\n"
            "environment: {threads: 1}\nmethod: rrr\nepochs: 1\nwidth: 4\n"
            "method_args: {lam: 3}\nmethod_params: {lam: 3.0, region: mask}\n"
            "init_source: {path: /x.pt, sha256: ab}\n")
    trainer = Trainer(tiny_data, yaml.safe_load(text), tmp_path / "run", progress=False)
    assert (trainer.cfg.method, trainer.cfg.epochs, trainer.cfg.method_args) == \
        ("rrr", 1, {"lam": 3})
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        Trainer(tiny_data, {"lrr": 1}, tmp_path / "run2", progress=False)


def test_one_number_spelt_two_ways_is_not_a_conflict():
    # PyYAML reads `1e-3` as a string and `0.001` as a float: the two were refused as a
    # setting given twice with different values
    from causalign.engine.config import merge_settings, parse_set

    assert parse_set(["lr=1e-3", "lr=0.001"]) == {"lr": 0.001}
    assert merge_settings({"method.alpha": "1e-2", "method_args": {"alpha": 0.01}})[
        "method_args"] == {"alpha": 0.01}
    with pytest.raises(ConfigError, match="given twice"):
        parse_set(["lr=1e-3", "lr=0.002"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_set(["amp=true", "amp=1"])  # a boolean is not the number 1 here
