"""Training: data -> model -> tf.function train step -> validation -> checkpoints, metrics and BN statistics.

The loop is written out (rather than `model.fit`) so that it can resume in the middle of an epoch with
the exact batches and optimizer state, save on Ctrl-C, and stop on a non-finite loss before anything
bad is written.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..config import plan_layers
from ..config.schema import Config
from ..data import fetch
from ..errors import ConvbnError
from ..data.pipeline import eval_dataset, make_splits, steps_per_epoch, train_dataset
from ..model import build_model
from ..model.stats import bn_statistics
from .optim import current_lr, make_optimizer
from .precise_bn import calibration_batches, recalibrate_model, save_recalibrated
from . import distribute
from .rundir import RunDir, RunDirError, checkpoint_step

PROGRESS_EVERY = 20  # steps between reads of the running loss (each read waits for the device)


class Interrupted(ConvbnError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `exit_code` is 128 + signal number."""

    def __init__(self, signum, checkpoint):
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; saved {checkpoint}; continue with "
                         f"`convbn train --resume {Path(checkpoint).parent.parent}`")


class Diverged(ConvbnError):
    """The loss became NaN or infinite; nothing from the bad steps was saved."""

    exit_code = 3


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list = field(default_factory=list)
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    model: object = None


class _StopFlag:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a signal never lands inside a checkpoint
    write. A second Ctrl-C raises KeyboardInterrupt at once, for a loop that does not come back."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


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
          on_step=None) -> TrainResult:
    """Train `cfg` and write a run directory; or, with `resume=RUN_DIR`, continue that run.

    data: arrays in Keras' mnist.npz layout (x_train, y_train, x_test, y_test); fetched when None.
    on_step: called as on_step(global_step, model) after every training step (tests and benchmarks use it).
    """
    distribute.setup_devices(cfg)
    strategy = distribute.make_strategy(cfg)
    chief = distribute.is_chief(strategy)
    scratch = None
    if not chief:
        # every worker takes part in saving (a collective); only the chief's files are kept
        scratch = distribute.temporary_run_root()
        log = _silent
        progress = False
    if resume is not None:
        run = RunDir.open(resume) if chief else RunDir.create(scratch, "worker")
        if chief:
            run.remove_stale_temporaries()
    else:
        run = RunDir.create(cfg.output.root if chief else scratch, cfg.output.name or "run")
        run.write_config(cfg)
        log(f"run directory: {run.path}")
    try:
        return _train(cfg, run, strategy, data, resume, log, progress, on_step)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _silent(*_):
    pass


def _train(cfg, run, strategy, data, resume, log, progress, on_step):
    seed_everything(cfg)
    if data is None:
        data = fetch(cfg.data.dataset, log=log, progress=progress)
    splits = make_splits(data, cfg)
    plan = plan_layers(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.data.batch_size * replicas
    if replicas > 1:
        log(f"{replicas} replicas ({type(strategy).__name__}), global batch {global_batch}, "
            f"BN statistics {'synchronized' if cfg.distribute.sync_bn else 'per replica'}")
    with strategy.scope():
        model = build_model(cfg, plan, precision=cfg.train.precision)
        steps = steps_per_epoch(splits.size("train"), global_batch)
        total_steps = steps * cfg.train.epochs
        optimizer = make_optimizer(cfg.train, total_steps)
        optimizer.build(model.trainable_variables)  # create slots now, so a restore fills them
        ckpt, state = make_checkpoint(model, optimizer)
        train_step, sums = make_train_step(model, optimizer, cfg.train, strategy, global_batch)
    manager = tf.train.CheckpointManager(ckpt, run.checkpoints, max_to_keep=cfg.output.keep_checkpoints,
                                         checkpoint_name="ckpt")
    best_manager = tf.train.CheckpointManager(ckpt, run.best, max_to_keep=1, checkpoint_name="ckpt")
    metrics = []
    if resume is not None:
        # a non-chief worker reads the chief's checkpoints and writes its own copy to scratch space
        source = manager if Path(resume).resolve() == run.path.resolve() else tf.train.CheckpointManager(
            ckpt, Path(resume) / "checkpoints", max_to_keep=None, checkpoint_name="ckpt")
        restored = _restore_latest(ckpt, source, log)
        if restored is None:
            log("no checkpoint yet: starting from the beginning")
        done_epochs = int(state["epoch"].numpy())
        metrics = [r for r in RunDir(resume).read_metrics() if r["epoch"] <= done_epochs]
        if restored and done_epochs and not state["step_in_epoch"].numpy() \
                and not (run.bn_stats / f"epoch_{done_epochs}.json").is_file():
            run.write_bn_stats(done_epochs, bn_statistics(model))  # killed before it was written
    start_epoch = int(state["epoch"].numpy())
    skip = int(state["step_in_epoch"].numpy())
    if start_epoch >= cfg.train.epochs:
        log(f"{run.path}: already trained {start_epoch} of {cfg.train.epochs} epochs; nothing to do")


    evaluate = make_evaluator(model)  # plain cross-entropy, as `convbn eval` reports it
    tb = tf.summary.create_file_writer(str(run.tensorboard))
    t_start = time.time() - (metrics[-1]["wall_time_s"] if metrics else 0.0)
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            for v in sums.values():
                v.assign(0.0)
            bar = _bar(progress, steps, epoch, cfg.train.epochs, skip)
            t0, done = time.time(), skip
            for x, y in _distributed(strategy, train_dataset(splits, cfg, epoch, skip, global_batch)):
                train_step(x, y)
                done += 1
                bar.update(1)
                global_step = epoch * steps + done
                if on_step is not None:
                    on_step(global_step, model)
                if global_step % PROGRESS_EVERY == 0 or done == steps:
                    _check_finite(sums, epoch, global_step, manager)
                    bar.set_postfix(_postfix(sums, t0, done - skip, global_batch), refresh=False)
                if stop.signum is not None:
                    bar.close()
                    _check_finite(sums, epoch, global_step, manager)
                    state["epoch"].assign(epoch)
                    state["step_in_epoch"].assign(done)
                    path = manager.save(checkpoint_number=int(optimizer.iterations.numpy()))
                    raise Interrupted(stop.signum, path)
            bar.close()
            _check_finite(sums, epoch, epoch * steps + done, manager)
            epoch_time = time.time() - t0
            seen = float(sums["count"].numpy())
            row = {"epoch": epoch + 1, "step": int(optimizer.iterations.numpy()),
                   "train_loss": float(sums["loss"].numpy()) / max(seen, 1.0),
                   "train_acc": float(sums["correct"].numpy()) / max(seen, 1.0)}
            val = evaluate(eval_dataset(splits, cfg, "val")) if splits.size("val") else None
            if val is not None and not math.isfinite(val["loss"]):
                # finite training loss but weights that already overflow at inference: not a checkpoint to keep
                raise _diverged(f"validation loss became non-finite ({val['loss']}) after epoch {epoch + 1}", manager)
            row.update(val_loss=val["loss"] if val else None, val_acc=val["accuracy"] if val else None,
                       lr=current_lr(optimizer), images_per_s=seen / max(epoch_time, 1e-9),
                       epoch_time_s=epoch_time, wall_time_s=time.time() - t_start)
            state["epoch"].assign(epoch + 1)
            state["step_in_epoch"].assign(0)
            score = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]
            improved = score > float(state["best_val_acc"].numpy())
            if improved:
                state["best_val_acc"].assign(score)
            # The metrics row first, then the checkpoint: a kill in between leaves a row for an epoch that has
            # no checkpoint yet, and --resume drops that row and runs the epoch again, so every epoch is in
            # metrics.jsonl exactly once.
            row["checkpoint"] = f"ckpt-{row['step']}"
            metrics.append(row)
            run.write_metrics(metrics)
            manager.save(checkpoint_number=row["step"])
            if improved:
                best_manager.save(checkpoint_number=row["step"])
            stats = bn_statistics(model)
            run.write_bn_stats(epoch + 1, stats)
            _tensorboard(tb, row, stats)
            log(_epoch_line(row, cfg.train.epochs))
            skip = 0
    test = evaluate(eval_dataset(splits, cfg, "test"))
    results = {"test_loss": test["loss"], "test_acc": test["accuracy"], "epochs": cfg.train.epochs,
               "wall_time_s": time.time() - t_start, "checkpoint": str(manager.latest_checkpoint)}
    log(f"test: loss {test['loss']:.4f}, accuracy {test['accuracy']:.4%}  ({run.path})")
    if cfg.train.precise_bn is not None:
        recalibrate_model(model, calibration_batches(splits, cfg, cfg.train.precise_bn.batches), progress=progress)
        path = save_recalibrated(model, run, manager.latest_checkpoint)
        test = evaluate(eval_dataset(splits, cfg, "test"))
        results.update(test_loss=test["loss"], test_acc=test["accuracy"], checkpoint=path,
                       before_precise_bn={"test_loss": results["test_loss"], "test_acc": results["test_acc"]})
        log(f"precise BN ({cfg.train.precise_bn.batches} batches): test loss {test['loss']:.4f}, "
            f"accuracy {test['accuracy']:.4%}  ({path})")
    run.write_results(results)
    return TrainResult(run.path, metrics, test["loss"], test["accuracy"], model)


def make_train_step(model, optimizer, train_cfg, strategy=None, global_batch=None):
    """(train_step(x, y), sums): one compiled optimization step that also adds to running loss/accuracy sums.

    Under a tf.distribute strategy each replica averages its per-example losses over the *global* batch
    (tf.nn.compute_average_loss), so the gradients the optimizer all-reduces add up to the gradient of the
    global batch's mean loss: the same step one device would take on the whole batch.
    The sums live in variables (summed across replicas when read), so reading them every PROGRESS_EVERY
    steps is the only host sync.
    """
    strategy = strategy or tf.distribute.get_strategy()
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=train_cfg.label_smoothing,
                                                   reduction=None)
    sums = {k: tf.Variable(0.0, dtype=tf.float64, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.SUM) for k in ("loss", "correct", "count")}

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)  # BN: batch statistics, moving averages updated
            per_example = loss_fn(tf.one_hot(y, 10), logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch or tf.shape(y)[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        sums["loss"].assign_add(tf.reduce_sum(tf.cast(per_example, tf.float64)))
        sums["correct"].assign_add(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, tf.int32), y), tf.float64)))
        sums["count"].assign_add(tf.cast(tf.shape(y)[0], tf.float64))

    @tf.function(jit_compile=train_cfg.jit_compile or None, reduce_retracing=True)
    def train_step(x, y):
        strategy.run(replica_step, args=(x, y))

    return train_step, sums


def _distributed(strategy, dataset):
    """Hand each replica its slice of every global batch (the dataset itself as it is, without a strategy)."""
    if strategy.num_replicas_in_sync == 1 and getattr(strategy, "cluster_resolver", None) is None:
        return dataset
    options = tf.data.Options()
    # the data are in memory, not in files: shard each global batch by elements across the workers
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def make_evaluator(model):
    """A function dataset -> {loss, accuracy, count}, running the model in inference mode (moving BN stats).

    The loss is plain cross-entropy (no label smoothing), so validation and test losses compare across configs.
    """
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        logits = model(x, training=False)
        loss = loss_fn(tf.one_hot(y, 10), logits) * tf.cast(tf.shape(y)[0], tf.float32)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, tf.int32), y), tf.float32))
        return loss, correct

    def run(ds):
        loss = correct = count = 0.0
        for x, y in ds:
            lo, co = step(x, y)
            loss += float(lo)
            correct += float(co)
            count += int(y.shape[0])
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1), "count": int(count)}

    return run


def _restore_latest(ckpt, manager, log):
    """Restore the newest checkpoint that loads; an unreadable newest one (a kill mid-write) falls back."""
    for path in reversed(manager.checkpoints):
        try:
            ckpt.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            log(f"cannot restore {path} ({type(e).__name__}); trying an older checkpoint")
            continue
        log(f"resumed from {path} (step {checkpoint_step(path)})")
        return path
    if manager.checkpoints:
        raise RunDirError(f"{manager.directory}: no checkpoint could be restored")
    return None


def _check_finite(sums, epoch, step, manager):
    loss = float(sums["loss"].numpy())
    if not math.isfinite(loss):
        raise _diverged(f"loss became non-finite ({loss}) in epoch {epoch + 1}, by step {step}", manager)


def _diverged(what, manager) -> Diverged:
    last = manager.latest_checkpoint or "none (no epoch finished)"
    return Diverged(f"{what}; training stopped. Last good checkpoint: {last}. Lower train.optimizer.lr or check "
                    "the data.")


def _bar(progress, steps, epoch, epochs, skip):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI (the per-epoch line is printed anyway)
    return tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                disable=None if progress else True, dynamic_ncols=True)


def _postfix(sums, t0, steps_run, batch_size):
    n = max(float(sums["count"].numpy()), 1.0)
    return {"loss": f"{float(sums['loss'].numpy()) / n:.4f}", "acc": f"{float(sums['correct'].numpy()) / n:.4f}",
            "img/s": f"{steps_run * batch_size / max(time.time() - t0, 1e-9):.0f}"}


def _epoch_line(row, epochs):
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4%}" if row["val_acc"] is not None
           else "no validation split")
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4%}, "
            f"{val}, lr {row['lr']:.3g}, {row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s")


def _tensorboard(writer, row, stats):
    with writer.as_default(step=row["epoch"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
            if row.get(key) is not None:
                tf.summary.scalar(key.replace("_", "/", 1) if key.startswith(("train", "val")) else key, row[key])
        for name, s in stats.items():
            tf.summary.histogram(f"{name}/gamma", np.asarray(s["gamma"]))
            tf.summary.histogram(f"{name}/beta", np.asarray(s["beta"]))
    writer.flush()
