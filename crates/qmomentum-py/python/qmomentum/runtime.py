"""Integer-only inference on an exported model (``.qmm``), numpy in and out."""

import os

import numpy as np

from . import _native


class Runtime:
    """An integer model file (written by ``model.export`` or ``qmomentum export``) in the
    integer-only runtime (u8 activations, i8 weights, i32 accumulators; floats only in the final
    logits).

    ``x`` is ``uint8`` pixels (read in place when C-contiguous: no copy, no conversion) or
    ``float32`` values, quantized on the model's input grid (scale 1/255, zero point 0: round
    half to even). Its shape is ``(n, input_size)`` or ``(n, *input_shape)``.

    >>> rt = Runtime("m.qmm")            # doctest: +SKIP
    >>> rt.predict(x_test)               # class indices, uint32, shape (n,)  # doctest: +SKIP
    """

    def __init__(self, path, threads=0):
        """Load ``path``. ``threads``: threads per call (0 = one per core, the CLI's default)."""
        self._m = _native.Runtime(os.fspath(path))
        self._size = self._m.input_size
        self.threads = int(threads)

    def _input(self, x):
        # The common case first, in a few attribute reads (batch-1 calls are microseconds).
        if (
            type(x) is np.ndarray
            and x.dtype == np.uint8
            and x.ndim == 2
            and x.shape[1] == self._size
            and x.flags.c_contiguous
        ):
            return x
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        if x.dtype not in (np.uint8, np.float32):
            raise TypeError(
                f"x has dtype {x.dtype}; the runtime reads uint8 pixels (0–255) or float32 values in [0, 1]"
            )
        if x.ndim == 1 and x.size == self._m.input_size:
            x = x.reshape(1, -1)
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != self._m.input_size:
            raise ValueError(
                f"shape mismatch: x has shape {tuple(x.shape)}, the model reads {self._m.input_size} "
                f"values per sample (shape (n, {self._m.input_size}))"
            )
        return np.ascontiguousarray(x)

    def predict(self, x):
        """Predicted class of each sample (argmax of the logits, lowest index on ties): ``uint32``
        array of shape ``(n,)``. Unlike Keras's ``predict`` (probabilities), this is the integer
        runtime's answer; use :meth:`logits` for the scores."""
        return np.frombuffer(self._m.predict(self._input(x), self.threads), dtype=np.uint32)

    def logits(self, x):
        """The dequantized logits, ``float32`` of shape ``(n, classes)``."""
        b = self._m.logits(self._input(x), self.threads)
        return np.frombuffer(b, dtype=np.float32).reshape(-1, self._m.classes)

    @property
    def input_size(self):
        """Values per input sample."""
        return self._m.input_size

    @property
    def classes(self):
        """Output classes."""
        return self._m.classes

    @property
    def class_names(self):
        """Class names stored in the file (or None)."""
        return self._m.class_names

    @property
    def kernel(self):
        """The kernel tier this CPU runs (``AMX-INT8``, ``AVX-512 VNNI``, ``AVX2`` or ``scalar``)."""
        return self._m.kernel

    def __repr__(self):
        return f"Runtime(input_size={self.input_size}, classes={self.classes}, kernel={self.kernel!r})"
