"""The run directory, `runs/<name>/<n>/`: what a training run writes and where (the one place that knows).

    config.yaml                  the resolved config (every default filled in; of the optimizer's and schedule's
                                 keys and BN's renorm keys, those used); every command rebuilds the model from it
    checkpoints/ckpt-<step>      the last `keep_checkpoints` checkpoints, named by training step
    checkpoints/best/ckpt-<step> the checkpoint with the best validation accuracy so far
    checkpoints/recalibrated/ckpt-<n>  precise-BN checkpoints (n = 1, 2, ...), each with a .source file naming
                                 the checkpoint it was recalibrated from
    checkpoints/ema/ckpt-<step>  with train.ema: the averaged weights with their BN statistics recomputed (the
                                 run's final model, which every command opens by default)
    metrics.jsonl, .csv          one row per epoch
    steps.jsonl                  the training loss, accuracy and learning rate every output.log_every_steps steps
    bn_stats/epoch_<k>.json      every BN layer's per-channel gamma, beta, moving mean and moving variance
    tensorboard/                 event files: scalars, and histograms of each BN layer's gamma and beta
    results.json                 test loss and accuracy of the run's final model, which it names
                                 ("final_checkpoint", relative to the run), the best epoch, the BN statistics check
    run.json                     the command line, overrides, versions, machine and git commit (and each resume)
    curves.png, confusion_matrix.png  pictures: per-epoch curves, and the test confusion matrix at the end
    export/                      `convbn export`'s default destination
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

from .. import readers
from ..config import dump_config, load_config
from ..errors import ConfigError, ConvbnError, WriteError
from ..files import is_our_temporary, remove_entry, write_bytes_atomic, write_json_atomic, write_text_atomic
from ..readers import read_json_lines

# val_loss/val_acc: validation as the final model would measure it (settled BN statistics, train/validation.py);
# val_*_moving: with the moving statistics training left (the same figures, or absent in runs from before they were
# told apart); val_acc_batch: with each batch's own statistics, when that was measured; settle_s: what it cost.
# New columns go last: a script that reads metrics.csv by position keeps working.
METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_ce",
                  "images_per_s", "epoch_time_s", "wall_time_s", "checkpoint", "val_loss_moving", "val_acc_moving",
                  "val_acc_batch", "val_bn", "settle_s"]


MAX_JSON_BYTES = 1 << 20  # results.json and run.json are a few KB: a bigger file is not one convbn wrote


class RunDirError(ConvbnError):
    """A run directory (or a file in it) that cannot be used."""


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.made = []  # the directories create/create_at made, the run's own last: all removed_if_unstarted removes

    # Paths -----------------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best")
    recalibrated = property(lambda self: self.path / "checkpoints" / "recalibrated")
    ema = property(lambda self: self.path / "checkpoints" / "ema")
    export = property(lambda self: self.path / "export")
    metrics_jsonl = property(lambda self: self.path / "metrics.jsonl")
    metrics_csv = property(lambda self: self.path / "metrics.csv")
    steps_jsonl = property(lambda self: self.path / "steps.jsonl")
    bn_stats = property(lambda self: self.path / "bn_stats")
    tensorboard = property(lambda self: self.path / "tensorboard")
    results = property(lambda self: self.path / "results.json")
    run_info = property(lambda self: self.path / "run.json")

    @classmethod
    def create(cls, root, name) -> "RunDir":
        """Make `root/name/<n>` with the next free n (make_numbered)."""
        parent = Path(root) / name
        try:
            missing = _missing(parent)
            run = cls(make_numbered(parent))
        except OSError as e:
            if isinstance(e, FileExistsError):
                e.strerror = "exists and is not a directory"
            raise RunDirError(f"output.root: cannot create a run directory under {parent}: "
                              f"{e.strerror or e}") from None
        run.made = [*missing, run.path]
        return run

    @classmethod
    def create_at(cls, path) -> "RunDir":
        """Make exactly `path` (a sweep's combination); an existing directory is refused, never reused."""
        path = Path(path)
        try:
            missing = _missing(path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            raise RunDirError(f"{path}: already exists; not overwriting it") from None
        except OSError as e:
            raise RunDirError(f"{path}: cannot create the run directory: {e.strerror or e}") from None
        run = cls(path)
        run.made = [*missing, path]
        return run

    @classmethod
    def open(cls, path) -> "RunDir":
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: no such run directory")
        if not run.config.is_file():
            raise RunDirError(f"{run.path}: not a run directory (config.yaml is missing)")
        return run

    def remove_stale_temporaries(self) -> list:
        """Delete what killed processes left half-written: the temporaries of atomic writes (`.NAME.*.tmp`),
        TensorFlow's checkpoint staging (`ckpt-*_temp/`) and export staging (`export/.NAME.*.tmp/`). Never a real
        file: only names that these writers make."""
        stale = [p for folder in (self.path, self.bn_stats, self.export) if folder.is_dir()
                 for p in folder.iterdir() if is_our_temporary(p)]
        stale += [p for folder in (self.checkpoints, self.best, self.recalibrated, self.ema) if folder.is_dir()
                  for p in folder.glob("ckpt-*_temp") if p.is_dir()]
        for p in stale:
            remove_entry(p)
        return stale

    # what training writes in a run directory: all that removed_if_unstarted may remove
    WRITTEN = ("config.yaml", "metrics.jsonl", "metrics.csv", "steps.jsonl", "results.json", "run.json", "curves.png",
               "confusion_matrix.png", "bn_stats", "tensorboard", "checkpoints")

    @contextlib.contextmanager
    def removed_if_unstarted(self):
        """A run that could not write its first files (config.yaml, the first checkpoint: a full disk, a read-only
        place) leaves no run directory behind, which `--resume` would refuse or start over in. On a WriteError
        before any checkpoint, what training wrote here is removed, then the directories create/create_at made, if
        nothing else is in them: never anything convbn did not make."""
        try:
            yield
        except WriteError as e:
            if not self.made or any(self.checkpoints.glob("ckpt-*.index")):
                raise
            self._remove_unstarted()
            gone = "was removed" if not self.path.exists() else "holds no checkpoint"
            raise WriteError(e.path, f"{e.cause}; the new run directory {self.path} {gone}") from None

    def _remove_unstarted(self) -> None:
        for p in self.path.iterdir() if self.path.is_dir() else ():
            if p.name in self.WRITTEN or is_our_temporary(p):
                with contextlib.suppress(OSError):  # a read-only place: then nothing was written there
                    remove_entry(p)
        for folder in reversed(self.made):  # the run's own first, then the parents made for it
            try:
                folder.rmdir()
            except OSError:  # not empty (another run, something of the user's) or not removable: kept
                break

    def check_intact(self) -> None:
        """Stop (one line, exit 2) if the run directory vanished under a running training."""
        if not self.config.is_file():
            raise RunDirError(f"{self.path}: the run directory (or its config.yaml) was removed while training; "
                              "stopped without writing anything there")

    # Files -----------------------------------------------------------------------------------------
    def write_file(self, name: str, data: bytes) -> None:
        """A file of the run (a picture) written into it, only while the run directory is there."""
        write_bytes_atomic(self.path / name, data, within=self.path)

    def write_config(self, cfg) -> None:
        write_text_atomic(self.config, dump_config(cfg), within=self.path)

    def load_config(self, overrides=()):
        """The run's resolved config (with `overrides` laid over it); a broken file is a RunDirError."""
        try:
            # its data.about: what the run read; its optimizer and schedule as they trained
            return load_config(self.config, overrides, reread=False, written_by_convbn=True)
        except ConfigError as e:
            where = "" if e.problems[0].startswith(str(self.config)) else f"{self.config}: "
            raise RunDirError(where + "; ".join(e.problems)) from None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's rows, each checked (METRIC_FIELDS): a damaged or hand-edited file is one line, exit 2."""
        if not (self.metrics_jsonl.exists() or self.metrics_jsonl.is_symlink()):
            return []
        rows = []
        for n, row in read_json_lines(self.metrics_jsonl, MAX_METRICS_BYTES, "a metrics file", RunDirError):
            try:
                rows.append(check_fields(row, METRIC_FIELDS, "", required=METRICS_REQUIRED))
            except RunDirError as e:
                raise RunDirError(f"{self.metrics_jsonl}: line {n} is not a metrics row ({str(e)[2:]})") from None
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite both metric files whole (atomically): a few hundred rows at most, and never half a row."""
        write_text_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows), within=self.path)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(self.metrics_csv, buf.getvalue(), within=self.path)

    def write_steps(self, rows: list[dict]) -> None:
        write_text_atomic(self.steps_jsonl, "".join(json.dumps(r) + "\n" for r in rows), within=self.path)

    def read_steps(self) -> list[dict]:
        """steps.jsonl's rows (the training loss every few steps), each checked; [] when there is none."""
        if not (self.steps_jsonl.exists() or self.steps_jsonl.is_symlink()):
            return []
        return [check_fields(row, STEP_FIELDS, f"{self.steps_jsonl}: line {n}", required=("step", "epoch", "loss"))
                for n, row in read_json_lines(self.steps_jsonl, MAX_METRICS_BYTES, "a steps file", RunDirError)]

    def write_bn_stats(self, epoch: int, stats: dict) -> None:
        write_json_atomic(self.bn_stats / f"epoch_{epoch}.json", {"epoch": epoch, "layers": stats},
                          within=self.path)

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.results, results, within=self.path)

    def final_checkpoint(self):
        """The prefix of the run's final model, as results.json names it (what the end-of-run summary measured),
        or None before training has finished. Only a checkpoint inside this run directory is taken."""
        rel = self.read_results().get("final_checkpoint")
        if not isinstance(rel, str) or not rel.startswith("checkpoints/") or ".." in Path(rel).parts:
            return None
        prefix = self.path / rel
        return str(prefix) if Path(f"{prefix}.index").is_file() else None

    def record_provenance(self, info: dict) -> None:
        """run.json: how the run was made; each --resume adds its own entry under "resumes"."""
        try:
            old = read_json(self.run_info)
        except RunDirError:  # damaged: start it again rather than refuse to train
            old = {}
        if old:
            resumes = old.get("resumes") if isinstance(old.get("resumes"), list) else []
            info = {**old, "resumes": [*resumes, info]}
        write_json_atomic(self.run_info, info, within=self.path)

    def read_results(self) -> dict:
        """results.json, checked ({} before the run has finished)."""
        return check_fields(read_json(self.results), RESULT_FIELDS, str(self.results))

    def read_run_info(self) -> dict:
        """run.json, checked ({} when there is none)."""
        return check_fields(read_json(self.run_info), RUN_INFO_FIELDS, str(self.run_info))


NUMBER, INTEGER, TEXT = "a number", "an integer", "text"
METRIC_FIELDS = {"epoch": INTEGER, "step": INTEGER, "checkpoint": TEXT, "val_bn": TEXT,
                 **{k: NUMBER for k in METRIC_COLUMNS if k not in ("epoch", "step", "checkpoint", "val_bn")}}
RESULT_FIELDS = {"test_acc": NUMBER, "test_loss": NUMBER, "best_val_acc": NUMBER, "wall_time_s": NUMBER,
                 "val_acc": NUMBER, "best_val_acc_moving": NUMBER,
                 "best_epoch": INTEGER, "epochs": INTEGER, "epochs_done": INTEGER, "stopped_early": TEXT,
                 "final_checkpoint": TEXT, "checkpoint": TEXT}
METRICS_REQUIRED = ("epoch", "train_loss", "train_acc", "lr", "wall_time_s")  # what every reader of a row uses
RUN_INFO_FIELDS = {"time": TEXT}
STEP_FIELDS = {"step": INTEGER, "epoch": NUMBER, "loss": NUMBER, "train_ce": NUMBER, "train_acc": NUMBER, "lr": NUMBER}
MAX_METRICS_BYTES = 16 << 20  # a row is ~300 bytes: 50,000 epochs


def best_row(rows: list):
    """(row, key): the epoch the run's final model comes from, and what chose it: the best validation accuracy as
    the final model would have it (val_acc: settled BN statistics), the LATER of equals (a short run's first
    epochs can tie, e.g. all at chance with lagging statistics, and the later weights have trained longer);
    without a validation split, the best training accuracy. (None, key) before any epoch."""
    key = "val_acc" if any(r.get("val_acc") is not None for r in rows) else "train_acc"
    scored = [r for r in rows if r.get(key) is not None]
    return (max(reversed(scored), key=lambda r: r[key]), key) if scored else (None, key)


def moving_val_acc(row: dict):
    """A metrics row's validation accuracy with the moving BN statistics (a row from before settled validation
    has only val_acc, which was that)."""
    return row.get("val_acc_moving", row.get("val_acc"))


def final_val(results: dict, same: bool = False) -> tuple:
    """(validation accuracy of the run's final model, the best epoch's with the moving statistics or None where
    they are the same, or where the final model kept its trained statistics: then both are one model's) from
    results.json: what every summary shows. The final model's figure is what `convbn eval
    RUN --split val` gives (results' val_acc); a run from before it was recorded has best_val_acc only.
    `same=True` keeps the moving figure where it equals the final one (a sweep averages it over seeds, and hides
    it only where the means are the same); it stays None where it is beside the point or missing."""
    shown = _accuracy(results.get("val_acc", results.get("best_val_acc")))
    moving = _accuracy(results.get("best_val_acc_moving"))
    bn = results.get("bn_statistics")
    if shown is not None and isinstance(bn, dict) and (bn.get("mechanism") == "none" or bn.get("kept") is False):
        # the final model kept its trained (moving) statistics: the epoch's figure and the final evaluation measure
        # one model (in bfloat16 they can differ by an image), so the final one is its moving figure
        moving = shown
    if shown is None or moving is None or "ema_val_acc" in results or (not same and abs(moving - shown) < 5e-5):
        moving = None  # (the EMA's final model is no epoch's weights: the epoch's moving figure is beside the point)
    return shown, moving


def _accuracy(value):
    """A number convbn can have written as an accuracy, else None (a hand-edited or damaged file)."""
    if not _is(value, NUMBER):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer too big for a float
        return None
    return value if 0.0 <= value <= 1.0 else None  # (NaN too is none)


def _is(value, kind) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == INTEGER else isinstance(value, (int, float))


def check_fields(obj, fields: dict, where: str, required=()) -> dict:
    """`obj` itself, once it is a JSON object whose `fields` (those present, and the `required` ones, which must
    not be null) hold the kind of value convbn writes there; else a RunDirError naming the file and the field."""
    if not isinstance(obj, dict):
        raise RunDirError(f"{where}: not a JSON object; not a file convbn wrote")
    for key in required:
        if obj.get(key) is None:
            raise RunDirError(f"{where}: has no \"{key}\"; not written by convbn")
    for key, kind in fields.items():
        value = obj.get(key)
        if value is not None and not _is(value, kind):
            raise RunDirError(f"{where}: \"{key}\" is {json.dumps(value)[:40]}, expected {kind}")
    return obj


def read_json(path: Path) -> dict:
    """A JSON object convbn wrote in a run (results.json, run.json): {} when the file is missing; bounded, and a
    damaged one (or a FIFO, a huge file, not an object) is a RunDirError, one line."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return {}
    data = readers.read_json(path, MAX_JSON_BYTES, "a file convbn wrote", RunDirError)
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object; not a file convbn wrote")
    return data


def _missing(folder: Path) -> list:
    """The directories `folder.mkdir(parents=True)` would make, outermost first."""
    return [p for p in reversed([folder, *folder.parents]) if not (p.exists() or p.is_symlink())]


def make_numbered(parent: Path, prefix: str = "") -> Path:
    """Make parent/<prefix><n> with the next free n. os.mkdir is atomic, so two processes starting at the same
    moment get different numbers instead of sharing a directory."""
    parent.mkdir(parents=True, exist_ok=True)
    n = next_number(parent, re.escape(prefix) + r"(\d+)")
    while True:
        try:
            (parent / f"{prefix}{n}").mkdir()
            return parent / f"{prefix}{n}"
        except FileExistsError:
            n += 1


def next_number(folder: Path, pattern: str) -> int:
    """One more than the largest number that `pattern`'s group captures in the names in `folder` (1 if none):
    the numbering of run directories and of recalibrated checkpoints."""
    taken = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ())
             if (m := re.fullmatch(pattern, p.name))]
    return max(taken, default=0) + 1


def checkpoint_step(prefix) -> int:
    """The number in a checkpoint prefix `.../ckpt-<n>` (the training step, or n for recalibrated ones)."""
    m = re.search(r"ckpt-(\d+)$", str(prefix))
    return int(m.group(1)) if m else -1

