"""examples/tour.py, the one-page tour of the Python API, run as a newcomer runs it: in its own process, with
overrides on the command line; what it prints must be what the run it wrote holds."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

TOUR = Path(__file__).resolve().parents[1] / "examples" / "tour.py"


def command(*overrides):
    return [sys.executable, str(TOUR), *map(str, overrides)]


def test_tour_prints_what_its_run_holds(tmp_path, mnist_cache):
    root = tmp_path / "runs"
    earlier = root / "tour" / "1"  # a run directory already there must stay as it is: the tour takes the next one
    earlier.mkdir(parents=True)
    (earlier / "keep.txt").write_text("earlier run")
    p = subprocess.run(command("data.max_train=1000", "train.epochs=1", f"output.root={root}"), capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout

    run = Path(re.search(r"^the run: (\S+)", out, re.M).group(1))
    assert run == root / "tour" / "2" and (run / "results.json").is_file()
    assert (earlier / "keep.txt").read_text() == "earlier run" and sorted(os.listdir(earlier)) == ["keep.txt"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["max_train"] == 1000 and cfg["train"]["epochs"] == 1  # the overrides reached the config

    # the printed test accuracy is the run's own, reread from disk by evaluate()
    results = json.loads((run / "results.json").read_text())
    assert re.search(r"^test accuracy: (\S+%)", out, re.M).group(1) == f"{results['test_acc']:.2%}"

    # one BN line per conv layer with BN, in order, every per-channel array of shape (filters,)
    convs = [layer["filters"] for layer in cfg["model"]["layers"] if layer["type"] == "conv" and layer["bn"]]
    rows = re.findall(r"^  (\w+): (\d+) channels, gamma \((\d+),\), beta \((\d+),\), moving_variance \((\d+),\)",
                      out, re.M)
    assert len(convs) == 3 and [int(r[1]) for r in rows] == convs, out
    assert all(len({int(n) for n in r[1:]}) == 1 for r in rows), rows

    # the verdict agrees with the findings listed under it
    errors, warnings = (len(re.findall(rf"^  {s}: ", out, re.M)) for s in ("error", "warning"))
    verdict = re.search(r"^diagnose: (.*)$", out, re.M).group(1)
    if errors or warnings:
        assert verdict.startswith(f"{errors} error(s), {warnings} warning(s)"), out
    else:
        assert verdict.startswith("BN looks healthy"), out


def test_tour_refuses_a_bad_override_in_one_line(tmp_path):
    p = subprocess.run(command("train.epochs=0", f"output.root={tmp_path / 'runs'}"), capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.epochs" in errors[0], p.stderr
    assert not (tmp_path / "runs").exists()
