"""Reliability round 3 (issue 27), signals: SIGINT/SIGTERM end a command whenever they arrive, after training
too (test evaluation, precise BN, pictures) and between a sweep's runs, with the exit code of the signal and the
work saved; the workers of a signalled or killed launcher are gone within seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import quiet, tiny_raw
from convbn_cli.config import load_config
from convbn_cli.runs import RunDir
from convbn_cli.train import Interrupted, train


class SignalAt:
    """A user subscriber that sends `signum` to this process at one event."""

    def __init__(self, event, signum=signal.SIGTERM):
        self.signum = signum
        setattr(self, event, self.send)

    def send(self, trainer, *args):
        os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("event", ["on_train_end", "on_finish"])
def test_a_signal_after_the_last_step_stops_with_its_exit_code_and_resume_finishes(tmp_path, synthetic, event):
    """The probe: SIGINT/SIGTERM after the last training step was ignored (exit 0, 12-14 s later)."""
    cfg = load_config(raw=tiny_raw(tmp_path, **{"train.precise_bn": "always"}))
    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False, subscribers=[SignalAt(event)])
    assert e.value.exit_code == 143 and "after the last training step" in str(e.value)
    run = RunDir(Path(e.value.checkpoint).parent.parent)
    assert not run.results.exists()  # results.json is written last: the run is not claimed finished
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    done = train(cfg, data=synthetic, resume=run.path, log=quiet, progress=False)
    assert run.read_results()["test_acc"] == done.test_acc
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]  # nothing trained again


def test_ctrl_c_at_the_end_of_a_sweeps_first_run_trains_no_other(tmp_path, synthetic, monkeypatch):
    """The probe: Ctrl-C at the end of run 1 of 3 let runs 2 and 3 train."""
    from convbn_cli.train import events
    from convbn_cli.train import sweep as sw

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"train.epochs": 1})))
    path = sw.create(sw.plan(config, ["model.bn.decay=0.5,0.9,0.99"]))
    # The sweep fetches each trial's dataset through data.sources (train() through data.fetch): both stubbed, or
    # the test downloads the real MNIST (refused without the network mark).
    monkeypatch.setattr("convbn_cli.data.fetch", lambda *a, **k: synthetic)
    monkeypatch.setattr("convbn_cli.data.sources.fetch", lambda *a, **k: synthetic)
    console_finish = events.Console.on_finish

    def finish_then_ctrl_c(self, trainer, results):
        console_finish(self, trainer, results)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(events.Console, "on_finish", finish_then_ctrl_c)
    with pytest.raises(sw.SweepInterrupted) as e:
        sw.run_sweep(path, log=quiet, progress=False)
    assert e.value.exit_code == 130
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ["model.bn.decay=0.5"]


def _children(pid: int) -> list:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_the_workers_of_a_signalled_launcher_are_gone_within_5_s(tmp_path, mnist_cache, signum, code):
    """The probe: SIGTERM (or SIGKILL) to `convbn train --workers 2` left both workers training to the end."""
    raw = tiny_raw(tmp_path, **{"data.max_train": 1280, "data.max_test": 200, "train.epochs": 50})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}
    launcher = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(config), "--workers", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "tiny" / "1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.is_file() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and launcher.poll() is None, launcher.stderr.read() if launcher.poll() else workers
    launcher.send_signal(signum)
    t0 = time.time()
    launcher.wait(timeout=30)
    while any(_alive(w) for w in workers) and time.time() - t0 < 5:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), f"workers still running {time.time() - t0:.1f} s after {signum!r}"
    assert launcher.returncode == code
    if signum == signal.SIGTERM:
        assert "Traceback" not in launcher.stderr.read()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows and rows[-1]["epoch"] < 50  # stopped, not trained to the end


def test_a_lost_peer_is_one_line_not_a_collective_error():
    import tensorflow as tf

    from convbn_cli.train.loop import PeerLost, _one_line_errors

    with pytest.raises(PeerLost, match="another worker of the cluster stopped or cannot be reached"):
        with _one_line_errors(cluster=True):
            raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: peer 1 is gone\n  at ...")
    with pytest.raises(tf.errors.UnavailableError):  # one machine: not a peer's fault, not hidden
        with _one_line_errors(cluster=False):
            raise tf.errors.UnavailableError(None, None, "x")
