"""Export never deletes, nothing hangs, every bad input is one line, every read is bounded, signals and leftovers.

Each test reproduces one way today's hostile user broke convbn and checks the promised exit code and message,
with the files that could have been damaged hashed before and after."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import run_cli, synthetic_arrays, tiny_raw, write_idx  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import ConfigError, load_config  # noqa: E402
from convbn_cli.data import DataError  # noqa: E402
from convbn_cli.data.formats import read_idx, read_npz  # noqa: E402
from convbn_cli.runs import RunDirError  # noqa: E402
from convbn_cli.train import train  # noqa: E402


def tree_hashes(root):
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def errors_of(output):
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- 1. export never deletes

def test_export_refuses_existing_outputs_and_never_replaces_what_is_not_an_export(run_copy, cli, tmp_path,
                                                                                     monkeypatch):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    guarded = {p: tree_hashes(p) for p in (run_copy, user_dir)}
    cases = [  # (output, format, with --force, message)
        (run_copy, "savedmodel", False, "already exists; add --force"),
        (run_copy, "savedmodel", True, "only a SavedModel directory convbn wrote"),
        # runs/<name>: every run under it
        (run_copy.parent, "savedmodel", True, "only a SavedModel directory convbn wrote"),
        (user_dir, "savedmodel", True, "only a SavedModel directory convbn wrote"),
        (user_dir, "savedmodel", False, "already exists"),
        (Path("."), "savedmodel", True, "working directory"),
        (Path("."), "tflite", True, "must end in .tflite"),
        (tmp_path / "m.tflite", "keras", False, "a keras export must end in .keras"),
        (tmp_path / "m", "keras", False, "must end in .keras"),
        (tmp_path / "m.keras", "savedmodel", False, "a SavedModel is a directory"),
        (user_dir / "notes.txt", "tflite", True, "must end in .tflite"),
    ]
    for output, fmt, force, message in cases:
        r = cli("export", run_copy, "--format", fmt, "--output", output, *(["--force"] if force else []))
        assert r.exit_code == 2, (output, fmt, r.output)
        assert len(errors_of(r.output)) == 1 and message in r.output, (output, fmt, r.output)
    assert {p: tree_hashes(p) for p in guarded} == guarded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "runs"]  # nothing else written, not even staging


def test_force_replaces_a_previous_export_of_the_same_kind(run_copy, cli, tmp_path):
    for fmt, out in (("keras", tmp_path / "m.keras"), ("savedmodel", tmp_path / "sm")):
        assert cli("export", run_copy, "--format", fmt, "--output", out).exit_code == 0
        again = cli("export", run_copy, "--format", fmt, "--output", out)
        assert again.exit_code == 2 and "--force" in again.output
        forced = cli("export", run_copy, "--format", fmt, "--output", out, "--fold-bn", "--force")
        assert forced.exit_code == 0, forced.output
    assert not list(tmp_path.glob(".*.tmp"))
    # a file of the user's inside a real export: --force refuses, and the export is left exactly as it was
    (tmp_path / "sm" / "variables" / "thesis.tex").write_text("three years")
    before = tree_hashes(tmp_path / "sm")
    refused = cli("export", run_copy, "--format", "savedmodel", "--output", tmp_path / "sm", "--force")
    assert refused.exit_code == 2 and "variables/thesis.tex is not a file convbn wrote" in refused.output
    assert tree_hashes(tmp_path / "sm") == before


def test_sigterm_during_export_removes_the_staging_and_exits_143(run_copy, cli, tmp_path, monkeypatch):
    from convbn_cli.formats import runtime

    real_write = runtime.write

    def write_then_terminated(model, fmt, path, about):
        real_write(model, fmt, path, about)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the export sits in its staging directory

    monkeypatch.setattr(runtime, "write", write_then_terminated)
    r = cli("export", run_copy, "--format", "savedmodel", "--output", tmp_path / "sm")
    assert r.exit_code == 143 and "interrupted by SIGTERM" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no export, no staging left


# --------------------------------------------------------------------------- 2. nothing hangs

def _tiny_file(tmp_path, **over):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"data.max_train": 640, "data.max_test": 100, **over})))
    return p


def _free_ports(n):
    from convbn_cli.launcher import free_ports

    return free_ports(n)


def test_a_worker_whose_peer_never_starts_gives_up_naming_it(tmp_path, mnist_cache):
    ports = _free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 0}}
    t0 = time.time()
    r = run_cli("train", _tiny_file(tmp_path), "distribute.strategy=multi_worker", timeout=120,
                env={"CONVBN_DATA_DIR": str(mnist_cache), "TF_CONFIG": json.dumps(tf_config),
                     "CONVBN_WORKER_STARTUP_TIMEOUT": "3"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert errors_of(r.stderr) == [f"error: the cluster did not start within 3 s ($CONVBN_WORKER_STARTUP_TIMEOUT): "
                                   f"no answer from worker 1 (127.0.0.1:{ports[1]})"]
    assert time.time() - t0 < 60 and not (tmp_path / "runs").exists()


def test_sigterm_ends_a_worker_waiting_for_its_peers_at_once(tmp_path, mnist_cache):
    ports = _free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 0}}
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache), "TF_CONFIG": json.dumps(tf_config)}
    proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(_tiny_file(tmp_path)),
                             "distribute.strategy=multi_worker"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not _listening(ports[0]):  # the child is inside TensorFlow's wait
        time.sleep(0.2)
    time.sleep(1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.time() - t0 < 10, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err


def _listening(port):
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("tf_config,message", [
    ("{not json", "TF_CONFIG: not a cluster description"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}),
     "TF_CONFIG: task index 3 is out of range for the 1 worker(s) in the cluster"),
])
def test_bad_tf_config_is_one_line(tmp_path, tf_config, message):
    r = run_cli("train", _tiny_file(tmp_path), "distribute.strategy=multi_worker", env={"TF_CONFIG": tf_config})
    assert r.returncode == 2 and len(errors_of(r.stderr)) == 1 and message in r.stderr, r.stderr[-2000:]


def test_workers_check_their_input_before_starting(tmp_path):
    r = run_cli("train", _tiny_file(tmp_path), "model.bn.decay=3", "--workers", "2")
    assert r.returncode == 2 and errors_of(r.stderr) == ["error: model.bn.decay: must be in [0, 1), got 3"]
    r = run_cli("train", "--resume", tmp_path / "nope", "--workers", "2")
    assert r.returncode == 2 and "no such run directory" in r.stderr and "worker 0" not in r.stderr


# --------------------------------------------------------------------------- 3. networks that cannot train

@pytest.mark.parametrize("layers,message", [
    ([{"type": "conv", "filters": 4}] * 400 + [{"type": "global_pool"}, {"type": "dense", "units": 10}],
     "model.layers: 402 layers, more than the 100 convbn builds"),
    ([{"type": "conv", "filters": 64}, {"type": "flatten"}, {"type": "dense", "units": 999999},
      {"type": "dense", "units": 10}],  # 50 G parameters
     "model.layers[2] (dense1): the network needs about"),
    ([{"type": "conv", "filters": 65536}, {"type": "global_pool"}, {"type": "dense", "units": 10}],
     "model.layers[0] (conv1): the network needs about"),
])
def test_networks_too_big_for_the_machine_are_refused_before_anything_is_written(tmp_path, layers, message):
    p = _tiny_file(tmp_path, **{"model.layers": layers})
    r = run_cli("validate", p)
    assert r.returncode == 2 and len(errors_of(r.stderr)) == 1 and message in r.stderr, r.stderr
    r = run_cli("train", p)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "runs").exists()


def test_validate_prints_the_estimates(tmp_path):
    r = run_cli("validate", _tiny_file(tmp_path))
    assert r.returncode == 0 and "estimated training memory:" in r.stdout and "for a batch of 32" in r.stdout


def test_failures_before_training_leave_no_run_directory(tmp_path, monkeypatch, synthetic):
    import convbn_cli.data.sources as sources
    import convbn_cli.train.loop as loop

    cfg = load_config(raw=tiny_raw(tmp_path))

    def no_data(*a, **k):
        raise DataError("no source could provide mnist (stub)")

    def too_deep(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(sources, "fetch", no_data)  # where the trainer's data.load.dataset_arrays fetches
    with pytest.raises(DataError):
        train(cfg, log=lambda m: None, progress=False)
    monkeypatch.setattr(sources, "fetch", lambda *a, **k: synthetic)
    monkeypatch.setattr(loop, "build_model", too_deep)
    r = CliRunner().invoke(main, ["train", str(_tiny_file(tmp_path))])
    assert r.exit_code == 2 and errors_of(r.output) == [
        "error: the network is too deep to build (Python's recursion limit); use fewer layers"]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- 4. bounded reads

def _npz_claiming(path, n):
    """An npz of tiny arrays whose x_train header claims n images."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for key, arr in synthetic_arrays(20, 10).items():
            buf = io.BytesIO()
            shape = (n, *arr.shape[1:]) if key == "x_train" else arr.shape
            np.lib.format.write_array_header_1_0(buf, {"descr": arr.dtype.str, "fortran_order": False, "shape": shape})
            z.writestr(key + ".npy", buf.getvalue() + arr.tobytes())


def test_a_cache_whose_header_claims_a_billion_images_is_refetched(data_dir, monkeypatch, mnist):
    from convbn_cli.data import cache_path, fetch, registry, sources

    data_dir.mkdir(parents=True)
    _npz_claiming(cache_path("mnist"), 10**9)
    with pytest.raises(DataError, match=r"x_train has shape \(1000000000, 28, 28\)"):
        read_npz(cache_path("mnist"), registry.MNIST)
    monkeypatch.setattr(sources, "automatic_sources", lambda d: [("stub", lambda d, progress: mnist)])
    lines = []
    got = fetch("mnist", log=lines.append, progress=False)
    assert len(got["y_train"]) == 60000 and any("cache unusable" in ln for ln in lines)


def test_idx_reads_are_bounded_by_the_header(tmp_path):
    from convbn_cli.data import registry

    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (10000, 28, 28))
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:  # 100 MB of zeros behind a header that declares 7.8 MB
        f.write(header)
        for _ in range(100):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="promises 7840000 bytes of data for shape .*file has more"):
        read_idx(bomb, (10000, (28, 28)))
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.write(header)
        f.truncate(40 * 2**30)  # 40 GB, almost all holes
    with pytest.raises(DataError, match="file has more"):
        read_idx(sparse, (10000, (28, 28)))
    wrong = tmp_path / "wrong"
    write_idx(wrong, np.zeros((5, 28, 29), np.uint8))
    with pytest.raises(DataError, match=r"declares shape \(5, 28, 29\); this dataset has at most 10000 items of shape "
                                        r"\(28, 28\)"):
        read_idx(wrong, (10000, (28, 28)))
    huge = tmp_path / "huge"
    huge.write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**31, 2**10, 2**10)))
    with pytest.raises(DataError):
        read_idx(huge, (registry.MNIST.train_size, (28, 28)))
    with pytest.raises(DataError, match="more than any MNIST-like file"):
        read_idx(huge)


@pytest.mark.parametrize("text,message", [
    (None, "is a device, not a file; refused"),  # /dev/zero: never read
    ("model: " + "[" * 20000 + "]" * 20000, "nest"),  # libyaml's own limit, or convbn's (32 levels)
    ("model: " + "[" * 40 + "]" * 40, "nested more than 32 levels deep"),
    ("model:\n  layers: [{type: flatten}, {type: dense, units: 10}]\ntrain: {epochs: 1}\ntrain: {epochs: 2}\n",
     "key 'train' appears twice (lines 3 and 4)"),
])
def test_hostile_config_files_are_one_line(tmp_path, text, message):
    path = "/dev/zero" if text is None else tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    r = run_cli("validate", path, timeout=60)
    assert r.returncode == 2 and len(errors_of(r.stderr)) == 1 and message in r.stderr, r.stderr[-2000:]


def test_deep_yaml_in_a_run_directory_is_one_line_for_eval_and_resume(run_copy, cli):
    (run_copy / "config.yaml").write_text("model: " + "[" * 20000 + "]" * 20000)
    for args in (["eval", run_copy], ["inspect-bn", run_copy], ["train", "--resume", run_copy]):
        r = cli(*args)
        assert r.exit_code == 2 and len(errors_of(r.output)) == 1 and "nest" in r.output, r.output
        assert "Traceback" not in r.output and r.output.count("config.yaml") == 1


def test_many_unknown_keys_report_the_first_few(tmp_path):
    raw = {"model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]},
           **{f"k{i}": 1 for i in range(64000)}}
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    assert len(e.value.problems) == 21 and e.value.problems[0].startswith("k0: unknown key")
    assert e.value.problems[-1] == "... and more problems (64000 in all); fix these first"


@pytest.mark.parametrize("key,value,message", [
    ("output.root", "a\x00b", "output.root: must not contain a NUL byte or a line break"),
    ("output.root", "a\nb", "output.root: must not contain a NUL byte or a line break"),
    ("output.name", "..", "output.name: must be a directory name, not '..'"),
    ("output.name", ".", "output.name: must be a directory name, not '.'"),
    ("output.name", "/etc", "output.name: may contain only letters"),
])
def test_paths_in_settings_cannot_escape_or_break_lines(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(tmp_path, **{key: value}))
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- 5. run-directory integrity

def test_a_run_directory_deleted_while_training_stops_the_run(tmp_path, synthetic):
    cfg = load_config(raw=tiny_raw(tmp_path))

    def delete_at_step_5(step, model):
        if step == 5:
            shutil.rmtree(tmp_path / "runs" / "tiny" / "1")

    with pytest.raises(RunDirError, match="removed while training"):
        train(cfg, data=synthetic, log=lambda m: None, progress=False, on_step=delete_at_step_5)
    assert not (tmp_path / "runs" / "tiny" / "1").exists()  # not silently recreated


@pytest.mark.parametrize("line", ['[1, 2]', '{"epoch": "one"}', '{"step": 3}', '"text"',
                                  '{"epoch": 1, "step": 20}'])  # the last: no wall_time_s (was a KeyError)
def test_corrupt_metrics_on_resume_is_one_line(run_copy, cli, line):
    (run_copy / "metrics.jsonl").write_text(line + "\n")
    before = tree_hashes(run_copy)
    r = cli("train", "--resume", run_copy, "--no-progress")
    assert r.exit_code == 2 and len(errors_of(r.output)) == 1 and "line 1 is not a metrics row" in r.output
    assert "Traceback" not in r.output and tree_hashes(run_copy) == before


def test_resume_with_fewer_epochs_than_done_changes_nothing(run_copy, cli):
    before = tree_hashes(run_copy)
    r = cli("train", "--resume", run_copy, "train.epochs=1", "--no-progress")
    assert r.exit_code == 2 and "has already trained 2 epochs; train.epochs=1" in r.output
    assert tree_hashes(run_copy) == before  # config.yaml and results.json still say 2 epochs


# --------------------------------------------------------------------------- 6. other bad input

def test_keras_models_that_do_not_fit_or_are_not_models(run_copy, cli, tmp_path):
    import keras

    (run_copy / "export").mkdir()
    inp = keras.Input((32, 32, 1))
    keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp))).save(run_copy / "export" / "wide.keras")
    inp = keras.Input((28, 28, 1))
    keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(inp))).save(run_copy / "export" / "three.keras")
    (run_copy / "export" / "empty.keras").write_bytes(b"")
    (run_copy / "export" / "junk.keras").write_bytes(b"\x00garbage" * 100)
    for name, message in (("wide", "takes inputs of shape (None, 32, 32, 1), but mnist images are (28, 28, 1)"),
                          ("three", "gives outputs of shape (None, 3), but mnist needs 10 logits"),
                          ("empty", "not a Keras model file (a .keras file is a zip archive; this one is empty)"),
                          ("junk", "not a Keras model file")):
        r = cli("eval", run_copy / "export" / f"{name}.keras")
        assert r.exit_code == 2 and len(errors_of(r.output)) == 1 and message in r.output, (name, r.output)


def test_plot_with_an_unsupported_suffix_is_refused(run_copy, cli, tmp_path):
    r = cli("inspect-bn", run_copy, "--plot", tmp_path / "out.txt")
    assert r.exit_code == 2 and "must end in one of .png, .pdf, .svg" in r.output
    assert not (tmp_path / "out.txt").exists()


def test_compare_matches_layers_by_name_and_size(run_copy, tmp_path, synthetic, cli):
    raw = tiny_raw(tmp_path / "other", **{"train.epochs": 1})
    raw["model"]["layers"][1]["filters"] = 5  # conv2_bn: same name, other size; conv1_bn matches
    raw["model"]["layers"].insert(2, {"type": "conv", "filters": 3, "kernel": 1})  # conv3_bn: only here
    other = train(load_config(raw=raw), data=synthetic, log=lambda m: None, progress=False).run_dir
    r = cli("inspect-bn", run_copy, "--compare", other, "--format", "csv")
    assert r.exit_code == 0, r.output
    assert {row.split(",")[0] for row in r.stdout.splitlines()[1:]} == {"conv1_bn"}
    assert "not compared (no BN layer of the same name and size in the other): conv2_bn, conv3_bn" in r.output
    t = cli("inspect-bn", run_copy, "--compare", other, "--all")
    assert t.exit_code == 0 and "no counterpart in the other checkpoint" in t.output
    summary = cli("inspect-bn", run_copy, "--compare", other).output
    assert "conv2_bn  not compared: no BN layer of this name and size in the other" in summary


# --------------------------------------------------------------------------- 7. signals and leftovers

def test_ctrl_c_during_a_fetch_exits_130(tmp_path, monkeypatch):
    import convbn_cli.data.sources as sources

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "fetch", interrupted)
    r = CliRunner(env={"CONVBN_DATA_DIR": str(tmp_path)}).invoke(main, ["data", "fetch"])
    assert r.exit_code == 130 and "interrupted by SIGINT" in r.output and "Aborted" not in r.output


def test_two_ctrl_c_in_a_row_leave_a_resumable_run(tmp_path, mnist_cache):
    p = _tiny_file(tmp_path, **{"train.epochs": 100, "data.max_train": 2000})
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(p), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "tiny" / "1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    r = run_cli("train", "--resume", metrics.parent, "train.epochs=2", "--no-progress",
                env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(metrics.parent.rglob("*_temp*")) and not list(metrics.parent.rglob(".*.tmp"))


def test_stale_temporaries_are_removed_by_the_next_command_that_owns_them(run_copy, cli, tmp_path, mnist_cache):
    old = time.time() - 3600
    stale_cache = mnist_cache / ".mnist.npz.abc12345.tmp"
    fresh_cache = mnist_cache / ".mnist.npz.def45678.tmp"  # may be a fetch running right now: kept
    for f in (stale_cache, fresh_cache):
        f.write_bytes(b"partial")
    os.utime(stale_cache, (old, old))
    stale_export = tmp_path / ".m.keras.xyz_9876.tmp"
    stale_export.mkdir()
    os.utime(stale_export, (old, old))
    users = mnist_cache / ".mnist.npz.my-notes.tmp"  # old, but not a name convbn writes: kept
    users.write_text("mine")
    os.utime(users, (old, old))
    stale_ckpt = run_copy / "checkpoints" / "ckpt-999_temp"
    stale_ckpt.mkdir()
    from convbn_cli.data import sources

    sources._store(mnist_cache / "mnist.npz", read_npz(mnist_cache / "mnist.npz"), lambda m: None)  # a fetch
    assert not stale_cache.exists() and fresh_cache.exists() and users.read_text() == "mine"
    fresh_cache.unlink()
    users.unlink()
    assert cli("export", run_copy, "--output", tmp_path / "m.keras").exit_code == 0
    assert not stale_export.exists()
    assert cli("train", "--resume", run_copy, "--no-progress").exit_code == 0
    assert not stale_ckpt.exists()


# --------------------------------------------------------------------------- 8. the cache follows the umask

def test_cache_files_follow_the_umask(data_dir, mnist):
    from convbn_cli.data import cache_path
    from convbn_cli.data.formats import write_npz_atomic

    old = os.umask(0o022)
    try:
        write_npz_atomic(cache_path("mnist"), mnist)
    finally:
        os.umask(old)
    assert cache_path("mnist").stat().st_mode & 0o777 == 0o644
