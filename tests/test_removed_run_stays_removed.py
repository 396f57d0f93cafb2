"""A run directory removed while convbn writes into it stays removed (issue 42): writes into a run make folders
only below it, one at a time, and training checks the run is there before TensorFlow's checkpoint writer (which
makes whatever folders it needs) runs. It used to come back as a 55 KB curves.png where the user deleted it."""

import shutil

import pytest

from conftest import quiet, tiny_raw
from convbn_cli.errors import ConvbnError
from convbn_cli.files import atomic_open, write_json_atomic
from convbn_cli.runs.rundir import RunDir


def test_a_write_within_a_removed_folder_makes_nothing(tmp_path):
    root = tmp_path / "runs" / "x" / "1"
    root.mkdir(parents=True)
    write_json_atomic(root / "bn_stats" / "epoch_1.json", {"ok": 1}, within=root)  # below it: made
    assert (root / "bn_stats" / "epoch_1.json").is_file()
    shutil.rmtree(root)
    with pytest.raises(ConvbnError, match="is gone"):
        with atomic_open(root / "bn_stats" / "epoch_2.json", within=root) as f:
            f.write("x")
    with pytest.raises(ConvbnError, match="is gone"):
        RunDir(root).write_file("curves.png", b"\x89PNG")
    assert not root.exists() and (tmp_path / "runs" / "x").is_dir()


def test_a_run_removed_mid_training_is_not_made_again(tmp_path, synthetic):
    """The removal lands right after the epoch's metrics are written (a user subscriber stands in for `rm -rf`
    at that moment): training stops with one line, and nothing - checkpoint, bn_stats, curves.png - brings the
    directory back."""
    from convbn_cli.config import load_config
    from convbn_cli.train import train

    class RemoveTheRun:
        def on_epoch_metrics(self, trainer, row):
            shutil.rmtree(trainer.run.path)

    cfg = load_config(raw=tiny_raw(tmp_path, **{"output.plots": True, "data.max_train": 320}))
    with pytest.raises(ConvbnError, match="removed while training"):
        train(cfg, data=synthetic, log=quiet, progress=False, subscribers=[RemoveTheRun()])
    assert not (tmp_path / "runs" / "tiny" / "1").exists()
