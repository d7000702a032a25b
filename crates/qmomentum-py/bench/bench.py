"""Python bindings against the command line, side by side (interleaved rounds).

    python crates/qmomentum-py/bench/bench.py [--rounds 3] [--cli PATH]

1. The design document's program (MLP 784-128-64-10, Momentum 0.9, lr 0.001, batch 128, seed 0,
   10 epochs): epoch time of `model.fit` (wall clock per epoch around the whole Python call, and
   the trainer's own step time) against `qmomentum train --lr 0.001 --seed 0` (its history's
   step time per epoch); medians over epochs 2–10 of all rounds.
2. `Runtime.predict` on the 10,000 test images (2 threads, median of 7, in a fresh Python
   process) against `qmomentum bench runtime` (same file, same threads, fresh process), and the batch-1 call
   (median of 20,000 `predict` calls on one image) against the runtime's batch-1 `run`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DATA, cli_path  # noqa: E402

import qmomentum  # noqa: E402
from qmomentum import keras  # noqa: E402


def design_doc(x, y):
    model = keras.Sequential([
        keras.layers.Dense(128, activation="relu", input_shape=(784,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Momentum(lr=0.001, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=0)
    wall = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            wall.append(time.perf_counter() - self.t0)

    h = model.fit(x, y, epochs=10, batch_size=128, verbose=0, callbacks=[Clock()])
    return wall, h.seconds


def py_runtime(path, threads):
    """Time `Runtime.predict` as `qmomentum bench runtime` times the runtime: batch-1 median of
    20,000 calls, then the test set, median of 7; prints JSON."""
    (_, _), (xt, _) = qmomentum.datasets.fashion_mnist.load_data(DATA)
    xt = xt.reshape(-1, 784)
    rt = qmomentum.Runtime(path, threads=threads)
    lat = []
    for i in range(20000):
        one = xt[i % 10000: i % 10000 + 1]
        t0 = time.perf_counter()
        rt.predict(one)
        lat.append(time.perf_counter() - t0)
    thr = []
    for _ in range(7):
        t0 = time.perf_counter()
        rt.predict(xt)
        thr.append(len(xt) / (time.perf_counter() - t0))
    print(json.dumps({"latency_s": statistics.median(lat), "samples_per_s": statistics.median(thr)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--py-runtime", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cli", default=cli_path())
    ap.add_argument("--threads", type=int, default=2, help="threads of the runtime measurements")
    ap.add_argument("--skip-train", action="store_true", help="only the runtime measurements")
    a = ap.parse_args()
    if a.py_runtime:
        return py_runtime(a.py_runtime, a.threads)
    (x, y), (xt, yt) = qmomentum.datasets.fashion_mnist.load_data(DATA)
    x, xt = x.reshape(-1, 784), xt.reshape(-1, 784)
    tmp = Path(tempfile.mkdtemp())
    py_wall, py_step, cli_step = [], [], []
    for r in range(0 if a.skip_train else a.rounds):
        out = tmp / f"cli{r}"
        subprocess.run([a.cli, "train", "--lr", "0.001", "--seed", "0", "--data", str(DATA), "--out", str(out), "--quiet"],
                       check=True, capture_output=True)
        cli_step += [e["seconds"] for e in json.loads((out / "history.json").read_text())["epochs"]][1:]
        w, s = design_doc(x, y)
        py_wall += w[1:]
        py_step += s[1:]
    m = lambda v: statistics.median(v)  # noqa: E731
    if not a.skip_train:
        print_train(a, m, cli_step, py_step, py_wall)
    runtime(a, m, x, y, xt, yt, tmp)


def print_train(a, m, cli_step, py_step, py_wall):
    print(f"design document's program, median epoch s over epochs 2-10 of {a.rounds} interleaved rounds:")
    print(f"  qmomentum train (CLI, step time)     {m(cli_step):.3f}")
    print(f"  Python fit, step time                {m(py_step):.3f}  ({m(py_step) / m(cli_step):.3f}x CLI)")
    print(f"  Python fit, wall clock per epoch     {m(py_wall):.3f}  ({m(py_wall) / m(cli_step):.3f}x CLI)")


def runtime(a, m, x, y, xt, yt, tmp):

    # Integer runtime: a W8A8 model trained for one epoch here.
    q = keras.Sequential([keras.layers.Dense(128, activation="relu", input_shape=(784,)),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")], quant="w8a8")
    q.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    q.fit(x, y, epochs=1, batch_size=128, verbose=0)
    path = tmp / "m.qmm"
    q.export(path)
    rt = qmomentum.Runtime(path, threads=a.threads)
    cli_thr, cli_lat, py_thr, py_lat = [], [], [], []
    for r in range(a.rounds):
        p = subprocess.run([a.cli, "bench", "runtime", "--model", str(path), "--data", str(DATA), "--threads", str(a.threads), "--rounds", "7"],
                           check=True, capture_output=True, text=True)
        j = json.loads(p.stdout)
        cli_thr.append(j["samples_per_s"])
        cli_lat.append(j["latency_s"])
        # Python in a fresh process too, as `bench runtime` is (no trainer threads around).
        p = subprocess.run([sys.executable, __file__, "--py-runtime", str(path), "--threads", str(a.threads)],
                           check=True, capture_output=True, text=True)
        j = json.loads(p.stdout)
        py_thr.append(j["samples_per_s"])
        py_lat.append(j["latency_s"])
    acc = float((rt.predict(xt) == yt).mean())
    print(f"Runtime.predict, 10,000 test images, {a.threads} thread(s), kernels {rt.kernel}, accuracy {acc:.4f}; median of {a.rounds} rounds:")
    print(f"  qmomentum bench runtime   {m(cli_thr):,.0f} samples/s   batch-1 {m(cli_lat) * 1e6:.2f} µs (Model::run)")
    print(f"  Python Runtime.predict    {m(py_thr):,.0f} samples/s ({m(py_thr) / m(cli_thr):.3f}x)   batch-1 {m(py_lat) * 1e6:.2f} µs per call")
    print(f"  batch-1 overhead of the Python call: {(m(py_lat) - m(cli_lat)) * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
