"""Plain Keras model.fit of the mnist_bn network, timing each epoch: does tf.data's autotuning stall it too?

    python bench/keras_fit_epochs.py [--epochs 4] [--images 20000] [--input numpy|dataset-no-autotune]

`numpy`: model.fit(x, y) on in-memory arrays, as most Keras users write it (Keras builds a tf.data pipeline
with autotuned prefetching and a new iterator every epoch). `dataset-no-autotune`: the same data as a
tf.data.Dataset with `options.autotune.enabled = False` and a fixed prefetch, the setting convbn uses
(BENCHMARKS.md, "Steady training").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convbn_cli.tf_setup import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402
from train_throughput import BATCH, config, keras_layers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--input", choices=["numpy", "dataset-no-autotune"], default="numpy")
    args = ap.parse_args()
    from convbn_cli.data import fetch

    arrays = fetch("mnist", log=lambda m: None, progress=False)
    x = (arrays["x_train"][: args.images, :, :, None] / 255.0).astype(np.float32)
    y = arrays["y_train"][: args.images].astype(np.int32)
    model = keras.Sequential(keras_layers(config("mnist_bn")))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    if args.input == "numpy":
        model.fit(x, y, batch_size=BATCH, epochs=args.epochs, verbose=0, shuffle=True, callbacks=[Timer()])
    else:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), reshuffle_each_iteration=True)
              .batch(BATCH).prefetch(2).with_options(options))
        model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[Timer()])
    rates = [len(y) / t for t in times]
    print(f"keras fit ({args.input}), {len(y)} images per epoch: " + ", ".join(f"{r:.0f}" for r in rates)
          + f" img/s per epoch; total {sum(times):.1f} s for {args.epochs} epochs")


if __name__ == "__main__":
    main()
