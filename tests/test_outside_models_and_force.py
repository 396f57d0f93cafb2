"""Reliability round 3 (issue 27): what a model or data from outside convbn must be, and what `--force`,
recalibrate and a killed download may touch. Each refusal is one line with exit 2, and nothing a user wrote is
removed or replaced."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from convbn_cli.cli import main
from convbn_cli.errors import ConvbnError, Stopped, Terminated


def _save(model, tmp_path, name="m.keras"):
    path = tmp_path / name
    model.save(path)
    return path


def _classifier(input_shape=(28, 28, 1), inputs=1, outputs=1, conv_out=False):
    ins = [keras.Input(input_shape, name=f"in{i}") for i in range(inputs)]
    x = ins[0] if inputs == 1 else keras.layers.Concatenate()(ins)
    x = keras.layers.Conv2D(4, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    if conv_out:
        return keras.Model(ins, x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outs = [keras.layers.Dense(10, name=f"out{i}")(x) for i in range(outputs)]
    return keras.Model(ins, outs if outputs > 1 else outs[0])


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 300))
    return path


def one_error(r, code=2):
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("model,message", [
    (lambda: _classifier(conv_out=True), "gives outputs of shape (None, 26, 26, 4)"),
    (lambda: _classifier(input_shape=(None, None, 1)), "takes inputs of shape (None, None, None, 1)"),
    (lambda: _classifier(inputs=2), "has 2 inputs and 1 outputs"),
    (lambda: _classifier(outputs=2), "has 1 inputs and 2 outputs"),
])
@pytest.mark.parametrize("command", ["diagnose", "eval", "recalibrate", "export", "inspect-bn"])
def test_what_is_not_a_single_input_image_classifier_is_refused(tmp_path, data, model, message, command):
    path = _save(model(), tmp_path)
    extra = [] if command in ("eval", "inspect-bn") else ["--data", str(data)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert message in one_error(CliRunner().invoke(main, [command, str(path), *extra]))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((20, 28, 28), np.uint8)
BAD_DATA = [
    (dict(x=IMAGES, y=np.full(20, 255)), "labels run from 255 to 255, but the model gives 10 classes"),
    (dict(x=IMAGES, y=np.full(20, -1)), "labels run from -1 to -1"),
    (dict(x=IMAGES, y=np.full(20, np.nan)), "y must be a 1-D array of integer class numbers"),
    (dict(x=IMAGES, y=np.zeros((20, 2), np.int64)), "expected one label per image"),
    (dict(x=np.array(["a"] * 20), y=np.zeros(20, np.int64)), "x must be images"),
    (dict(x=np.array(3.0), y=np.zeros(20, np.int64)), "x must be images"),
    (dict(x=np.full((20, 28, 28), np.nan, np.float32), y=np.zeros(20, np.int64)), "not finite"),
]


@pytest.mark.parametrize("arrays,message", BAD_DATA)
def test_data_that_is_not_images_and_class_numbers_is_refused(tmp_path, arrays, message):
    """The probe: labels 255/-1/NaN/2-D and string or 0-d x gave tracebacks; NaN images "BN looks healthy"."""
    path = _save(_classifier(), tmp_path)
    r = CliRunner().invoke(main, ["diagnose", str(path), "--data", str(_npz(tmp_path, **arrays))])
    assert message in one_error(r)


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-1"])
def test_a_scale_that_is_not_a_positive_number_is_refused_before_loading(tmp_path, data, scale):
    r = CliRunner().invoke(main, ["diagnose", str(tmp_path / "absent.keras"), "--data", str(data), "--scale", scale])
    assert r.exit_code == 2 and "must be a positive finite number" in r.output


# --------------------------------------------------------------------------- --force and other people's files

def tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def a_written_export(folder):
    from convbn_cli.formats.catalog import write_manifest

    (folder / "variables").mkdir(parents=True)
    (folder / "assets").mkdir()
    (folder / "saved_model.pb").write_bytes(b"\x08\x01graph")
    (folder / "fingerprint.pb").write_bytes(b"fp")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(b"data")
    write_manifest(folder)
    return folder


@pytest.mark.parametrize("change,message", [
    (lambda d: (d / "variables" / "thesis.tex").write_text("three years"), "variables/thesis.tex is not a file"),
    (lambda d: (d / "assets" / "vocab.txt").write_text("words"), "assets/vocab.txt is not a file"),
    (lambda d: (d / "variables" / "variables.index").write_bytes(b"edited"), "was changed after convbn wrote"),
    (lambda d: (d / "mine").mkdir(), "mine is not a directory convbn wrote"),
    (lambda d: os.symlink("/etc/hostname", d / "assets" / "link"), "assets/link is not a file"),
    (lambda d: (d / "convbn_export.json").unlink(), "holds no readable convbn_export.json"),
    (lambda d: (d / "convbn_export.json").write_text('{"files": 1}'), "is not one convbn wrote"),
])
def test_force_replaces_only_a_tree_whose_every_file_convbn_wrote(tmp_path, change, message):
    """The probe: --force onto a real export deleted `variables/thesis.tex` and `assets/vocab.txt` the user had
    added, because only the top-level names were checked."""
    from convbn_cli.export.output import check_output

    sm = a_written_export(tmp_path / "sm")
    assert check_output(sm, "savedmodel", force=True) == sm  # exactly as written: replaceable
    change(sm)
    before = tree(sm)
    with pytest.raises(ConvbnError, match="only a SavedModel directory convbn wrote") as e:
        check_output(sm, "savedmodel", force=True)
    assert message in str(e.value)
    assert tree(sm) == before


def test_force_never_takes_a_user_directory_that_looks_like_a_savedmodel(tmp_path):
    from convbn_cli.export.output import check_output

    mine = tmp_path / "mine"
    (mine / "variables").mkdir(parents=True)
    (mine / "saved_model.pb").write_text("a text file, not a graph")
    (mine / "variables" / "experiment.csv").write_text("1,2,3")
    with pytest.raises(ConvbnError, match="holds no readable convbn_export.json"):
        check_output(mine, "savedmodel", force=True)


def test_staged_checks_again_right_before_replacing(tmp_path):
    """A file added to the old export while the new one was being written stops the replacement."""
    from convbn_cli.export.output import check_output
    from convbn_cli.files import staged

    sm = a_written_export(tmp_path / "sm")
    with pytest.raises(ConvbnError, match="late.txt is not a file"):
        with staged(sm, before_replace=lambda: check_output(sm, "savedmodel", force=True)) as tmp:
            a_written_export(tmp)
            (sm / "late.txt").write_text("added meanwhile")
    assert (sm / "late.txt").is_file() and not list(tmp_path.glob(".*.tmp"))


def test_recalibrate_never_replaces_a_dangling_link(tmp_path):
    from convbn_cli.analysis.recalibration import _save_beside
    from convbn_cli.runs.target import Target

    src = _save(_classifier(), tmp_path, "theirs.keras")
    os.symlink(tmp_path / "nowhere", tmp_path / "theirs-recalibrated.keras")
    target = Target("external", str(src), None, keras.saving.load_model(src), None)
    assert _save_beside(target) == str(tmp_path / "theirs-recalibrated-2.keras")
    assert os.readlink(tmp_path / "theirs-recalibrated.keras") == str(tmp_path / "nowhere")


def test_a_killed_download_leaves_nothing_once_the_next_fetch_looks(tmp_path):
    """SIGKILL during a download used to leave its 30-60 MB in a temporary directory for good; now the directory
    sits in the cache and the next fetch removes it (its owner's lock is free), but never a live one's."""
    from convbn_cli.files import remove_abandoned, scratch_dir

    code = ("import sys, time; from convbn_cli.files import scratch_dir\n"
            "with scratch_dir(sys.argv[1], 'mnist-download') as d:\n"
            "    (d / 'part').write_bytes(bytes(1000)); print(d, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    left = tmp_path / os.path.basename(proc.stdout.readline().strip())
    with scratch_dir(tmp_path, "mnist-download") as live:
        assert remove_abandoned(tmp_path, "mnist-download") == [] and left.is_dir()  # its owner is alive
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert remove_abandoned(tmp_path, "mnist-download") == [left] and not left.exists()
        assert live.is_dir()
    assert not live.exists()


# --------------------------------------------------------------------------- signals are not errors

def test_a_signal_is_never_caught_as_an_error():
    from convbn_cli.train.loop import Interrupted
    from convbn_cli.train.sweep import SweepInterrupted

    for cls in (Stopped, Terminated, Interrupted, SweepInterrupted):
        assert not issubclass(cls, Exception)
    try:
        try:
            raise Terminated(signal.SIGTERM)
        except Exception:  # noqa: BLE001  what a damaged file's reader does
            pytest.fail("SIGTERM was caught as an error")
    except Terminated as e:
        assert e.exit_code == 143


def test_sigterm_while_a_model_loads_exits_143_not_as_bad_input(tmp_path, data, monkeypatch):
    """The probe: SIGTERM was sometimes reported as bad input, caught by `except Exception` around the load."""
    path = _save(_classifier(), tmp_path)

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("the signal did not arrive")

    monkeypatch.setattr(keras.saving, "load_model", load)
    r = CliRunner().invoke(main, ["diagnose", str(path), "--data", str(data)])
    assert r.exit_code == 143 and "interrupted by SIGTERM" in r.output and "error:" not in r.output, r.output
