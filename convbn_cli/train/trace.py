"""The BN trace while training (`output.bn_trace: N`): bn_stats/bn_trace.npz, and bn_trace.png / bn_trace_heatmap.png
at the end (runs/bn_trace.py holds the file, present/bn_trace.py draws it).

Every N steps (more often when an epoch has fewer than POINTS_PER_EPOCH x N steps: a short run's lag needs
points), for each BN layer and channel: the batch mean and biased variance the step normalized with, which the BN
layer kept in its own variables during the step (model/batch_trace.py: no second forward pass; asked for in
on_start, so that a run without the trace does not write them), and the moving mean and variance after the
step's update. The cost is one read of those small variables per sample (bench/bn_trace_cost.py measures it on
mnist_bn's step).

Written with the metrics, before each epoch's checkpoint, and when training stops for any reason (the signal
checkpoint is taken at the very step of the last sample). A --resume keeps the samples up to the step of the
checkpoint it continues from, so the trace has every sampled step once: none missing, none twice. Under tf.distribute
the traced batch statistics are the first replica's: with synchronized BN the global batch's, without it the
chief's own slice; the moving statistics are the mirrored variables' (averaged over replicas).

Each sample is also handed to the callables in `listeners` as (step, {layer: {quantity: (C,)}}): events.TensorBoard
writes it there (one read from the device for both).

Deliberately not an events.Subscriber subclass (events.py imports this module for standard()); it has every event
method, as the trainer calls them all.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

from ..errors import ConvbnError
from ..model import build_model
from ..model.batch_trace import batch_variables, keep_batch_statistics
from ..model.bn import bn_layers, moving_variance_rule
from ..present.bn_trace import draw_heatmap, draw_lag
from ..runs.bn_trace import MAX_SAMPLES, QUANTITIES, TRACE_FILE, empty, extend, read_trace, to_bytes, up_to
from ..runs.checkpoints import restore

POINTS_PER_EPOCH = 20
PICTURES = ("bn_trace.png", "bn_trace_heatmap.png")


def sampling_interval(every: int, steps_per_epoch: int) -> int:
    """Steps between samples: `every`, or fewer so that an epoch has at least POINTS_PER_EPOCH samples."""
    return max(1, min(int(every), int(steps_per_epoch) // POINTS_PER_EPOCH))


class BNTrace:
    """Records the BN trace (module docstring); uses only the trainer's contract (events.py's docstring)."""

    def __init__(self):
        self.trace, self.bns, self.every, self.dirty, self.read = None, [], 1, False, None
        self.steps, self.rows = [], []  # samples not yet in self.trace (added in one go: no copy per sample)
        self.listeners = []  # called with each sample (module docstring)

    def on_start(self, trainer):
        self.every = sampling_interval(trainer.cfg.output.bn_trace, trainer.steps)
        self.bns = [bn for bn in bn_layers(trainer.model) if batch_variables(bn) is not None]
        for bn in self.bns:  # before the training step is first traced (the trainer calls it after on_start)
            keep_batch_statistics(bn)
        variables = [v for bn in self.bns for v in (*batch_variables(bn), bn.moving_mean, bn.moving_variance)]
        self.read = tf.function(lambda: tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in variables], 0))
        self.trace = empty({bn.name: int(bn.moving_mean.shape[0]) for bn in self.bns},
                           {bn.name: float(bn.momentum) for bn in self.bns},
                           {bn.name: moving_variance_rule(bn) for bn in self.bns}, trainer.steps)
        if trainer.restored and (trainer.run.path / TRACE_FILE).is_file():
            self.resume(trainer, trainer.run.path / TRACE_FILE)

    def resume(self, trainer, path):
        """The samples of the trace being continued, up to the step of the checkpoint the training resumed from
        (a trace of other layers, or a damaged one, is started afresh: it costs only the earlier samples)."""
        try:
            earlier = read_trace(path)
        except ConvbnError as e:
            trainer.log(f"note: {e}; the BN trace starts again at this step")
            return
        channels = {n: a["batch_mean"].shape[1] for n, a in self.trace.layers.items()}
        if {n: a["batch_mean"].shape[1] for n, a in earlier.layers.items()} == channels:
            self.trace = up_to(earlier, int(trainer.optimizer.iterations.numpy()))
            self.dirty = True  # samples past the checkpoint were dropped: the file says so at the next write

    def on_epoch_start(self, trainer, epoch):
        pass

    def on_step(self, trainer, step):
        if not self.bns or step // self.every <= (step - trainer.last_chunk) // self.every:
            return  # no multiple of `every` was crossed by this call (events.crossed)
        flat, at, values = self.read().numpy(), 0, {}  # one copy from the device, whatever the layer count
        for bn in self.bns:
            values[bn.name] = {}
            for q in QUANTITIES:
                values[bn.name][q], at = flat[at:at + bn.moving_mean.shape[0]], at + bn.moving_mean.shape[0]
        self.steps.append(step)
        self.rows.append(values)
        for listen in self.listeners:
            listen(step, values)
        self.dirty = True
        if len(self.steps) >= MAX_SAMPLES // 4:  # a long epoch: bounded in memory too
            self.flush()

    def flush(self):
        extend(self.trace, self.steps, self.rows)
        self.steps, self.rows = [], []

    def on_epoch_metrics(self, trainer, row):
        self.write(trainer)  # before the epoch's checkpoint: a resume drops what lies past its checkpoint

    def on_epoch_end(self, trainer, row):
        pass

    def on_train_end(self, trainer):
        self.write(trainer)

    def on_finish(self, trainer, results):
        if not self.bns:
            return
        self.flush()
        trace = self.trace
        trace.end_step = int(trainer.optimizer.iterations.numpy())
        record = results.get("bn_statistics") or {}
        if record.get("mechanism") in ("precise_bn", "ema") and record.get("kept"):
            trace.final_mechanism = record["mechanism"]
            trace.final = final_statistics(trainer, results["final_checkpoint"])
        self.dirty = True
        self.write(trainer)
        if trainer.cfg.output.plots:
            for name, draw in zip(PICTURES, (draw_lag, draw_heatmap)):
                picture = io.BytesIO()
                draw(trace, picture, title=str(trainer.run.path))
                trainer.run.write_file(name, picture.getvalue())

    def on_close(self, trainer):
        """Stopped by a signal: its checkpoint is at this very step, and the samples up to it go with it (a resume
        continues from there). After any other failure nothing is written: the run keeps what it had."""
        if self.trace is None or trainer.run is None:
            return
        step = int(trainer.optimizer.iterations.numpy())
        if (trainer.run.checkpoints / f"ckpt-{step}.index").is_file():
            self.write(trainer)

    def write(self, trainer):
        if self.dirty and self.trace is not None and self.bns and trainer.run is not None:
            self.flush()
            trainer.run.write_file(TRACE_FILE, to_bytes(self.trace))
            self.dirty = False


def final_statistics(trainer, relative: str) -> dict:
    """{layer: {"mean", "variance"}} of the final model (precise BN's or the EMA's statistics). In float32 the
    trained model is that model (final.py recalibrates it in place); under mixed precision its float32 copy is
    read back from the checkpoint final.py saved."""
    model = trainer.model
    if trainer.precision != "float32":
        model = build_model(trainer.cfg)
        restore(model, trainer.run.path / relative)
    return {bn.name: {"mean": np.asarray(bn.moving_mean.numpy(), np.float32),
                      "variance": np.asarray(bn.moving_variance.numpy(), np.float32)}
            for bn in bn_layers(model)}
