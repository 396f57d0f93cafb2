"""`convbn validate`, `train` and `sweep`: configs checked, trained, and trained in every combination."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..config import dump_config, layer_table, load_config, plan_layers
from ..config.plan import estimate
from ..errors import ConvbnError
from ..launcher import SUPERVISED_ENV, check_tf_config, launch_workers, supervise
from ..runs import RunDir, open_for_resume
from . import common
from .common import Session, no_progress_option, pass_session


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(config, overrides):
    """Check CONFIG (with KEY=VALUE overrides); print the resolved config and the layer table.

    Exit 0 if the config is usable, 2 with one line per problem if not. Never imports TensorFlow.
    """
    from ..present.reports import LayerTable  # NumPy: not for --help

    cfg = load_config(config, overrides)
    plan = plan_layers(cfg)
    click.echo(LayerTable(dump_config(cfg), layer_table(plan), estimate(plan, cfg.data.batch_size)).render())


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its latest checkpoint (train.epochs=N may raise the epochs).")
@no_progress_option
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="K",
              help="Start K local worker processes (127.0.0.1) under MultiWorkerMirroredStrategy.")
@pass_session
def train(session: Session, config, overrides, resume, no_progress, workers):
    """Train the network CONFIG describes, with KEY=VALUE overrides (e.g. train.epochs=1 model.bn.decay=0.9).

    Writes runs/<name>/<n>/: config.yaml, checkpoints/, metrics.jsonl/.csv, bn_stats/, tensorboard/.
    """
    if resume and config is not None and "=" not in config:  # `train CONFIG --resume DIR`: the run has its config
        RunDir.open(resume)  # a missing run directory is the first thing to say
        raise ConvbnError(f"--resume {resume} continues that run with its own config.yaml: give no CONFIG with it "
                          f"(got {config}; only train.epochs=N and distribute.* may change)")
    if resume and config is not None:  # `train --resume DIR train.epochs=5`: Click filled CONFIG with the override
        overrides, config = (config, *overrides), None
    if not resume and config is None:
        raise ConvbnError("missing CONFIG (e.g. convbn train configs/mnist_bn.yaml), or --resume RUN_DIR")
    # the input is checked here, once: bad input is exit 2 before any worker process starts
    resume = open_for_resume(resume, overrides) if resume else None
    cfg = resume.config if resume else load_config(config, overrides,
                                                   **common.dataset_reader(session, session.progress(no_progress)))
    args = (["--resume", str(resume.run.path)] if resume else [config]) + list(overrides)
    if workers and workers > 1:
        sys.exit(launch_workers(workers, args + ["--no-progress"], log=session.say))
    if cfg.distribute.strategy == "multi_worker" and not os.environ.get(SUPERVISED_ENV):
        # one worker of a cluster: train in a child process whose start-up this one watches (launcher.py)
        peers = check_tf_config(os.environ.get("TF_CONFIG"))
        sys.exit(supervise(args + (["--no-progress"] if no_progress else []), peers))
    if cfg.own is None:  # the user's own dataset was read (decoded and cached) with the config
        common.fetch_apart(cfg.data.dataset, session, session.progress(no_progress))
    session.tensorflow()
    from ..train import train as run_training  # TensorFlow: after the checks above

    result = run_training(cfg, resume=resume, progress=session.progress(no_progress), overrides=overrides,
                          log=session.log(), warn=lambda m: click.echo(m, err=True))
    if session.quiet:  # the one line a script needs: where the run is and how it did
        click.echo(f"{result.run_dir}: test accuracy {result.test_acc:.2%}")


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("settings", nargs=-1)
@click.option("--seeds", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Train each combination with K seeds (train.seed, +1, ...); the summary gives mean and spread.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="SWEEP_DIR",
              help="Continue an interrupted sweep: finished runs are skipped, an interrupted one resumes exactly.")
@no_progress_option
@pass_session
def sweep(session: Session, config, settings, seeds, resume, no_progress):
    """Train every combination of SETTINGS (KEY=V1,V2,... ; KEY=V for all) of CONFIG, one after another.

    Writes runs/<name>/sweep-<k>/<combination>/ (a run directory each) and summary.csv, summary.json and
    summary.png (test accuracy, best validation accuracy, the BN statistics gap and time, per combination).
    Example: convbn sweep mnist_bn model.bn.decay=0.9,0.99,0.999 train.epochs=1
    """
    from ..train import sweep as sw  # its planning needs no TensorFlow; its training imports it when it runs

    if resume and (config or settings):
        if not Path(resume).is_dir():  # as for train: a missing sweep directory is the first thing to say
            raise ConvbnError(f"{resume}: no such sweep directory")
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
    configs = [sw.run_config(path, planned, i) for i in range(len(planned["runs"]))]  # your own dataset: read here
    for dataset in dict.fromkeys(c.data.dataset for c in configs if c.own is None):
        common.fetch_apart(dataset, session, session.progress(no_progress))
    session.tensorflow()
    from ..present.reports import SweepReport

    summary = sw.run_sweep(path, log=session.log(), progress=session.progress(no_progress))
    click.echo(SweepReport(summary).render())


COMMANDS = (validate, train, sweep)
