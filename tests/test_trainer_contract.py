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
            if (v.id if isinstance(v, ast.Name) else getattr(v, "attr", None)) == "trainer":
                used.setdefault(n.attr, set()).add(type(n.ctx).__name__)
    return used


# --------------------------------------------------------------------------- every attribute declared in __init__

def test_every_trainer_attribute_is_set_in_init_and_documented():
    cls = _trainer_class()
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    anywhere, in_init = _self_attributes_set(cls), _self_attributes_set(init)
    assert anywhere - in_init == set(), "set outside Trainer.__init__: declare them there (None until set)"
    made = set(vars(_trainer()))
    assert anywhere <= made  # __init__ really sets each of them (none behind a condition)
    assert _documented_attributes() == made


def test_the_static_check_sees_an_attribute_set_outside_init():
    """The check above can fail: a method that sets a new attribute is caught."""
    code = "class Trainer:\n    def __init__(self):\n        self.a = self.b = None\n" \
           "    def phase(self):\n        self.a, self.c = 1, 2\n        self.b += 1\n"
    cls = ast.parse(code).body[0]
    assert _self_attributes_set(cls) - _self_attributes_set(cls.body[0]) == {"c"}


# --------------------------------------------------------------------------- the subscribers' contract

def test_subscribers_and_final_use_only_the_contract_and_set_nothing():
    read, call = _contract()
    assert {"cfg", "run", "model", "metrics"} <= read and {"interrupt", "bn_statistics"} <= call
    for module in ("events.py", "final.py"):
        used = _trainer_uses(TRAIN / module)
        assert set(used) - read - call == set(), f"{module} uses trainer names outside events.py's contract"
        assert [name for name, ctx in used.items() if ctx != {"Load"}] == [], f"{module} sets a trainer attribute"


def test_the_contract_names_only_declared_attributes_and_methods():
    read, call = _contract()
    trainer = _trainer()
    assert read <= set(vars(trainer)) and read <= _documented_attributes()
    assert all(callable(getattr(loop.Trainer, name, None)) for name in call), call
    assert not read & call


def test_the_contract_check_sees_an_undeclared_name(tmp_path):
    """The check above can fail: a subscriber reading a name the contract does not list is caught."""
    path = tmp_path / "subscriber.py"
    path.write_text("def on_step(self, trainer, step):\n    trainer.manager.save()\n    self.trainer.epoch = 1\n")
    read, call = _contract()
    used = _trainer_uses(path)
    assert set(used) - read - call == {"manager"} and used["epoch"] == {"Store"}


# --------------------------------------------------------------------------- the trainer's own signal subscriber

def test_the_trainer_holds_its_stop_on_signal_by_name_and_calls_it_last():
    other = events.StopOnSignal()  # someone else's: not the trainer's to consult
    trainer = _trainer([events.Console(print), other])
    assert trainer.subscribers[-1] is trainer.stop_on_signal and trainer.stop_on_signal is not other
    trainer.manager = SimpleNamespace(latest_checkpoint="run/checkpoints/ckpt-7")
    trainer.run = SimpleNamespace(path=Path("run"))
    other.signum = signal.SIGTERM
    trainer.check_signals()  # nothing: the trainer's own subscriber saw no signal
    trainer.stop_on_signal.signum = signal.SIGTERM
    with pytest.raises(loop.Interrupted) as stopped:
        trainer.check_signals()
    assert stopped.value.exit_code == 143 and "ckpt-7" in str(stopped.value)


def test_the_first_reason_to_stop_stays():
    trainer = _trainer()
    assert trainer.request_stop("early stopping: a") and not trainer.request_stop("early stopping: b")
    assert trainer.stop_reason == "early stopping: a"


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


def test_handlers_are_set_only_by_the_signals_module():
    package = REPO / "convbn_cli"
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in sorted(package.rglob("*.py")) if p.name != "signals.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bsignal\.signal\(", line)]
    assert offenders == []
