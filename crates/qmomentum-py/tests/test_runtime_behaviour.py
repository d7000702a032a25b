"""Ctrl-C, the GIL, callbacks, repeated fits."""

import _thread
import signal
import threading
import time

import numpy as np
import pytest
from qmomentum import keras

from conftest import mlp


def compiled(seed=1):
    m = mlp(keras)
    m.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"], seed=seed)
    return m


def test_ctrl_c_stops_at_a_step_and_the_run_continues_exactly(fmnist):
    # The whole training set: 3 × 1875 steps, long enough (about a second here) that the
    # interruption 0.3 s in lands inside the run on a fast machine too (20,000 images once
    # finished first).
    x, y, _, _ = fmnist
    ref = compiled()
    ref.fit(x, y, epochs=3, batch_size=32, verbose=0)
    m = compiled()
    # Python's own Ctrl-C handler, whatever this process inherited: a job started in the
    # background by a non-interactive shell ignores SIGINT, and `interrupt_main` then does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match=r"interrupted at epoch [123], step \d+ \(global step \d+\); the model is consistent"):
            m.fit(x, y, epochs=3, batch_size=32, verbose=0)
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    t = m._trainer
    assert t.epoch < 3 and 0 < t.global_step < 3 * 1875
    assert len(m.history.history.get("loss", [])) == t.epoch  # the epochs finished before the interruption
    # Fitting again finishes the interrupted epoch first (it counts as one), then the rest:
    # the same weights as without the interruption.
    m.fit(x, y, epochs=3 - t.epoch, batch_size=32, verbose=0)
    assert t.epoch == 3
    assert all(np.array_equal(a, b) for a, b in zip(ref.get_weights(), m.get_weights()))


def test_gil_is_released_during_fit(fmnist):
    x, y, _, _ = fmnist
    m = compiled()
    done = threading.Event()
    ticks = 0

    def train():
        m.fit(x[:30000], y[:30000], epochs=1, batch_size=128, verbose=0)
        done.set()

    th = threading.Thread(target=train)
    t0 = time.perf_counter()
    th.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    th.join()
    elapsed = time.perf_counter() - t0
    # The main thread ran alongside the whole time (a held GIL would starve it).
    assert ticks > 0.3 * elapsed / 0.001 * 0.5, (ticks, elapsed)


def test_callbacks_history_and_stop(small, capsys):
    x, y, xt, yt = small
    seen = []

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, sorted(logs)))
            if epoch == 1:
                self.model.stop_training = True

    m = compiled()
    h = m.fit(x, y, epochs=5, batch_size=64, verbose=1, validation_split=0.25, callbacks=[Stop()])
    assert seen == [(0, ["accuracy", "loss", "val_accuracy", "val_loss"]), (1, ["accuracy", "loss", "val_accuracy", "val_loss"])]
    assert h.epoch == [0, 1] and h.params["steps"] == 24  # 1536 samples / 64
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("Epoch 1/5 - 24/24 - ") and "val_accuracy: " in out[0]
    # fit again: Keras's "epochs more" — the run goes on from epoch 2.
    h2 = m.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert m._trainer.epoch == 3 and len(h2.history["loss"]) == 1
    r = m.evaluate(xt, yt, verbose=0, return_dict=True)
    assert set(r) == {"loss", "accuracy"}


def test_no_metrics_gives_loss_only(small):
    x, y, xt, yt = small
    m = mlp(keras)
    m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    h = m.fit(x, y, verbose=0)
    assert set(h.history) == {"loss"}
    assert isinstance(m.evaluate(xt, yt, verbose=0), float)
