"""Data sets as numpy arrays, like ``keras.datasets``: ``fashion_mnist.load_data()``.

The files are never downloaded: the Fashion-MNIST IDX files ship in the repository
(``data/fashion-mnist/``). The folder is found as the command line finds it:

1. the ``path`` argument;
2. the ``QMOMENTUM_DATA`` environment variable;
3. ``data/fashion-mnist`` in the current folder or any folder above it;
4. the repository copy the package was built from (``pip install ./crates/qmomentum-py`` from a
   clone);
5. ``/usr/share/datasets/fashion-mnist`` (Debian's package).

The error lists every place tried.
"""

import os
from pathlib import Path

import numpy as np

from . import _native

DATA_ENV = "QMOMENTUM_DATA"
_TEST_IMAGES = "t10k-images-idx3-ubyte"


def _holds_data(d):
    return any((d / f).is_file() for f in (_TEST_IMAGES + ".gz", _TEST_IMAGES))


def find_data_dir(path=None):
    """The data folder (see the module's docstring for the order); ``path`` is taken as given."""
    if path is not None:
        return Path(path)
    tried = []
    env = os.environ.get(DATA_ENV)
    if env:
        d = Path(env)
        if _holds_data(d):
            return d
        tried.append(f"${DATA_ENV} = {d}")
    here = Path.cwd()
    candidates = [p / "data" / "fashion-mnist" for p in (here, *here.parents)]
    candidates.append(Path(_native.SOURCE_DATA_DIR).resolve())
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    for d in candidates:
        if _holds_data(d):
            return d
        tried.append(str(d))
    raise FileNotFoundError(
        "no data folder given and none found; tried: "
        + ", ".join(tried)
        + f". Pass path=DIR (a folder with train-images-idx3-ubyte[.gz], …) or set ${DATA_ENV}"
    )


def _load(path):
    d = find_data_dir(path)
    xtr, ytr, xte, yte, shape = _native.load_mnist_dir(os.fspath(d))
    # bytearrays: numpy wraps them without a copy, and the arrays are writable as Keras's are.
    x_train = np.frombuffer(xtr, dtype=np.uint8).reshape(-1, *shape)
    x_test = np.frombuffer(xte, dtype=np.uint8).reshape(-1, *shape)
    return (x_train, np.frombuffer(ytr, dtype=np.uint8)), (x_test, np.frombuffer(yte, dtype=np.uint8))


class _MnistFamily:
    """``load_data(path=None)`` → ``(x_train, y_train), (x_test, y_test)``: uint8 images of shape
    ``(n, 28, 28)`` and uint8 labels of shape ``(n,)``, as ``keras.datasets.*.load_data()``."""

    def __init__(self, name):
        self.name = name

    def load_data(self, path=None):
        """Load the training and test sets (``path``: a folder in the MNIST IDX layout)."""
        return _load(path)


fashion_mnist = _MnistFamily("fashion_mnist")
"""Fashion-MNIST (Xiao et al. 2017, MIT): 60,000 + 10,000 28×28 grey images, 10 classes."""

__all__ = ["fashion_mnist", "find_data_dir", "DATA_ENV"]
