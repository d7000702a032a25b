from os import PathLike
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

DATA_ENV: str
_Split = Tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]

def find_data_dir(path: Optional[Union[str, PathLike]] = ...) -> Path: ...

class _MnistFamily:
    name: str
    def load_data(self, path: Optional[Union[str, PathLike]] = ...) -> Tuple[_Split, _Split]: ...

fashion_mnist: _MnistFamily
