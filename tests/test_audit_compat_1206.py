"""On-disk compatibility with artifacts written by older causalign versions (audit, compat)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from causalign.engine.config import TrainConfig
from causalign.engine.trainer import settings_diff, stored_config
from causalign.methods.base import build_method, resolved_params


def _old_run(root: Path, **params: object) -> Path:
    """A run folder's config.yaml as causalign before 2026-12-05 wrote it: causal-align's
    cg_iters default was 3 (now 0 = auto); gn_switch, newton_polish, damping_max,
    negative_curvature and the cache settings did not exist; no model_args."""
    run = root / "run"
    run.mkdir(parents=True)
    stored = resolved_params(build_method("causal-align", {}))
    for key in ("newton_polish", "damping_max", "negative_curvature", "gn_switch",
                "cache_device", "cache_dtype"):
        del stored[key]
    stored.update(cg_iters=3, **params)
    cfg = TrainConfig(method="causal-align", epochs=8).to_dict()
    del cfg["model_args"]
    cfg.update(data=str(root / "data"), causalign_version="0.1.0", method_params=stored)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def test_an_old_run_keeps_the_defaults_it_was_trained_with(tmp_path):
    # `train --resume` builds its config from stored_config: the new default cg_iters 0 was
    # applied to the old run and the resume refused with "settings differ: method.cg_iters
    # 3 -> 0 (use a new --out)", nothing having been changed by the user
    run = _old_run(tmp_path)
    cfg = stored_config(run)
    assert settings_diff(run, cfg) == []
    method = build_method(cfg.method, cfg.method_args)  # what load_run / counterfactual use
    assert method.params.cg_iters == 3
    # params_before: the earlier behaviour (CG on every step; a curved sample dropped at
    # δ = damping, not solved by Gauss-Newton)
    assert method.params.gn_switch == 0 and method.params.damping_max == 0.0
    assert method.params.negative_curvature == "damping"
    assert cfg.epochs == 8 and cfg.model_args == {}


def test_an_explicit_other_value_on_resume_is_still_a_difference(tmp_path):
    from causalign.engine.config import apply_overrides

    run = _old_run(tmp_path)
    wanted = apply_overrides(stored_config(run), {"method.cg_iters": 0})
    assert settings_diff(run, wanted) == ["method.cg_iters 3 -> 0"]
    # the user's own method_args win over the record
    run2 = _old_run(tmp_path / "b", alpha=0.05)
    raw = yaml.safe_load((run2 / "config.yaml").read_text())
    raw["method_args"] = {"alpha": 0.05}
    (run2 / "config.yaml").write_text(yaml.safe_dump(raw))
    assert stored_config(run2).method_args == {"alpha": 0.05, "cg_iters": 3, "gn_switch": 0,
                                               "damping_max": 0.0,
                                               "negative_curvature": "damping"}


def test_a_current_run_gets_no_pinned_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="causal-align")
    params = resolved_params(build_method("causal-align", {}))
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(),
                                                    "method_params": params}))
    assert stored_config(run).method_args == {}


def test_a_stored_value_this_version_refuses_is_named_on_resume(tmp_path):
    run = _old_run(tmp_path, distance="l3")  # an option that no longer exists
    cfg = stored_config(run)  # still readable (evaluate, explain)
    assert "distance" not in cfg.method_args
    # refused naming the value (gn_switch: no history, so no fallback it could have changed)
    assert settings_diff(run, cfg) == ["method.cg_iters 3 -> 0", "method.distance 'l3' -> 'l1'"]


@pytest.mark.parametrize(("method", "key"), [("rrr", "lam"), ("hier-align", "alpha2"),
                                             ("ppi", "omega")])
def test_other_methods_keep_their_stored_defaults(tmp_path, method, key):
    run = tmp_path / "run"
    run.mkdir()
    params = resolved_params(build_method(method, {}))
    params[key] = params[key] * 0.5  # trained when the default was another value
    (run / "config.yaml").write_text(yaml.safe_dump({**TrainConfig(method=method).to_dict(),
                                                    "method_params": params}))
    cfg = stored_config(run)
    assert cfg.method_args[key] == params[key] and settings_diff(run, cfg) == []


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
def test_negative_curvature_of_an_old_run_is_compared_with_the_earlier_behaviour(tmp_path,
                                                                                method):
    """negative_curvature (default gauss-newton) and causal-align's damping_max (default 10)
    did not exist before 2026-12-05: a run stored before dropped (later: re-damped) the
    samples whose CG met negative curvature, and was resumed or collected by a benchmark
    with the Gauss-Newton fallback on, silently. Now the earlier value is compared, unless
    the run's history shows CG never met negative curvature."""
    run = tmp_path / "run"
    run.mkdir()
    params = resolved_params(build_method(method, {}))
    for key in ("negative_curvature", "damping_max", "gn_switch"):
        params.pop(key, None)
    cfg = TrainConfig(method=method, epochs=1)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(),
                                                    "method_params": params}))
    prefix = "train_img_" if method == "hier-align" else "train_"
    (run / "history.csv").write_text(f"epoch,{prefix}cg_dropped\n1,0\n2,0.125\n")
    diffs = settings_diff(run, cfg)
    assert "method.negative_curvature 'damping' (before the setting existed) -> " \
           "'gauss-newton'" in diffs
    assert (method == "causal-align") == (
        "method.damping_max 0.0 (before the setting existed) -> 10.0" in diffs)
    assert settings_diff(run, stored_config(run)) == []  # what `train --resume` builds
    (run / "history.csv").write_text(f"epoch,{prefix}cg_dropped,{prefix}damping\n1,0,0.01\n")
    assert settings_diff(run, cfg) == []  # CG never met negative curvature: no effect
    (run / "history.csv").write_text(f"epoch,{prefix}cg_dropped,{prefix}damping\n1,0,0.1\n")
    assert settings_diff(run, cfg) != []  # δ was raised: it did


def _old_export(out: Path, summary: dict) -> Path:
    """An export folder as causalign before 2026-12-04 22:46 wrote it: no manifest."""
    import json

    out.mkdir()
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "grid.png").write_bytes(b"png")
    return out


def test_an_older_versions_export_of_the_other_command_is_not_overwritten(tmp_path):
    # the manifest-based refusal (explain's summary.json and grid.png replaced by
    # counterfactual's, and the reverse) missed folders from before the manifests
    from causalign.errors import CausalignError
    from causalign.explain.counterfactual_export import COUNTERFACTUAL_MANIFEST
    from causalign.explain.export import OwnedFiles, refuse_other_exports

    ex = _old_export(tmp_path / "ex", {"saliency": "gradcam", "split": "test", "n": 4,
                                       "out": "ex"})
    cf = _old_export(tmp_path / "cf", {"split": "test", "n": 4, "n_generated": 4,
                                       "flip_rate": 1.0, "out": "cf"})
    planned_cf = {"summary.json", "grid.png", "triptychs/test_0.png", "cf/test_0.npy"}
    with pytest.raises(CausalignError, match=r"ex: holds the output of `causalign explain` "
                                             r"\(by an older causalign version"):
        refuse_other_exports(ex, COUNTERFACTUAL_MANIFEST, planned_cf)
    with pytest.raises(CausalignError, match="holds the output of `causalign counterfactual`"):
        OwnedFiles(cf, ".causalign-explain.json", {"summary.json", "grid.png", "maps/a.npy"})
    assert (cf / "summary.json").read_text().startswith('{"split"')  # left as it was
    # the same command's older output is its own to rewrite, as before
    refuse_other_exports(cf, COUNTERFACTUAL_MANIFEST, planned_cf)
    OwnedFiles(ex, ".causalign-explain.json", {"summary.json", "grid.png"})
