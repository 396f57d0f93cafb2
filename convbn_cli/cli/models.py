"""The commands that open a model: `convbn eval`, `predict`, `inspect-bn`, `diagnose`, `recalibrate`, `export` and
`report`. Each checks what it was pointed at, loads TensorFlow (Session.tensorflow), calls one function of the
analysis or export packages and prints its report (present/reports.py); those are imported once TensorFlow is set
up, as they import it themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..analysis.predict import EXIT_SOME_FAILED, UNCERTAIN_BELOW
from ..errors import EXIT_FINDINGS, ConvbnError
from ..formats.catalog import FORMATS, format_of
from .common import (
    PLOT_SUFFIXES,
    TARGET_HELP,
    Session,
    batches_option,
    checkpoint_option,
    data_option,
    dead_threshold_option,
    json_option,
    no_progress_option,
    pass_session,
    scale_option,
    thresholds_option,
)

layout_option = click.option(
    "--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), default=None,
    help="An ONNX model's input layout, where its graph does not say (NCHW: PyTorch; NHWC: Keras, TensorFlow).")


def _onnx(target) -> bool:
    """Whether TARGET is an ONNX model: diagnose, inspect-bn, recalibrate and export take one (with --data)."""
    return format_of(Path(target)) == "onnx"


def _refuse_ignored(target, onnx_ignores: dict, others_ignore: dict) -> None:
    """One line (exit 2) for an option given that TARGET's kind would silently ignore: `onnx_ignores` {option:
    given} are what only a run or Keras model takes, `others_ignore` what only an ONNX model takes."""
    onnx = _onnx(target)
    named = [o for o, given in (onnx_ignores if onnx else others_ignore).items() if given]
    if named and onnx:
        raise ConvbnError(f"{target}: {', '.join(named)} not taken by an ONNX model (for runs and Keras models: an "
                          "ONNX model has no run; its statistics and accuracy come from --batches of --data's images)")
    if named:
        raise ConvbnError(f"{target}: {', '.join(named)} is for ONNX models only (a Keras model's input is NHWC)")


# --------------------------------------------------------------------------- eval and inspect-bn

@click.command("eval", help="Accuracy, loss, per-class accuracy and confusion matrix of TARGET: " + TARGET_HELP
              + " (or a .tflite file).")
@click.argument("target", metavar="TARGET")
@checkpoint_option
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--bn-stats", type=click.Choice(["moving", "batch"]), default="moving", show_default=True,
              help="moving: BN's moving averages (correct inference); batch: each batch's own statistics.")
@click.option("--tta", is_flag=True,
              help="Also report accuracy with test-time augmentation (the mean prediction over the image and its "
                   "four one-pixel shifts), apart from the plain accuracy.")
@layout_option
@json_option
@no_progress_option
@pass_session
def eval_cmd(session: Session, target, which, split, bn_stats, tta, layout, as_json, no_progress):
    if tta and bn_stats == "batch":
        raise click.UsageError("--tta works with --bn-stats moving (the model's inference mode)")
    session.tensorflow(target, runnable_only=True)
    from ..analysis import evaluate
    from ..present.reports import EvalReport, dumps

    target = _with_layout(target, which, layout)

    report = EvalReport(evaluate(target, which=which, split=split, bn_stats=bn_stats, tta=tta,
                                 progress=session.progress(no_progress) and not as_json, log=session.say))
    click.echo(dumps(report.to_json()) if as_json else report.render())


def _with_layout(target, which, layout):
    """TARGET opened with --layout (an ONNX model whose graph does not say NCHW or NHWC), else TARGET as given:
    evaluate and predict take either."""
    if layout is None:
        return target
    from ..runs.target import open_target

    return open_target(target, which, runnable_only=True, layout=layout)


@click.command("predict")
@click.argument("target", metavar="TARGET")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@checkpoint_option
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Show the K most probable classes of each input.")
@click.option("--invert", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Make pictures light strokes on dark, as in MNIST; yes: the ink is darker than the paper, no: "
                   "lighter; auto: measured (with --preprocess none: invert when the border is light; a model of "
                   "your own dataset, not of digits: never).")
@click.option("--preprocess", type=click.Choice(["auto", "mnist", "none"]), default="auto", show_default=True,
              help="mnist: take the paper's tone, light and specks out of pictures, bring thin pens to MNIST's "
                   "stroke width, crop to the ink, fit it in 20x20 keeping its shape, centre it by its centre of "
                   "mass in 28x28, as MNIST's digits were made; none: pad to a square and resize (a model of your "
                   "own dataset: as its files were read in training, by its data.resize rule). auto: mnist for a "
                   "model of digits (MNIST, or your own digits 0-9 drawn light on dark).")
@click.option("--show", "show", type=click.Path(file_okay=False), metavar="DIR",
              help="Write each picture's stages and what the model was fed (enlarged) to the new directory DIR.")
@click.option("--uncertain-below", type=click.FloatRange(0, 1), default=UNCERTAIN_BELOW, show_default=True,
              metavar="P", help="Call a prediction uncertain (still giving its class and probability) when its "
                                "probability is under P, or when no ink was found in the picture.")
@scale_option
@layout_option
@json_option
@pass_session
def predict_cmd(session: Session, target, inputs, which, top_k, invert, preprocess, show, uncertain_below, scale,
                layout, as_json):
    """The class of each INPUT, with its probability, by TARGET (anything eval accepts, exports included).

    INPUT: PNG/JPEG pictures (made grayscale, or colour for a model that takes colour, and resized to the
    model's input; a model of your own dataset also reads the other kinds its folders may hold, BMP, GIF, TIFF,
    WebP, PNM), directories of them, or .npy/.npz arrays of pixels 0-255 shaped (N, H, W), (N, H, W, 1) or (H, W),
    (N, H, W, 3) or (H, W, 3) for colour. A picture that cannot be read is one error line and the others are still
    predicted; the exit code is then 1.
    """
    session.tensorflow(target, runnable_only=True, inputs=inputs)
    from ..analysis.predict import predict
    from ..present.reports import PredictReport, dumps

    if show and Path(show).exists() and (not Path(show).is_dir() or any(Path(show).iterdir())):
        raise click.BadParameter(f"{show}: exists and is not an empty directory; name a new one", param_hint="--show")
    target = _with_layout(target, which, layout)
    report = PredictReport(predict(target, inputs, top_k=top_k, invert=invert, which=which, scale=scale,
                                   preprocess=preprocess, show=show, uncertain_below=uncertain_below,
                                   log=session.say))
    if show:
        session.say(f"each picture's stages and what the model was fed: {show}/")
    if report.result["predictions"] or as_json:
        click.echo(dumps(report.to_json()) if as_json else report.render())
    for f in report.result["failed"]:
        click.echo(f"error: {f['error']}", err=True)
    if report.result["failed"]:
        sys.exit(EXIT_SOME_FAILED)


@click.command("inspect-bn")
@click.argument("target", metavar="TARGET")
@checkpoint_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--layer", "layers", multiple=True, metavar="NAME", help="Only this BN layer (repeatable).")
@dead_threshold_option
@click.option("--all", "show_all", is_flag=True, help="Every layer's per-channel values after the summary.")
@click.option("--rank", is_flag=True, help="Rank every channel of the network by |gamma| (Network Slimming's "
              "importance: one threshold prunes the tail), and order the per-channel tables so.")
@thresholds_option
@click.option("--compare", "other", metavar="OTHER", help="How OTHER's BN differs from TARGET's: per layer, and per "
              "channel with --all (OTHER - TARGET).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also draw per-layer bar charts of gamma, beta and moving variance (with --compare: both; with "
                   "--activations: box plots per channel, and FILE_per_activation.png).")
@click.option("--activations", is_flag=True, help="What each BN layer receives, its normalized values and what it "
              "gives, per channel, on one batch of evaluation images; and BN per feature map vs per activation.")
@data_option
@scale_option
@pass_session
def inspect_bn_cmd(session: Session, target, which, fmt, layers, dead_threshold, show_all, rank, thresholds, other,
                   plot_path, activations, data, scale):
    """Every BN layer of TARGET: a one-line summary each, then (--all, --layer) per-channel gamma, beta, moving
    mean/variance and the inference affine map; or (--activations) what the layers do to one batch."""
    if plot_path and Path(plot_path).suffix.lower() not in PLOT_SUFFIXES:
        raise click.BadParameter(f"{plot_path}: the picture's name must end in one of {', '.join(PLOT_SUFFIXES)}",
                                 param_hint="--plot")
    if activations:
        if other or rank or fmt == "csv":
            raise click.UsageError("--activations shows one batch's values: not with --compare, --rank or --format csv")
        return _activations(session, target, which, layers, data, scale, fmt, plot_path)
    if data is not None:
        raise click.UsageError("--data is for --activations (the parameters need no images)")
    session.tensorflow(target, *([other] if other else []), runnable_only=_onnx(target) or bool(other and _onnx(other)))
    from ..analysis import inspection as ib
    from ..present.inspection import plot as plot_bn
    from ..present.reports import InspectReport, dumps

    result = ib.inspect_bn(target, which=which, layers=list(layers) or None)
    diff = theirs = None
    if other:
        theirs = ib.inspect_bn(other, which=which, layers=list(layers) or None)
        diff = ib.compare(result, theirs)
        unmatched = ib.counterparts(result, theirs)[1]
        if unmatched:
            session.say(f"not compared (no BN layer of the same name and size in the other): {', '.join(unmatched)}")
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
        session.say(f"plot written to {plot_path}")


def _activations(session, target, which, layers, data, scale, fmt, plot_path):
    session.tensorflow(target, data=data)
    from ..analysis.activations import bn_activations
    from ..present import bn_activations as shown
    from ..present.reports import dumps

    result = bn_activations(target, which=which, layers=list(layers) or None, data=data, scale=scale,
                            log=session.say)
    click.echo(dumps(shown.to_json(result)) if fmt == "json" else shown.activation_table(result))
    if plot_path:
        shown.draw_activations(result, plot_path)
        written = [plot_path]
        if result["per_activation"] is not None:
            path = Path(plot_path)
            written.append(str(path.with_name(f"{path.stem}_per_activation{path.suffix}")))
            shown.draw_per_activation(result["per_activation"], written[-1])
        session.say(f"plot written to {', '.join(written)}")


@click.command("diagnose")
@click.argument("targets", metavar="TARGET [WORKER ...]", nargs=-1, required=True)
@checkpoint_option
@data_option
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Batches of images the data checks and the in-memory precise BN use.")
@scale_option
@layout_option
@json_option
@click.option("--fail-on", type=click.Choice(["warning", "error"]), default="error", show_default=True,
              help="Exit 4 when a finding of this severity or worse is found.")
@pass_session
def diagnose_cmd(session: Session, targets, which, data, batches, scale, layout, as_json, fail_on):
    """Find what is wrong with the batch normalization of TARGET.

    TARGET: a run directory, checkpoint, export, any Keras 3 .keras model with BN layers, or an ONNX model (a
    PyTorch export: MODEL.onnx --data mnist). Each finding names its layers, its evidence and a fix. Exit 0, or 4
    when something at or above --fail-on was found.

    WORKER ...: the other workers' checkpoints or models of one data-parallel training, compared with TARGET
    (workers_disagree: their BN statistics and weights).
    """
    from ..present.reports import DiagnoseReport, dumps

    target, workers = targets[0], list(targets[1:])

    try:
        session.tensorflow(target, *workers, data=data, runnable_only=any(map(_onnx, targets)))
        from ..analysis.diagnose import SEVERITIES, diagnose

        report = DiagnoseReport(diagnose(target, which=which, data=data, batches=batches, scale=scale, layout=layout,
                                         log=session.say, workers=workers))
    except ConvbnError as e:
        if as_json:  # a script reading stdout gets an object either way; the one-line error still goes to stderr
            click.echo(dumps({"error": e.lines, "exit_code": e.exit_code}))
        raise
    click.echo(dumps(report.to_json()) if as_json else report.render())
    worst = SEVERITIES.index(fail_on)
    if any(SEVERITIES.index(f.severity) >= worst for f in report.result["findings"]):
        sys.exit(EXIT_FINDINGS)


# --------------------------------------------------------------------------- recalibrate and export

@click.command()
@click.argument("target", metavar="TARGET")
@checkpoint_option
@batches_option
@click.option("--full", is_flag=True, help="One whole pass over the training split instead of --batches.")
@click.option("--augmented/--unaugmented", default=None,
              help="Calibrate on the run's training images with its data.augment, or as they are, as inference sees "
                   "them (default: as the run's train.precise_bn.augmented says: unaugmented unless set; augmented "
                   "for a run from before that key with precise BN on); a run's model only.")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="Where to report accuracy before and after (default: val if the run has one, else test).")
@data_option
@scale_option
@layout_option
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE.onnx",
              help="For an ONNX TARGET: where to write the recalibrated model (default: NAME-recalibrated.onnx beside "
                   "it); an existing file is refused unless --force.")
@click.option("--force", is_flag=True, help="For an ONNX TARGET: replace an existing --output file.")
@no_progress_option
@pass_session
def recalibrate(session: Session, target, which, batches, full, augmented, split, data, scale, layout, output,
                force, no_progress):
    """Precise BN: recompute every BN layer's moving mean and variance with the weights frozen.

    The result is a new checkpoint in the run's checkpoints/recalibrated/, or for a .keras TARGET a new
    NAME-recalibrated.keras beside it, for an ONNX TARGET (with --data) a new NAME-recalibrated.onnx; the original
    is never changed.
    """
    flag = {True: "--augmented", False: "--unaugmented"}.get(augmented)
    if flag and _onnx(target):  # before TensorFlow: known from the name
        raise ConvbnError(f"{target}: {flag} is for a run's model: an ONNX model has no run, and is calibrated "
                          "on --data's images as they are")
    _refuse_ignored(target, {"--full": full, "--split": split, "--checkpoint": which != "best"}, {"--layout": layout})
    session.tensorflow(target, data=data, runnable_only=_onnx(target))
    from ..analysis.recalibration import recalibrate as run_recalibrate
    from ..present.reports import RecalibrateReport

    r = run_recalibrate(target, which=which, batches=None if full else batches, split=split, data_source=data,
                        scale=scale, progress=session.progress(no_progress), output=output, force=force,
                        layout=layout, augmented=augmented, log=session.say)
    click.echo(RecalibrateReport(r).render())
    if flag and r["augmented"] is None:  # said, not silently accepted: the flag changed nothing
        click.echo(f"({flag}: the run's training augments nothing, so its batches were unaugmented anyway)")


@click.command("export")
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
@layout_option
@pass_session
def export_cmd(session: Session, target, fmt, fold_bn, output, force, no_preprocessing, which, data, scale, layout):
    """Export TARGET with standard Keras/TensorFlow layers only, checked against the original model.

    TARGET may also be a .keras model from outside convbn (then --data gives the images it is checked on), or an
    ONNX model: `--format onnx --fold-bn --data ...` folds its BN nodes into the Conv/Gemm before them.
    """
    _refuse_ignored(target, {"--checkpoint": which != "best"}, {"--layout": layout})
    session.tensorflow(target, data=data, runnable_only=_onnx(target))
    from ..export import export
    from ..present.reports import ExportReport

    r = export(target, fmt, fold_bn=fold_bn, output=output, which=which, force=force, data_source=data, scale=scale,
               preprocessing=not no_preprocessing, layout=layout, log=session.say)
    click.echo(ExportReport(r, fold_bn).render())


# --------------------------------------------------------------------------- report

@click.command("report")
@click.argument("target", metavar="RUN_DIR|SWEEP_DIR", type=click.Path(file_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Where to write the page (default: RUN_DIR/report.html, rewritten each time).")
@click.option("--force", is_flag=True, help="Replace --output's file if it exists.")
@click.option("--batches", type=click.IntRange(min=1), default=5, show_default=True,
              help="Batches of images the diagnose checks of a run use.")
@pass_session
def report_cmd(session: Session, target, output, force, batches):
    """One self-contained HTML page of a run (results, curves, confusion matrix, the first training batch,
    per-channel BN, diagnose verdict, config, provenance) or of a sweep (summary and every run's curves); opens in
    any browser, offline."""
    from ..analysis.report import report, report_kind

    path = Path(target)
    if report_kind(path) == "run":  # a run's page measures its model: TensorFlow (a sweep's needs none)
        session.tensorflow(path)

    r = report(path, output=output, force=force, batches=batches, log=session.say)
    if r["verdict"]:
        session.say(f"diagnose: {r['verdict']}")
    click.echo(f"report written to {r['path']}")


COMMANDS = (eval_cmd, predict_cmd, inspect_bn_cmd, diagnose_cmd, recalibrate, export_cmd, report_cmd)
