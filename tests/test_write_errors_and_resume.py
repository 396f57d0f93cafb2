"""Write errors and resume (issue 35). Every write the machine refuses (a full disk, a read-only place), Python's
or TensorFlow's, is one line naming the path the user knows (never a temporary's) and the cause, exit 2, with
nothing written earlier lost and no staging left behind; a train that could not write its first files leaves no
run directory; `train --resume` falls back past a damaged latest checkpoint.

The full and read-only disks are real: a small tmpfs mounted for the test, filled to its last byte or remounted
read-only (root and `mount` needed: CI runs as root; where mounting is impossible those tests are skipped, saying
why). Root ignores file permissions, so a chmod'ed directory would not refuse anything.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import tiny_raw  # noqa: E402
from convbn_cli import files  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.cli.group import _os_error_line  # noqa: E402
from convbn_cli.errors import ConvbnError, WriteError  # noqa: E402

# what a failed write may never leave behind: convbn's temporaries, TensorFlow's checkpoint and events staging
LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|_temp$|tempstate|^checkpoint\.tmp")


# --------------------------------------------------------------------------- a real small disk

class Disk:
    """A tmpfs mounted at `path`: fill() it to the last byte and free() it again, or make a folder of it read-only
    (a read-only bind mount over it: remounting the tmpfs itself is refused while a file on it is open for
    writing, as TensorBoard's are during training) and writable() again."""

    def __init__(self, path: Path):
        self.path, self.binds = path, []

    def fill(self):
        """Write a filler file until the disk refuses even one byte (tmpfs counts whole pages)."""
        with open(self.path / "filler", "ab", buffering=0) as f:
            for size in (1 << 20, 1 << 16, 1 << 12, 1):
                try:
                    while f.write(b"\0" * size):
                        pass
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e

    def free(self):
        (self.path / "filler").unlink()

    def read_only(self, where=None):
        where = str(where or self.path)
        for args in (["--bind", where, where], ["-o", "remount,ro,bind", where]):
            subprocess.run(["mount", *args], check=True, capture_output=True)
        self.binds.append(where)

    def writable(self):
        while self.binds:
            subprocess.run(["umount", self.binds.pop()], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], capture_output=True,
                           text=True)
    except OSError as e:  # no mount program
        pytest.skip(f"cannot mount a tmpfs for a real full or read-only disk here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full or read-only disk here (root needed): {r.stderr.strip()}")
    d = Disk(path)
    yield d
    d.binds.reverse()
    for where in [*d.binds, str(path)]:
        subprocess.run(["umount", "-l", where], capture_output=True)


def make_unwritable(disk, how, where=None):
    disk.fill() if how == "full" else disk.read_only(where)


CAUSE = {"full": "cannot write it: no space left on device", "read-only": "not writable: read-only file system"}


# --------------------------------------------------------------------------- what every case must show

def tree(root) -> dict:
    """Every file under root (its bytes) and every directory (None)."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def leftovers(root) -> list:
    return [str(p) for p in Path(root).rglob("*") if LEFTOVER.search(p.name)]


def one_line(r, where, cause) -> str:
    """The one error line of a CLI result with exit 2: it names `where` (a path the user knows) and `cause`."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    line = errors[0]
    assert f"error: {where}: " in line and cause.lower() in line.lower(), line
    assert not re.search(r"\.tmp|_temp|tempstate|out of memory|\{\{", line), line
    return line


def kept(before: dict, root, appended=("tensorboard",)):
    """Every file in `before` is still there, unchanged (an events file may only have grown at its end)."""
    after = tree(root)
    for name, data in before.items():
        assert name in after, f"{name} was lost"
        if data is None or name.startswith(appended):
            assert data is None or after[name].startswith(data), name
        else:
            assert after[name] == data, f"{name} changed"


@pytest.fixture
def runner(mnist_cache):
    return CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})


@pytest.fixture
def run_on_disk(trained, disk):
    """A copy of the suite's trained run on the small disk."""
    return Path(shutil.copytree(trained[1].run_dir, disk.path / "run"))


# --------------------------------------------------------------------------- commands on a full or read-only disk

@pytest.mark.parametrize("how", ["full", "read-only"])
@pytest.mark.parametrize("args,where", [
    (["export", "{run}", "--format", "savedmodel"], "{run}/export/model_savedmodel"),
    (["export", "{run}", "--format", "tflite"], "{run}/export/model.tflite"),
    (["recalibrate", "{run}"], "{run}/checkpoints/recalibrated/ckpt-1"),
    (["train", "--resume", "{run}", "train.epochs=3", "--no-progress"], "{run}/tensorboard"),  # the events writer
    (["report", "{run}"], "{run}/report.html"),
])
def test_a_refused_write_is_one_line_naming_the_destination_and_changes_nothing(run_on_disk, disk, runner, how,
                                                                                args, where):
    run = run_on_disk
    (run / "export").mkdir(exist_ok=True)  # there already: the staging is made beside the destination
    before = tree(run)
    make_unwritable(disk, how)
    r = runner.invoke(main, [a.format(run=run) for a in args])
    one_line(r, where.format(run=run), CAUSE[how])
    assert tree(run) == before  # nothing changed, nothing made (no recalibrated/ folder, no empty events file)
    assert leftovers(disk.path) == []


def test_a_dangling_link_in_the_way_is_named_as_one(trained, runner, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    r = runner.invoke(main, ["report", str(trained[1].run_dir), "--output", str(link / "r.html")])
    line = one_line(r, link, "not a directory (a symbolic link to")
    assert "File exists" not in line and "does not exist" in line
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- training on a full or read-only disk

def small_config(tmp_path, root, epochs=3) -> Path:
    raw = tiny_raw(tmp_path, **{"data.max_train": 640, "data.max_test": 200, "train.epochs": epochs,
                                "output.root": str(root)})
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def at_epoch_metrics(monkeypatch, epoch, action, state):
    """Run `action` once epoch `epoch`'s metrics are written, just before its checkpoint (a subscriber after
    convbn's own), after a snapshot of the run directory in state["before"]."""
    from convbn_cli.train import events

    real = events.standard

    class At(events.Subscriber):
        def on_epoch_metrics(self, trainer, row):
            if row["epoch"] == epoch:
                state["run"], state["before"] = trainer.run.path, tree(trainer.run.path)
                action()

    monkeypatch.setattr(events, "standard", lambda *a, **k: [*real(*a, **k), At()])


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_refused_checkpoint_write_keeps_the_earlier_epochs_and_resume_completes(disk, runner, tmp_path,
                                                                                   monkeypatch, how):
    cfg = small_config(tmp_path, disk.path / "runs")
    state = {}
    # read-only: the run's checkpoints folder (metrics and events files are open or written around it)
    at_epoch_metrics(monkeypatch, 2, lambda: make_unwritable(disk, how, state["run"] / "checkpoints"), state)
    r = runner.invoke(main, ["train", str(cfg), "--no-progress"])
    run = state["run"]
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["step"]
    line = one_line(r, run / "checkpoints" / f"ckpt-{step}", CAUSE[how])
    assert "data.batch_size" not in line
    kept(state["before"], run)
    assert leftovers(disk.path) == [] and not (run / "checkpoints" / f"ckpt-{step}.index").exists()
    monkeypatch.undo()
    disk.free() if how == "full" else disk.writable()
    r = runner.invoke(main, ["train", "--resume", str(run), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "results.json").is_file()


def test_a_train_that_cannot_write_its_config_leaves_no_run_directory(disk, runner, tmp_path):
    cfg = small_config(tmp_path, disk.path / "runs")
    disk.fill()
    r = runner.invoke(main, ["train", str(cfg), "--no-progress"])
    line = one_line(r, disk.path / "runs" / "tiny" / "1" / "config.yaml", CAUSE["full"])
    assert "was removed" in line
    assert sorted(p.name for p in disk.path.iterdir()) == ["filler"]  # runs/ and runs/tiny/ were made: gone too


def test_a_train_that_cannot_write_its_first_checkpoint_leaves_no_run_directory(disk, runner, tmp_path,
                                                                               monkeypatch):
    mine = disk.path / "runs" / "tiny" / "notes.txt"  # the user's: never removed, nor the folders holding it
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    cfg = small_config(tmp_path, disk.path / "runs")
    state = {}
    at_epoch_metrics(monkeypatch, 1, disk.fill, state)
    r = runner.invoke(main, ["train", str(cfg), "--no-progress"])
    one_line(r, state["run"] / "checkpoints" / "ckpt-16", CAUSE["full"])
    assert not state["run"].exists()
    assert sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"] and mine.read_text() == "mine"


# --------------------------------------------------------------------------- resume past a damaged checkpoint

def damage(prefix: Path, how: str):
    data, index = Path(f"{prefix}.data-00000-of-00001"), Path(f"{prefix}.index")
    if how == "truncated data":
        data.write_bytes(data.read_bytes()[:100])
    elif how == "empty data":
        data.write_bytes(b"")
    elif how == "empty index":
        index.write_bytes(b"")
    elif how == "no data":
        data.unlink()


def kept_checkpoints(run: Path) -> list:
    state = tf.train.get_checkpoint_state(str(run / "checkpoints"))
    return [Path(p) for p in state.all_model_checkpoint_paths]


@pytest.fixture
def run_copy_2(trained, tmp_path):
    return Path(shutil.copytree(trained[1].run_dir, tmp_path / "run"))


@pytest.mark.parametrize("how", ["truncated data", "empty data", "empty index", "no data"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(run_copy_2, runner, how):
    run = run_copy_2
    older, latest = kept_checkpoints(run)[-2:]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    damage(latest, how)
    r = runner.invoke(main, ["train", "--resume", str(run), "train.epochs=3", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.exception)
    said = [ln for ln in r.output.splitlines() if "damaged" in ln]
    assert len(said) == 1 and f"{latest}: damaged" in said[0], r.output
    assert f"resumed from {older} " in r.output
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in after] == [1, 2, 3]
    assert after[0] == rows[0]  # the kept checkpoint's own metrics row, as it was


def test_resume_refuses_in_one_line_when_no_checkpoint_is_intact(run_copy_2, runner):
    run = run_copy_2
    prefixes = kept_checkpoints(run)
    for prefix in prefixes:
        damage(prefix, "truncated data")
    before = tree(run)
    r = runner.invoke(main, ["train", "--resume", str(run), "train.epochs=3", "--no-progress"])
    line = one_line(r, run / "checkpoints", "no intact checkpoint to resume from")
    assert f"({', '.join(p.name for p in reversed(prefixes))}: damaged" in line  # newest first
    assert "warning" not in r.output  # the refusal is the one line
    assert tree(run) == before


def test_resume_with_an_unreadable_record_uses_the_checkpoint_files(run_copy_2, runner):
    """A garbled `checkpoint` record reads as no checkpoint at all: resume must not start over (and overwrite the
    run) but take the newest checkpoint file; an empty record is one line that says what to do."""
    run = run_copy_2
    newest = kept_checkpoints(run)[-1]
    record = run / "checkpoints" / "checkpoint"
    record.write_text("garbled {{")
    r = runner.invoke(main, ["train", "--resume", str(run), "train.epochs=3", "--no-progress"])
    assert r.exit_code == 0 and f"resumed from {newest} " in r.output, r.output
    record.write_text("")
    r = runner.invoke(main, ["train", "--resume", str(run), "train.epochs=4", "--no-progress"])
    one_line(r, run, "a damaged checkpoint record")


# --------------------------------------------------------------------------- the pieces, without a disk

def test_atomic_writes_name_the_destination_and_leave_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("earlier")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(WriteError) as e:
        files.write_text_atomic(out, "new")
    assert str(e.value) == f"{out}: cannot write it: No space left on device"
    assert out.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_staging_turns_tensorflow_write_errors_into_one_naming_the_destination(tmp_path):
    out = tmp_path / "export" / "model_savedmodel"
    with pytest.raises(WriteError) as e:
        with files.staged(out) as tmp:
            raise tf.errors.ResourceExhaustedError(None, None, f"{tmp}/variables/variables_temp/part-0.tempstate1; "
                                                               "No space left on device")
    assert str(e.value) == f"{out}: cannot write it: No space left on device"
    assert not (tmp_path / "export").exists()  # the folder it made for the export, removed with the staging
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    for error in (ValueError("not ours"), ConvbnError("a refusal"), oom):
        with pytest.raises(type(error)):
            with files.staged(out):
                raise error


def test_a_replaced_export_is_never_missing(tmp_path, monkeypatch):
    """Replacing an earlier export: if the new one cannot be moved in (a file replaces a file in one os.replace; a
    directory moves the old one aside first), the old one is still there."""
    out = tmp_path / "model.keras"
    out.write_text("earlier")
    real, real_replace = Path.rename, os.replace

    def rename(self, target):
        if Path(target) == out and self.name == "model.keras" and self.parent != tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real(self, target)

    def replace(src, dst, *args, **kw):
        if Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_replace(src, dst, *args, **kw)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError):
        with files.staged(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_the_cli_names_the_final_path_not_a_temporary():
    e = OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/runs/1/.report.html.xcfxke_1.tmp")
    assert _os_error_line(e) == "/x/runs/1/report.html: not writable: Read-only file system"
    e = OSError(errno.ENOENT, os.strerror(errno.ENOENT), "/x/export/.m_savedmodel.abcd1234.tmp/m_savedmodel/v")
    assert _os_error_line(e) == "/x/export/m_savedmodel: No such file or directory"
    message = ("{{function_node __wrapped__SaveV2}} r/checkpoints/recalibrated/ckpt-1_temp/part-00000-of-00001"
               ".data-00000-of-00001.tempstate1042; No space left on device [Op:SaveV2]")
    written = files.tensorflow_write_error(tf.errors.ResourceExhaustedError(None, None, message))
    assert str(written) == "r/checkpoints/recalibrated/ckpt-1: cannot write it: No space left on device"


def test_a_full_disk_is_not_out_of_memory_but_a_real_oom_is():
    from convbn_cli.train.loop import _one_line_errors

    with pytest.raises(WriteError, match="r/tensorboard/train/e: cannot write it: No space left on device"):
        with _one_line_errors():
            raise tf.errors.ResourceExhaustedError(None, None, "r/tensorboard/train/e; No space left on device")
    with pytest.raises(ConvbnError, match="out of memory") as e:
        with _one_line_errors():
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1000000]")
    assert not isinstance(e.value, WriteError)


def test_resume_does_not_fall_back_past_a_checkpoint_it_cannot_read_now(tmp_path):
    """A checkpoint that cannot be read now (permissions, an unavailable file system) is not damaged: falling back
    would train its steps again, and the newer, intact checkpoint could then be pruned by the manager."""
    from convbn_cli.runs.checkpoints import restore_latest
    from convbn_cli.runs.rundir import RunDirError

    for n in (10, 20):
        (tmp_path / f"ckpt-{n}.index").write_bytes(b"index")
    tried = []

    class Manager:
        checkpoints, directory = [str(tmp_path / "ckpt-10"), str(tmp_path / "ckpt-20")], str(tmp_path)

    class Checkpoint:
        def restore(self, path):
            tried.append(Path(path).name)
            raise tf.errors.PermissionDeniedError(None, None, f"{path}.index; Permission denied")

    with pytest.raises(RunDirError, match="cannot be read now"):
        restore_latest(Checkpoint(), Manager(), log=lambda m: None)
    assert tried == ["ckpt-20"]  # the newest only: no fall back to ckpt-10
