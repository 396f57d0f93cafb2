"""The commands that read what convbn wrote without opening a model (no TensorFlow): `convbn runs` (list and
compare), `configs` (the built-in configs) and `data` (fetch and info)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from ..config import load_config
from ..config.builtin import builtin_names, builtin_path
from ..data.registry import DATASETS
from ..errors import ConvbnError, DataError
from ..runs.listing import compare_runs, list_runs
from ..runs.rundir import next_number
from .common import Session, json_option, no_progress_option, pass_session

# --------------------------------------------------------------------------- runs

class RunsGroup(click.Group):
    """`convbn runs [ROOT]` lists; `convbn runs compare A B ...` compares: anything that is not a subcommand is
    the listing's ROOT."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=RunsGroup)
def runs():
    """List the runs under a directory, or compare some (`convbn runs [ROOT]`, `convbn runs compare A B`)."""


@runs.command("list")
@click.argument("root", default="runs", type=click.Path(file_okay=False))
@click.option("--sort", "sort", metavar="KEY", help="Order by test, best_val, time, epochs, date, run, or any config "
              "key (e.g. model.bn.decay); numbers as numbers.")
@json_option
def runs_list(root, sort, as_json):
    """One line per run under ROOT (default: runs): date, dataset, layers (c = conv, p = pool, g = global pool,
    d = dense), epochs, best validation and test accuracy, time, and the config keys where it differs from the
    others."""
    from ..present.reports import RunsReport, dumps

    report = RunsReport(list_runs(root, sort=sort))
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 120
    click.echo(dumps(report.to_json()) if as_json else report.render(width=max(width, 80)))


@runs.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Where to draw the overlaid curves (default: a new compare-<n>.png in this directory).")
@click.option("--force", is_flag=True, help="Replace --plot's file if it exists.")
@json_option
def runs_compare(run_dirs, plot_path, force, as_json):
    """The config differences of the runs in RUN_DIR..., their results, and their curves in one picture."""
    from ..present.plots import compare_curves
    from ..present.reports import CompareReport, dumps

    if len(run_dirs) < 2:
        raise ConvbnError("compare needs at least two run directories")
    if plot_path is None:
        n = next_number(Path("."), r"compare-(\d+)\.png")  # a new name: never over an earlier picture
        plot_path = f"compare-{n}.png"
    elif Path(plot_path).suffix.lower() != ".png":
        raise click.BadParameter(f"{plot_path}: the picture's name must end in .png", param_hint="--plot")
    elif Path(plot_path).exists() and not force:
        raise ConvbnError(f"--plot {plot_path}: already exists; add --force to replace it")
    result = compare_runs(run_dirs)
    compare_curves(result["metrics"], plot_path, title="convbn runs compare")
    report = CompareReport(result, plot_path)
    click.echo(dumps(report.to_json()) if as_json else report.render())


# --------------------------------------------------------------------------- configs

@click.group(invoke_without_command=True)
@click.pass_context
def configs(ctx):
    """The configs that ship with convbn: `convbn train NAME` uses one from any directory."""
    if ctx.invoked_subcommand is None:
        for name in builtin_names():
            cfg = load_config(name, read_dataset=False)  # folder_cnn's dataset is yours: given when you train
            kinds = [layer.type for layer in cfg.model.layers]
            dataset = cfg.data.dataset if cfg.own is None else "your images"
            click.echo(f"{name:12s} {dataset}, {len(kinds)} layers ({kinds.count('conv')} conv), "
                       f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size}, decay {cfg.model.bn.decay:g}")


@configs.command("show")
@click.argument("name")
def configs_show(name):
    """Print the built-in config NAME, to start a file of your own from."""
    path = builtin_path(name)
    if path is None:
        raise ConvbnError(f"no built-in config named {name!r} (there are: {', '.join(builtin_names())})")
    click.echo(path.read_text(), nl=False)


# --------------------------------------------------------------------------- data

@click.group()
def data():
    """Fetch and inspect the datasets (MNIST, Fashion-MNIST), and check your own."""


@data.command("fetch")
@click.argument("dataset", type=click.Choice(DATASETS), default=DATASETS[0])
@click.option("--from", "source", type=click.Path(exists=False), metavar="PATH",
              help="A directory of the four IDX files (gzipped or not) or an .npz in Keras' layout.")
@no_progress_option
@pass_session
def data_fetch(session: Session, dataset, source, no_progress):
    """Get DATASET into the cache ($CONVBN_DATA_DIR, else ~/.cache/convbn), verified against published hashes."""
    from ..data import fetch

    arrays = fetch(dataset, source, log=session.say, progress=session.progress(no_progress))
    click.echo(f"{dataset}: {len(arrays['y_train'])} training and {len(arrays['y_test'])} test images ready")


@data.command("check")
@click.argument("path", type=click.Path(exists=False))
@click.option("--format", "fmt", type=click.Choice(["auto", "folder", "csv", "npz", "idx"]), default="auto",
              show_default=True, help="How PATH holds the images (auto: told by what it is and holds).")
@click.option("--resize", type=click.Choice(["pad", "fit", "stretch"]), default="pad", show_default=True,
              help="How images are brought to one shape (data.resize).")
@click.option("--input-shape", "shape", metavar="HxWxC", default=None,
              help="The shape to bring the images to (model.input_shape); default: the dataset's most common.")
@click.option("--test-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of a dataset without a test split held out as one (data.test_split).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Training batch size: classes with fewer images are named.")
@click.option("--max-files", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Images read at most (data.max_files).")
@click.option("--strict", is_flag=True, help="Refuse the dataset (exit 2) if any file is unreadable or skipped.")
@json_option
@no_progress_option
@pass_session
def data_check(session: Session, path, fmt, resize, shape, test_split, batch_size, max_files, strict, as_json,
               no_progress):
    """Check your own dataset at PATH (image folders, a CSV, an NPZ or IDX files) as training would read it.

    Counts per class and split, class imbalance, exact duplicates within and across splits (which inflate test
    accuracy), unreadable files, mixed sizes and what the resize rule did to them, classes smaller than a batch.
    The decoded images are cached (nothing is written in PATH). Exit 0: usable; 1: warnings; 2: refused.
    """
    from ..analysis.dataset_checks import check_dataset
    from ..data import cache_dir
    from ..data.own.dataset import load_own
    from ..present.dataset_report import DataCheckReport
    from ..present.reports import dumps

    own = load_own(path, fmt, resize=resize, shape=_shape(shape), test_split=test_split, max_files=max_files,
                   cache_root=cache_dir(), log=session.say, progress=session.progress(no_progress))
    check = check_dataset(own, batch_size=batch_size, strict=strict)
    report = DataCheckReport(check)
    click.echo(dumps(report.to_json()) if as_json else report.render())
    if check.refused:
        sys.exit(2)
    if check.severity_counts()["warning"]:
        sys.exit(1)


def _shape(text):
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and 0 < int(p) <= 4096 for p in parts) or parts[2] not in ("1", "3"):
        raise DataError(f"--input-shape {text}: expected HEIGHTxWIDTHxCHANNELS, e.g. 28x28x1 (channels 1 or 3)")
    return tuple(int(p) for p in parts)


@data.command("info")
@json_option
def data_info(as_json):
    """Show the cache directory and what it holds (the built-in datasets, and your own that were read)."""
    from ..data import cache_dir, info
    from ..data.own.cache import own_caches
    from ..present.reports import DataInfoReport, dumps

    report = DataInfoReport(str(cache_dir()), [info(d) for d in DATASETS], own_caches(cache_dir()))
    click.echo(dumps(report.to_json()) if as_json else report.render())


COMMANDS = (runs, configs, data)
