"""CLI discoverability (audit 2026-12-06): a misspelt name says which one was meant, the
tool says its version, and --help names every method, model and saliency it accepts."""

from __future__ import annotations

import pytest
from test_cli_edges import _assert_user_error, _run

from causalign.engine.config import TrainConfig, apply_overrides
from causalign.errors import CausalignError, did_you_mean

# ---------------------------------------------------------------- "did you mean"


@pytest.mark.parametrize(("sets", "meant"), [
    # Before: 32 valid method.* keys listed, the meant one nowhere near the typo
    (["--method", "causal-align", "--set", "method.lamm=1"], "did you mean 'method.lam'?"),
    (["--method", "causal-align", "--set", "method.stepz=3"], "did you mean 'method.steps'"),
    (["--method", "causal-algn"], "did you mean 'causal-align'?"),
    (["--set", "epoch=3"], "did you mean 'epochs'?"),
    (["--model", "resnet"], "did you mean 'resnet18'?"),
    (["--set", "eval_saliency=gradcm"], "did you mean 'gradcam'?"),
    (["--set", "scheduler=cosin"], "did you mean 'cosine'?"),
])
def test_a_misspelt_train_setting_names_the_closest_valid_one(tmp_path, capsys, sets, meant):
    # refused before the data is read: the folder need not exist
    rc, out, err = _run(capsys, "train", tmp_path / "no_data", "--out", tmp_path / "run", *sets)
    _assert_user_error(rc, err, meant)
    assert "valid" in err or "must be cosine or none" in err  # every choice still named
    assert not (tmp_path / "run").exists()


def test_select_metric_names_the_bad_value_and_the_meant_one():
    # Before: "select_metric must be balanced_accuracy, accuracy, auc or loss" (no value)
    with pytest.raises(CausalignError, match=r"got 'AUC'; did you mean 'auc'\?"):
        apply_overrides(TrainConfig(), {"select_metric": "AUC"})


@pytest.mark.parametrize(("argv", "meant"), [
    (["counterfactual", "TMP/run", "--distance", "L1"], "did you mean 'l1'?"),
    (["counterfactual", "TMP/run", "--optimizer", "adm"], "did you mean 'adam'?"),
    (["data", "synth", "TMP/out", "--shortcut", "plusminus"], "did you mean 'plus-minus'?"),
    (["counterfactual", "TMP/run", "--space", "zzz"], None),
])
def test_misspelt_option_values_name_the_closest_one(tmp_path, capsys, argv, meant):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    rc, _, err = _run(capsys, *argv)
    if meant is None:  # no close name: no suggestion, the usual message
        assert rc == 2 and "did you mean" not in err
        return
    _assert_user_error(rc, err, meant)


def test_did_you_mean_ignores_case_takes_stems_and_stays_quiet_when_nothing_is_close():
    assert did_you_mean("Test", ["train", "val", "test"]) == "; did you mean 'test'?"
    assert did_you_mean("lrp", ["lrp-epsilon", "lrp-flat", "gradcam"]) == \
        "; did you mean 'lrp-epsilon' or 'lrp-flat'?"
    assert did_you_mean("zzz", ["train", "val", "test"]) == ""
    assert did_you_mean("lamm", ["lam", "alpha"], "method.") == "; did you mean 'method.lam'?"


def test_an_unknown_split_names_the_meant_one(tiny_data):
    from causalign.data.format import LesionDataset

    with pytest.raises(CausalignError, match=r"unknown split 'tset'.*did you mean 'test'\?"):
        LesionDataset(tiny_data, "tset")


# ---------------------------------------------------------------- --version, -h


def test_version_prints_the_packages_version(capsys):
    # Before: "error: No such option: --version", exit 2
    from causalign import __version__

    rc, out, err = _run(capsys, "--version")
    assert rc == 0 and out == f"causalign {__version__}\n" and err == ""


@pytest.mark.parametrize("argv", [["-h"], ["train", "-h"], ["data", "synth", "-h"],
                                  ["bench", "step", "-h"]])
def test_dash_h_shows_the_help(capsys, argv):
    # Before: "error: No such option: -h", exit 2
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and "Usage:" in out and "--help" in out


# ---------------------------------------------------------------- what --help offers


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    """--help tables 100 columns wide, whatever the terminal: words are not folded."""
    monkeypatch.setenv("COLUMNS", "100")


def _help(capsys, *argv) -> str:
    rc, out, _ = _run(capsys, *argv, "--help")
    assert rc == 0
    return " ".join(out.replace("│", " ").split())  # the rich table's cells joined


def test_help_names_every_method_model_and_saliency(capsys):
    # Before: "erm | oracle | causal-align | …", "cnn7 | resnet18 | vgg11 | …" (bench step),
    # "lrp-…"; evaluate --saliency and bench step --method named no choice at all
    from causalign.explain import explainer_names
    from causalign.methods.base import method_names
    from causalign.models import MODEL_NAMES

    helps = {c: _help(capsys, *c.split()) for c in ("train", "bench step", "explain",
                                                    "evaluate", "demo")}
    for command in ("train", "bench step", "demo"):
        for name in method_names():
            assert f" {name} " in helps[command], (command, name)
    for command in ("train", "bench step"):
        for name in MODEL_NAMES:
            assert f" {name} " in helps[command], (command, name)
    for command in ("explain", "evaluate"):
        for name in explainer_names():
            assert f" {name} " in helps[command], (command, name)


def test_demo_help_names_the_demo_suites_methods():
    from causalign.cli import DEMO_METHODS
    from causalign.engine.benchmark import load_suite

    suite = load_suite("demo")
    assert DEMO_METHODS.split(", ") == [m.name for m in suite.experiments[0].methods]


def test_set_shows_key_value_not_a_python_type(capsys):
    # Before: "--set <list[str]>"
    for command in ("train", "bench step", "benchmark"):
        text = _help(capsys, *command.split())
        assert "--set KEY=VALUE" in text and "list[str]" not in text, command


def test_an_unknown_method_setting_lists_the_settings_with_their_defaults(tmp_path, capsys):
    # Before: the names only; no command showed a method's defaults (alpha 0.01, steps 10)
    rc, _, err = _run(capsys, "train", tmp_path / "d", "--method", "causal-align",
                      "--set", "method.x=1")
    _assert_user_error(rc, err, "valid (with defaults): method.align_batch=16,")
    for shown in ("method.alpha=0.01", "method.steps=10", "method.warm_start=true",
                  "method.autoencoder=''", "method.distance=l1"):
        assert shown in err, shown


def test_data_import_help_states_each_kinds_default():
    # Before: --min-readers, --slices-per-subject, --min-tumor-px, --mask-dilate, --shade-step
    # and --mask-suffix had no text beyond their kind; --shortcut, --test-frac, --label, --task,
    # --mode, --region, --crop, --color, ... named no default (e.g. --shortcut's is none)
    import dataclasses

    import typer.main

    from causalign.cli import app
    from causalign.data.importers import IMPORTERS, get_importer

    cmd = typer.main.get_command(app).commands["data"].commands["import"]
    helps = {p.name: " ".join((p.help or "").split()) for p in cmd.params}
    missing = []
    for kind in IMPORTERS:
        options = get_importer(kind).Options
        for f in dataclasses.fields(options):
            default = f.default
            if f.name in ("limit", "seed") or default in (None, "", False, True):
                continue  # limit: all items; seed: said once; flags: off unless given
            text = f"{default:g}" if isinstance(default, float) else str(default)
            if text not in helps[f.name] and not (f.name == "modalities"
                                                  and "default all four" in helps[f.name]):
                missing.append(f"{kind} --{f.name.replace('_', '-')} {text}: "
                               f"{helps[f.name]!r}")
    assert not missing, missing


def test_no_help_text_holds_what_rich_reads_as_a_markup_tag(capsys):
    # Before: data import's "[lidc] ", "[brats] ", ... prefixes were read by typer's rich
    # help as markup tags and dropped: --min-readers showed no text at all, and no option
    # said which kinds use it
    import re

    import typer.main

    from causalign.cli import app

    tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")  # rich.markup's tag syntax
    found = []

    def walk(cmd, path):
        texts = [("doc", cmd.help or "")] + [(p.name, getattr(p, "help", None) or "")
                                             for p in getattr(cmd, "params", [])]
        found.extend(f"{path} {name}: {tag.findall(t)}" for name, t in texts if tag.search(t))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "causalign")
    assert not found, found
    text = _help(capsys, "data", "import")
    assert "--min-readers <int> lidc only: skip nodules" in text
    assert "--test-frac <float> lidc, busi, brats, folder only: fraction for test" in text


def test_train_help_names_every_config_key_and_its_default(capsys):
    # Before: the keys only --set/--config set (width, scheduler, augment, amp, ...) were
    # named nowhere in --help, and their defaults nowhere on the command line
    import dataclasses
    import re

    flags = {"method", "model", "epochs", "batch_size", "lr", "seed", "device"}
    text = _help(capsys, "train")
    base = TrainConfig()
    missing = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in flags or f.name in ("method_args", "model_args"):
            continue
        value = getattr(base, f.name)
        shown = (str(value).lower() if isinstance(value, bool) else f"{value:g}"
                 if isinstance(value, float) else "none" if value == "" else str(value))
        if not re.search(rf"\b{f.name}\b[^()]*\({re.escape(shown)}(?![\w.])", text):
            missing.append(f"{f.name} ({shown})")
    assert not missing, missing


@pytest.mark.parametrize(("sets", "meant"), [
    # a method's setting without its prefix: "unknown config key 'lam'" listed only the
    # training keys, and difflib's nearest was 'amp'
    (["--method", "causal-align", "--set", "lam=3"], "did you mean 'method.lam'?"),
    (["--set", "lam=3"], "did you mean 'method.lam' (a setting of causal-align, cdep, icnn, "
                         "rrr)?"),
    (["--model", "multiview", "--set", "tau=1"], "did you mean 'model.tau'?"),
    # a training setting under a prefix: "it takes none" / the method's 32 settings
    (["--set", "model.width=8"], "width is a training setting, not the model's"),
    (["--method", "causal-align", "--set", "method.epochs=3"],
     "epochs is a training setting, not the method's"),
    (["--model", "multiview", "--set", "model.train_slice=3"],
     "did you mean 'model.train_slices'?"),
])
def test_a_setting_given_at_the_wrong_level_names_the_right_key(tmp_path, capsys, sets, meant):
    rc, _, err = _run(capsys, "train", tmp_path / "no_data", "--out", tmp_path / "run", *sets)
    _assert_user_error(rc, err, meant)


def test_bench_steps_set_hint_does_not_send_a_training_setting_to_its_set(capsys):
    # bench step's --set takes method settings only: a hint "--set epochs=…" would loop
    rc, _, err = _run(capsys, "bench", "step", "--set", "epochs=3")
    _assert_user_error(rc, err, "epochs is a training setting, not the method's")
    assert "--set epochs" not in err


@pytest.mark.parametrize(("option", "typo", "meant"), [
    ("--methods", "erm,orcle", "did you mean 'oracle'?"),
    ("--only", "tabel1", "did you mean 'table1'?"),
    ("--datasets", "plus-minu", "did you mean 'plus-minus'?"),
])
def test_a_misspelt_benchmark_selection_names_the_meant_one(tmp_path, capsys, option, typo,
                                                           meant):
    rc, _, err = _run(capsys, "benchmark", "quick", "--out", tmp_path / "o", "--no-progress",
                      option, typo)
    _assert_user_error(rc, err, meant)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["explain", "counterfactual"])
def test_limit_help_says_how_to_take_the_whole_split(capsys, command):
    # Before: "first N samples [default: 32]": --limit 0 is refused and None cannot be typed,
    # so nothing said that a large N takes every sample
    assert "N past the split's size: all" in _help(capsys, command)


def test_another_methods_setting_names_the_methods_that_have_it(tmp_path, capsys):
    # Before: `--set method.lam=1` without --method: "unknown parameter(s) lam for method
    # 'erm'; valid: (none)", nothing said that --method was missing
    rc, _, err = _run(capsys, "train", tmp_path / "d", "--set", "method.lam=1")
    _assert_user_error(rc, err, "lam is a setting of causal-align, cdep, icnn, rrr "
                                "(see --method)")
