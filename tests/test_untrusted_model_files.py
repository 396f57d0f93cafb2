"""No model file runs code or reaches outside itself (issue 35): a SavedModel whose graph writes, reads or lists
files is refused before TensorFlow loads it; an ONNX model's external data is read only from beside the model,
and its memory is bounded; a damaged TFLite file is refused instead of crashing the interpreter. Each probe runs
`convbn` in a fresh process, as a user would, so that a crash is an exit code here, not the end of the suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def one_error_line(r, *needles):
    """Exit 2 with one `error:` line holding every needle, and no traceback."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


@pytest.fixture
def digits(tmp_path):
    """Two 28x28 pictures as an .npy array, what predict reads."""
    path = tmp_path / "digits.npy"
    np.save(path, np.full((2, 28, 28), 30, np.uint8))
    return path


# --------------------------------------------------------------------------- SavedModel: tensor arithmetic only

def saved_model(folder: Path, payload: str) -> Path:
    """A SavedModel whose serving function is a linear classifier plus `payload`: nothing, or a side effect a
    malicious author would add (writing a file, reading one into the scores, listing a directory)."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.random.stateless_normal((784, 10), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32)])
        def serve(self, x):
            y = tf.matmul(tf.reshape(x, (-1, 784)), self.w)
            if payload == "write":
                tf.io.write_file(str(folder / "written-by-the-model.txt"), "pwned")
            elif payload == "read":
                y += tf.cast(tf.strings.length(tf.io.read_file("/etc/hostname")), tf.float32)
            elif payload == "glob":
                y += tf.cast(tf.size(tf.io.matching_files("/etc/*")), tf.float32)
            return y

    m = Model()
    tf.saved_model.save(m, str(folder / f"sm_{payload}"), signatures={"serving_default": m.serve})
    return folder / f"sm_{payload}"


@pytest.mark.parametrize("payload, op", [("write", "WriteFile"), ("read", "ReadFile"), ("glob", "MatchingFiles")])
def test_a_savedmodel_that_touches_files_is_refused_before_it_runs(tmp_path, digits, payload, op):
    path = saved_model(tmp_path, payload)
    one_error_line(run_cli("predict", path, digits), str(path), op, "not tensor arithmetic")
    assert not (tmp_path / "written-by-the-model.txt").exists()


def test_a_plain_savedmodel_still_predicts(tmp_path, digits):
    """The rule refuses what runs more than tensor arithmetic, not SavedModels: one saved by TensorFlow itself,
    with its saver functions (SaveV2, RestoreV2), is run."""
    r = run_cli("predict", saved_model(tmp_path, "none"), digits, "--json")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_run_directorys_export_is_held_to_the_same_rule(run_copy, tmp_path):
    (run_copy / "export").mkdir(exist_ok=True)
    evil = saved_model(tmp_path, "write").rename(run_copy / "export" / "evil_savedmodel")
    r = run_cli("eval", evil)
    one_error_line(r, "WriteFile")
    assert not (tmp_path / "written-by-the-model.txt").exists()


# --------------------------------------------------------------------------- ONNX: external data, memory

def linear_onnx(path: Path, location=None, big=None, offset="0"):
    """An ONNX linear classifier (x (N, 28, 28, 1) -> (N, 10)); `location`: its weights in that external file
    (the model then reads them from there); `big`: also ConstantOfShape([big]) summed into the scores."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    if location is not None:
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("raw_data")
        for key, value in (("location", location), ("offset", offset), ("length", str(784 * 10 * 4))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    flat = numpy_helper.from_array(np.array([-1, 784], np.int64), "flat")
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["xf"]), helper.make_node("MatMul", ["xf", "w"], ["m"])]
    inits = [w, flat]
    if big is None:
        nodes.append(helper.make_node("Identity", ["m"], ["y"]))
    else:
        one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        inits.append(numpy_helper.from_array(np.array([big], np.int64), "shape"))
        nodes += [helper.make_node("ConstantOfShape", ["shape"], ["c"], value=one),
                  helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0), helper.make_node("Add", ["m", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 28, 28, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_external_data_is_read_from_beside_the_model_wherever_convbn_runs(tmp_path, digits):
    model_dir, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model_dir.mkdir()
    elsewhere.mkdir()
    (model_dir / "weights.bin").write_bytes(np.ones((784, 10), np.float32).tobytes())
    path = linear_onnx(model_dir / "m.onnx", location="weights.bin")
    r = run_cli("predict", path, digits, "--json", cwd=elsewhere)  # used to fail unless run from its own folder
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("location", ["secret.bin", "../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_the_models_folder_is_refused(tmp_path, digits, location):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = np.full((784, 10), 7, np.float32).tobytes()
    (tmp_path / "secret.bin").write_bytes(secret)  # the working directory's file, and the folder above the model's
    path = linear_onnx(model_dir / "m.onnx", location=location)
    one_error_line(run_cli("predict", path, digits, cwd=tmp_path), repr(location), "not a file beside the model")


def peak_rss_mb(*args, cwd=None):
    """(CompletedProcess, peak resident memory of `convbn ARGS` in MB), measured by a parent of its own."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "convbn_cli", *map(str, args)],
                       capture_output=True, text=True, cwd=cwd or REPO, timeout=600)
    return r, int(r.stdout.rsplit("PEAK", 1)[1])


@pytest.mark.process  # peak_rss_mb starts convbn under a parent of its own
@pytest.mark.parametrize("size", [1 << 29, 1 << 33])
def test_an_onnx_graph_cannot_allocate_without_bound(tmp_path, digits, size):
    """ConstantOfShape([2^29]) took 2.84 GB and exited 0; [2^33] ended in onnxruntime's traceback."""
    r, peak = peak_rss_mb("predict", linear_onnx(tmp_path / "big.onnx", big=size), digits)
    one_error_line(r, "big.onnx", "memory")
    assert peak < 1024, peak


# --------------------------------------------------------------------------- TFLite: verified before it runs

@pytest.fixture(scope="module")
def tflite_bytes(tmp_path_factory):
    """A small conv-BN classifier as a TFLite flatbuffer, written by convbn's own writer."""
    import keras

    from convbn_cli.formats import runtime

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)))
    path = tmp_path_factory.mktemp("tflite") / "m.tflite"
    runtime.write(model, "tflite", path, {})
    return path.read_bytes()


def damaged(data: bytes, n=12, seed=0):
    """Truncations at several lengths, then copies with a few bytes overwritten at random."""
    rng = np.random.default_rng(seed)
    out = [data[:k] for k in (0, 8, 64, 300, len(data) // 2, len(data) - 16)]
    for _ in range(n):
        b = bytearray(data)
        for i in rng.integers(0, len(b), 6):
            b[i] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


def test_a_damaged_tflite_file_is_one_line_not_a_crash(tmp_path, tflite_bytes, digits):
    """A truncated .tflite killed convbn with SIGSEGV (exit 139, 3 of 3 tries): the flatbuffer was not verified."""
    good = tmp_path / "good.tflite"
    good.write_bytes(tflite_bytes)
    assert run_cli("predict", good, digits).returncode == 0
    codes = []
    for k, data in enumerate(damaged(tflite_bytes)):
        path = tmp_path / f"d{k}.tflite"
        path.write_bytes(data)
        r = run_cli("predict", path, digits)
        codes.append(r.returncode)
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (k, r.returncode, r.stderr[-1500:])
    assert codes[:6] == [2] * 6  # every truncation is refused


def test_a_damaged_onnx_or_savedmodel_file_is_one_line(tmp_path, digits):
    """The fuzz of the other readers (tests/test_bounded_readers.py), for the ONNX and SavedModel readers: every
    damaged copy is read or refused in one line, never a traceback or a crash."""
    good = linear_onnx(tmp_path / "good.onnx").read_bytes()
    for k, data in enumerate(damaged(good, n=8, seed=1)):
        path = tmp_path / f"d{k}.onnx"
        path.write_bytes(data)
        r = run_cli("predict", path, digits)
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (k, r.returncode, r.stderr[-1500:])
    folder = saved_model(tmp_path, "none")
    pb = (folder / "saved_model.pb").read_bytes()
    for data in (pb[:len(pb) // 3], pb[: len(pb) - 7]):
        (folder / "saved_model.pb").write_bytes(data)
        one_error_line(run_cli("predict", folder, digits), str(folder))


def test_a_fifo_inside_a_savedmodel_is_refused_without_blocking(tmp_path, digits):
    """TensorFlow's reader waits forever on a FIFO; every file of the directory is checked first, unopened."""
    folder = saved_model(tmp_path, "none")
    data = next((folder / "variables").glob("variables.data-*"))
    data.unlink()
    os.mkfifo(data)
    one_error_line(run_cli("predict", folder, digits, timeout=120), str(data), "not a regular file")


@pytest.mark.parametrize("which", ["data", "record"])
def test_a_fifo_in_a_checkpoint_is_refused_without_blocking(run_copy, mnist_cache, which):
    """A FIFO as a checkpoint's .data file (or as the folder's `checkpoint` record) blocked `eval --checkpoint
    latest` until it was killed: TensorFlow's reader opens it and waits for a writer."""
    folder = run_copy / "checkpoints"
    latest = max(folder.glob("ckpt-*.index"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    target = next(folder.glob(latest.name.replace(".index", ".data-*"))) if which == "data" else folder / "checkpoint"
    target.unlink()
    os.mkfifo(target)
    r = run_cli("eval", run_copy, "--checkpoint", "latest", env={"CONVBN_DATA_DIR": str(mnist_cache)}, timeout=120)
    one_error_line(r, str(target), "not a regular file")


def odd_saved_model(folder: Path, kind: str) -> Path:
    """A SavedModel that is an image classifier only by its signature: no `serve` method (a plain tf.Module whose
    function is called `classify`), an output dict, or an output that ignores the batch size."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.random.stateless_normal((784, 10), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32, name="image")])
        def classify(self, x):
            y = tf.matmul(tf.reshape(x, (-1, 784)), self.w)
            if kind == "dict":
                return {"scores": y}
            return y[:1] if kind == "one_row" else y

    m = Model()
    tf.saved_model.save(m, str(folder / f"odd_{kind}"), signatures={"serving_default": m.classify})
    return folder / f"odd_{kind}"


@pytest.mark.parametrize("kind", ["no_serve", "dict", "one_row"])
def test_odd_inference_only_models_predict_or_say_why_in_one_line(tmp_path, digits, kind):
    """No `.serve`, a dict of outputs, or an output that ignores the batch size: each was a traceback."""
    r = run_cli("predict", odd_saved_model(tmp_path, kind), digits, "--json")
    if kind == "one_row":
        one_error_line(r, "gave outputs of shape (1, 10) for 2 images")
    else:
        assert r.returncode == 0 and len(json.loads(r.stdout)["predictions"]) == 2, r.stderr[-1500:]


def test_a_tensorflow_1_savedmodel_is_refused(tmp_path, digits):
    """TensorFlow loads a SavedModel without an object graph the TF1 way, running the restore op its saver names
    as it loads: that op could be any saver operation (SaveV2, MergeV2Checkpoints) on any path."""
    import tensorflow as tf

    folder = tmp_path / "tf1"
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, (None, 28, 28, 1), name="x")
        y = tf.reshape(x, (-1, 784))[:, :10]
        tf.compat.v1.saved_model.simple_save(session, str(folder), {"x": x}, {"y": y})
    one_error_line(run_cli("predict", folder, digits), "TensorFlow 1 SavedModel")


def test_a_link_inside_a_savedmodel_is_refused(tmp_path, digits):
    """TensorFlow follows a link out of the model (to someone's data, a FIFO, a huge file); none is read."""
    folder = saved_model(tmp_path, "none")
    elsewhere = tmp_path / "elsewhere"
    (folder / "variables").rename(elsewhere)
    (folder / "variables").symlink_to(elsewhere)
    one_error_line(run_cli("predict", folder, digits), "symbolic link inside a SavedModel")


def test_onnx_external_data_with_a_negative_offset_is_refused(tmp_path, digits):
    """A negative offset (or length) lowered the sum the 256 MiB bound is checked against."""
    (tmp_path / "weights.bin").write_bytes(np.ones((784, 10), np.float32).tobytes())
    path = linear_onnx(tmp_path / "m.onnx", location="weights.bin", offset="-64")
    one_error_line(run_cli("predict", path, digits), "external data")
