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
from ..errors import ConvbnError
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
            cfg = load_config(name)
            kinds = [layer.type for layer in cfg.model.layers]
            click.echo(f"{name:12s} {cfg.data.dataset}, {len(kinds)} layers ({kinds.count('conv')} conv), "
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
    """Fetch and inspect the datasets (MNIST, Fashion-MNIST)."""


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


@data.command("info")
@json_option
def data_info(as_json):
    """Show the cache directory and what it holds."""
    from ..data import cache_dir, info
    from ..present.reports import DataInfoReport, dumps

    report = DataInfoReport(str(cache_dir()), [info(d) for d in DATASETS])
    click.echo(dumps(report.to_json()) if as_json else report.render())


COMMANDS = (runs, configs, data)
