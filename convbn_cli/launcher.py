"""`convbn train --workers K`: K local worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy.

Kept free of TensorFlow: the launcher only starts, watches and stops processes (each worker imports it).
Across real hosts, start `convbn train CONFIG distribute.strategy=multi_worker` on each host with its own
TF_CONFIG instead (see the README).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .errors import ConvbnError


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
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        # the chief talks to the terminal; the others' stderr goes to a file, read if they fail
        err = None if i == 0 else tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", *train_args,
                                 "distribute.strategy=multi_worker"], env=env,
                                stdout=None if i == 0 else subprocess.DEVNULL, stderr=err)
        proc.err_file = err
        procs.append(proc)
    log(f"started {k} workers on {', '.join(cluster['worker'])} (worker 0 is the chief)")
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                reason = _last_line(procs[i]) if i else ""
                _stop(procs)
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                raise WorkerFailed(f"worker {i} {how}{': ' + reason if reason else ''}; the run was stopped")
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        raise


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
