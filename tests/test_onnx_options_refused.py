"""Options a target's kind would silently ignore are one-line errors (exit 2) before any work: recalibrate's
--full, --split, --checkpoint and --augmented/--unaugmented and export's --checkpoint on an ONNX model (no run:
--batches of --data's images); --layout on anything but an ONNX model (runs/target.open_target, cli/models.py).
Fast: nothing is opened, the refusal comes first (the files here are empty)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from convbn_cli.cli import main
from convbn_cli.errors import TargetError
from convbn_cli.runs.target import open_target


@pytest.mark.parametrize("args, named", [
    (["recalibrate", "m.onnx", "--full"], "--full"),
    (["recalibrate", "m.onnx", "--split", "test"], "--split"),
    (["recalibrate", "m.onnx", "--checkpoint", "latest"], "--checkpoint"),
    (["recalibrate", "m.onnx", "--unaugmented"], "--unaugmented"),
    (["recalibrate", "m.onnx", "--augmented"], "--augmented"),
    (["export", "m.onnx", "--format", "onnx", "--fold-bn", "--checkpoint", "420"], "--checkpoint"),
    (["recalibrate", "m.keras", "--layout", "NCHW"], "--layout"),
    (["export", "m.keras", "--layout", "NHWC"], "--layout")])
def test_an_option_the_target_would_ignore_is_one_line(tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / args[1]).write_bytes(b"")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert named in r.output and ("ONNX model" in r.output) and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("augmented, flag", [(False, "--unaugmented"), (True, "--augmented")])
def test_the_api_refuses_augmented_either_way_for_an_onnx_model(tmp_path, augmented, flag):
    """recalibrate(augmented=False or True) on an ONNX model (no run, no augmentation to leave out or keep): refused,
    not ignored, as the CLI's flags are."""
    from convbn_cli.analysis.recalibration import recalibrate

    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(TargetError, match=f"{flag} .augmented={augmented}. is for a run's model"):
        recalibrate(str(tmp_path / "m.onnx"), augmented=augmented)


@pytest.mark.parametrize("name", ["m.tflite", "ckpt-1"])
def test_layout_is_refused_for_a_target_that_is_not_onnx(tmp_path, name):
    (tmp_path / ("ckpt-1.index" if name == "ckpt-1" else name)).write_bytes(b"")
    with pytest.raises(TargetError, match="--layout is for ONNX models only"):
        open_target(str(tmp_path / name), runnable_only=True, layout="NCHW")
