"""The `convbn` command line: thin Click commands over the importable modules.

Exit codes: 0 success; 2 bad input (config, data, checkpoint or run directory), one line per problem;
3 training diverged (non-finite loss); 130 interrupted by Ctrl-C (143 by SIGTERM), after saving a
checkpoint; 1 anything unexpected. TensorFlow is imported inside the commands that need it only.
"""

from __future__ import annotations

import functools
import sys

import click

EXIT_BAD_INPUT = 2


def fail(lines, code=EXIT_BAD_INPUT):
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Known errors become one-line messages with their exit code; no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import ConvbnError

        try:
            return fn(*args, **kwargs)
        except ConvbnError as e:
            if e.exit_code > 128:  # interrupted: not an error, the checkpoint is saved
                click.echo(str(e), err=True)
                sys.exit(e.exit_code)
            fail(e.lines, e.exit_code)
        except OSError as e:  # the machine said no: a full disk, a path that cannot be written, ...
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convbn")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log output.")
@click.pass_context
def main(ctx, verbose):
    """Train conv nets with per-channel batch normalization on MNIST-like data, and inspect every filter's BN."""
    ctx.obj = {"verbose": verbose}


def _tf(ctx):
    from .tf_setup import import_tensorflow

    return import_tensorflow(verbose=ctx.obj["verbose"])


# --------------------------------------------------------------------------- validate

@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@handle_errors
def validate(config, overrides):
    """Check CONFIG (with KEY=VALUE overrides); print the resolved config and the layer table.

    Exit 0 if the config is usable, 2 with one line per problem if not. Never imports TensorFlow.
    """
    from .config import dump_config, layer_table, load_config, plan_layers

    cfg = load_config(config, overrides)
    click.echo(dump_config(cfg).rstrip())
    click.echo()
    click.echo(format_layer_table(layer_table(plan_layers(cfg))))


def format_layer_table(rows) -> str:
    head = ("layer", "type", "output shape", "params", "")
    cells = [head] + [(n, t, "x".join(map(str, s)), f"{p:,}", note) for n, t, s, p, note in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:4], widths)))
             + ("  " + r[4] if r[4] else "") for r in cells]
    total = sum(r[3] for r in rows)
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- train

@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its latest checkpoint (train.epochs=N may raise the epochs).")
@click.option("--no-progress", is_flag=True, help="No progress bars (they are off anyway when not on a terminal).")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="K",
              help="Start K local worker processes (127.0.0.1) under MultiWorkerMirroredStrategy.")
@click.pass_context
@handle_errors
def train(ctx, config, overrides, resume, no_progress, workers):
    """Train the network CONFIG describes, with KEY=VALUE overrides (e.g. train.epochs=1 model.bn.decay=0.9).

    Writes runs/<name>/<n>/: config.yaml, checkpoints/, metrics.jsonl/.csv, bn_stats/, tensorboard/.
    """
    from .config import load_config

    if resume and config is not None:  # `train --resume DIR train.epochs=5`: Click filled CONFIG with the override
        overrides, config = (config, *overrides), None
    if workers and workers > 1:
        from .launcher import launch_workers

        args = (["--resume", resume] if resume else [config]) + list(overrides) + ["--no-progress"]
        sys.exit(launch_workers(workers, [a for a in args if a is not None], log=lambda m: click.echo(m, err=True)))
    if resume:
        # the weights do not depend on these; anything else would not fit the checkpoint or the run's metrics
        bad = [o for o in overrides if o.split("=", 1)[0].strip() != "train.epochs"
               and not o.split("=", 1)[0].strip().startswith("distribute.")]
        if bad:
            fail(f"--resume: only train.epochs and distribute.* may change when resuming, got {', '.join(bad)}")
        from .train.rundir import RunDir, RunDirError

        try:
            cfg = RunDir.open(resume).load_config(overrides)
        except RunDirError as e:
            fail(str(e))
    else:
        if config is None:
            fail("missing CONFIG (e.g. convbn train configs/mnist_bn.yaml), or --resume RUN_DIR")
        cfg = load_config(config, overrides)
    _tf(ctx)
    from .train import train as run_training

    result = run_training(cfg, resume=resume, progress=not no_progress)
    if resume and overrides:
        from .train.rundir import RunDir

        RunDir(result.run_dir).write_config(cfg)  # record the new epoch count


# --------------------------------------------------------------------------- eval and inspect-bn

TARGET_HELP = "a run directory, a checkpoint prefix (runs/x/1/checkpoints/ckpt-420) or an exported .keras model"


@main.command("eval", help="Accuracy, loss, per-class accuracy and confusion matrix of TARGET: " + TARGET_HELP + ".")
@click.argument("target", metavar="TARGET")
@click.option("--checkpoint", "which", type=click.Choice(["best", "latest"]), default="best", show_default=True,
              help="Which checkpoint of a run directory.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--bn-stats", type=click.Choice(["moving", "batch"]), default="moving", show_default=True,
              help="moving: BN's moving averages (correct inference); batch: each batch's own statistics.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
@handle_errors
def eval_cmd(ctx, target, which, split, bn_stats, as_json, no_progress):
    _tf(ctx)
    from .analysis import evaluate

    r = evaluate(target, which=which, split=split, bn_stats=bn_stats, progress=not no_progress and not as_json,
                 log=lambda m: click.echo(m, err=True))
    if as_json:
        import json

        click.echo(json.dumps({**r, "per_class_accuracy": r["per_class_accuracy"].tolist(),
                               "confusion": r["confusion"].tolist()}, indent=2))
        return
    click.echo(f"checkpoint: {r['checkpoint']}")
    click.echo(f"split: {r['split']} ({r['images']} images), BN statistics: {r['bn_stats']}")
    click.echo(f"loss {r['loss']:.4f}, accuracy {r['accuracy']:.4%}")
    click.echo("per-class accuracy: " + "  ".join(f"{c}: {a:.2%}" for c, a in enumerate(r["per_class_accuracy"])))
    click.echo("confusion matrix (rows: true class, columns: predicted):")
    width = max(5, len(str(r["confusion"].max())) + 1)
    click.echo("     " + "".join(str(c).rjust(width) for c in range(10)))
    for c, row in enumerate(r["confusion"]):
        click.echo(f"  {c}: " + "".join(str(v).rjust(width) for v in row))


def _thresholds(ctx, param, value):
    try:
        return [float(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@main.command("inspect-bn")
@click.argument("target", metavar="TARGET")
@click.option("--checkpoint", "which", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--layer", "layers", multiple=True, metavar="NAME", help="Only this BN layer (repeatable).")
@click.option("--dead-threshold", type=float, default=1e-2, show_default=True,
              help="Channels with |gamma| below this are counted as dead in the summary.")
@click.option("--rank", is_flag=True, help="Order channels by |gamma| (Network Slimming's importance signal).")
@click.option("--thresholds", default="0.01,0.05,0.1", callback=_thresholds, show_default=True,
              help="With --rank: report the fraction of channels with |gamma| below each.")
@click.option("--compare", "other", metavar="OTHER", help="Show per-channel differences OTHER - TARGET.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also draw per-layer bar charts of gamma, beta and moving variance.")
@click.pass_context
@handle_errors
def inspect_bn_cmd(ctx, target, which, fmt, layers, dead_threshold, rank, thresholds, other, plot_path):
    """Per-channel gamma, beta, moving mean/variance and the inference affine map of every BN layer in TARGET."""
    _tf(ctx)
    from .analysis import inspection as ib

    result = ib.inspect_bn(target, which=which, layers=list(layers) or None)
    diff = ib.compare(result, ib.inspect_bn(other, which=which, layers=list(layers) or None)) if other else None
    ranks = {n: ib.rank(layer, thresholds) for n, layer in result["layers"].items()} if rank else None
    if fmt == "json":
        import json

        out = ib.to_json(result, dead_threshold)
        for name in out["layers"]:
            if ranks:
                out["layers"][name]["rank"] = {"order": ranks[name]["order"].tolist(),
                                               "fraction_below": ranks[name]["below"]}
            if diff is not None and name in diff:
                out["layers"][name]["difference"] = {q: v.tolist() for q, v in diff[name].items()}
        click.echo(json.dumps(out, indent=2))
    elif fmt == "csv":
        import csv

        rows = ib.diff_csv_rows(diff) if diff is not None else ib.csv_rows(result)
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    else:
        order = {n: r["order"] for n, r in ranks.items()} if ranks else None
        click.echo(ib.table(result, dead_threshold, order, diff))
        if ranks:
            click.echo("")
            for name, r in ranks.items():
                click.echo(f"{name}: fraction of channels with |gamma| below "
                           + ", ".join(f"{t:g}: {f:.1%}" for t, f in r["below"].items()))
    if plot_path:
        ib.plot(result, plot_path, dead_threshold)
        click.echo(f"plot written to {plot_path}", err=True)


# --------------------------------------------------------------------------- recalibrate and export

@main.command()
@click.argument("target", metavar="TARGET")
@click.option("--checkpoint", "which", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training batches to average the BN statistics over.")
@click.option("--full", is_flag=True, help="One whole pass over the training split instead of --batches.")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="Where to report accuracy before and after (default: val if the run has one, else test).")
@click.option("--no-progress", is_flag=True)
@click.pass_context
@handle_errors
def recalibrate(ctx, target, which, batches, full, split, no_progress):
    """Precise BN: recompute every BN layer's moving mean and variance with the weights frozen.

    The result is a new checkpoint in the run's checkpoints/recalibrated/; the original is never changed.
    """
    _tf(ctx)
    from .analysis.recalibrate import recalibrate as run_recalibrate

    r = run_recalibrate(target, which=which, batches=None if full else batches, split=split,
                        progress=not no_progress, log=lambda m: click.echo(m, err=True))
    click.echo(f"recalibrated {len(r['layers'])} BN layer(s) of {r['source']} over {r['batches']} batches")
    click.echo(f"{r['split']} accuracy: before {r['before']['accuracy']:.4%} (loss {r['before']['loss']:.4f}), "
               f"after {r['after']['accuracy']:.4%} (loss {r['after']['loss']:.4f})")
    click.echo(f"saved {r['checkpoint']}")


@main.command("export")
@click.argument("target", metavar="TARGET")
@click.option("--format", "fmt", type=click.Choice(["keras", "savedmodel", "tflite"]), default="keras",
              show_default=True)
@click.option("--fold-bn", is_flag=True, help="Fold each BN into the conv/dense layer before it.")
@click.option("--output", type=click.Path(), help="Where to write (default: RUN_DIR/export/...).")
@click.option("--checkpoint", "which", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.pass_context
@handle_errors
def export_cmd(ctx, target, fmt, fold_bn, output, which):
    """Export TARGET with standard Keras/TensorFlow layers only, checked against the original model."""
    _tf(ctx)
    from .export import export

    r = export(target, fmt, fold_bn=fold_bn, output=output, which=which, log=lambda m: click.echo(m, err=True))
    if r["folded"]:
        click.echo(f"folded into the preceding conv/dense: {', '.join(r['folded'])}")
    if r["kept"]:
        click.echo(f"BN layers kept{' (not directly after a conv/dense)' if fold_bn else ''}: {', '.join(r['kept'])}")
    click.echo(f"max |logit difference| on {r['checked_images']} test images: {r['max_abs_logit_diff']:.2e}")
    click.echo(f"inference throughput: original {r['throughput_original']:.0f} img/s, exported "
               f"{r['throughput_exported']:.0f} img/s")
    click.echo(f"wrote {r['path']}")


# --------------------------------------------------------------------------- data

@main.group()
def data():
    """Fetch and inspect the datasets (MNIST, Fashion-MNIST)."""


@data.command("fetch")
@click.argument("dataset", type=click.Choice(["mnist", "fashion_mnist"]), default="mnist")
@click.option("--from", "source", type=click.Path(exists=False), metavar="PATH",
              help="A directory of the four IDX files (gzipped or not) or an .npz in Keras' layout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def data_fetch(dataset, source, no_progress):
    """Get DATASET into the cache ($CONVBN_DATA_DIR, else ~/.cache/convbn), verified against published hashes."""
    from .data import fetch

    arrays = fetch(dataset, source, log=lambda m: click.echo(m, err=True), progress=not no_progress)
    click.echo(f"{dataset}: {len(arrays['y_train'])} training and {len(arrays['y_test'])} test images ready")


@data.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def data_info(as_json):
    """Show the cache directory and what it holds."""
    import json

    from .data import DATASETS, cache_dir, info

    infos = [info(d) for d in DATASETS]
    if as_json:
        click.echo(json.dumps({"cache_dir": str(cache_dir()), "datasets": infos}, indent=2))
        return
    click.echo(f"cache directory: {cache_dir()}")
    for i in infos:
        if not i["cached"]:
            state = "not cached (convbn data fetch " + i["dataset"] + ")"
        elif i.get("verified"):
            state = f"cached, verified, {i['shapes']['x_train'][0]} train / {i['shapes']['x_test'][0]} test images"
        else:
            state = f"cached but unusable: {i['problem']}"
        click.echo(f"  {i['dataset']}: {state}")


if __name__ == "__main__":
    main()
