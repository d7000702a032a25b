"""The design document's program on qmomentum's Python bindings, timed like keras_ref.py (median
wall-clock epoch of epochs 2..10, measured by an on_epoch_end callback around Keras-style fit).

    python bench/peers/python_ref.py --lr 0.001 --seed 0        (needs `pip install ./crates/qmomentum-py`)
"""

import argparse
import json
import time

import numpy as np
from qmomentum import datasets, keras

p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=0.001)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--epochs", type=int, default=10)
a = p.parse_args()

(x_train, y_train), (x_test, y_test) = datasets.fashion_mnist.load_data()
x_train = x_train.reshape(-1, 784)
x_test = x_test.reshape(-1, 784)


class Timer:
    def __init__(self):
        self.times = []
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        t = time.perf_counter()
        self.times.append(t - self.t0)
        self.t0 = t


model = keras.Sequential([
    keras.layers.Dense(128, activation="relu", input_shape=(784,)),
    keras.layers.Dense(64, activation="relu"),
    keras.layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.Momentum(lr=a.lr, momentum=0.9),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=a.seed)
t = Timer()
model.fit(x_train, y_train, epochs=a.epochs, batch_size=128, verbose=0, callbacks=[t])
_, acc = model.evaluate(x_test, y_test, verbose=0)
rest = sorted(t.times[1:])
print(json.dumps({"peer": "qmomentum-python", "lr": a.lr, "seed": a.seed,
                  "epoch_s": rest[len(rest) // 2], "test_accuracy": float(acc)}))
