"""Worker processes for `distribute.strategy: multi_worker`, kept free of TensorFlow (it only starts, watches
and stops processes):

- `convbn train --workers K`: K local worker processes on 127.0.0.1 (launch_workers);
- one worker of a real cluster (TF_CONFIG): the CLI runs the training in a child process and watches its
  start-up (supervise). TensorFlow waits for every worker inside the strategy's constructor, holding the GIL
  and deaf to signals; the parent stays responsive: it ends the child on SIGINT/SIGTERM (130/143) and gives up
  after $CONVBN_WORKER_STARTUP_TIMEOUT seconds (120), naming the workers that never answered.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .errors import ConvbnError, Stopped

READY_FD_ENV = "CONVBN_READY_FD"  # the child writes to this pipe once every worker has joined
SUPERVISED_ENV = "CONVBN_SUPERVISED"  # set for processes that already have a watcher (no second one)
STARTUP_TIMEOUT_S = float(os.environ.get("CONVBN_WORKER_STARTUP_TIMEOUT", "120"))
STOP_GRACE_S = 4.0  # a signalled launcher's workers get this long to save a checkpoint, then are killed


def die_with_parent():
    """In a child (a worker; also the pip or apt-get of a data fetch, data/sources.py), between fork and exec:
    the kernel SIGKILLs it when its launcher dies, however the launcher dies (SIGKILL included, where the
    launcher itself can do nothing). prctl(PR_SET_PDEATHSIG) is Linux's; on other systems the launcher's own
    signal handling is all there is. SIGKILL, not SIGTERM: a worker whose peers are gone would wait in a
    collective operation, deaf to SIGTERM; its last epoch's checkpoint is complete."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class WorkerFailed(ConvbnError):
    exit_code = 1


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_workers(k: int, train_args: list[str], log=print, poll_s: float = 0.5) -> int:
    """Run `convbn train ARGS distribute.strategy=multi_worker` as K processes on 127.0.0.1.

    Worker 0 is the chief: it alone writes the run directory and prints to the terminal. If any worker
    dies, the others are stopped and the failure names the worker, instead of the rest waiting forever.
    """
    ports = free_ports(k)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(k):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
               SUPERVISED_ENV: "1"}
        # the chief talks to the terminal; the others' stderr goes to a file, read if they fail
        err = None if i == 0 else tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", *train_args,
                                 "distribute.strategy=multi_worker"], env=env,
                                stdout=None if i == 0 else subprocess.DEVNULL, stderr=err,
                                preexec_fn=die_with_parent)
        proc.err_file = err
        procs.append(proc)
    log(f"started {k} workers on {', '.join(cluster['worker'])} (worker 0 is the chief)")
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # a worker that dies takes its peers' collectives down with it, and they may exit first: give
                # them a moment, then name the one killed by a signal (the cause) before those that exited
                time.sleep(poll_s)
                failed = [(i, c) for i, c in enumerate(p.poll() for p in procs) if c not in (None, 0)]
                i, code = min(failed, key=lambda f: (f[1] >= 0, f[0]))
                reason = _last_line(procs[i]) if i else ""
                _stop(procs, grace_s=STOP_GRACE_S)  # a peer is gone: the rest cannot save (a collective)
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                raise WorkerFailed(f"worker {i} {how}{': ' + reason if reason else ''}; the run was stopped")
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C reached the workers too (one process group): they are saving a checkpoint
        _stop(procs, signal.SIGINT, grace_s=STOP_GRACE_S)
        raise
    except Stopped as e:  # SIGTERM to the launcher alone: pass it on, then make sure
        _stop(procs, e.signum, grace_s=STOP_GRACE_S)
        raise


def check_tf_config(text) -> dict:
    """{task name: address} of the other workers in TF_CONFIG; a missing or malformed TF_CONFIG is exit 2."""
    if not text:
        raise ConvbnError("distribute.strategy: multi_worker needs TF_CONFIG describing the cluster "
                          "(or use `convbn train --workers K` to start K local workers)")
    try:
        conf = json.loads(text)
        cluster, task = conf["cluster"], conf["task"]
        kind, index = task["type"], task["index"]
        members = cluster[kind]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        expected = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
        raise ConvbnError(f"TF_CONFIG: not a cluster description ({type(e).__name__}: {e}); expected "
                          + expected) from None
    if not isinstance(index, int) or not isinstance(members, list) or not 0 <= index < len(members):
        raise ConvbnError(f"TF_CONFIG: task index {index!r} is out of range for the {len(members)} "
                          f"{kind}(s) in the cluster")
    return {f"{k} {i}": addr for k, addrs in cluster.items() for i, addr in enumerate(addrs)
            if not (k == kind and i == index)}


def supervise(train_args: list[str], peers: dict, timeout_s: float | None = None) -> int:
    """Run `convbn train ARGS` as a child and watch its cluster start-up; returns the exit code to end with."""
    timeout_s = STARTUP_TIMEOUT_S if timeout_s is None else timeout_s
    read_fd, write_fd = os.pipe()
    env = {**os.environ, SUPERVISED_ENV: "1", READY_FD_ENV: str(write_fd)}
    proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", *train_args], env=env, pass_fds=(write_fd,),
                            preexec_fn=die_with_parent)
    os.close(write_fd)
    deadline, ready = time.monotonic() + timeout_s, False
    try:
        while proc.poll() is None:
            if not ready:
                ready = _wait_readable(read_fd, 0.2)
                if not ready and proc.poll() is None and time.monotonic() > deadline:
                    _stop([proc], signal.SIGKILL, grace_s=5)
                    missing = [f"{name} ({addr})" for name, addr in peers.items() if not _reachable(addr)]
                    why = f"no answer from {', '.join(missing)}" if missing else "not every worker joined"
                    raise ConvbnError(f"the cluster did not start within {timeout_s:g} s "
                                      f"($CONVBN_WORKER_STARTUP_TIMEOUT): {why}")
            else:
                time.sleep(0.2)
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    except (KeyboardInterrupt, Stopped) as e:
        # once started, the child saves a checkpoint on the signal (it got it too, from the terminal or from us)
        if not ready:  # still blocked inside TensorFlow: it cannot save anything, nor hear the signal
            _stop([proc], signal.SIGKILL, grace_s=5)
        elif isinstance(e, KeyboardInterrupt):  # Ctrl-C reached the child too: it is saving a checkpoint
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _stop([proc], signal.SIGINT, grace_s=60)
        else:
            _stop([proc], signal.SIGTERM, grace_s=60)
        raise
    finally:
        os.close(read_fd)


def _wait_readable(fd, timeout_s) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable) and os.read(fd, 64) != b""


def _reachable(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _last_line(proc) -> str:
    if proc.err_file is None:
        return ""
    proc.err_file.seek(0)
    err = proc.err_file.read().decode(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return lines[-1][len("error: "):] if lines else ""


def _stop(procs, sig=signal.SIGTERM, grace_s=10.0):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
