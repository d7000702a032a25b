"""QAT, PTQ, export and integer inference from Python."""

import subprocess

import numpy as np
import pytest
import qmomentum
from qmomentum import keras

from conftest import DATA, mlp


def test_qat_export_runtime(fmnist, tmp_path, cli):
    x, y, xt, yt = fmnist
    m = mlp(keras, quant="w8a8")
    m.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=1, batch_size=128, verbose=0)
    _, sim_acc = m.evaluate(xt, yt, verbose=0)
    size = m.export(tmp_path / "m.qmm")
    assert size == (tmp_path / "m.qmm").stat().st_size > 0
    rt = qmomentum.Runtime(tmp_path / "m.qmm")
    assert (rt.input_size, rt.classes) == (784, 10)
    pred = rt.predict(xt)
    assert pred.dtype == np.uint32 and pred.shape == (10_000,)
    rt_acc = float((pred == yt).mean())
    # The integer model and the float simulation agree (the library's export test: ≥ 99.9 %).
    sim_pred = m.predict(xt).argmax(1)
    assert (sim_pred == pred).mean() >= 0.999
    assert abs(rt_acc - sim_acc) <= 0.001
    assert rt_acc > 0.8
    # The same file in the CLI's integer runtime gives the same accuracy.
    out = subprocess.run([cli, "infer", tmp_path / "m.qmm", "--data", DATA], capture_output=True, text=True).stdout
    assert f"accuracy {rt_acc:.4f}" in out, out
    # float32 pixels/255 are quantized on the input grid: the same answers; logits agree.
    assert np.array_equal(rt.predict(xt.astype(np.float32) / 255.0), pred)
    lg = rt.logits(xt[:100])
    assert lg.shape == (100, 10) and np.array_equal(lg.argmax(1), pred[:100])
    # One sample, flat, and a Fortran-ordered batch.
    assert rt.predict(xt[3])[0] == pred[3]
    assert np.array_equal(rt.predict(np.asfortranarray(xt[:50])), pred[:50])


def test_ptq_then_finetune(fmnist, tmp_path):
    x, y, xt, yt = fmnist
    m = mlp(keras)
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=1, batch_size=128, verbose=0)
    _, fp = m.evaluate(xt, yt, verbose=0)
    with pytest.raises(ValueError, match="not quantized|quantized model|float"):
        m.export(tmp_path / "fp.qmm")
    m.quantize("int8", x=x[:1280])
    assert m.quant == "w8a8"
    _, q = m.evaluate(xt, yt, verbose=0)
    assert abs(q - fp) < 0.01, (fp, q)
    m.export(tmp_path / "ptq.qmm")
    acc = float((qmomentum.Runtime(tmp_path / "ptq.qmm").predict(xt) == yt).mean())
    assert abs(acc - q) <= 0.002
    h = m.fit(x[:4096], y[:4096], epochs=1, batch_size=128, verbose=0)  # QAT fine-tuning
    assert len(h.history["loss"]) == 1


def test_cnn_layers(fmnist, tmp_path):
    x, y, xt, yt = fmnist
    x, y = x[:3000].reshape(-1, 28, 28, 1), y[:3000]
    m = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Dropout(0.1),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    lines = []
    m.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "conv2d_0 (conv2d)" in text and "(None, 28, 28, 8)" in text and "(None, 14, 14, 8)" in text
    assert "Total params: 15,786" in text  # 3·3·8 + 8 + 2·8 + 1568·10 + 10
    h = m.fit(x, y, epochs=2, batch_size=64, verbose=0, validation_data=(xt[:500].reshape(-1, 28, 28), yt[:500]))
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert h.history["val_accuracy"][-1] > 0.6
    m.quantize("w8a8", x=x[:640])
    m.export(tmp_path / "cnn.qmm")
    rt = qmomentum.Runtime(tmp_path / "cnn.qmm")
    agree = (rt.predict(xt[:500]) == m.predict(xt[:500].reshape(-1, 28, 28, 1)).argmax(1)).mean()
    assert agree >= 0.99


def test_per_layer_quantization_and_binary(small, tmp_path):
    x, y, xt, yt = small
    four = {"weights": {"kind": "int", "bits": 4}, "activations": {"bits": 8}}
    m = keras.Sequential([
        keras.layers.Dense(128, activation="relu", input_shape=(784,)),
        keras.layers.Dense(64, activation="relu", quant=four),
        keras.layers.Dense(10, activation="softmax"),
    ], quant="w8a8")
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=2, batch_size=64, verbose=0)
    m.export(tmp_path / "mixed.qmm")
    rt = qmomentum.Runtime(tmp_path / "mixed.qmm")
    assert (rt.predict(xt) == m.predict(xt).argmax(1)).mean() >= 0.99
    # Binary (Bop) QAT exports to the XNOR-popcount runtime.
    b = mlp(keras, quant="binary")
    b.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    b.fit(x, y, epochs=2, batch_size=64, verbose=0)
    b.export(tmp_path / "bin.qmm")
    rb = qmomentum.Runtime(tmp_path / "bin.qmm")
    assert (rb.predict(xt) == b.predict(xt).argmax(1)).mean() >= 0.99
