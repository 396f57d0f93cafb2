"""Wrong paths and flags are one line before TensorFlow loads, and the `convbn` process ends with its last line
(without losing a write)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import run_cli, tiny_raw

# Each command pointed at something that is not there, as a user mistypes it: (arguments, the one line expected).
BAD = [
    (["eval", "runs/missing"], "error: runs/missing: no such run directory or checkpoint"),
    (["eval", "runs/missing", "--tta", "--bn-stats", "batch"], "--tta works with --bn-stats moving"),
    (["eval", "model.tflite"], "error: model.tflite: no such file"),
    (["inspect-bn", "missing.keras"], "error: missing.keras: no such file"),
    (["inspect-bn", "{run}", "--compare", "runs/other"], "error: runs/other: no such run directory or checkpoint"),
    (["diagnose", "{run}", "--data", "nope.npz"], "error: --data nope.npz: no such file"),
    (["recalibrate", "{run}/checkpoints/ckpt-3.index"], "give the checkpoint prefix without its extension"),
    (["export", "{run}", "--data", "nope.npz"], "error: --data nope.npz: no such file"),
    (["predict", "{run}", "missing.png"], "error: missing.png: no such file or directory"),
    (["predict", "x.tflite", "missing.png"], "error: x.tflite: no such file"),
]

# Runs the CLI in-process in a fresh interpreter and reports whether TensorFlow was imported.
PROBE = """
import json, sys
from click.testing import CliRunner
from convbn_cli.cli import main
r = CliRunner().invoke(main, json.loads(sys.argv[1]))
print(json.dumps({"code": r.exit_code, "stderr": r.stderr, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.fixture
def run_dir(tmp_path):
    """A directory that passes for a run (config.yaml), whose checkpoints are never reached."""
    run = tmp_path / "runs" / "tiny" / "1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    return run


@pytest.mark.parametrize("args,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_wrong_path_or_flag_is_one_line_before_tensorflow_loads(tmp_path, run_dir, args, message):
    args = [a.replace("{run}", str(run_dir)) for a in args]
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["code"] == 2 and message.replace("{run}", str(run_dir)) in r["stderr"], r
    assert "Traceback" not in r["stderr"] and not r["tensorflow"], r


def test_the_process_ends_with_its_last_line_and_every_file_is_written(tmp_path, mnist_cache):
    """`convbn` skips the interpreter's teardown once TensorFlow is loaded (cli.entry): the run directory must still
    be complete, the TensorBoard events included, and the exit code the command's."""
    import tensorflow as tf

    config = tmp_path / "tiny.yaml"
    raw = tiny_raw(tmp_path, **{"train.epochs": 1, "data.max_train": 640, "data.max_test": 100,
                                "output.log_every_steps": 5})
    config.write_text(yaml.safe_dump(raw))
    env = {"CONVBN_DATA_DIR": str(mnist_cache)}
    out = run_cli("train", config, "--no-progress", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip().splitlines()[-1].startswith("next: convbn eval")
    run = tmp_path / "runs" / "tiny" / "1"
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 1
    for sub, tag in (("train", "step/loss"), ("validation", "epoch/accuracy")):
        tags = {v.tag for f in (run / "tensorboard" / sub).glob("events.out.tfevents.*")
                for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
        assert {"epoch/loss", tag} <= tags, (sub, tags)
    bad = run_cli("eval", run / "checkpoints" / "ckpt-999", env=env, cwd=tmp_path)  # after TensorFlow: exit 2 still
    assert bad.returncode == 2 and "no such run directory or checkpoint" in bad.stderr
    gone = run_cli("eval", run, "--checkpoint", "999", env=env, cwd=tmp_path)
    assert gone.returncode == 2 and "no checkpoint of step 999" in gone.stderr
