"""`method.fd_eps` below float32's resolution is refused at setup, before training.

Before, 1e-6 passed validation and stopped training at the first alignment step with a
ValueError traceback from `implicit_gradient` ("below what torch.float32 resolves")."""

from __future__ import annotations

import pytest

from causalign import cli
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.causal_align import FD_EPS_MIN_FLOAT32


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
def test_a_step_below_float32_resolution_is_a_config_error(method, tiny_data):
    from causalign.data import LesionDataset

    train = LesionDataset(tiny_data, "train")
    small = build_method(method, {"hvp": "finite-difference", "fd_eps": 1e-6})
    with pytest.raises(ConfigError, match=r"method.fd_eps=1e-06 is below what float32 images "
                                          r"resolve .* use method.fd_eps >= 1.2e-06"):
        small.check_settings(train.image_shape)  # what setup runs first
    # a float64 loop of one's own may take it: refused only against float32 images
    build_method(method, {"hvp": "finite-difference", "fd_eps": 1e-6})
    build_method(method, {"hvp": "finite-difference", "fd_eps": FD_EPS_MIN_FLOAT32}
                 ).check_settings(train.image_shape)


def test_the_command_line_refuses_it_in_one_line_before_training(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", str(tiny_data), "--method", "causal-align", "--out", str(run),
                     "--epochs", "1", "--no-progress", "--set", "method.hvp=finite-difference",
                     "--set", "method.fd_eps=1e-6"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "method.fd_eps=1e-06 is below what float32" in err
    assert not run.exists() or not any(run.iterdir())
