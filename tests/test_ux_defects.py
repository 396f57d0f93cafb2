"""Small defects a new user hit (issue 36): each mistake is one line that says what was wrong and what to give
instead (exit 2), and what the user sees (the diagnose table's ids, the gamma plots' red lines) is explained.

The fast tests here stop before TensorFlow loads (the CLI's checks of what it was pointed at); the slow ones open
a real run."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, tiny_raw
from convbn_cli.cli import main
from convbn_cli.errors import ConfigError, DataError


def convbn(*args):
    """`convbn ARGS` in this process: (exit code, stderr's lines)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr.strip().splitlines()


@pytest.fixture
def run_dir(tmp_path):
    """A directory that passes for a run (config.yaml), whose checkpoints are never read: two recalibrated ones and
    an empty best/."""
    run = tmp_path / "runs" / "tiny" / "1"
    (run / "checkpoints" / "recalibrated").mkdir(parents=True)
    (run / "checkpoints" / "best").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    for n in (1, 2):
        for suffix in (".index", ".data-00000-of-00001"):
            (run / "checkpoints" / "recalibrated" / f"ckpt-{n}{suffix}").write_bytes(b"")
    return run


# --------------------------------------------------------------------------- 1. a file of another format

def test_a_model_file_of_another_format_is_named_with_what_is_accepted(tmp_path):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    code, lines = convbn("eval", h5)
    assert code == 2 and len(lines) == 1, lines
    assert "no such" not in lines[0] and "HDF5" in lines[0] and "save it again as NAME.keras" in lines[0], lines
    assert all(k in lines[0] for k in ("run directory", "checkpoint prefix", ".keras", ".tflite", ".onnx")), lines
    code, lines = convbn("inspect-bn", h5)  # a command that needs a Keras model lists only what it opens
    assert code == 2 and ".keras" in lines[0] and ".tflite" not in lines[0], lines
    other = tmp_path / "notes.txt"
    other.write_text("x")
    code, lines = convbn("eval", other)
    assert code == 2 and "a .txt file" in lines[0] and "no such" not in lines[0], lines


# --------------------------------------------------------------------------- 2. a checkpoint folder

def test_a_checkpoint_folder_is_its_newest_checkpoint_said_aloud(run_dir):
    from convbn_cli.runs.locate import locate

    folder = run_dir / "checkpoints" / "recalibrated"
    where = locate(folder)
    assert where.kind == "prefix" and where.path == folder / "ckpt-2", where
    assert str(folder / "ckpt-2") in where.note and "newest" in where.note, where.note
    assert locate(f"{folder}/").path == folder / "ckpt-2"


def test_a_checkpoint_folder_without_checkpoints_says_what_to_pass(run_dir):
    code, lines = convbn("inspect-bn", run_dir, "--compare", run_dir / "checkpoints" / "best")
    assert code == 2 and len(lines) == 1, lines
    assert "holds no checkpoint" in lines[0] and f"run directory {run_dir} (with --checkpoint" in lines[0], lines


# --------------------------------------------------------------------------- 3. train CONFIG --resume MISSING

def test_resume_of_a_missing_run_says_the_run_is_missing(tmp_path, run_dir):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    code, lines = convbn(*("train", config, "--resume", tmp_path / "missing"))
    assert code == 2 and lines == [f"error: {tmp_path / 'missing'}: no such run directory"], lines
    code, lines = convbn(*("train", config, "--resume", run_dir))  # the run is there: CONFIG is what is wrong
    assert code == 2 and len(lines) == 1 and "give no CONFIG" in lines[0] and str(config) in lines[0], lines


def test_sweep_resume_of_a_missing_sweep_says_the_sweep_is_missing(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    code, lines = convbn("sweep", config, "model.bn.decay=0.9,0.99", "--resume", tmp_path / "missing")
    assert code == 2 and lines == [f"error: {tmp_path / 'missing'}: no such sweep directory"], lines
    code, lines = convbn("sweep", config, "--resume", tmp_path)  # it is there: CONFIG is what is wrong
    assert code == 2 and len(lines) == 1 and "give no CONFIG" in lines[0], lines


# --------------------------------------------------------------------------- 4. bare leaf keys

@pytest.mark.parametrize("override,full", [("epochs=2", "train.epochs"), ("lr=0.01", "train.optimizer.lr"),
                                           ("batch_size=64", "data.batch_size"), ("batch=64", "data.batch_size"),
                                           ("train.batch_size=64", "data.batch_size")])
def test_a_bare_leaf_key_gets_its_full_dotted_key(tmp_path, override, full):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    code, lines = convbn("validate", config, override)
    key = override.split("=")[0]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {key}: unknown key; did you mean {full}?"), lines


def test_a_bare_leaf_key_of_several_settings_names_each():
    from convbn_cli.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(Path("/nonexistent")), overrides=["decay=0.9"])
    assert "did you mean model.bn.decay or train.ema.decay?" in e.value.problems[0], e.value.problems


# --------------------------------------------------------------------------- 5. --data for a convbn run

@pytest.mark.parametrize("command", ["diagnose", "recalibrate", "export"])
def test_data_for_a_run_of_another_dataset_is_refused(run_dir, command):
    code, lines = convbn(command, run_dir, "--data", "fashion_mnist")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --data fashion_mnist:") and "trained on mnist" in lines[0], lines


def test_data_naming_the_runs_own_dataset_passes(run_dir):
    from convbn_cli.cli.common import check_paths
    from convbn_cli.runs.locate import check_data_of_run

    check_paths(str(run_dir), data="mnist")
    check_paths(str(run_dir / "checkpoints" / "recalibrated" / "ckpt-1"), data="mnist")
    with pytest.raises(DataError):
        check_paths(str(run_dir / "checkpoints" / "recalibrated"), data="fashion_mnist")
    with pytest.raises(DataError):  # what a Target of a run checks, for callers of the Python API
        check_data_of_run("run", "mnist", "fashion_mnist")


# --------------------------------------------------------------------------- 6. diagnose's ids and the docs' table

def _finding_ids() -> set:
    """Every id a Finding(...) in convbn_cli/analysis/ can have: a string, or a name the function assigns strings."""
    ids = set()
    for path in sorted((REPO / "convbn_cli" / "analysis").glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Finding"):
                first = call.args[0] if call.args else next(k.value for k in call.keywords if k.arg == "name")
                if isinstance(first, ast.Constant):
                    ids.add(first.value)
                    continue
                assigned = [a.value for a in ast.walk(fn) if isinstance(a, ast.Assign) and isinstance(first, ast.Name)
                            and any(getattr(t, "id", None) == first.id for t in a.targets)]
                found = {c.value for v in assigned for c in ast.walk(v) if isinstance(c, ast.Constant)
                         and isinstance(c.value, str)}
                assert found, f"{path.name}:{call.lineno}: the finding's id is neither a string nor assigned one here"
                ids |= found
    return ids


def _check_ids() -> set:
    """The ids of diagnose's checks (what `passed` lists): CHECKS's functions without `check_`."""
    tree = ast.parse((REPO / "convbn_cli" / "analysis" / "diagnose.py").read_text())
    checks = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "CHECKS" for t in n.targets))
    return {e.id.removeprefix("check_") for e in checks.elts}


def test_the_docs_table_lists_exactly_the_ids_diagnose_can_emit():
    text = (REPO / "docs" / "usage.md").read_text()
    start = text.index("| check | finding |")
    rows = [line for line in text[start:].split("\n\n")[0].splitlines()[2:]]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    table_checks = {re.fullmatch(r"`(\w+)`", c[0]).group(1) for c in cells}
    table_findings = {name for c in cells for name in re.findall(r"`(\w+)` \(", c[1])}
    code_checks, code_findings = _check_ids(), _finding_ids()
    # a new check or finding gets its row (check | finding | ...) in docs/usage.md's table; a removed one loses it
    assert table_checks == code_checks, {"checks only in the code": code_checks - table_checks,
                                         "checks only in the docs": table_checks - code_checks}
    assert table_findings == code_findings, {"findings only in the code": code_findings - table_findings,
                                             "findings only in the docs": table_findings - code_findings}


# --------------------------------------------------------------------------- 7. the gamma plots' red lines

def test_the_gamma_plots_say_what_their_red_lines_are(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import numpy as np

    from convbn_cli.present.inspection import plot

    shown = []
    monkeypatch.setattr(plt, "close", shown.append)  # keep the figure to read its words
    layer = {"channels": 3, "gamma": np.array([1.0, 0.001, -0.5]), "beta": np.zeros(3),
             "moving_variance": np.ones(3), "scale_learned": True, "center": True}
    plot({"checkpoint": "c", "layers": {"bn": layer}}, tmp_path / "p.png", 0.02)
    fig = shown[0]
    red = [line for ax in fig.axes for line in ax.get_lines() if line.get_color() == "red"]
    assert red and all(abs(y) == 0.02 for line in red for y in line.get_ydata()), "the red lines moved"
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "red lines" in caption and "0.02" in caption and "dead" in caption and "--dead-threshold" in caption, caption
    plt.close(fig)


# --------------------------------------------------------------------------- the same, before TensorFlow, for real

PROBE = """
import json, sys
from click.testing import CliRunner
from convbn_cli.cli import main
r = CliRunner().invoke(main, json.loads(sys.argv[1]))
print(json.dumps({"code": r.exit_code, "stderr": r.stderr, "tensorflow": "tensorflow" in sys.modules}))
"""


def test_these_mistakes_are_told_before_tensorflow_loads(tmp_path, run_dir):
    (tmp_path / "model.h5").write_bytes(b"x")
    for args in (["eval", "model.h5"], ["diagnose", str(run_dir), "--data", "fashion_mnist"],
                 ["inspect-bn", str(run_dir), "--compare", str(run_dir / "checkpoints" / "best")],
                 ["train", "tiny.yaml", "--resume", "missing"]):
        out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        r = json.loads(out.stdout)
        assert r["code"] == 2 and len(r["stderr"].splitlines()) == 1 and not r["tensorflow"], (args, r)


# --------------------------------------------------------------------------- slow: a real run

def test_inspect_bn_compares_with_the_folder_recalibrate_printed(run_copy, cli):
    r = cli("-q", "recalibrate", run_copy, "--batches", "2")
    assert r.exit_code == 0, r.output
    saved = next(line for line in r.stdout.splitlines() if line.startswith("saved ")).split(" ", 1)[1]
    folder = Path(saved).parent
    r = cli("inspect-bn", run_copy, "--compare", folder)
    assert r.exit_code == 0, r.output
    assert f"using its newest checkpoint, {saved}" in r.stderr, r.stderr
    assert "mean |d gamma|" in r.stdout, r.stdout  # the comparison, per layer


def test_the_api_refuses_another_dataset_for_a_run(run_copy):
    from convbn_cli.analysis.diagnose import diagnose

    with pytest.raises(DataError, match="trained on mnist"):
        diagnose(str(run_copy), data="fashion_mnist", batches=1)
