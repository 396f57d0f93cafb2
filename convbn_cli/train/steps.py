"""The compiled training step and the in-graph loop of steps that the trainer (train/loop.py) calls.

One step is a tf.function around the forward pass, the loss, the gradients and the optimizer, adding to running
sums that the trainer reads between calls; on one device, `train.steps_per_execution` of them run in one compiled
call that gathers its batches from the dataset held in memory.
"""

from __future__ import annotations

import keras
import tensorflow as tf


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
                           aggregation=tf.VariableAggregation.SUM) for k in ("loss", "ce", "correct", "count")}

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)  # BN: batch statistics, moving averages updated
            per_example = loss_fn(tf.one_hot(y, tf.shape(logits)[-1]), logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch or tf.shape(y)[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        sums["loss"].assign_add(tf.reduce_sum(tf.cast(per_example, tf.float64)))
        if train_cfg.label_smoothing:  # the plain cross-entropy too, comparable with the validation loss
            plain = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(logits, tf.float32))
            sums["ce"].assign_add(tf.reduce_sum(tf.cast(plain, tf.float64)))
        sums["correct"].assign_add(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, tf.int32), y), tf.float64)))
        sums["count"].assign_add(tf.cast(tf.shape(y)[0], tf.float64))

    @tf.function(jit_compile=train_cfg.jit_compile or None, reduce_retracing=True)
    def train_step(x, y):
        strategy.run(replica_step, args=(x, y))

    train_step.replica_step = replica_step
    return train_step, sums


def make_in_graph_steps(step, load, batch_size, train_cfg):
    """train_steps(order, epoch, start, count): `count` training steps in one compiled call, from batch `start`
    of the epoch whose image order is `order`; each batch is gathered, augmented and normalized inside the graph
    (load, the tf.data pipeline's own batch function) from the dataset held in memory.

    What it saves, measured (BENCHMARKS.md, issue 16): per call, the Python dispatch of the step function and
    tf.data's iterator hand-off: mnist_fast's small net takes 29.3 ms a step at 10 steps per call against 33.8
    ms at 1 (1.15x); for the 'same'-padded mnist_bn's 100-200-ms steps it was within noise. Keras'
    `steps_per_execution` does the same for `model.fit`.
    """

    if train_cfg.jit_compile:
        # XLA compiles the step alone, not the loop around it: the loop gathers each batch from the whole dataset
        # held in memory, a graph constant that XLA would take into its program (measured with the loop compiled:
        # one epoch of 300 MNIST images took 54 s, 5 images a second; 4,000 images had not finished their first
        # call after four minutes)
        step = tf.function(step, jit_compile=True, reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def train_steps(order, epoch, start, count):
        for i in tf.range(start, start + count):
            x, y = load(epoch, i, order[i * batch_size:(i + 1) * batch_size])
            step(x, y)

    train_steps.step = step  # what each iteration runs (XLA-compiled with train.jit_compile)
    return train_steps


def distributed_batches(strategy, dataset):
    """Hand each replica its slice of every global batch (the dataset itself as it is, without a strategy)."""
    if strategy.num_replicas_in_sync == 1 and getattr(strategy, "cluster_resolver", None) is None:
        return dataset
    options = tf.data.Options()
    # the data are in memory, not in files: shard each global batch by elements across the workers
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))
