"""Shared fixtures: the repository's Fashion-MNIST and the `qmomentum` command line."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "data" / "fashion-mnist"


def cli_path():
    """The `qmomentum` binary: $QMOMENTUM_CLI, then the release build of $CARGO_TARGET_DIR or of
    the repository's target/, then PATH."""
    cands = []
    if os.environ.get("QMOMENTUM_CLI"):
        cands.append(Path(os.environ["QMOMENTUM_CLI"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "qmomentum")
    cands.append(REPO / "target" / "release" / "qmomentum")
    for c in cands:
        if c.is_file():
            return str(c)
    return shutil.which("qmomentum")


@pytest.fixture(scope="session")
def cli():
    p = cli_path()
    if p is None:
        if os.environ.get("CI"):
            pytest.fail("the qmomentum binary is needed (cargo build --release -p qmomentum-cli)")
        pytest.skip("no qmomentum binary (set QMOMENTUM_CLI)")
    return p


@pytest.fixture(scope="session")
def fmnist():
    from qmomentum.datasets import fashion_mnist

    (x, y), (xt, yt) = fashion_mnist.load_data(DATA)
    return x.reshape(-1, 784), y, xt.reshape(-1, 784), yt


def mlp(keras, quant=None):
    return keras.Sequential(
        [
            keras.layers.Dense(128, activation="relu", input_shape=(784,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        quant=quant,
    )


@pytest.fixture
def small(fmnist):
    """2,048 training and 1,000 test samples."""
    x, y, xt, yt = fmnist
    return x[:2048], y[:2048], xt[:1000], yt[:1000]


np.set_printoptions(precision=4)
