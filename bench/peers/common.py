"""Fashion-MNIST loader shared by the peer scripts: the IDX .gz files, pixels/255 as float32."""
import gzip
import os
import struct

import numpy as np


def load(data_dir):
    def read(name):
        p = os.path.join(data_dir, name)
        opener = gzip.open if p.endswith(".gz") else open
        with opener(p, "rb") as f:
            b = f.read()
        nd = b[3]
        dims = struct.unpack(">" + "I" * nd, b[4 : 4 + 4 * nd])
        return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)

    xtr = read("train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    ytr = read("train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = read("t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    yte = read("t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return xtr, ytr, xte, yte
