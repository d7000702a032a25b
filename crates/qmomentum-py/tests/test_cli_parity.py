"""Same seed and settings → the same weights, bit for bit, in Python and on the command line;
checkpoints cross in both directions."""

import subprocess

import numpy as np
import pytest
from qmomentum import keras

from conftest import DATA, mlp


def run(cli, *args):
    p = subprocess.run([cli, *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize(
    "quant,extra",
    [("fp32", {}), ("w4a4", {"validation_split": 0.1})],
)
def test_weights_bit_identical_to_cli(cli, fmnist, tmp_path, quant, extra):
    x, y, xt, yt = fmnist
    flags = ["--validation-split", "0.1"] if extra else []
    run(cli, "train", "--data", DATA, "--epochs", 1, "--seed", 7, "--lr", 0.01, "--quant", quant,
        "--out", tmp_path / "cli", "--quiet", *flags)
    m = mlp(keras)
    m.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"], quant=quant, seed=7)
    h = m.fit(x, y, epochs=1, batch_size=128, verbose=0, **extra)
    c = keras.models.load_model(tmp_path / "cli" / "checkpoint.safetensors")
    assert m.weight_names() == c.weight_names()
    for n, a, b in zip(m.weight_names(), m.get_weights(), c.get_weights()):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.array_equal(a, b), f"{n}: max |Δ| {np.abs(a - b).max()}"
    # The CLI's history.csv has the same epoch figures.
    csv = (tmp_path / "cli" / "history.csv").read_text().splitlines()
    row = dict(zip(csv[0].split(","), csv[1].split(",")))
    assert float(row["loss"]) == pytest.approx(h.history["loss"][0], rel=1e-6)
    if extra:
        assert float(row["val_accuracy"]) == pytest.approx(h.history["val_accuracy"][0], rel=1e-6)
    # A checkpoint saved from Python loads in the CLI, which evaluates it to the same figures.
    m.save(tmp_path / "py.safetensors")
    out = run(cli, "evaluate", tmp_path / "py.safetensors", "--data", DATA)
    loss, acc = m.evaluate(xt, yt, verbose=0)
    assert f"{acc:.4f}" in out, out
    # ... and the CLI continues it (resume) exactly as Python continues the CLI's run.
    (tmp_path / "run").mkdir()
    (tmp_path / "py.safetensors").rename(tmp_path / "run" / "checkpoint.safetensors")
    run(cli, "train", "--data", DATA, "--out", tmp_path / "run", "--resume", "--epochs", 2, "--force-data", "--quiet")
    c.fit(x, y, epochs=1, batch_size=128, verbose=0, **extra)
    r = keras.models.load_model(tmp_path / "run" / "checkpoint.safetensors")
    for n, a, b in zip(r.weight_names(), r.get_weights(), c.get_weights()):
        assert np.array_equal(a, b), n


def test_labels_dtypes_and_layouts_train_the_same(small):
    x, y, _, _ = small
    ws = []
    for xx, yy in [
        (x, y.astype(np.uint8)),
        (np.asfortranarray(x), y.astype(np.int64)),
        (x.astype(np.float32) / 255.0, y.astype(np.int32)),
        (x / 255.0, y.astype(np.int64).reshape(-1, 1)),
    ]:
        m = mlp(keras)
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
        m.fit(xx, yy, epochs=1, batch_size=64, verbose=0)
        ws.append(m.get_weights())
    for w in ws[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(ws[0], w))
