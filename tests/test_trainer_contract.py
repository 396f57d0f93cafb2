"""The Trainer's contract with its subscribers (train/events.py's docstring), every Trainer attribute declared in
`__init__` and documented, the trainer's own signal subscriber held by name, and the one mechanism that installs
and restores signal handlers (convbn_cli/signals.py). No training: the code is read, and a Trainer is only made."""

from __future__ import annotations

import ast
import re
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

pytest.importorskip("tensorflow")

from convbn_cli import signals  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.train import events, loop  # noqa: E402

TRAIN = REPO / "convbn_cli" / "train"


def _trainer(subscribers=()):
    return loop.Trainer(load_config("mnist_bn"), None, list(subscribers))


def _trainer_class() -> ast.ClassDef:
    tree = ast.parse((TRAIN / "loop.py").read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")


def _self_attributes_set(node) -> set:
    """Every `self.X` that `node` assigns (also in tuples, chains and augmented assignments)."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _documented_attributes() -> set:
    """The names the Trainer docstring's `Attributes:` section describes (`name (type): ...` entries)."""
    section = loop.Trainer.__doc__.split("Attributes:", 1)[1]
    return set(re.findall(r"^ {8}(\w+)(?: \([^)]*\))?:", section, re.MULTILINE))


def _contract() -> tuple[set, set]:
    """(what a subscriber may read, what it may call) on the trainer, from events.py's docstring."""
    doc = events.__doc__
    read = re.search(r"^ +read: +(.*?)^ +call:", doc, re.MULTILINE | re.DOTALL).group(1)
    call = re.search(r"^ +call: +(.*?)(?:\n\s*\n|\Z)", doc, re.MULTILINE | re.DOTALL).group(1)
    return set(re.findall(r"\w+", read)), set(re.findall(r"(\w+)\(", call))


def _trainer_uses(path: Path) -> dict:
    """{name: contexts} of every `trainer.X` and `<obj>.trainer.X` in a module (its subscribers' view)."""
    used = {}
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Attribute):
            v = n.value
            if (isinstance(v, ast.Name) and v.id == "trainer") or (isinstance(v, ast.Attribute) and v.attr == "trainer"):
                used.setdefault(n.attr, set()).add(type(n.ctx).__name__)
    return used


# --------------------------------------------------------------------------- one way to set signal handlers

def _note(signum, frame):
    pass


def _other(signum, frame):
    pass


def test_handled_installs_and_restores_also_on_an_error():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), signals.handled(signals.stop_signals(_note)):
        assert signal.getsignal(signal.SIGINT) is _note and signal.getsignal(signal.SIGTERM) is _note
        raise RuntimeError
    assert signal.getsignal(signal.SIGTERM) is before


def test_nested_handlers_put_back_what_each_found_and_restoring_twice_does_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with signals.handled({signal.SIGTERM: _note}):
        restore = signals.install({signal.SIGTERM: _other})
        assert signal.getsignal(signal.SIGTERM) is _other
        restore()
        assert signal.getsignal(signal.SIGTERM) is _note
        signal.signal(signal.SIGTERM, _other)  # set by someone after us: a second restore must not undo it
        restore()
        assert signal.getsignal(signal.SIGTERM) is _other
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_signals_are_left_alone():
    before, errors = signal.getsignal(signal.SIGTERM), []

    def work():
        try:
            with signals.handled(signals.stop_signals(_note)):
                assert signal.getsignal(signal.SIGTERM) is before
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before
