"""Training: data -> model -> tf.function train step -> validation -> checkpoints, in named phases.

The loop is written out (rather than `model.fit`) so that it can resume in the middle of an epoch with the
exact batches and optimizer state, save on Ctrl-C, and stop on a non-finite loss before anything bad is
written. The phases are Trainer methods (setup, restore, run_epoch, end_of_epoch, finish); everything
around them (metrics files, BN statistics, TensorBoard, console, progress bar, the signal checkpoint) is a
subscriber to the trainer's events (events.py).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from .. import signals
from ..config import plan_layers
from ..config.schema import Config
from ..data.load import dataset_arrays
from ..data.pipeline import (
    batch_loader,
    epoch_order,
    eval_dataset,
    first_batch,
    make_splits,
    steps_per_epoch,
    train_dataset,
)
from ..errors import EXIT_DIVERGED, ConvbnError, Stopped
from ..files import tensorflow_write_error
from ..model import Evaluator, build_model
from ..model.precision import resolve_precision
from ..model.stats import bn_statistics
from ..present.reports import plural
from ..runs import RunDir, RunDirError, open_for_resume
from ..runs.checkpoints import restore_latest, save, training_managers
from ..runs.provenance import provenance
from ..runs.rundir import best_row, moving_val_acc
from . import distribute, events, final
from .optim import current_lr, make_optimizer
from .steps import distributed_batches, make_in_graph_steps, make_train_step
from .validation import unvalidated, validation_fields


class Interrupted(Stopped):
    """SIGINT/SIGTERM arrived; the training is in a checkpoint. `exit_code` is 128 + signal number.

    During training the checkpoint is saved at the step the signal arrived; after the last step (settling the
    final model, testing, pictures) the last epoch's checkpoint already holds everything, and `--resume` of a
    run with every epoch done only settles and tests the final model again."""

    def __init__(self, signum, checkpoint, run_dir, when=""):
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(signum, f"interrupted by {name}{when}; saved {checkpoint}; continue with "
                                 f"`convbn train --resume {run_dir}`")


class Diverged(ConvbnError):
    """The loss became NaN or infinite; nothing from the bad steps was saved."""

    exit_code = EXIT_DIVERGED


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list = field(default_factory=list)
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    model: object = None


def seed_everything(cfg: Config) -> None:
    keras.utils.set_random_seed(cfg.train.seed)  # Python, NumPy and TensorFlow/Keras generators
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def make_checkpoint(model, optimizer):
    """What a checkpoint holds: model (weights, BN moving statistics, dropout seed state), optimizer slots and
    step count, and where in training we are, so that resuming continues exactly."""
    state = {
        "epoch": tf.Variable(0, dtype=tf.int64, trainable=False),  # epochs completed
        "step_in_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),  # batches done in the current epoch
        "best_val_acc": tf.Variable(-1.0, dtype=tf.float64, trainable=False),
    }
    # Keras does not make its layers' random-seed states (dropout's SeedGenerator) checkpoint dependencies of the
    # model; without them a resumed run would draw different dropout masks than an uninterrupted one.
    seeds = {f"seed_{i}": v.value for i, v in enumerate(v for v in model.variables if "seed_generator" in v.path)}
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **state, **seeds)
    return ckpt, state


def train(cfg: Config, *, data: dict | None = None, resume=None, log=print, progress: bool = True,
          on_step=None, overrides=(), run_dir=None, warn=None, subscribers=()) -> TrainResult:
    """Train the network `cfg` describes and write a run directory; or continue a run.

    Args:
        cfg: a validated config (`load_config`).
        data: arrays in Keras' mnist.npz layout (x_train, y_train, x_test, y_test); fetched when None.
        resume: a run directory (path) or an opened `runs.Resume` to continue from its latest checkpoint.
        log: where the per-epoch lines go.
        warn: where a warning about the result goes (BN statistics that still lag at the end); default stderr.
            The CLI keeps it under --quiet.
        progress: show progress bars (on a terminal).
        on_step: called as on_step(global_step, model) after every training step (tests and benchmarks).
        overrides: the KEY=VALUE overrides the config was made with (recorded in run.json).
        run_dir: write the run exactly there (a new directory; a sweep's combination) instead of
            output.root/output.name/<n>.
        subscribers: your own callbacks: objects with any of events.Subscriber's methods (on_start,
            on_epoch_start, on_step, on_epoch_metrics, on_epoch_end, on_train_end, on_finish, on_close), each
            called with the Trainer (what a subscriber may use of it: events.py's docstring) and the event's
            arguments, after convbn's own.

    Returns:
        TrainResult: run_dir, metrics (one dict per epoch), test_loss, test_acc and the trained model.

    Raises:
        Interrupted: SIGINT/SIGTERM arrived (a checkpoint was saved); Diverged: the loss became non-finite.
    """
    distribute.setup_devices(cfg)
    strategy = distribute.make_strategy(cfg)
    chief = distribute.is_chief(strategy)
    scratch = None if chief else distribute.temporary_run_root()
    warn = warn or _to_stderr
    if not chief:  # every worker takes part in saving (a collective); only the chief's files are kept
        log, warn, progress = _silent, _silent, False
    if resume is not None and not hasattr(resume, "run"):
        resume = open_for_resume(resume)
    record = (lambda: provenance(resume.overrides if resume else overrides)) if chief else None  # run.json
    made = events.standard(cfg, log, progress, on_step, subscribers, provenance=record)
    trainer = Trainer(cfg, strategy, made, log, progress, warn)
    fresh = resume is None and scratch is None  # a run directory this call makes, and removes if it cannot start
    try:
        with _one_line_errors(cluster=cfg.distribute.strategy == "multi_worker", trainer=trainer):
            trainer.setup(data)  # data and model first: a failure here leaves no run directory behind
            run = _open_run(cfg, resume, scratch, log, run_dir)
            with run.removed_if_unstarted() if fresh else contextlib.nullcontext():
                result = trainer.fit(run, resume)
        if chief and resume is not None and resume.overrides:
            run.write_config(cfg)  # record the new epoch count
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _open_run(cfg, resume, scratch, log, at=None) -> RunDir:
    """The run directory: the resumed one, a new runs/<name>/<n>/ (or exactly `at`), or (a non-chief worker)
    scratch space."""
    if scratch is not None:
        run = RunDir.create(scratch, "worker")
        run.write_config(cfg)
        return run
    if resume is not None:
        resume.run.remove_stale_temporaries()
        return resume.run
    run = RunDir.create_at(at) if at is not None else RunDir.create(cfg.output.root, cfg.output.name or "run")
    with run.removed_if_unstarted():  # the config could not be written: no empty run directory is left
        run.write_config(cfg)
    log(f"run directory: {run.path}")
    return run


class PeerLost(ConvbnError):
    """Another worker of a multi-worker cluster died or became unreachable (exit 1: not bad input)."""

    exit_code = 1


@contextlib.contextmanager
def _one_line_errors(cluster: bool = False, trainer=None):
    """What TensorFlow or Python raise when a network is too big for this machine, as one line (exit 2); in a
    cluster (`cluster`), a collective operation that failed because a peer is gone (exit 1)."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError, tf.errors.InternalError) as e:
        if not cluster:
            raise
        run = getattr(getattr(trainer, "run", None), "path", None) or "RUN_DIR"
        raise PeerLost(f"another worker of the cluster stopped or cannot be reached ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:160]}); the run's checkpoints are kept: continue with "
                       f"`convbn train --resume {run}`") from None
    except tf.errors.ResourceExhaustedError as e:
        written = tensorflow_write_error(e)  # TensorFlow says ResourceExhausted for a full disk too
        if written is not None:
            raise written from None
        raise ConvbnError(f"out of memory building or training the network ({' '.join(str(e).split())[:200]}); "
                          "make it smaller or lower data.batch_size") from None
    except MemoryError:
        raise ConvbnError("out of memory building or training the network; make it smaller or lower "
                          "data.batch_size") from None
    except RecursionError:
        raise ConvbnError("the network is too deep to build (Python's recursion limit); use fewer layers") from None


def _silent(*_):
    pass


def _to_stderr(message):
    print(message, file=sys.stderr)


class Trainer:
    """One training run, phase by phase; `fit` runs them all.

    Every attribute is declared in `__init__` (None, or a neutral value, until the phase that sets it runs); the
    ones a subscriber may use are listed in events.py's docstring, the trainer's contract with its subscribers.

    Attributes:
        cfg (Config): the run's config. Given.
        strategy: the tf.distribute strategy the training steps run under. Given.
        stop_on_signal (events.StopOnSignal): turns SIGINT/SIGTERM into a checkpoint (during the steps) or a stop
            (after them); `check_signals` asks it between the final phases. Made here.
        subscribers (list): the event subscribers in the order they are called: the given ones, then
            stop_on_signal (last: a signal sent by an earlier subscriber is seen at once). Given.
        log (callable): where the per-epoch lines and notes go. Given.
        warn (callable): where a warning about the result goes (BN statistics that still lag). Given.
        progress (bool): whether to show progress bars. Given.
        epochs (int): train.epochs, the epoch count the run ends at. Given.
        splits (Splits): the data's train/val/test splits. setup.
        global_batch (int): data.batch_size times the replicas. setup.
        precision (str): train.precision resolved ("float32", "mixed_bfloat16", ...). setup.
        model (keras.Model): the network being trained. setup.
        steps (int): training steps per epoch. setup.
        optimizer (keras.optimizers.Optimizer): the model's optimizer, its slots built. setup.
        ckpt (tf.train.Checkpoint): what a checkpoint holds (make_checkpoint). setup.
        state (dict): the checkpoint's progress variables: epoch, step_in_epoch, best_val_acc. setup.
        train_step (tf.function): one compiled training step, train_step(x, y). setup.
        sums (dict): the epoch's running loss, ce, correct and count variables. setup.
        train_steps (tf.function): several steps in one compiled call (make_in_graph_steps) on one device; None
            under a tf.distribute strategy, whose dataset feeds train_step. setup.
        evaluate (Evaluator): the validation evaluator of `model`. setup.
        t_start (float): the time.time() the run's wall_time_s counts from. setup; restore moves it back by the
            time the run had already trained.
        run (RunDir): the run directory. fit.
        manager (tf.train.CheckpointManager): the latest checkpoints. fit.
        best_manager (tf.train.CheckpointManager): the best epoch's checkpoint. fit.
        restored (str): the checkpoint a resume loaded; None when the run started from the beginning. restore.
        metrics (list): one metrics row per finished epoch, as in metrics.jsonl. restore, end_of_epoch.
        start_epoch (int): the epochs done before this session (0 without a resume). restore.
        epoch (int): the current epoch, counted from 0. restore, run_epoch.
        skip (int): the steps of epoch `start_epoch` a resume skips (done before it was interrupted); 0 once that
            epoch is done. restore, fit.
        done_in_epoch (int): the steps done in the current epoch. run_epoch.
        last_chunk (int): the steps the last compiled call ran (1, or up to train.steps_per_execution). run_epoch.
        last_sums (dict): the running sums as last read (every events.PROGRESS_EVERY steps). read_sums.
        stop_reason (str): why training ends before train.epochs (early stopping); None while it does not.
            request_stop.
        last_test (dict): the final model's test result (loss, accuracy, confusion). finish.
        _stats (dict): bn_statistics' last reading. bn_statistics.
        _stats_step (int): the optimizer step `_stats` was read at. bn_statistics.
    """

    def __init__(self, cfg: Config, strategy, subscribers, log=print, progress=True, warn=_silent):
        self.cfg, self.strategy = cfg, strategy
        self.stop_on_signal = events.StopOnSignal()
        self.subscribers = [*subscribers, self.stop_on_signal]
        self.log, self.warn, self.progress = log, warn, progress
        self.epochs = cfg.train.epochs
        # setup
        self.splits = self.global_batch = self.precision = self.model = self.steps = self.optimizer = None
        self.ckpt = self.state = self.train_step = self.sums = self.train_steps = self.evaluate = None
        self.t_start = None
        # fit and restore
        self.run = self.manager = self.best_manager = self.restored = None
        self.metrics = []
        self.epoch = self.start_epoch = self.skip = 0
        # the epochs and the end
        self.done_in_epoch = 0
        self.last_chunk = 1  # training steps the last compiled call ran (events.crossed)
        self.last_sums = self.stop_reason = self.last_test = None
        self._stats = self._stats_step = None

    def publish(self, event, *args):
        for s in self.subscribers:
            getattr(s, event)(self, *args)

    def fit(self, run: RunDir, resume) -> TrainResult:
        """Train in `run` (after `setup`): restore, epochs, finish."""
        self.run = run
        self.manager, self.best_manager = training_managers(self.ckpt, run, self.cfg.output.keep_checkpoints)
        try:
            if resume is not None:
                self.restore(resume.run.path)
            self.publish("on_start")
            if self.start_epoch >= self.epochs:
                self.log(f"{self.run.path}: already trained {self.start_epoch} of {plural(self.epochs, 'epoch')}; "
                         "nothing to do")
            for epoch in range(self.start_epoch, self.epochs):
                if self.stop_reason:  # a subscriber (early stopping) decided that training is done
                    break
                row = self.run_epoch(epoch)
                self.end_of_epoch(row)
                self.skip = 0
            self.publish("on_train_end")
            result = self.finish()
        except BaseException:
            self.close(failing=True)
            raise
        self.close()
        return result

    def close(self, failing=False):
        """on_close to every subscriber, even after one raised (the first error is raised after them all, unless
        the run is failing already: then what made it fail is the error reported, not what closing met after)."""
        first = None
        for s in self.subscribers:
            try:
                s.on_close(self)
            except Exception as e:  # noqa: BLE001  (raised below, or the run's own error is)
                first = first or e
        if first is not None and not failing:
            raise first

    # ------------------------------------------------------------------ phases

    def setup(self, data):
        """Seeds, data splits, model, optimizer and train step (nothing is written)."""
        cfg = self.cfg
        seed_everything(cfg)
        if data is None:
            data = dataset_arrays(cfg, log=self.log, progress=self.progress)
        self.splits = make_splits(data, cfg)
        replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.data.batch_size * replicas
        if replicas > 1:
            self.log(f"{replicas} replicas ({type(self.strategy).__name__}), global batch {self.global_batch}, "
                     f"BN statistics {'synchronized' if cfg.distribute.sync_bn else 'per replica'}")
        plan = plan_layers(cfg)
        self.precision, why = resolve_precision(cfg.train.precision,
                                                widths=[p.spec.filters for p in plan if p.spec.type == "conv"])
        if cfg.train.precision == "auto":
            self.log(f"precision: {self.precision} ({why})")
        with self.strategy.scope():
            self.model = build_model(cfg, plan, precision=self.precision)
            self.steps = steps_per_epoch(self.splits.size("train"), self.global_batch)
            self.optimizer = make_optimizer(cfg.train, self.steps * self.epochs)
            self.optimizer.build(self.model.trainable_variables)  # create slots now, so a restore fills them
            self.ckpt, self.state = make_checkpoint(self.model, self.optimizer)
            self.train_step, self.sums = make_train_step(self.model, self.optimizer, cfg.train, self.strategy,
                                                         self.global_batch)
            self.train_steps = None
            if replicas == 1 and getattr(self.strategy, "cluster_resolver", None) is None:
                # one device: the batches are made inside the compiled call from the tensors in memory
                self.train_steps = make_in_graph_steps(self.train_step.replica_step, batch_loader(self.splits, cfg),
                                                       self.global_batch, cfg.train)
        self.evaluate = Evaluator(self.model, cfg.dataset.num_classes)
        self.t_start = time.time()

    def restore(self, source: Path):
        """The latest checkpoint that loads, and the metrics of the epochs it has done."""
        # a non-chief worker reads the chief's checkpoints and writes its own copy to scratch space
        manager = self.manager if source.resolve() == self.run.path.resolve() else tf.train.CheckpointManager(
            self.ckpt, source / "checkpoints", max_to_keep=None, checkpoint_name="ckpt")
        self.restored = restore_latest(self.ckpt, manager, self.log, self.warn)
        if self.restored is None:
            self.log("no checkpoint yet: starting from the beginning")
        self.start_epoch = self.epoch = int(self.state["epoch"].numpy())
        self.skip = int(self.state["step_in_epoch"].numpy())
        if self.start_epoch > self.epochs:
            raise RunDirError(f"--resume: {source} has already trained {plural(self.start_epoch, 'epoch')}; "
                              f"train.epochs={self.epochs} would undo nothing and claim less, so nothing was done")
        self.metrics = [r for r in RunDir(source).read_metrics() if r["epoch"] <= self.start_epoch]
        self.t_start = time.time() - (self.metrics[-1]["wall_time_s"] if self.metrics else 0.0)

    def run_epoch(self, epoch) -> dict:
        """The epoch's training steps (from `skip` on, after a resume); returns its training metrics."""
        self.epoch = epoch
        for v in self.sums.values():
            v.assign(0.0)
        self.publish("on_epoch_start", epoch)
        t0, done = time.time(), self.skip
        for k in self.calls(epoch):
            done += k
            self.last_chunk = k
            step = epoch * self.steps + done
            if events.crossed(self, step, events.PROGRESS_EVERY) or done == self.steps:
                self.check_finite(step)
            self.done_in_epoch = done
            self.publish("on_step", step)
        self.check_finite(epoch * self.steps + done)
        sums, epoch_time = self.read_sums(), time.time() - t0
        seen = max(sums["count"], 1.0)
        return {"epoch": epoch + 1, "step": int(self.optimizer.iterations.numpy()),
                "train_loss": sums["loss"] / seen, "train_acc": sums["correct"] / seen,
                "train_ce": (sums["ce"] if self.cfg.train.label_smoothing else sums["loss"]) / seen,
                "images_per_s": sums["count"] / max(epoch_time, 1e-9), "epoch_time_s": epoch_time}

    def calls(self, epoch):
        """Run the epoch's training steps (from `skip` on), one compiled call at a time; yield the steps of each."""
        if self.train_steps is None:  # a tf.distribute strategy: its dataset hands each replica its slice
            batches = train_dataset(self.splits, self.cfg, epoch, self.skip, self.global_batch)
            for x, y in distributed_batches(self.strategy, batches):
                self.train_step(x, y)
                yield 1
            return
        order = tf.constant(epoch_order(self.splits.size("train"), self.global_batch, self.cfg.train.seed, epoch))
        per_call, done = self.cfg.train.steps_per_execution, self.skip
        while done < self.steps:
            k = min(per_call, self.steps - done)
            # tensors, not Python ints: one trace for every call
            self.train_steps(order, tf.constant(epoch, tf.int64), tf.constant(done), tf.constant(k))
            done += k
            yield k

    def end_of_epoch(self, row):
        """Validate, then metrics, checkpoints (latest, and best when it improved), BN statistics and the rest."""
        splits = self.splits
        val = self.evaluate(eval_dataset(splits, self.cfg, "val")) if splits.size("val") else None
        if val is not None and not math.isfinite(val["loss"]):
            # finite training loss but weights that already overflow at inference: not a checkpoint to keep
            raise self.diverged(f"validation loss became non-finite ({val['loss']}) after epoch {row['epoch']}")
        # as the final model would measure it: settled BN statistics where the moving ones lag (validation.py)
        val = validation_fields(self.model, splits, self.cfg, val, self.evaluate) if val else unvalidated()
        row = {**{k: row[k] for k in ("epoch", "step", "train_loss", "train_acc", "train_ce")}, **val,
               "lr": current_lr(self.optimizer), "images_per_s": row["images_per_s"],
               "epoch_time_s": row["epoch_time_s"], "wall_time_s": time.time() - self.t_start,
               "checkpoint": f"ckpt-{row['step']}"}
        self.state["epoch"].assign(row["epoch"])
        self.state["step_in_epoch"].assign(0)
        score = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]
        improved = score >= float(self.state["best_val_acc"].numpy())  # the later of equals (rundir.best_row)
        if improved:
            self.state["best_val_acc"].assign(score)
        self.metrics.append(row)
        self.run.check_intact()
        self.publish("on_epoch_metrics", row)  # durable before the checkpoint (see events.MetricsFiles)
        self.run.check_intact()  # again: TensorFlow's checkpoint writer would make a removed run directory anew
        save(self.manager, row["step"])
        if improved:
            save(self.best_manager, row["step"])
        self.publish("on_epoch_end", row)

    def finish(self) -> TrainResult:
        """The final model (final.py: best or EMA weights, BN statistics that do not lag), its test accuracy,
        results.json."""
        results = {"epochs": self.epochs, "epochs_done": self.metrics[-1]["epoch"] if self.metrics else 0,
                   **self.best(), "stopped_early": self.stop_reason, "precision": self.precision}
        settled = final.settle(self.cfg, self.run, self.splits, self.model, self.optimizer, precision=self.precision,
                               latest=self.manager.latest_checkpoint, best=self.best_manager.latest_checkpoint,
                               evaluate_test=self.evaluate_test, progress=self.progress)
        results.update(settled.results)
        self.check_signals()
        model, gap, before = settled.model, settled.gap, settled.test_before
        test = self.evaluate_test(model)
        self.check_signals()
        results.update(test_loss=test["loss"], test_acc=test["accuracy"], checkpoint=str(settled.checkpoint))
        if before is not None:  # what the EMA or precise BN changed, on the test set
            key = "before_ema" if self.cfg.train.ema is not None else "before_precise_bn"
            results[key] = {"test_loss": before["loss"], "test_acc": before["accuracy"]}
        results["wall_time_s"] = time.time() - self.t_start  # precise BN and the EMA's recalibration included
        self.last_test = test
        self.publish("on_finish", results)
        self.check_signals()
        self.run.write_results(results)
        if gap.material:  # still lagging (precise BN off, or it did not help): say so even under --quiet
            self.warn(f"warning: {gap.split} accuracy is {gap.moving_acc:.2%} with the moving BN statistics but "
                      f"{gap.batch_acc:.2%} with batch statistics; see `convbn diagnose {self.run.path}`")
        return TrainResult(self.run.path, self.metrics, test["loss"], test["accuracy"], model)

    def evaluate_test(self, model) -> dict:
        return Evaluator(model, self.cfg.dataset.num_classes)(eval_dataset(self.splits, self.cfg, "test"))

    # ------------------------------------------------------------------ helpers for the phases and subscribers

    def read_sums(self) -> dict:
        """The running loss/correct/count sums of the epoch (one host sync)."""
        self.last_sums = {k: float(v.numpy()) for k, v in self.sums.items()}
        return self.last_sums

    def current_lr(self) -> float:
        return current_lr(self.optimizer)

    def first_batch(self, count: int = 32):
        """(pixels, labels): the first `count` images of the run's first training batch as the model gets them
        (pipeline.first_batch)."""
        return first_batch(self.splits, self.cfg, count, self.global_batch)

    def check_finite(self, step):
        loss = self.read_sums()["loss"]
        if not math.isfinite(loss):
            raise self.diverged(f"loss became non-finite ({loss}) in epoch {self.epoch + 1}, by step {step}")

    def diverged(self, what) -> Diverged:
        last = self.manager.latest_checkpoint or "none (no epoch finished)"
        return Diverged(f"{what}; training stopped. Last good checkpoint: {last}. Lower train.optimizer.lr or "
                        "check the data.")

    def interrupt(self, signum):
        """Save a checkpoint at the current step and stop (called between steps by events.StopOnSignal)."""
        self.check_finite(self.epoch * self.steps + self.done_in_epoch)
        self.run.check_intact()
        self.state["epoch"].assign(self.epoch)
        self.state["step_in_epoch"].assign(self.done_in_epoch)
        with signals.handled(signals.stop_signals(signal.SIG_IGN)):  # a second Ctrl-C must not cut it in half
            path = save(self.manager, int(self.optimizer.iterations.numpy()))
        raise Interrupted(signum, path, self.run.path)

    def stopped_after_training(self, signum) -> Interrupted:
        """What a signal after the last training step ends the command with: the last epoch's checkpoint holds
        the training; `--resume` settles and tests the final model again (results.json is written last)."""
        latest = self.manager.latest_checkpoint or "nothing (no epoch finished)"
        return Interrupted(signum, latest, self.run.path, " after the last training step, before results.json")

    def check_signals(self):
        """Between the final phases: stop if a signal came (the trainer's own events.StopOnSignal)."""
        self.stop_on_signal.check(self)

    def request_stop(self, reason: str) -> bool:
        """End training after the current epoch (a subscriber's decision: early stopping); the first reason given
        stays (results.json's stopped_early). Whether this call's reason is the one kept."""
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return True

    def best(self) -> dict:
        """The epoch with the best (settled) validation accuracy, the later of equals, as the best checkpoint keeps
        it (training accuracy without a validation split); and its validation with the moving statistics."""
        top, _ = best_row(self.metrics)
        if top is None:
            return {"best_epoch": None, "best_val_acc": None}
        return {"best_epoch": top["epoch"], "best_val_acc": top.get("val_acc"),
                "best_val_acc_moving": moving_val_acc(top)}

    def bn_statistics(self) -> dict:
        """Every BN layer's per-channel parameters now (read once per training step, whoever asks)."""
        step = int(self.optimizer.iterations.numpy())
        if self._stats_step != step:
            self._stats, self._stats_step = bn_statistics(self.model), step
        return self._stats
