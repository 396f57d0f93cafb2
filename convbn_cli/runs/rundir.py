"""The run directory, `runs/<name>/<n>/`: what a training run writes and where (the one place that knows).

    config.yaml                  the resolved config (every default filled in); every command rebuilds the model from it
    checkpoints/ckpt-<step>      the last `keep_checkpoints` checkpoints, named by training step
    checkpoints/best/ckpt-<step> the checkpoint with the best validation accuracy so far
    checkpoints/recalibrated/ckpt-<n>  precise-BN checkpoints (n = 1, 2, ...), each with a .source file naming
                                 the checkpoint it was recalibrated from
    checkpoints/ema/ckpt-<step>  with train.ema: the averaged weights with their BN statistics recomputed (the
                                 run's final model, which every command opens by default)
    metrics.jsonl, .csv          one row per epoch
    bn_stats/epoch_<k>.json      every BN layer's per-channel gamma, beta, moving mean and moving variance
    tensorboard/                 event files: scalars, and histograms of each BN layer's gamma and beta
    results.json                 test loss and accuracy of the run's final model, which it names
                                 ("final_checkpoint", relative to the run), the best epoch, the BN statistics check
    run.json                     the command line, overrides, versions, machine and git commit (and each resume)
    curves.png, confusion_matrix.png  pictures: per-epoch curves, and the test confusion matrix at the end
    export/                      `convbn export`'s default destination
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from ..config import dump_config, load_config
from ..errors import ConfigError, ConvbnError
from ..files import is_our_temporary, write_json_atomic, write_text_atomic

METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_ce",
                  "images_per_s", "epoch_time_s", "wall_time_s", "checkpoint"]


MAX_JSON_BYTES = 1 << 20  # results.json and run.json are a few KB: a bigger file is not one convbn wrote


class RunDirError(ConvbnError):
    """A run directory (or a file in it) that cannot be used."""


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    # Paths -----------------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best")
    recalibrated = property(lambda self: self.path / "checkpoints" / "recalibrated")
    ema = property(lambda self: self.path / "checkpoints" / "ema")
    export = property(lambda self: self.path / "export")
    metrics_jsonl = property(lambda self: self.path / "metrics.jsonl")
    metrics_csv = property(lambda self: self.path / "metrics.csv")
    bn_stats = property(lambda self: self.path / "bn_stats")
    tensorboard = property(lambda self: self.path / "tensorboard")
    results = property(lambda self: self.path / "results.json")
    run_info = property(lambda self: self.path / "run.json")

    @classmethod
    def create(cls, root, name) -> "RunDir":
        """Make `root/name/<n>` with the next free n (make_numbered)."""
        parent = Path(root) / name
        try:
            return cls(make_numbered(parent))
        except OSError as e:
            if isinstance(e, FileExistsError):
                e.strerror = "exists and is not a directory"
            raise RunDirError(f"output.root: cannot create a run directory under {parent}: "
                              f"{e.strerror or e}") from None

    @classmethod
    def create_at(cls, path) -> "RunDir":
        """Make exactly `path` (a sweep's combination); an existing directory is refused, never reused."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            raise RunDirError(f"{path}: already exists; not overwriting it") from None
        except OSError as e:
            raise RunDirError(f"{path}: cannot create the run directory: {e.strerror or e}") from None
        return cls(path)

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
        import shutil

        stale = [p for folder in (self.path, self.bn_stats, self.export) if folder.is_dir()
                 for p in folder.iterdir() if is_our_temporary(p)]
        stale += [p for folder in (self.checkpoints, self.best, self.recalibrated, self.ema) if folder.is_dir()
                  for p in folder.glob("ckpt-*_temp") if p.is_dir()]
        for p in stale:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return stale

    def check_intact(self) -> None:
        """Stop (one line, exit 2) if the run directory vanished under a running training."""
        if not self.config.is_file():
            raise RunDirError(f"{self.path}: the run directory (or its config.yaml) was removed while training; "
                              "stopped without writing anything there")

    # Files -----------------------------------------------------------------------------------------
    def write_config(self, cfg) -> None:
        write_text_atomic(self.config, dump_config(cfg))

    def load_config(self, overrides=()):
        """The run's resolved config (with `overrides` laid over it); a broken file is a RunDirError."""
        try:
            return load_config(self.config, overrides)
        except ConfigError as e:
            where = "" if e.problems[0].startswith(str(self.config)) else f"{self.config}: "
            raise RunDirError(where + "; ".join(e.problems)) from None

    def read_metrics(self) -> list[dict]:
        if not self.metrics_jsonl.is_file():
            return []
        rows = []
        for n, line in enumerate(self.metrics_jsonl.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise RunDirError(f"{self.metrics_jsonl}: line {n} is not valid JSON") from None
                if not isinstance(row, dict) or type(row.get("epoch")) is not int \
                        or not isinstance(row.get("wall_time_s", 0.0), (int, float)):
                    raise RunDirError(f"{self.metrics_jsonl}: line {n} is not a metrics row (an object with an "
                                      "integer \"epoch\")")
                rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite both metric files whole (atomically): a few hundred rows at most, and never half a row."""
        write_text_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(self.metrics_csv, buf.getvalue())

    def write_bn_stats(self, epoch: int, stats: dict) -> None:
        write_json_atomic(self.bn_stats / f"epoch_{epoch}.json", {"epoch": epoch, "layers": stats})

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.results, results)

    def final_checkpoint(self):
        """The prefix of the run's final model, as results.json names it (what the end-of-run summary measured),
        or None before training has finished. Only a checkpoint inside this run directory is taken."""
        rel = read_json(self.results).get("final_checkpoint")
        if not isinstance(rel, str) or not rel.startswith("checkpoints/") or ".." in Path(rel).parts:
            return None
        prefix = self.path / rel
        return str(prefix) if Path(f"{prefix}.index").is_file() else None

    def record_provenance(self, info: dict) -> None:
        """run.json: how the run was made; each --resume adds its own entry under "resumes"."""
        if self.run_info.is_file():
            try:
                old = json.loads(self.run_info.read_text())
            except (json.JSONDecodeError, OSError):
                old = None
            if isinstance(old, dict):
                info = {**old, "resumes": [*old.get("resumes", []), info]}
        write_json_atomic(self.run_info, info)


def read_json(path: Path) -> dict:
    """A JSON object convbn wrote (results.json, run.json), or {} when it is missing or damaged."""
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)  # ours are a few KB: a bigger file is not one convbn wrote
        data = json.loads(text) if len(text) <= MAX_JSON_BYTES else None
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


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

