"""The fast tier is hermetic: conftest's guard refuses to start processes and to reach the network from a test that
is not marked for it, and every test sees the session's own data, Matplotlib, Keras and cache directories, never
the user's.

These tests must run in the fast tier, since its guard is what they check. conftest.py puts a test in the process
tier, where the guard lets processes start, when its source says `subprocess.` or `Popen(`, so the subprocess
module is reached here by name (SP, getattr) and not spelled out. That is honest only while the tests really are
in the fast tier: each asserts it carries no tier mark (`assert_fast`), so a change in how conftest reads sources
fails them instead of letting them pass under a mark that allows what they try.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import socket
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ENV_BEFORE, HERMETIC, NETWORK, PROCESS, SESSION_ENV, TIERS, Guard, HermeticTierError

SP = importlib.import_module("subprocess")  # by name: see the module docstring


def assert_fast(request):
    marks = {m.name for m in request.node.iter_markers()}
    assert not marks & {*TIERS, "slow"}, f"{request.node.nodeid} is not a fast-tier test: {sorted(marks)}"


@contextlib.contextmanager
def refused(request, what: str):
    """The block is refused by the guard, which names this test and what it tried."""
    assert_fast(request)
    with pytest.raises(HermeticTierError) as caught:
        yield
    message = str(caught.value)
    assert message.startswith(f"{request.node.nodeid} tried to {what}"), message
    assert HERMETIC.refused == [message]
    HERMETIC.refused.clear()  # expected here: the test's report must not count it as a swallowed refusal


def _python(mark: Path) -> list:
    """A child Python that would leave `mark` behind."""
    return [sys.executable, "-c", f"open({str(mark)!r}, 'w').close()"]


def _fork(mark: Path):
    pid = os.fork()
    if pid == 0:  # reached only if the guard let the fork through: leave the mark and go at once
        mark.touch()
        os._exit(0)
    os.waitpid(pid, 0)


def _multiprocessing(mark: Path):
    proc = multiprocessing.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join(60)
    mark.touch()


def _posix_spawn(mark: Path):
    os.waitpid(os.posix_spawn(sys.executable, _python(mark), dict(os.environ)), 0)


STARTS = {
    "subprocess.run": lambda mark: SP.run(_python(mark), check=False),
    "subprocess.Popen": lambda mark: SP.Popen(_python(mark)).wait(),
    "subprocess.check_output": lambda mark: SP.check_output(_python(mark)),
    "os.system": lambda mark: os.system(f"touch '{mark}'"),
    "os.popen": lambda mark: os.popen(f"touch '{mark}'").close(),
    "os.posix_spawn": _posix_spawn,
    "os.spawnv": lambda mark: os.spawnv(os.P_WAIT, sys.executable, _python(mark)),
    "os.fork": _fork,
    "multiprocessing spawn": _multiprocessing,
}


@pytest.mark.parametrize("start", STARTS.values(), ids=STARTS.keys())
def test_a_fast_test_cannot_start_a_process(request, tmp_path, start):
    mark = tmp_path / "the child ran"
    with refused(request, "start "):
        start(mark)
    assert not mark.exists()


def _connect(port):
    with socket.socket() as s:
        s.connect(("127.0.0.1", port))


def _connect_ex(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port))


def _datagram(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", port))


def _create_connection(port):
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _urlopen(port):  # what convbn's data sources download with
    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()


@pytest.mark.parametrize("attempt", [_connect, _connect_ex, _create_connection, _urlopen, _datagram])
def test_a_fast_test_cannot_reach_even_a_listening_local_port(request, attempt):
    # a server is listening, so the system would accept: the refusal is the guard's, not ConnectionRefusedError
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        what = "send to" if attempt is _datagram else "connect to"
        with refused(request, f"{what} ('127.0.0.1', {port})"):
            attempt(port)
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):  # and nothing reached it
            server.accept()


@pytest.mark.parametrize("lookup", [socket.getaddrinfo, socket.gethostbyname])
def test_a_fast_test_cannot_look_up_a_host_name(request, lookup):
    with refused(request, "look up the host 'pypi.org'"):
        lookup("pypi.org", *([443] if lookup is socket.getaddrinfo else []))


def test_local_sockets_and_numeric_addresses_are_left_alone(request, tmp_path):
    # what TensorFlow, asyncio and multiprocessing use inside one process: socket pairs and AF_UNIX sockets
    assert_fast(request)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"ping")
        assert b.recv(4) == b"ping"
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen()
        client.connect(path)
    assert socket.getaddrinfo("127.0.0.1", 80) and socket.getaddrinfo("localhost", None)
    assert HERMETIC.refused == []


def test_each_mark_allows_only_what_it_says():
    def item(*marks):
        return SimpleNamespace(nodeid="t", iter_markers=lambda: [getattr(pytest.mark, m).mark for m in marks])

    guard = Guard()  # not installed: only its decisions are checked here
    allowed = {}
    for marks in [(), ("process",), ("train",), ("network",), ("train", "process")]:
        guard.item = item(*marks)
        for kind in (PROCESS, NETWORK):
            try:
                guard.check(kind, "x")
                allowed[marks, kind] = True
            except HermeticTierError:
                allowed[marks, kind] = False
    assert allowed == {((), PROCESS): False, ((), NETWORK): False,
                       (("process",), PROCESS): True, (("process",), NETWORK): False,
                       (("train",), PROCESS): True, (("train",), NETWORK): False,
                       (("network",), PROCESS): True, (("network",), NETWORK): True,
                       (("train", "process"), PROCESS): True, (("train", "process"), NETWORK): False}
    guard.item = None  # between tests: nothing is refused
    guard.check(NETWORK, "x")


def test_every_test_has_the_sessions_own_directories(request, tmp_path_factory):
    import keras.src.backend.config as keras_config
    import matplotlib

    from convbn_cli.data.sources import cache_dir

    assert_fast(request)
    base = tmp_path_factory.getbasetemp().resolve()
    user_cache = Path(ENV_BEFORE["XDG_CACHE_HOME"] or Path.home() / ".cache") / "convbn"
    for name in ("CONVBN_DATA_DIR", "MPLCONFIGDIR", "KERAS_HOME", "XDG_CACHE_HOME"):
        assert os.environ[name] == SESSION_ENV[name] != ENV_BEFORE[name]
        assert Path(os.environ[name]).resolve().is_relative_to(base)
    # what convbn, Matplotlib and Keras themselves use
    assert cache_dir().resolve().is_relative_to(base) and cache_dir() != user_cache
    assert Path(matplotlib.get_configdir()).resolve().is_relative_to(base)
    assert Path(keras_config.keras_home()).resolve().is_relative_to(base)


def test_the_data_dir_fixture_still_gives_an_empty_cache_of_its_own(data_dir, tmp_path):
    from convbn_cli.data.sources import cache_dir

    assert cache_dir() == data_dir and data_dir.parent == tmp_path and not data_dir.exists()
    assert os.environ["CONVBN_DATA_DIR"] != SESSION_ENV["CONVBN_DATA_DIR"]


@pytest.mark.parametrize("outcome", ["passed", "skipped", "failed"])
def test_a_refusal_the_code_under_test_swallows_still_fails_the_test(outcome):
    # e.g. a command run through Click's CliRunner, which keeps the exception in its result: a test that only
    # looks at the exit code would pass although its command was stopped by the guard
    from conftest import pytest_runtest_makereport

    report = pytest.TestReport("t.py::t", ("t.py", 1, "t"), {}, outcome, None if outcome == "passed" else "why",
                               "call")
    HERMETIC.refused.append("t.py::t tried to start ['git']")
    hook = pytest_runtest_makereport(None, None)
    next(hook)
    with pytest.raises(StopIteration) as done:
        hook.send(report)
    assert done.value.value is report and HERMETIC.refused == []
    assert report.outcome == "failed"
    if outcome == "failed":  # its own failure stays, the refusal is added beside it
        assert report.longrepr == "why" and report.sections == [("hermetic guard", "t.py::t tried to start ['git']")]
    else:
        assert "carried on" in str(report.longrepr) and "tried to start ['git']" in str(report.longrepr)
