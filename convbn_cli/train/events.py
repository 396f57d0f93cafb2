"""What happens around the training loop, as subscribers to its events: the metrics files, the per-epoch BN
statistics, TensorBoard, the console, the progress bar and the checkpoint on SIGINT/SIGTERM.

The trainer (loop.py) calls, in order:
    on_start(trainer)                  after setup and restore, before the first step
    on_epoch_start(trainer, epoch)     (epoch counts from 0)
    on_step(trainer, step)             after every compiled call: `trainer.last_chunk` steps (1, or up to
                                       train.steps_per_execution) ending at global step `step` (from 1)
    on_epoch_metrics(trainer, row)     the epoch's metrics row, *before* its checkpoint is saved
    on_epoch_end(trainer, row)         after the checkpoint is saved
    on_train_end(trainer)              after the last training step and its checkpoint
    on_finish(trainer, results)        after the final model is settled (final.py) and tested, before results.json
    on_close(trainer)                  always, last, also after an error
A subscriber implements the ones it needs; adding per-epoch work (plots, early stopping) means adding one, and
users add theirs with train(cfg, subscribers=[...]) (any object with some of these methods).

What a subscriber may use of the trainer is this list, the trainer's contract with its subscribers (loop.Trainer's
docstring says what each attribute is and which phase sets it; tests/test_trainer_contract.py holds every
subscriber here and final.py to it). Attributes are read, never set; the trainer changes through its methods:
    read:  cfg, run, model, optimizer, precision, epochs, steps, global_batch, metrics, restored, start_epoch,
           epoch, skip, done_in_epoch, last_chunk, last_sums, stop_reason, last_test, log
    call:  read_sums(), current_lr(), bn_statistics(), first_batch(), request_stop(reason), interrupt(signum),
           stopped_after_training(signum)
"""

from __future__ import annotations

import contextlib
import io
import signal
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from .. import signals
from ..errors import ConvbnError, WriteError
from ..files import writing
from ..present.bn_trace import lag
from ..present.plots import confusion_matrix, curves, training_batch
from ..present.reports import BATCHES_OF, duration, plural
from ..runs.bn_trace import one_sample
from ..runs.rundir import final_val
from .trace import BNTrace

PROGRESS_EVERY = 20  # steps between reads of the running loss (each read waits for the device)
BN_HISTOGRAMS = ("moving_mean", "moving_variance", "batch_mean")  # per BN trace sample, over channels


def crossed(trainer, step, every) -> bool:
    """Whether the call that ended at `step` passed a multiple of `every` (a call may run several steps)."""
    return step // every > (step - trainer.last_chunk) // every


def standard(cfg, log, progress, on_step=None, user=(), provenance=None) -> list:
    """convbn's own subscribers for a training of `cfg`, in the order they are called, then the `user`'s (any
    objects with some of Subscriber's methods); `provenance` makes run.json's record (None: none is written, a
    non-chief worker); the trainer adds its StopOnSignal after them all."""
    trace = BNTrace() if cfg.output.bn_trace else None  # bn_trace.npz (and its pictures with output.plots)
    made = [MetricsFiles(), StepLog(), BNStatsFiles(), TensorBoard(trace), Console(log)]
    made += [Plots()] if cfg.output.plots else []
    made += [trace] if trace is not None else []
    if cfg.train.early_stopping is not None:
        made.append(EarlyStopping(cfg.train.early_stopping))
    made += [Provenance(provenance)] if provenance is not None else []  # once the run (or resume) has started
    made += [ProgressBar()] if progress else []
    made += [StepCallback(on_step)] if on_step is not None else []
    return made + [UserSubscriber(s) for s in user]


class Subscriber:
    def on_start(self, trainer): pass
    def on_epoch_start(self, trainer, epoch): pass
    def on_step(self, trainer, step): pass
    def on_epoch_metrics(self, trainer, row): pass
    def on_epoch_end(self, trainer, row): pass
    def on_train_end(self, trainer): pass
    def on_finish(self, trainer, results): pass
    def on_close(self, trainer): pass


class MetricsFiles(Subscriber):
    """metrics.jsonl and metrics.csv, rewritten whole each epoch. Written before the epoch's checkpoint: a kill in
    between leaves a row for an epoch that has no checkpoint yet, and --resume drops that row and runs the epoch
    again, so every epoch is in metrics.jsonl exactly once."""

    def on_epoch_metrics(self, trainer, row):
        trainer.run.write_metrics(trainer.metrics)


class BNStatsFiles(Subscriber):
    """bn_stats/epoch_<k>.json: every BN layer's per-channel parameters after each epoch."""

    def on_start(self, trainer):
        done = trainer.start_epoch
        written = (trainer.run.bn_stats / f"epoch_{done}.json").is_file()
        if trainer.restored and done and not trainer.skip and not written:
            trainer.run.write_bn_stats(done, trainer.bn_statistics())  # killed before it was written

    def on_epoch_end(self, trainer, row):
        trainer.run.write_bn_stats(row["epoch"], trainer.bn_statistics())


def step_window(trainer, step, previous: dict):
    """(mean loss, cross-entropy and accuracy over the steps since `previous` sums, the sums now), or (None, sums)
    when no step ran since. The trainer has just read the sums at its own PROGRESS_EVERY steps: one host sync."""
    sums = trainer.last_sums if crossed(trainer, step, PROGRESS_EVERY) else trainer.read_sums()
    n = sums["count"] - previous["count"]
    if n <= 0:
        return None, dict(sums)
    return {k: (sums[k] - previous[k]) / n for k in ("loss", "ce", "correct")}, dict(sums)


ZERO_SUMS = {"loss": 0.0, "ce": 0.0, "correct": 0.0, "count": 0.0}


class StepLog(Subscriber):
    """steps.jsonl: the training loss, accuracy and learning rate every `output.log_every_steps` steps, or more
    often where an epoch has fewer than 10 such points (the mean over those steps), for the curves of short runs and
    of schedules (metrics.jsonl has one point per epoch). Rewritten whole at each epoch's end; a resumed run keeps
    the rows up to its checkpoint."""

    POINTS_PER_EPOCH = 12  # at least: a short run's curve is a line, not a dot

    def on_start(self, trainer):
        self.every = max(1, min(trainer.cfg.output.log_every_steps, trainer.steps // self.POINTS_PER_EPOCH))
        done = int(trainer.optimizer.iterations.numpy())
        try:
            self.rows = [r for r in trainer.run.read_steps() if r["step"] <= done] if trainer.restored else []
        except Exception:  # noqa: BLE001  (a damaged steps.jsonl only costs the curves their first points)
            self.rows = []

    def on_epoch_start(self, trainer, epoch):
        self.previous = dict(ZERO_SUMS)

    def on_step(self, trainer, step):
        if not crossed(trainer, step, self.every):
            return
        means, self.previous = step_window(trainer, step, self.previous)
        if means is not None:
            self.rows.append({"step": step, "epoch": step / trainer.steps, "loss": means["loss"],
                              "train_ce": means["ce"] if trainer.cfg.train.label_smoothing else means["loss"],
                              "train_acc": means["correct"], "lr": trainer.current_lr()})

    def on_epoch_metrics(self, trainer, row):
        trainer.run.write_steps(self.rows)


class TensorBoard(Subscriber):
    """`tensorboard --logdir runs`: tensorboard/train and tensorboard/validation are two TensorBoard runs whose
    epoch/loss and epoch/accuracy overlay; the train run also has the loss and learning rate every
    `output.log_every_steps` steps (the mean over those steps), the throughput, and histograms of each BN layer's
    gamma and beta. The train run's epoch/loss is the plain cross-entropy, like validation's; with label
    smoothing, the loss actually minimized is epoch/loss_with_label_smoothing.

    With the BN trace on (`bn_trace`, the run's BNTrace), each of its samples too, at its step: per BN layer the lag
    of the moving statistics behind the batch's as scalars, bn/<layer>/lag_mean (median over channels of |moving
    mean - batch mean| / batch std) and bn/<layer>/lag_variance (of |moving variance / batch variance - 1|), the
    very measure of bn_trace.png (present/bn_trace.lag), and histograms over channels of bn/<layer>/moving_mean,
    moving_variance and batch_mean. The trace's own read of the device serves both."""

    train = val = None
    write_bn_sample = None  # the compiled writer of one BN trace sample (on_start)

    def __init__(self, bn_trace=None):
        self.bn_trace = bn_trace

    def on_start(self, trainer):
        self.every = trainer.cfg.output.log_every_steps
        self.folder = folder = trainer.run.tensorboard
        before = set(folder.rglob("*")) if folder.is_dir() else set()
        try:
            with writing(folder):  # TensorFlow's words for a full or read-only disk, as one line naming the folder
                self.train = tf.summary.create_file_writer(str(folder / "train"))
                self.val = tf.summary.create_file_writer(str(folder / "validation"))
        except WriteError:
            self.on_close(trainer, quietly=True)
            # what the writers made (an empty events file, their folders): a later resume makes its own
            for p in sorted(set(folder.rglob("*")) - before if folder.is_dir() else (), reverse=True):
                with contextlib.suppress(OSError):
                    p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            if not before:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        if self.bn_trace is not None:
            self.bn_trace.listeners.append(self.on_bn_sample)
            # A sample's ~5 summaries per BN layer in one compiled call: run eagerly, tf.summary.histogram's
            # bucketing goes op by op (~60 ms a sample for mnist_bn's five layers against ~6 ms traced once,
            # BENCHMARKS.md "The BN trace's cost"), and the trace samples inside the timed epochs.
            self.write_bn_sample = tf.function(self._write_bn_sample)

    def on_bn_sample(self, step, values):
        """One BN trace sample ({layer: {quantity: (C,)}} at `step`): the class docstring's bn/ tags."""
        if self.train is None:
            return
        sample = one_sample(step, values)
        scalars, histograms = {}, {}
        for name, arrays in values.items():
            gaps = lag(sample, name)
            for key in ("mean", "variance"):
                scalars[f"bn/{name}/lag_{key}"] = np.float32(gaps[key][0])
            for q in BN_HISTOGRAMS:
                histograms[f"bn/{name}/{q}"] = arrays[q]
        # several summaries per sample fill the writer's queue: a write may flush, and meet a full disk, here
        with writing(self.folder):
            self.write_bn_sample(tf.constant(step, tf.int64), scalars, histograms)

    def _write_bn_sample(self, step, scalars, histograms):
        with self.train.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
            for tag, value in histograms.items():
                tf.summary.histogram(tag, value)

    def on_epoch_start(self, trainer, epoch):
        self.previous = dict(ZERO_SUMS)  # the sums restart with every epoch

    def on_step(self, trainer, step):
        if not crossed(trainer, step, self.every):
            return
        means, self.previous = step_window(trainer, step, self.previous)
        if means is not None:
            scalar = tf.summary.scalar
            with self.train.as_default(step=step):
                scalar("step/loss", means["loss"])
                if trainer.cfg.train.label_smoothing:
                    scalar("step/cross_entropy", means["ce"])
                scalar("step/learning_rate", trainer.current_lr())

    def on_epoch_end(self, trainer, row):
        scalar = tf.summary.scalar
        with self.train.as_default(step=row["epoch"]):
            scalar("epoch/loss", row["train_ce"])
            if trainer.cfg.train.label_smoothing:
                scalar("epoch/loss_with_label_smoothing", row["train_loss"])
            scalar("epoch/accuracy", row["train_acc"])
            scalar("epoch/learning_rate", row["lr"])
            scalar("epoch/images_per_s", row["images_per_s"])
            for name, s in trainer.bn_statistics().items():
                tf.summary.histogram(f"{name}/gamma", np.asarray(s["gamma"]))
                tf.summary.histogram(f"{name}/beta", np.asarray(s["beta"]))
        if row["val_acc"] is not None:
            with self.val.as_default(step=row["epoch"]):
                scalar("epoch/loss", row["val_loss"])
                scalar("epoch/accuracy", row["val_acc"])  # as the final model would measure it (validation.py)
                if row.get("val_acc_moving") is not None:
                    scalar("epoch/accuracy_moving_bn_statistics", row["val_acc_moving"])
        with writing(self.folder):
            self.train.flush()
            self.val.flush()

    def on_close(self, trainer, quietly=False):
        writers, self.train, self.val = (self.train, self.val), None, None
        for writer in writers:
            if writer is not None:
                with writing(self.folder) if not quietly else contextlib.suppress(Exception):
                    writer.close()  # everything on disk now: the CLI's exit skips the interpreter's teardown


class Provenance(Subscriber):
    """run.json: how the run was made (runs/provenance.py), written once setup and restore have succeeded, so
    that a refused --resume changes nothing."""

    def __init__(self, make):
        self.make = make

    def on_start(self, trainer):
        trainer.run.record_provenance(self.make())


class Console(Subscriber):
    """One line per epoch, and the test result. Accuracies with two decimals; with label smoothing, the training
    loss (what is minimized) is labelled as such and the plain cross-entropy, comparable with the validation
    loss, is shown beside it."""

    def __init__(self, log):
        self.log = log
        self.clock = RunClock()

    def on_start(self, trainer):
        self.clock.start(trainer)

    def on_epoch_end(self, trainer, row):
        smoothing = trainer.cfg.train.label_smoothing
        loss = (f"train loss {row['train_loss']:.4f} (with label smoothing {smoothing:g}; cross-entropy "
                f"{row['train_ce']:.4f})" if smoothing else f"train loss {row['train_loss']:.4f}")
        val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if row["val_acc"] is not None
               else "no validation split")
        if row.get("val_bn") == "precise_bn":  # the moving statistics lag: val is what the final model would get
            val += f" with settled BN statistics ({row['val_acc_moving']:.2%} with the moving ones)"
        left = self.clock.left(trainer, row["epoch"] * trainer.steps)
        self.log(f"epoch {row['epoch']}/{trainer.epochs}: {loss} acc {row['train_acc']:.2%}, {val}, "
                 f"lr {row['lr']:.3g}, {row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s"
                 + (f"; run: about {left} left" if left else ""))

    def on_finish(self, trainer, results):
        run, bn = trainer.run.path, results["bn_statistics"]
        before, after = bn["before"], bn.get("after")
        test = f"loss {results['test_loss']:.4f}, accuracy {results['test_acc']:.2%}"
        where = f"{before['split']} accuracy with moving / batch BN statistics"
        if bn["mechanism"] == "ema":
            raw = results["before_ema"]
            self.log(f"test (raw weights): loss {raw['test_loss']:.4f}, accuracy {raw['test_acc']:.2%}  ({run})")
            self.log(f"EMA of the weights (decay {trainer.cfg.train.ema.decay:g}), BN recomputed over {bn['batches']} "
                     f"{BATCHES_OF.get(bn.get('augmented'), '')}batches: test {test}  ({results['checkpoint']})")
        elif bn["mechanism"] == "precise_bn":
            self.log(f"BN statistics: {where}: {before['moving_acc']:.2%} / {before['batch_acc']:.2%}")
            outcome = "kept" if bn["kept"] else "not kept: it did not help"
            self.log(f"precise BN ({bn['trigger']}) over {bn['batches']} {BATCHES_OF.get(bn.get('augmented'), '')}"
                     f"training batches: {after['moving_acc']:.2%} "
                     f"with the moving statistics ({outcome})")
            earlier = results.get("before_precise_bn")
            self.log(f"test: {test}" + (f" (before precise BN: {earlier['test_acc']:.2%})" if earlier else "")
                     + f"  ({results['checkpoint']})")
        else:
            self.log(f"BN statistics: {where}: {before['moving_acc']:.2%} / {before['batch_acc']:.2%}")
            self.log(f"test: {test}  ({results['checkpoint']})")
        self.log(end_of_run_line(results))
        pictures = ""
        if trainer.cfg.output.plots:
            # confusion_matrix.png is drawn right after this (Plots.on_finish); of the others, those there are (a
            # run resumed from before train_batch.png has none)
            for name in ("curves.png", "confusion_matrix.png", "train_batch.png"):
                if name == "confusion_matrix.png" or (trainer.run.path / name).is_file():
                    pictures += f"{name}, "
        self.log(f"see {run}: {pictures}metrics.csv, run.json")
        self.log(f"next: convbn eval {run} | convbn report {run} | convbn inspect-bn {run} | convbn diagnose {run} "
                 f"| convbn export {run} --fold-bn")


def end_of_run_line(results: dict) -> str:
    """The run in one line: the best epoch, and the final model (the one every later command opens) with its
    validation accuracy (what `convbn eval RUN --split val` gives; the best epoch's with the moving statistics
    beside it where they differ), test accuracy and time."""
    shown, moving = final_val(results)
    epoch = f"best epoch {results['best_epoch']}; " if results.get("best_epoch") is not None else ""
    val = "" if shown is None else f"validation accuracy {shown:.2%}" + (
        f" (with the moving BN statistics: {moving:.2%})" if moving is not None else "") + ", "
    return (f"{epoch}final model {results['final_checkpoint']}: {val}test accuracy {results['test_acc']:.2%}; "
            f"{results['wall_time_s']:.0f} s")


class RunClock:
    """How long the rest of the run's training takes: this session's time per training step so far (validation
    included) times the steps left; the final model's settling and test after them are not counted."""

    def start(self, trainer):
        self.t0, self.step0 = time.monotonic(), trainer.start_epoch * (trainer.steps or 0) + trainer.skip

    def left(self, trainer, step) -> str | None:
        done, total = step - getattr(self, "step0", step), trainer.epochs * trainer.steps
        if done <= 0 or step >= total:
            return None
        return duration((time.monotonic() - self.t0) / done * (total - step))


class ProgressBar(Subscriber):
    """A tqdm bar per epoch on a terminal (silent in logs and CI, where the per-epoch line is printed anyway)."""

    def on_start(self, trainer):
        self.clock = RunClock()
        self.clock.start(trainer)

    def on_epoch_start(self, trainer, epoch):
        self.bar = tqdm(total=trainer.steps, initial=trainer.skip, desc=f"epoch {epoch + 1}/{trainer.epochs}",
                        unit="batch", leave=False, disable=None, dynamic_ncols=True)
        self.t0, self.first = time.time(), trainer.skip

    def on_step(self, trainer, step):
        self.bar.update(trainer.last_chunk)
        done = step - trainer.epoch * trainer.steps
        if crossed(trainer, step, PROGRESS_EVERY) or done == trainer.steps:
            sums = trainer.last_sums  # read by the trainer's finiteness check at this very step
            n = max(sums["count"], 1.0)
            rate = (done - self.first) * trainer.global_batch / max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix({"loss": f"{sums['loss'] / n:.4f}", "acc": f"{sums['correct'] / n:.4f}",
                                  "img/s": f"{rate:.0f}", "run left": self.clock.left(trainer, step) or "-"},
                                 refresh=False)

    def on_epoch_metrics(self, trainer, row):
        self.bar.close()

    def on_close(self, trainer):
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class StopOnSignal(Subscriber):
    """SIGINT/SIGTERM end the training, whenever they arrive, with the work saved (Interrupted, exit 128 + signal).

    While training steps run, the signal is a flag checked between steps, so that it never lands inside a
    checkpoint write: at the next step the trainer saves a checkpoint and stops. A second Ctrl-C raises
    KeyboardInterrupt at once, for a loop that does not come back. After the last step (on_train_end) the
    last epoch's checkpoint holds everything, so a signal then (settling the final model, testing, pictures)
    stops at once; the trainer also checks the flag between those phases (check), in case the exception was
    raised where Python swallows it (inside a garbage-collection callback)."""

    def __init__(self):
        self.signum, self.after_training, self.trainer = None, False, None
        self._restore = signals.install({})  # nothing installed yet: putting back does nothing

    def on_start(self, trainer):
        self.trainer = trainer
        self._restore = signals.install(signals.stop_signals(self._handle))  # put back in on_close

    def _handle(self, signum, frame):
        if self.after_training:
            self.signum = signum
            raise self.trainer.stopped_after_training(signum)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def on_step(self, trainer, step):
        if self.signum is not None:
            trainer.interrupt(self.signum)

    def on_train_end(self, trainer):
        self.check(trainer)
        self.after_training = True

    def check(self, trainer):
        if self.signum is not None:
            raise trainer.stopped_after_training(self.signum)

    def on_close(self, trainer):
        self._restore()


class StepCallback(Subscriber):
    """Calls fn(global_step, model) after every step, or every compiled call with train.steps_per_execution > 1
    (the Python API's `on_step`; tests and benchmarks)."""

    def __init__(self, fn):
        self.fn = fn

    def on_step(self, trainer, step):
        self.fn(step, trainer.model)


EVENTS = [name for name in vars(Subscriber) if name.startswith("on_")]


class UserSubscriber(Subscriber):
    """A user's callback object (train(..., subscribers=[...])): only the methods it defines are called, so it
    need not subclass Subscriber."""

    def __init__(self, obj):
        for event in EVENTS:
            if callable(getattr(obj, event, None)):
                setattr(self, event, getattr(obj, event))  # called as event(trainer, *args)


class EarlyStopping(Subscriber):
    """Stop when the validation metric has not improved by more than `min_delta` for `patience` epochs.

    The decision is a function of metrics.jsonl alone, so an interrupted run resumes to the same decision, and a
    run that stopped early stays stopped when resumed. Nothing is restored: the best checkpoint is kept anyway.
    """

    def __init__(self, settings):
        self.metric, self.patience, self.min_delta = settings.metric, settings.patience, settings.min_delta

    def reason(self, rows):
        sign = 1.0 if self.metric == "val_acc" else -1.0  # larger is better for accuracy, smaller for loss
        best, best_epoch = None, None
        for row in rows:
            value = row.get(self.metric)
            if value is not None and (best is None or sign * (value - best) > self.min_delta):
                best, best_epoch = value, row["epoch"]
        if best_epoch is not None and rows[-1]["epoch"] - best_epoch >= self.patience:
            return (f"early stopping: {self.metric} has not improved by more than {self.min_delta:g} for "
                    f"{plural(rows[-1]['epoch'] - best_epoch, 'epoch')} (best {best:.4f} at epoch {best_epoch})")
        return None

    def on_start(self, trainer):
        self._check(trainer)

    def on_epoch_end(self, trainer, row):
        self._check(trainer)

    def _check(self, trainer):
        why = self.reason(trainer.metrics) if trainer.metrics else None
        if why and trainer.request_stop(why):
            trainer.log(why)


class Plots(Subscriber):
    """train_batch.png (the first training batch as the model gets it: what the augmentation does) when a run
    starts, curves.png (losses, accuracies and learning rate, per step where steps.jsonl has them), redrawn after
    every epoch, and confusion_matrix.png (test split, with the dataset's class names) at the end."""

    def on_start(self, trainer):
        if trainer.restored is None:  # a resumed run drew it when it started
            pixels, labels = trainer.first_batch()
            picture = io.BytesIO()
            training_batch(pixels, labels, trainer.cfg.dataset.class_names, picture, trainer.cfg.data.augment,
                           where=str(trainer.run.path))
            trainer.run.write_file("train_batch.png", picture.getvalue())

    def on_epoch_end(self, trainer, row):
        try:
            steps = trainer.run.read_steps()
        except ConvbnError:  # damaged by hand: per-epoch curves only
            steps = None
        picture = io.BytesIO()  # drawn here, written by the run (only while it is there: a removed run stays so)
        curves(trainer.metrics, picture, title=str(trainer.run.path), steps=steps)
        trainer.run.write_file("curves.png", picture.getvalue())

    def on_finish(self, trainer, results):
        picture = io.BytesIO()
        confusion_matrix(trainer.last_test["confusion"], trainer.cfg.dataset.class_names, picture,
                         title=f"{trainer.run.path}: test accuracy {results['test_acc']:.2%}")
        trainer.run.write_file("confusion_matrix.png", picture.getvalue())
