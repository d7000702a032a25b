"""The design document's Keras program (with SGD(momentum=...) in place of the non-existent
optimizers.Momentum, and learning_rate in place of lr). Prints one JSON line."""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import load  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="data/fashion-mnist")
ap.add_argument("--lr", type=float, default=0.001)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--epochs", type=int, default=10)
a = ap.parse_args()
tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(2)
keras.utils.set_random_seed(a.seed)
xtr, ytr, xte, yte = load(a.data)
model = keras.Sequential([
    keras.Input(shape=(784,)),
    keras.layers.Dense(128, activation="relu"),
    keras.layers.Dense(64, activation="relu"),
    keras.layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=a.lr, momentum=0.9),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class Timer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.t0)


t = Timer()
model.fit(xtr, ytr, epochs=a.epochs, batch_size=128, verbose=0, callbacks=[t])
_, acc = model.evaluate(xte, yte, verbose=0)
print(json.dumps({"peer": "keras", "lr": a.lr, "seed": a.seed, "epoch_s": sorted(t.times[1:])[len(t.times[1:]) // 2], "test_accuracy": acc}))
