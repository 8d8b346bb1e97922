"""`causalign counterfactual` with the default pixel search read the whole training split
only for x*'s bounds (7.9 s to open 20,000 images of 32 px, for a range taken in 0.19 s).
A run records that range (`data_intensity`); while the dataset is unchanged it is used."""

from __future__ import annotations

import json

import yaml

from causalign.cli import main
from causalign.engine import TrainConfig, train


def test_recorded_training_range_spares_reading_the_split(tiny_data, tmp_path, monkeypatch,
                                                          capsys):
    import causalign.engine.trainer as trainer

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    opened: list[str] = []
    real = trainer._optional_split

    def spy(data, split):
        opened.append(split)
        return real(data, split)

    monkeypatch.setattr(trainer, "_optional_split", spy)
    args = ["counterfactual", str(run), "--limit", "2", "--steps", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) in (0, None), capsys.readouterr().err
    assert opened == []  # the recorded range served
    with_record = json.loads((tmp_path / "a" / "summary.json").read_text())["valid_range"]

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.pop("data_intensity")  # a run from before the record: the split is read, as before
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([*args, "--out", str(tmp_path / "b")]) in (0, None), capsys.readouterr().err
    assert opened == ["train"]
    without = json.loads((tmp_path / "b" / "summary.json").read_text())["valid_range"]
    assert with_record == without
