"""qmomentum: quantized neural networks trained with the Momentum optimizer family, from Python.

* :mod:`qmomentum.keras` — a Keras-shaped API (``Sequential``, ``layers``, ``optimizers``,
  ``compile``/``fit``/``evaluate``/``predict``, ``quantize``, ``export``, ``save``/``load_model``)
  over the Rust trainer of the ``qmomentum`` command line; same seed, same settings, same weights.
* :class:`Runtime` — the integer-only runtime: ``Runtime("m.qmm").predict(x_uint8)``.
* :mod:`qmomentum.datasets` — ``fashion_mnist.load_data()`` from the repository's copy.

``doc/from-keras.md`` in the repository maps every Keras name to ours and states the differences.
"""

from . import _native
from . import datasets
from . import keras
from .runtime import Runtime

__version__ = _native.__version__

__all__ = ["Runtime", "datasets", "keras", "__version__"]
