"""Optimizer and learning-rate schedule from the config (Keras' own where Keras has them)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from ..config.schema import TrainConfig


@keras.saving.register_keras_serializable(package="convbn")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The one-cycle policy (Smith & Topin 2018), cosine-annealed as in PyTorch's OneCycleLR.

    Keras has no one-cycle schedule. The lr rises from peak/div_factor to the peak over the first
    pct_start of the steps, then falls to peak/(div_factor*final_div_factor). With BN, such high peaks
    stay stable, which is what makes short training runs reach high accuracy.
    """

    def __init__(self, peak, total_steps, pct_start=0.25, div_factor=25.0, final_div_factor=1e4):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        start, end = self.peak / self.div_factor, self.peak / self.div_factor / self.final_div_factor
        up = max(1.0, self.pct_start * self.total_steps)
        down = max(1.0, self.total_steps - up)

        def cos_anneal(a, b, frac):
            frac = tf.clip_by_value(frac, 0.0, 1.0)
            return b + (a - b) * 0.5 * (1.0 + tf.cos(math.pi * frac))

        return tf.where(step < up, cos_anneal(start, self.peak, step / up),
                        cos_anneal(self.peak, end, (step - up) / down))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


def make_schedule(train: TrainConfig, total_steps: int):
    s, lr = train.schedule, train.optimizer.lr
    if s.name == "constant":
        return lr
    if s.name == "cosine":
        warm = int(s.warmup * total_steps)
        if warm:
            return keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warm), warmup_target=lr,
                                                          warmup_steps=warm)
        return keras.optimizers.schedules.CosineDecay(lr, max(1, total_steps))
    return OneCycle(lr, total_steps, s.pct_start, s.div_factor, s.final_div_factor)


def make_optimizer(train: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    o = train.optimizer
    lr = make_schedule(train, total_steps)
    wd = o.weight_decay or None
    # train.ema: Keras' own weight averaging (updated in apply_gradients; `finalize_variable_values` copies it in)
    ema = {"use_ema": True, "ema_momentum": train.ema.decay} if train.ema is not None else {}
    if o.name == "sgd":
        opt = keras.optimizers.SGD(lr, weight_decay=wd, **ema)
    elif o.name == "momentum":
        opt = keras.optimizers.SGD(lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=wd, **ema)
    elif o.name == "adam":
        opt = keras.optimizers.Adam(lr, beta_1=o.beta_1, beta_2=o.beta_2, weight_decay=wd, **ema)
    else:
        opt = keras.optimizers.AdamW(lr, beta_1=o.beta_1, beta_2=o.beta_2, weight_decay=o.weight_decay, **ema)
    # Decay the conv/dense kernels only: shrinking BN's gamma/beta or the biases regularizes nothing useful.
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return opt


def current_lr(opt) -> float:
    lr = opt.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
