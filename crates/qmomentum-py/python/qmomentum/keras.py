"""A Keras-shaped API over the qmomentum trainer.

The design document's program runs with only its import line changed::

    from qmomentum import keras
    model = keras.Sequential([
        keras.layers.Dense(128, activation="relu", input_shape=(784,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    optimizer = keras.optimizers.Momentum(lr=0.001, momentum=0.9)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10, batch_size=128)

Training runs in Rust (the ``qmomentum`` library, the code the command line runs): the same seed
and settings give the same weights, bit for bit, as ``qmomentum train``. The GIL is released
during each training step, evaluation and prediction; Ctrl-C raises ``KeyboardInterrupt`` at the
next step boundary with the model consistent (``fit`` again continues the run).

Differences from Keras are listed in ``doc/from-keras.md``; the main ones: runs are deterministic
by default (seed 0; ``keras.utils.set_random_seed`` or ``compile(seed=)`` changes it), the
trainer reads pixels (uint8, or floats in [0, 1] that are pixel/255, rounded to the 1/255 grid as
the command line rounds float ``.npy`` inputs), and the loss is sparse categorical cross-entropy
on a softmax head.
"""

import json
import math
import os
import sys
import types

import numpy as np

from . import _native

__all__ = [
    "Sequential",
    "Input",
    "layers",
    "optimizers",
    "callbacks",
    "models",
    "utils",
    "History",
]

_ACTIVATIONS = {None: "linear", "linear": "linear", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax"}


def _activation(a):
    if a not in _ACTIVATIONS:
        raise ValueError(f"invalid activation = {a!r}: expected one of relu, sigmoid, tanh, softmax, linear or None")
    return _ACTIVATIONS[a]


def _pair(v, what):
    if isinstance(v, int):
        return v
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"invalid {what} = {v!r}: expected an int or a pair of ints")
    return list(v)


def _padding(p):
    if p in ("valid", "same"):
        return p
    raise ValueError(f"invalid padding = {p!r}: expected 'valid' or 'same'")


# ---------------------------------------------------------------------------------------------
# Layers


class Layer:
    """Base of the layers: each one is a line of the trainer's model configuration."""

    def __init__(self, input_shape=None, name=None):
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.name = name

    def get_config(self):
        """The layer as the trainer's configuration reads it (``configs/*.toml``, as a dict)."""
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class InputLayer(Layer):
    """``keras.Input(shape=(784,))``: the shape of one sample (NHWC for images)."""

    def __init__(self, shape=None, name=None, input_shape=None):
        shape = shape if shape is not None else input_shape
        if shape is None:
            raise ValueError("Input needs shape=(…)")
        super().__init__(input_shape=shape, name=name)

    def get_config(self):
        """The input's shape (not a layer of the trainer's configuration)."""
        return {"type": "input", "shape": list(self.input_shape)}


def Input(shape=None, name=None):
    """``keras.Input(shape=…)``, to put first in a ``Sequential``."""
    return InputLayer(shape=shape, name=name)


class Dense(Layer):
    """``Dense(units, activation=None)``. ``quant``: this layer's own quantization (the
    configuration's ``LayerQuant``, e.g. ``{"weights": {"kind": "int", "bits": 4},
    "activations": {"bits": 8}}``), overriding the model's scheme."""

    def __init__(self, units, activation=None, input_shape=None, quant=None, name=None, use_bias=True):
        super().__init__(input_shape, name)
        if not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"invalid units = {units!r}: must be a whole number ≥ 1")
        if not use_bias:
            raise ValueError("use_bias=False is not supported: every dense layer has a bias")
        self.units = int(units)
        self.activation = _activation(activation)
        self.quant = quant

    def get_config(self):
        d = {"type": "dense", "units": self.units, "activation": self.activation}
        if self.quant is not None:
            d["quant"] = self.quant
        return d


class Conv2D(Layer):
    """``Conv2D(filters, kernel_size, strides=1, padding="valid", dilation_rate=1, groups=1,
    activation=None)`` over NHWC images (``input_shape=(h, w, c)``)."""

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        dilation_rate=1,
        groups=1,
        activation=None,
        input_shape=None,
        quant=None,
        name=None,
    ):
        super().__init__(input_shape, name)
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = _padding(padding)
        self.dilation_rate = _pair(dilation_rate, "dilation_rate")
        self.groups = int(groups)
        self.activation = _activation(activation)
        self.quant = quant

    def get_config(self):
        d = {
            "type": "conv2d",
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
            "activation": self.activation,
        }
        if self.quant is not None:
            d["quant"] = self.quant
        return d


class MaxPooling2D(Layer):
    """``MaxPooling2D(pool_size=2, strides=None, padding="valid")``."""

    _type = "max_pool2d"

    def __init__(self, pool_size=2, strides=None, padding="valid", input_shape=None, name=None):
        super().__init__(input_shape, name)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = None if strides is None else _pair(strides, "strides")
        self.padding = _padding(padding)

    def get_config(self):
        d = {"type": self._type, "pool_size": self.pool_size, "padding": self.padding}
        if self.strides is not None:
            d["strides"] = self.strides
        return d


class AveragePooling2D(MaxPooling2D):
    """``AveragePooling2D(pool_size=2, strides=None, padding="valid")`` (padded positions are not
    counted)."""

    _type = "avg_pool2d"


class GlobalAveragePooling2D(Layer):
    """``GlobalAveragePooling2D()``."""

    def get_config(self):
        return {"type": "global_avg_pool"}


class BatchNormalization(Layer):
    """``BatchNormalization(momentum=0.99, epsilon=1e-3)``: Keras's convention (``momentum`` is
    the weight of the old running value)."""

    def __init__(self, momentum=0.99, epsilon=1e-3, input_shape=None, name=None):
        super().__init__(input_shape, name)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def get_config(self):
        return {"type": "batch_norm", "momentum": self.momentum, "epsilon": self.epsilon}


class Flatten(Layer):
    """``Flatten()``."""

    def get_config(self):
        return {"type": "flatten"}


class Dropout(Layer):
    """``Dropout(rate)``; the draws are a function of (seed, step), as on the command line."""

    def __init__(self, rate, input_shape=None, name=None):
        super().__init__(input_shape, name)
        self.rate = float(rate)

    def get_config(self):
        return {"type": "dropout", "rate": self.rate}


class Activation(Layer):
    """``Activation("relu")``."""

    def __init__(self, activation, input_shape=None, name=None):
        super().__init__(input_shape, name)
        self.activation = _activation(activation)

    def get_config(self):
        return {"type": "activation", "activation": self.activation}


def _layer_from_config(d):
    """A layer object from the trainer's configuration of it (for models loaded from files)."""
    t = d["type"]
    act = d.get("activation", "linear")
    if t == "dense":
        return Dense(d["units"], activation=act, quant=d.get("quant"))
    if t == "conv2d":
        return Conv2D(
            d["filters"],
            d["kernel_size"],
            strides=d.get("strides", 1),
            padding=d.get("padding", "valid") if isinstance(d.get("padding", "valid"), str) else "valid",
            dilation_rate=d.get("dilation_rate", 1),
            groups=d.get("groups", 1),
            activation=act,
            quant=d.get("quant"),
        )
    if t in ("max_pool2d", "avg_pool2d"):
        cls = MaxPooling2D if t == "max_pool2d" else AveragePooling2D
        pad = d.get("padding", "valid")
        return cls(d.get("pool_size", 2), d.get("strides"), pad if isinstance(pad, str) else "valid")
    if t == "global_avg_pool":
        return GlobalAveragePooling2D()
    if t == "batch_norm":
        bn = BatchNormalization(epsilon=d.get("epsilon", 1e-3))
        bn._config = d  # keeps torch_momentum if the run used PyTorch's convention
        bn.get_config = lambda: dict(d)
        return bn
    if t == "flatten":
        return Flatten()
    if t == "dropout":
        return Dropout(d["rate"])
    if t == "activation":
        return Activation(act)
    raise ValueError(f"unknown layer type {t!r}")


layers = types.SimpleNamespace(
    Layer=Layer,
    Input=Input,
    InputLayer=InputLayer,
    Dense=Dense,
    Conv2D=Conv2D,
    MaxPooling2D=MaxPooling2D,
    MaxPool2D=MaxPooling2D,
    AveragePooling2D=AveragePooling2D,
    AvgPool2D=AveragePooling2D,
    GlobalAveragePooling2D=GlobalAveragePooling2D,
    BatchNormalization=BatchNormalization,
    Flatten=Flatten,
    Dropout=Dropout,
    Activation=Activation,
)
"""``keras.layers``: the layers the trainer supports."""


# ---------------------------------------------------------------------------------------------
# Optimizers


class Optimizer:
    """Base of the optimizers: each one is the trainer's ``[optimizer]`` configuration."""

    def get_config(self):
        """The trainer's optimizer configuration (``OptimizerConfig``) as a dict."""
        raise NotImplementedError


class SGD(Optimizer):
    """Keras's ``SGD(learning_rate=0.01, momentum=0.0, nesterov=False)``.

    Keras puts the learning rate inside the velocity (``v ← μv − ηg``, ``θ ← θ + v``), which is
    the trainer's ``lr_inside`` convention, the design document's. ``weight_decay`` is decoupled
    (``θ ← θ − ηλθ``) as in Keras 3; ``clipnorm``/``clipvalue`` clip the global norm / each value.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None):
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm if clipnorm is not None else global_clipnorm
        self.clipvalue = clipvalue

    def get_config(self):
        d = {"lr": self.learning_rate, "momentum": self.momentum, "nesterov": self.nesterov, "convention": "lr_inside"}
        if self.weight_decay:
            d["weight_decay"] = float(self.weight_decay)
            d["decay_mode"] = "decoupled"
        if self.clipnorm is not None:
            d["clip_norm"] = float(self.clipnorm)
        if self.clipvalue is not None:
            d["clip_value"] = float(self.clipvalue)
        return d

    def __repr__(self):
        return f"SGD(learning_rate={self.learning_rate}, momentum={self.momentum}, nesterov={self.nesterov})"


class Momentum(Optimizer):
    """The design document's ``optimizers.Momentum(lr=0.001, momentum=0.9)`` (not in Keras).

    The document's update is ``v ← γv + η∇L(θ)``, ``θ ← θ − v``: the learning rate inside the
    velocity (``convention="lr_inside"``, the default; Keras's ``SGD`` is the same update).
    ``convention="pytorch"`` (or ``"lr_outside"``) is ``torch.optim.SGD``'s: ``b ← μb + g``,
    ``θ ← θ − ηb``; the two agree at a constant learning rate. ``learning_rate=`` is accepted as
    a synonym of ``lr``; ``dampening`` and ``weight_decay`` (coupled L2, ``decoupled=True`` for
    ``θ ← θ − ηλθ``) as on the command line.
    """

    def __init__(self, lr=0.001, momentum=0.9, nesterov=False, convention="lr_inside", dampening=0.0, weight_decay=0.0, decoupled=False, learning_rate=None):
        if learning_rate is not None:
            lr = learning_rate
        conv = {"lr_inside": "lr_inside", "keras": "lr_inside", "lr_outside": "lr_outside", "pytorch": "lr_outside"}
        if convention not in conv:
            raise ValueError(f"invalid convention = {convention!r}: expected lr_inside (keras) or lr_outside (pytorch)")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.convention = conv[convention]
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)

    @property
    def learning_rate(self):
        """η (Keras's name)."""
        return self.lr

    def get_config(self):
        d = {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "convention": self.convention,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
        }
        if self.decoupled:
            d["decay_mode"] = "decoupled"
        return d

    def __repr__(self):
        return f"Momentum(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, convention={self.convention!r})"


def _optimizer(o):
    if isinstance(o, Optimizer):
        return o
    if isinstance(o, str):
        if o.lower() == "sgd":
            return SGD()
        if o.lower() == "momentum":
            return Momentum()
    raise ValueError(f"invalid optimizer = {o!r}: expected keras.optimizers.SGD(…), Momentum(…), 'sgd' or 'momentum'")


optimizers = types.SimpleNamespace(Optimizer=Optimizer, SGD=SGD, Momentum=Momentum)
"""``keras.optimizers``: ``SGD`` (Keras's) and ``Momentum`` (the design document's)."""


# ---------------------------------------------------------------------------------------------
# Callbacks and history


class Callback:
    """Base of the callbacks: override ``on_epoch_end(epoch, logs)`` (``epoch`` 0-based, ``logs``
    the epoch's figures with Keras's keys), ``on_train_begin(logs)``, ``on_train_end(logs)``.
    Setting ``self.model.stop_training = True`` ends ``fit`` after the epoch."""

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        """Called by ``fit`` with the model being trained."""
        self.model = model

    def set_params(self, params):
        """Called by ``fit`` with ``{"epochs", "steps", "verbose"}``."""
        self.params = params

    def on_train_begin(self, logs=None):
        """Called once when ``fit`` starts."""

    def on_train_end(self, logs=None):
        """Called once when ``fit`` ends (not after an exception)."""

    def on_epoch_begin(self, epoch, logs=None):
        """Called before each epoch (``epoch`` 0-based, counted from the start of the run)."""

    def on_epoch_end(self, epoch, logs=None):
        """Called after each epoch with its figures: ``loss``, ``accuracy``, ``val_loss``,
        ``val_accuracy`` (those that apply)."""


class LambdaCallback(Callback):
    """``LambdaCallback(on_epoch_end=lambda epoch, logs: …)``."""

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None, on_train_end=None):
        super().__init__()
        for name, f in (("on_epoch_begin", on_epoch_begin), ("on_epoch_end", on_epoch_end), ("on_train_begin", on_train_begin), ("on_train_end", on_train_end)):
            if f is not None:
                setattr(self, name, f)


class History(Callback):
    """What ``fit`` returns: ``history.history`` is a dict of lists keyed as Keras keys them
    (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``), ``history.epoch`` the 0-based
    epochs, ``history.params`` ``{"epochs", "steps", "verbose"}``. Also kept as
    ``model.history``. ``history.seconds`` holds each epoch's training time (steps only)."""

    def __init__(self):
        super().__init__()
        self.history = {}
        self.epoch = []
        self.seconds = []

    def on_epoch_end(self, epoch, logs=None):
        """Appends the epoch's figures to ``history``."""
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


callbacks = types.SimpleNamespace(Callback=Callback, LambdaCallback=LambdaCallback, History=History)
"""``keras.callbacks``."""


# ---------------------------------------------------------------------------------------------
# numpy in


def _check_x(x, model_shape, input_size):
    """``x`` as a C-contiguous uint8/float32/float64 array of shape ``(n, …)``."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"x: expected a numpy array, got {type(x).__name__} ({e})") from None
    if x.dtype not in (np.uint8, np.float32, np.float64):
        if x.dtype == np.float16:
            x = x.astype(np.float32)
        else:
            raise TypeError(
                f"x has dtype {x.dtype}; the model reads uint8 pixels (0–255) or floats in [0, 1] "
                f"(float32 or float64, pixel/255)"
            )
    if x.ndim < 2:
        raise ValueError(f"shape mismatch: x has shape {tuple(x.shape)}; expected (samples, {', '.join(map(str, model_shape))})")
    sample = tuple(x.shape[1:])
    ok = (
        sample == tuple(model_shape)
        or sample == (input_size,)
        or (len(model_shape) == 3 and model_shape[2] == 1 and sample == tuple(model_shape[:2]))
    )
    if not ok:
        feats = int(np.prod(sample))
        raise ValueError(
            f"shape mismatch: the data have {feats} features per sample (shape {sample}), the model reads "
            f"{input_size} (input shape {tuple(model_shape)})"
        )
    return np.ascontiguousarray(x)


def _check_y(y, n, classes):
    """Labels as a uint8 array of ``n`` values in ``0..classes``."""
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(
            f"y has dtype {y.dtype}; labels are integer class indices (int32, int64 or uint8) for "
            f"sparse_categorical_crossentropy"
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"shape mismatch: y has shape {tuple(y.shape)}; expected ({n},) class indices")
    if y.shape[0] != n:
        raise ValueError(f"shape mismatch: {y.shape[0]} labels but x has {n} samples")
    if n:
        bad = np.flatnonzero((y < 0) | (y >= classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"label {int(y[i])} at index {i} is out of range (classes = {classes})")
    return np.ascontiguousarray(y.astype(np.uint8, copy=False))


# ---------------------------------------------------------------------------------------------
# The model


class _Seed:
    value = 0


def _set_random_seed(seed):
    """``keras.utils.set_random_seed(seed)``: the seed of the models compiled after it
    (initialisation, shuffling, dropout). Runs are deterministic without it too (seed 0)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"invalid seed = {seed}: must be ≥ 0")
    _Seed.value = seed


utils = types.SimpleNamespace(set_random_seed=_set_random_seed)
"""``keras.utils``."""


class Sequential:
    """``Sequential([layers…], quant=None)``: a stack of layers trained by the qmomentum trainer.

    ``quant``: the quantization scheme of every dense/conv layer without its own ``quant``
    (``"fp32"``, ``"w8a8"``, ``"w4a8"``, ``"w4a4"``, ``"w2a2"``, ``"ternary"``, ``"binary"``,
    ``"binary-all"``): quantization-aware training. ``compile(quant=…)`` sets it too.
    """

    def __init__(self, layers=None, name=None, quant=None):
        self.name = name or "sequential"
        self.layers = []
        self.quant = quant
        self._trainer = None
        self._compiled = None
        self._metrics = ["accuracy"]
        self._ptq = False
        self.stop_training = False
        self.history = None
        for l in layers or []:
            self.add(l)

    # -- building ------------------------------------------------------------------------

    def add(self, layer):
        """Append a layer (Keras's ``model.add``)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"expected a keras.layers layer, got {type(layer).__name__}")
        if self._trainer is not None:
            raise ValueError("the model is built (compiled or trained): layers cannot be added any more")
        self.layers.append(layer)

    def _input_shape(self):
        shape = None
        for l in self.layers:
            if l.input_shape is not None:
                shape = l.input_shape
                break
        if shape is None:
            raise ValueError("the first layer needs input_shape=(…) (or start with keras.Input(shape=(…)))")
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or any(s < 1 for s in shape):
            raise ValueError(f"invalid input_shape = {shape}: expected (features,) or (height, width, channels)")
        return shape

    def _config(self, optimizer, quant, seed):
        shape = self._input_shape()
        model = {"input": int(np.prod(shape)), "layers": [l.get_config() for l in self.layers if not isinstance(l, InputLayer)]}
        if len(shape) == 3:
            model["input_shape"] = list(shape)
        return {
            "seed": seed,
            "epochs": 1,
            "batch_size": 32,
            "quant": str(quant or "fp32").replace("-", "_").replace("int8", "w8a8").replace("none", "fp32"),
            "model": model,
            "optimizer": optimizer.get_config(),
        }

    def compile(self, optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=None, quant=None, seed=None):
        """``compile(optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])``.

        Builds the model (weights initialised from the seed: ``seed``, else
        ``keras.utils.set_random_seed``'s, else 0). ``quant`` sets the QAT scheme (overrides the
        one given to ``Sequential``). The loss is sparse categorical cross-entropy, fused with the
        softmax of the last layer (``from_logits`` models are not supported)."""
        if self._trainer is not None and self._trainer.global_step > 0:
            raise ValueError("the model has been trained: compile would start it again; build a new model")
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        if name not in ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy"):
            raise ValueError(f"invalid loss = {loss!r}: the trainer computes sparse_categorical_crossentropy (integer labels, softmax head)")
        metrics = list(metrics or [])
        for m in metrics:
            if m not in ("accuracy", "acc", "sparse_categorical_accuracy"):
                raise ValueError(f"invalid metric {m!r}: the trainer reports accuracy")
        self._metrics = ["accuracy"] if metrics else []
        opt = _optimizer(optimizer)
        q = quant if quant is not None else self.quant
        cfg = self._config(opt, q, _Seed.value if seed is None else int(seed))
        self._trainer = _native.Trainer(json.dumps(cfg))
        self.quant = cfg["quant"]
        self.optimizer = opt
        self._compiled = cfg

    def _built(self):
        if self._trainer is None:
            self.compile(metrics=["accuracy"])
        return self._trainer

    @property
    def input_shape(self):
        """``(None, *shape)`` as Keras reports it."""
        return (None, *self._input_shape())

    def _shape(self):
        t = self._built()
        cfg = json.loads(t.config_json())["model"]
        return tuple(cfg.get("input_shape") or (cfg["input"],))

    def _dataset(self, x, y):
        t = self._built()
        x = _check_x(x, self._shape(), t.input_size)
        y = _check_y(y, x.shape[0], t.classes)
        return _native.Dataset(x, y, t.input_size, t.classes)

    # -- training ------------------------------------------------------------------------

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        initial_epoch=0,
    ):
        """Train for ``epochs`` more epochs; returns a :class:`History`.

        ``batch_size`` defaults to 32 (Keras's). ``validation_split`` holds out the last fraction
        of ``x``/``y`` (before shuffling, as Keras); ``validation_data=(x_val, y_val)``.
        ``verbose``: 0 silent, 1/"auto"/2 one line per epoch. ``callbacks``: objects with
        ``on_epoch_end(epoch, logs)``."""
        if x is None or y is None:
            raise ValueError("fit needs x and y (numpy arrays)")
        t = self._built()
        if batch_size is None:
            batch_size = 32
        if not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"invalid epochs = {epochs!r}: must be a whole number ≥ 1")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"invalid batch_size = {batch_size!r}: must be a whole number ≥ 1")
        if not (0.0 <= float(validation_split) < 1.0):
            raise ValueError(f"invalid validation_split = {validation_split}: must be in [0, 1)")
        if validation_split and validation_data is not None:
            raise ValueError("validation_split and validation_data: give one of them")
        x = _check_x(x, self._shape(), t.input_size)
        y = _check_y(y, x.shape[0], t.classes)
        val = None
        if validation_split:
            n_val = int(math.floor(x.shape[0] * float(validation_split)))
            n_tr = x.shape[0] - n_val
            val = _native.Dataset(x[n_tr:], y[n_tr:], t.input_size, t.classes)
            x, y = x[:n_tr], y[:n_tr]
        elif validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data: expected (x_val, y_val)")
            val = self._dataset(*validation_data)
        train = _native.Dataset(x, y, t.input_size, t.classes)
        if len(train) == 0:
            raise ValueError("the training set has no samples")
        start = t.epoch
        # A run stopped inside an epoch (Ctrl-C) finishes that epoch first: it counts.
        total = start + int(epochs)
        t.set_run(total, int(batch_size), bool(shuffle), float(validation_split))
        if self._ptq:
            t.unfreeze_observers()
            self._ptq = False
        verbose = 1 if verbose == "auto" else int(verbose)
        history = History()
        cbs = [history] + list(callbacks or [])
        steps = -(-len(train) // int(batch_size))
        params = {"epochs": total, "steps": steps, "verbose": verbose}
        for c in cbs:
            if hasattr(c, "set_model"):
                c.set_model(self)
            if hasattr(c, "set_params"):
                c.set_params(params)
        self.stop_training = False
        self.history = history
        for c in cbs:
            if hasattr(c, "on_train_begin"):
                c.on_train_begin({})
        while t.epoch < total and not self.stop_training:
            e = t.epoch
            for c in cbs:
                if hasattr(c, "on_epoch_begin"):
                    c.on_epoch_begin(e, {})
            rec = t.train_epoch(train, val)
            if rec is None:
                break
            logs = {"loss": rec["loss"]}
            if self._metrics:
                logs["accuracy"] = rec["accuracy"]
            if "val_loss" in rec:
                logs["val_loss"] = rec["val_loss"]
                if self._metrics:
                    logs["val_accuracy"] = rec["val_accuracy"]
            history.seconds.append(rec["seconds"])
            if verbose:
                parts = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                ms = 1000.0 * rec["seconds"] / max(rec["steps"], 1)
                print(
                    f"Epoch {rec['epoch']}/{total} - {rec['steps']}/{rec['steps']} - {rec['seconds']:.2f}s - "
                    f"{ms:.2f}ms/step - {parts}",
                    file=sys.stdout,
                    flush=True,
                )
            for c in cbs:
                if hasattr(c, "on_epoch_end"):
                    c.on_epoch_end(e, dict(logs))
        for c in cbs:
            if hasattr(c, "on_train_end"):
                c.on_train_end({})
        return history

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", return_dict=False):
        """``[loss, accuracy]`` on ``x``/``y`` (``loss`` alone when compiled without metrics;
        a dict with ``return_dict=True``). ``batch_size`` is accepted and ignored: evaluation
        runs in batches of 1000 and does not depend on it."""
        t = self._built()
        ds = self._dataset(x, y)
        if len(ds) == 0:
            raise ValueError("evaluate: x has no samples")
        loss, acc = t.evaluate(ds)
        if verbose not in (0, False) and verbose != "auto":
            print(f"{len(ds)} samples - loss: {loss:.4f} - accuracy: {acc:.4f}", flush=True)
        if return_dict:
            d = {"loss": loss}
            if self._metrics:
                d["accuracy"] = acc
            return d
        return [loss, acc] if self._metrics else loss

    def predict(self, x, batch_size=None, verbose="auto"):
        """The model's outputs (probabilities of the softmax head), ``float32`` of shape
        ``(n, classes)``; float simulation of quantized models (use :class:`qmomentum.Runtime`
        on the exported file for integer inference)."""
        t = self._built()
        x = _check_x(x, self._shape(), t.input_size)
        return np.frombuffer(t.predict(x), dtype=np.float32).reshape(-1, t.classes)

    # -- quantization and files ----------------------------------------------------------

    def quantize(self, mode="w8a8", x=None, calibration="minmax", batches=10, batch_size=128):
        """Post-training quantization, as ``qmomentum quantize``: batch norms folded into their
        convolutions, activation ranges calibrated on the first ``batches`` batches of
        ``batch_size`` samples of ``x`` (``calibration``: ``"minmax"``, ``"percentile[:P]"``,
        ``"mse"``). ``mode``: ``w8a8`` (``int8``), ``w4a8``, ``w4a4``, ``w2a2``, ``ternary``. The
        model becomes the quantized one; a later ``fit`` is QAT fine-tuning (observers
        unfrozen, as ``--finetune-epochs`` does)."""
        t = self._built()
        if x is None:
            raise ValueError("quantize needs calibration data: model.quantize(mode, x=x_train[:1280])")
        x = _check_x(x, self._shape(), t.input_size)
        ds = _native.Dataset(x, np.zeros(x.shape[0], dtype=np.uint8), t.input_size, t.classes)
        if int(batches) < 1:
            raise ValueError(f"invalid batches = {batches}: calibration needs at least one batch")
        t.quantize(str(mode).replace("-", "_").replace("int8", "w8a8"), ds, int(batches), int(batch_size), str(calibration))
        cfg = json.loads(t.config_json())
        first = [_layer_from_config(d) for d in cfg["model"]["layers"]]
        shape = cfg["model"].get("input_shape") or [cfg["model"]["input"]]
        self.layers = [InputLayer(shape=tuple(shape))] + first
        self.quant = cfg["quant"]
        self._ptq = True

    def export(self, filepath):
        """Write the integer model file (``.qmm``) of a quantized model (QAT or PTQ), as
        ``qmomentum export``; returns its size in bytes. Run it with :class:`qmomentum.Runtime`
        or ``qmomentum infer``."""
        return self._built().export(os.fspath(filepath))

    def save(self, filepath):
        """Write a checkpoint in the command line's format (safetensors: weights, optimizer state,
        configuration, position in the run): ``qmomentum evaluate/info/export/quantize`` read
        it, and ``keras.models.load_model`` reads it back (training can go on exactly)."""
        self._built().save(os.fspath(filepath))

    def get_weights(self):
        """Every trained parameter as a float32 array, in model order (dense kernels are
        ``(inputs, units)`` as Keras's; conv kernels ``(kh·kw·cin/groups, filters)``)."""
        out = []
        for _name, shape, b in self._built().weights():
            out.append(np.frombuffer(b, dtype=np.float32).reshape(shape).copy())
        return out

    def weight_names(self):
        """The names of :meth:`get_weights`'s arrays (the checkpoint's ``param.*`` tensors)."""
        return [n for n, _s, _b in self._built().weights()]

    def set_weights(self, weights):
        """Replace every parameter (arrays in :meth:`get_weights`'s order and shapes)."""
        t = self._built()
        cur = t.weights()
        if len(weights) != len(cur):
            raise ValueError(f"shape mismatch: {len(weights)} arrays given, the model has {len(cur)} parameter tensors")
        vals = []
        for (name, shape, _b), w in zip(cur, weights):
            w = np.asarray(w, dtype=np.float32)
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"shape mismatch: {name}: given {tuple(w.shape)}, the model has {tuple(shape)}")
            vals.append((name, np.ascontiguousarray(w).tobytes()))
        t.set_weights(vals)

    def count_params(self):
        """Trained parameters."""
        return self._built().param_count()

    def summary(self, print_fn=None):
        """Keras's table: layer, output shape, parameters; then the totals, the quantization
        scheme and the optimizer in the command line's words."""
        t = self._built()
        pf = print_fn or print
        rows = [(f"{kind}_{i} ({kind})", "(None, " + ", ".join(map(str, shape)) + ")", params) for i, kind, shape, params, _m in t.plan()]
        w = [max(28, max((len(r[0]) for r in rows), default=0) + 2), 26, 12]
        line = "━" * sum(w)
        pf(f'Model: "{self.name}"')
        pf(line)
        pf("Layer (type)".ljust(w[0]) + "Output Shape".ljust(w[1]) + "Param #".rjust(w[2]))
        pf(line)
        for n, s, p in rows:
            pf(n.ljust(w[0]) + s.ljust(w[1]) + f"{p:,}".rjust(w[2]))
        pf(line)
        total = t.param_count()
        pf(f" Total params: {total:,} ({total * 4 / 1024:.2f} KB)")
        pf(f" Quantization: {self.quant or 'fp32'}")
        pf(f" Optimizer: {t.optimizer_summary()}")

    def __repr__(self):
        return f"<qmomentum.keras.Sequential {self.name!r}: {len(self.layers)} layers, quant {self.quant or 'fp32'}>"

    @classmethod
    def _from_trainer(cls, t):
        cfg = json.loads(t.config_json())
        shape = cfg["model"].get("input_shape") or [cfg["model"]["input"]]
        m = cls([InputLayer(shape=tuple(shape))] + [_layer_from_config(d) for d in cfg["model"]["layers"]])
        m._trainer = t
        m.quant = cfg["quant"]
        m._compiled = cfg
        o = cfg["optimizer"]
        m.optimizer = Momentum(
            lr=o["lr"],
            momentum=o["momentum"],
            nesterov=o["nesterov"],
            convention=o["convention"],
            dampening=o.get("dampening", 0.0),
            weight_decay=o.get("weight_decay", 0.0),
            decoupled=o.get("decay_mode") == "decoupled",
        )
        return m


def load_model(filepath):
    """A model from a checkpoint written by ``model.save`` or by the command line (``qmomentum
    train``'s ``checkpoint.safetensors``, ``quantize``'s): weights, optimizer state, configuration
    and position in the run; ``fit`` continues it exactly as ``qmomentum train --resume``."""
    return Sequential._from_trainer(_native.Trainer.load(os.fspath(filepath)))


models = types.SimpleNamespace(Sequential=Sequential, load_model=load_model)
"""``keras.models``."""
