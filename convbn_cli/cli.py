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

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convbn")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own log output and full tracebacks.")
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
@click.pass_context
@handle_errors
def train(ctx, config, overrides, resume, no_progress):
    """Train the network CONFIG describes, with KEY=VALUE overrides (e.g. train.epochs=1 model.bn.decay=0.9).

    Writes runs/<name>/<n>/: config.yaml, checkpoints/, metrics.jsonl/.csv, bn_stats/, tensorboard/.
    """
    from .config import load_config

    if resume:
        if config is not None:  # `train --resume DIR train.epochs=5`: Click filled CONFIG with the override
            overrides = (config, *overrides)
        bad = [o for o in overrides if not o.split("=", 1)[0].strip() == "train.epochs"]
        if bad:
            fail(f"--resume: only train.epochs may change when resuming, got {', '.join(bad)}")
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
