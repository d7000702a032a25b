"""Bad inputs raise the documented exceptions with the library's wording."""

import numpy as np
import pytest
import qmomentum
from qmomentum import keras
from qmomentum.datasets import fashion_mnist

from conftest import DATA, mlp


@pytest.fixture
def model():
    m = mlp(keras)
    m.compile(optimizer=keras.optimizers.Momentum(lr=0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


X = np.zeros((4, 784), np.uint8)
Y = np.array([0, 1, 2, 3])


@pytest.mark.parametrize(
    "x,y,exc,msg",
    [
        (X.astype(np.int64), Y, TypeError, "dtype int64"),
        (X, Y.astype(np.float32), TypeError, "labels are integer class indices"),
        (np.zeros((4, 783), np.uint8), Y, ValueError, "783 features per sample"),
        (np.zeros(784, np.uint8), Y, ValueError, "shape mismatch"),
        (X, Y[:3], ValueError, "3 labels but x has 4 samples"),
        (X, np.array([0, 1, 10, 3]), ValueError, r"label 10 at index 2 is out of range \(classes = 10\)"),
        (X, np.array([0, -1, 1, 3]), ValueError, r"label -1 at index 1 is out of range"),
        (np.full((4, 784), np.nan, np.float32), Y, ValueError, r"float32 value NaN at index \[0, 0\] is outside \[0, 1\]"),
        (np.full((4, 784), 255.0), Y, ValueError, r"float64 value 255 at index \[0, 0\] is outside \[0, 1\].*pixel/255"),
        (["a"] * 4, Y, TypeError, "dtype"),
    ],
)
def test_bad_fit_inputs(model, x, y, exc, msg):
    with pytest.raises(exc, match=msg):
        model.fit(x, y, epochs=1, verbose=0)
    assert model._trainer.global_step == 0  # nothing was trained


def test_bad_predict_and_evaluate(model):
    with pytest.raises(ValueError, match="features per sample"):
        model.predict(np.zeros((2, 28, 29), np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        model.evaluate(X, np.array([0, 1, 2, 99]))
    p = model.predict(X)
    assert p.shape == (4, 10) and p.dtype == np.float32
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "build,exc,msg",
    [
        (lambda: keras.optimizers.Momentum(lr=-1.0), ValueError, r"invalid optimizer.lr = -1: the learning rate must be a finite number"),
        (lambda: keras.optimizers.Momentum(momentum=1.5), ValueError, r"invalid optimizer.momentum = 1.5"),
        (lambda: keras.optimizers.SGD(learning_rate=0.1, nesterov=True), ValueError, "Nesterov"),
    ],
)
def test_bad_optimizers(build, exc, msg):
    m = mlp(keras)
    with pytest.raises(exc, match=msg):
        m.compile(optimizer=build(), loss="sparse_categorical_crossentropy")


def test_bad_model_settings():
    with pytest.raises(ValueError, match="invalid activation"):
        keras.layers.Dense(3, activation="gelu")
    with pytest.raises(ValueError, match="input_shape"):
        keras.Sequential([keras.layers.Dense(3)]).compile()
    with pytest.raises(ValueError, match="sparse_categorical_crossentropy"):
        mlp(keras).compile(loss="mse")
    with pytest.raises(ValueError, match=r"invalid quant|unknown variant"):
        mlp(keras).compile(quant="w5a5")
    with pytest.raises(ValueError, match="invalid batch_size"):
        m = mlp(keras)
        m.fit(X, Y, batch_size=0)
    with pytest.raises(ValueError, match="binary networks need training"):
        m = mlp(keras)
        m.quantize("binary", x=X)
    with pytest.raises(ValueError, match="calibration data"):
        mlp(keras).quantize("w8a8")


def test_files(tmp_path, model):
    with pytest.raises(OSError):
        keras.models.load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="checkpoint"):
        keras.models.load_model(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError):
        qmomentum.Runtime(tmp_path / "junk.safetensors")
    model.save(tmp_path / "m.safetensors")
    again = keras.models.load_model(tmp_path / "m.safetensors")
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights()))


def test_runtime_bad_inputs(tmp_path):
    m = mlp(keras, quant="w8a8")
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    m.fit(X, Y, epochs=1, verbose=0)
    m.export(tmp_path / "m.qmm")
    rt = qmomentum.Runtime(tmp_path / "m.qmm")
    with pytest.raises(ValueError, match="the model reads 784 values per sample"):
        rt.predict(np.zeros((2, 700), np.uint8))
    with pytest.raises(TypeError, match="dtype int16"):
        rt.predict(np.zeros((2, 784), np.int16))
    with pytest.raises(ValueError, match="NaN"):
        rt.predict(np.full((2, 784), np.nan, np.float32))
    assert rt.predict(np.zeros((0, 784), np.uint8)).shape == (0,)


def test_datasets(monkeypatch, tmp_path):
    (x, y), (xt, yt) = fashion_mnist.load_data()
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,) and y.dtype == np.uint8
    assert xt.shape == (10000, 28, 28) and yt.max() == 9
    x[0, 0, 0] = 1  # writable, as Keras's
    monkeypatch.setenv("QMOMENTUM_DATA", str(DATA))
    (_, y2), _ = fashion_mnist.load_data()
    assert np.array_equal(y, y2)
    with pytest.raises(ValueError, match="not found"):
        fashion_mnist.load_data(tmp_path)
    monkeypatch.setenv("QMOMENTUM_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from qmomentum import datasets

    d = datasets.find_data_dir()  # falls back to the repository copy the package was built from
    assert (d / "t10k-images-idx3-ubyte.gz").is_file()


def test_divergence_is_a_runtime_error_naming_the_step(small):
    x, y, _, _ = small
    m = mlp(keras)
    m.compile(optimizer=keras.optimizers.Momentum(lr=1e5, momentum=0.9), loss="sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match=r"training diverged at epoch 1, step \d+ .*lower learning rate"):
        m.fit(x, y, epochs=1, verbose=0)


def test_summary_of_the_design_doc_mlp(model):
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    for row in ("dense_0 (dense)", "(None, 128)", "100,480", "(None, 64)", "8,256", "(None, 10)", "650"):
        assert row in text, text
    assert "Total params: 109,386" in text
    assert "momentum 0.9 (lr inside the velocity" in text


def test_every_public_name_is_documented():
    import inspect

    import qmomentum.datasets as ds
    import qmomentum.keras as k

    missing = []
    objs = [qmomentum.Runtime, k.Sequential, k.load_model, ds.fashion_mnist.load_data, ds.find_data_dir]
    for ns in (k.layers, k.optimizers, k.callbacks):
        objs += [v for n, v in vars(ns).items() if not n.startswith("_")]
    for o in objs:
        if not (o.__doc__ or "").strip():
            missing.append(getattr(o, "__qualname__", repr(o)))
        if inspect.isclass(o):
            for n, f in vars(o).items():
                # inspect.getdoc: an override without its own docstring shows its base's, as help() does.
                if not n.startswith("_") and callable(f) and not (inspect.getdoc(getattr(o, n)) or "").strip():
                    missing.append(f"{o.__qualname__}.{n}")
    assert not missing, missing
