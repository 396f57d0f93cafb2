"""Adversarial tests: fuzzed configs, kills at the worst moments, corrupt and hostile files, divergence,
concurrent runs. Whatever happens: a one-line error with a meaningful exit code, or a run that completes,
and nothing already written is damaged."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CONFIGS, own_dataset_for, run_cli, tiny_raw
from convbn_cli.cli import main

SHIPPED = [yaml.safe_load(p.read_text()) for p in CONFIGS]
# What a problem line may start with: a dotted config path (a layer's with its name: `model.layers[5] (pool2)`,
# docs/config.md), the config file, or an override.
SEGMENT = r"(?:\[\d+\]|\['(?:[^'\\]|\\.)*'\]|\[\"(?:[^\"\\]|\\.)*\"\])"
PROBLEM = re.compile(rf"^error: (?:(?:[A-Za-z_]\w*|{SEGMENT})(?:\.[A-Za-z_]\w*|{SEGMENT})*(?: \([^()]+\))?"
                     rf"|\(top level\)|/\S+|override (?:'.*'|\".*\")): \S")


def check_outcome(result, allow_ok=True):
    """Exit 0 (valid) or 2 with one-line problems naming a path; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert allow_ok
        return
    assert result.exit_code == 2, result.output
    if "\nError: " in "\n" + result.output:  # Click's own usage error (e.g. an override that looks like -x)
        return
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert errors, result.output
    for line in errors:
        assert PROBLEM.match(line), line


# --------------------------------------------------------------------------- 1. fuzzing configs

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def paths_of(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated_configs(draw):
    raw = copy.deepcopy(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(raw) if p]
        path = draw(st.sampled_from(paths))
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return raw


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return p


@pytest.fixture
def no_training(monkeypatch):
    """`convbn train` of a config that validates would fetch its data set (a child process `convbn data fetch`,
    which downloads into the data directory) and train for real; these tests are about bad input. Records what
    reached the stubs: `trained` (the configs) and `fetched` (the data sets)."""
    import convbn_cli.cli.common as cli_common
    import convbn_cli.train as train_pkg

    calls = SimpleNamespace(trained=[], fetched=[])
    monkeypatch.setattr(train_pkg, "train", lambda cfg, **kw: calls.trained.append(cfg))
    monkeypatch.setattr(cli_common, "fetch_apart", lambda dataset, session, progress: calls.fetched.append(dataset))
    monkeypatch.setattr("convbn_cli.tf_setup.import_tensorflow", lambda verbose=False: None)
    return calls


def _files(folder: Path) -> set:
    return set(folder.rglob("*")) if folder.exists() else set()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_shipped_config_reaches_the_trainer_only_through_the_stubbed_fetch(tmp_path, no_training, path):
    # What the fuzz test below does with a mutation that leaves the config valid: `train` gets past validation.
    # Without the stub of fetch_apart, it would start `convbn data fetch` (refused by conftest's guard; before
    # the guard, a 55 MB download into the data directory of whoever ran the fast tier).
    from convbn_cli.data.sources import cache_dir

    own = own_dataset_for(path, tmp_path)  # folder_cnn: a small folder of the user's own images
    before = _files(cache_dir())
    for command in ("validate", "train"):
        result = CliRunner().invoke(main, [command, str(path), f"output.root={tmp_path / 'runs'}", *own])
        assert result.exit_code == 0 and result.exception is None, (command, result.output, result.exception)
    if own:  # read (decoded, or from convbn's cache) with the config itself; nothing to fetch
        assert no_training.fetched == [] and [c.own.path for c in no_training.trained] == \
            [str((tmp_path / "own-images").resolve())]
        return
    dataset = yaml.safe_load(path.read_text())["data"]["dataset"]
    assert no_training.fetched == [dataset] and [c.data.dataset for c in no_training.trained] == [dataset]
    assert _files(cache_dir()) == before


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(raw=mutated_configs())
def test_mutated_shipped_configs_validate_or_fail_cleanly(tmp_path, no_training, raw):
    p = write(tmp_path, "c.yaml", yaml.safe_dump(raw, allow_unicode=True))
    for command in ("validate", "train"):
        fetched, trained = len(no_training.fetched), len(no_training.trained)
        result = CliRunner().invoke(main, [command, str(p), f"output.root={tmp_path / 'runs'}"])
        check_outcome(result)
    if result.exit_code == 0:  # a valid mutation: train got its data set through the stubbed fetch, then trained
        assert no_training.fetched[fetched:] == [c.data.dataset for c in no_training.trained[trained:]]
        assert len(no_training.trained) == trained + 1


@FUZZ
@given(doc=values)
def test_random_yaml_documents_fail_cleanly(tmp_path, no_training, doc):
    p = write(tmp_path, "c.yaml", yaml.safe_dump(doc, allow_unicode=True))
    check_outcome(CliRunner().invoke(main, ["validate", str(p)]), allow_ok=False)
    check_outcome(CliRunner().invoke(main, ["train", str(p)]), allow_ok=False)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_garbage_files_fail_cleanly(tmp_path, no_training, data):
    p = write(tmp_path, "c.yaml", data)
    check_outcome(CliRunner().invoke(main, ["validate", str(p)]), allow_ok=False)


@FUZZ
@given(key=st.text(max_size=20), value=st.text(max_size=20))
def test_random_overrides_fail_cleanly_or_apply(tmp_path, no_training, key, value):
    check_outcome(CliRunner().invoke(main, ["validate", str(CONFIGS[0]), f"{key}={value}"]))


@pytest.mark.parametrize("text", [
    "model: !!python/object/apply:os.system ['touch /tmp/convbn-pwned']\n",
    "!!python/object/new:os.system [echo]\n",
    "model: !!binary aGVsbG8=\n",
    "model: !custom {a: 1}\n",
    "",
    "   \n# only a comment\n",
    "[1, 2, 3]\n",
    "just a string\n",
    "model:\n  layers:\n    - {type: conv, filters: 1e400}\n",
    "model: {layers: [{type: dense, units: .inf}]}\n",
    "1: 2\n",
    "model: {layers: [{type: conv, filters: 99999999999999999999999999}, {type: dense, units: 10}]}\n",
    "\x00\x01\x02binary",
])
def test_hostile_yaml_is_refused_with_one_line(tmp_path, no_training, text):
    p = write(tmp_path, "c.yaml", text)
    for command in ("validate", "train"):
        check_outcome(CliRunner().invoke(main, [command, str(p)]), allow_ok=False)
    assert not os.path.exists("/tmp/convbn-pwned")


# --------------------------------------------------------------------------- 2. kills at the worst moments

KILL_HARNESS = textwrap.dedent("""
    import os, signal, sys
    where, n = sys.argv[1], int(sys.argv[2])
    count = [0]

    def hit():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "batch":  # after the n-th training call (one step each here): before the first checkpoint, or
        import convbn_cli.train.loop as loop  # inside an epoch
        real = loop.Trainer.calls
        def patched(*a, **k):
            for item in real(*a, **k):
                hit()
                yield item
        loop.Trainer.calls = patched
    elif where == "checkpoint":  # the data and index of the n-th checkpoint are written, its record is not
        from tensorflow.python.checkpoint import checkpoint_management as cm
        real_update = cm.update_checkpoint_state_internal
        def update(*a, **k):
            hit()
            return real_update(*a, **k)
        cm.update_checkpoint_state_internal = update
    elif where == "metrics":  # the n-th atomic file write: temporary written, not yet renamed
        import convbn_cli.files as files
        real_replace = files.os.replace
        class OsProxy:
            def __getattr__(self, name):
                return getattr(os, name)
            def replace(self, a, b):
                hit()
                return real_replace(a, b)
        files.os = OsProxy()
    from convbn_cli.cli import main
    main(["train", *sys.argv[3:]], prog_name="convbn")
""")


def kill_config(tmp_path):
    raw = tiny_raw(tmp_path, **{"data.max_train": 1280, "data.max_test": 200, "train.epochs": 3})
    p = tmp_path / "kill.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def assert_run_is_whole(run, epochs):
    from convbn_cli.tf_setup import import_tensorflow

    tf = import_tensorflow()
    from convbn_cli.runs.target import open_target

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == epochs + 1
    for k in range(1, epochs + 1):
        json.loads((run / "bn_stats" / f"epoch_{k}.json").read_text())
    json.loads((run / "results.json").read_text())
    yaml.safe_load((run / "config.yaml").read_text())
    for prefix in tf.train.get_checkpoint_state(str(run / "checkpoints")).all_model_checkpoint_paths:
        open_target(prefix)  # every checkpoint on record restores
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("where,n", [
    ("batch", 3),        # before the first checkpoint
    ("batch", 60),       # in the middle of epoch 2 (40 batches an epoch)
    ("checkpoint", 2),   # while the second epoch's checkpoint is being written
    ("metrics", 3),      # while epoch 2's metrics.jsonl is being replaced
])
def test_sigkill_at_any_moment_then_resume_completes(tmp_path, mnist_cache, where, n):
    cfg = kill_config(tmp_path)
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}
    killed = subprocess.run([sys.executable, "-c", KILL_HARNESS, where, str(n), str(cfg), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "runs" / "tiny" / "1"
    r = run_cli("train", "--resume", run, "--no-progress", env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 0, r.stderr
    assert_run_is_whole(run, 3)


# --------------------------------------------------------------------------- 3. corrupt and hostile files

@pytest.fixture
def finished_run(trained):
    return trained[1].run_dir


def tree_hashes(root):
    """sha256 of every file under root, except the temporaries of atomic writes in progress."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(".tmp")}


def test_bit_flipped_checkpoint_is_refused_and_nothing_changes(finished_run, tmp_path, mnist_cache):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # the latest checkpoint (by step number, not by name: ckpt-100 sorts before ckpt-50)
    data = max((run / "checkpoints").glob("ckpt-*.data-*"), key=lambda p: int(p.name.split(".")[0].split("-")[1]))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    before = tree_hashes(run)
    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    for args in (["eval", str(run), "--checkpoint", "latest"], ["inspect-bn", str(run), "--checkpoint", "latest"],
                 ["export", str(run), "--checkpoint", "latest"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert "cannot restore this model" in r.output and "Traceback" not in r.output
    assert tree_hashes(run) == before


def test_unwritable_output_is_one_line_and_nothing_is_damaged(finished_run, tmp_path, mnist_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = kill_config(tmp_path)
    r = run_cli("train", cfg, f"output.root={blocker}", env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: output.root: cannot create a run directory under")
    assert blocker.read_text() == "not a directory"


def test_full_disk_during_training_keeps_what_was_written(tmp_path, mnist_cache, monkeypatch):
    """ENOSPC on the second epoch's metrics write: a one-line error, exit 2, epoch 1's files intact."""
    import convbn_cli.files as files

    cfg = kill_config(tmp_path)
    real_fdopen = os.fdopen
    state = {"writes": 0, "snapshot": None}

    def fdopen(fd, *a, **k):
        if "metrics.jsonl" in os.readlink(f"/proc/self/fd/{fd}"):
            state["writes"] += 1
            if state["writes"] == 2:
                run = tmp_path / "runs" / "tiny" / "1"
                state["snapshot"] = tree_hashes(run)
                os.close(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "metrics.jsonl"))
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    monkeypatch.setenv("CONVBN_DATA_DIR", str(mnist_cache))
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    run = tmp_path / "runs" / "tiny" / "1"
    assert tree_hashes(run) == state["snapshot"]  # nothing written before the failure was touched
    assert not list(run.rglob("*.tmp"))  # and the failed write cleaned up after itself
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


# --------------------------------------------------------------------------- 4. divergence

def test_divergence_keeps_good_checkpoints_that_eval_accepts(tmp_path, mnist_cache):
    # three linear layers; the one-cycle learning rate climbs from 2e-4 towards an absurd 20 and the weights
    # blow up a few epochs in, after the first epochs were checkpointed
    raw = tiny_raw(tmp_path, **{"data.max_train": 1280, "data.max_test": 300, "train.epochs": 20,
                                "train.optimizer": {"name": "momentum", "lr": 20.0},
                                "train.schedule": {"name": "one_cycle", "pct_start": 0.9, "div_factor": 100000.0}})
    raw["model"]["layers"] = [{"type": "flatten"}, {"type": "dense", "units": 64}, {"type": "dense", "units": 64},
                              {"type": "dense", "units": 10}]
    p = tmp_path / "diverge.yaml"
    p.write_text(yaml.safe_dump(raw))
    env = {"CONVBN_DATA_DIR": str(mnist_cache)}
    r = run_cli("train", p, "--no-progress", env=env)
    assert r.returncode == 3, r.stderr
    assert "non-finite" in r.stderr and "Last good checkpoint:" in r.stderr and "Traceback" not in r.stderr
    run = tmp_path / "runs" / "tiny" / "1"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(x["train_loss"]) for x in rows)
    for which in ("best", "latest"):
        e = run_cli("eval", run, "--checkpoint", which, "--json", env=env)
        assert e.returncode == 0, e.stderr
        assert math.isfinite(json.loads(e.stdout)["loss"])


# --------------------------------------------------------------------------- 5. concurrency

def test_two_runs_with_the_same_name_get_different_directories(tmp_path, mnist_cache):
    raw = tiny_raw(tmp_path, **{"data.max_train": 320, "data.max_test": 100, "train.epochs": 1})
    p = tmp_path / "same.yaml"
    p.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(p), "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    dirs = sorted(line.split(": ", 1)[1] for out, _ in outs for line in out.splitlines()
                  if line.startswith("run directory:"))
    assert len(set(dirs)) == 2
    for d in dirs:
        assert json.loads((Path(d) / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_concurrent_fetches_leave_one_valid_cache(tmp_path, mnist_cache):
    from conftest import write_idx
    from convbn_cli.data.formats import read_npz

    good = read_npz(mnist_cache / "mnist.npz")
    src = tmp_path / "idx"
    src.mkdir()
    for key, name in {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                      "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}.items():
        write_idx(src / name, good[key])
    cache = tmp_path / "cache"
    env = {**os.environ, "CONVBN_DATA_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "convbn_cli", "data", "fetch", "--from", str(src),
                               "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.npz"]  # no temporary files left
    cached = read_npz(cache / "mnist.npz")
    assert all(np.array_equal(cached[k], good[k]) for k in good)
