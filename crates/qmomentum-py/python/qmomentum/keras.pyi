# Type stubs of qmomentum.keras (the Keras-shaped API). See doc/from-keras.md.
from os import PathLike
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike]
_Pair = Union[int, Tuple[int, int]]
_Act = Optional[str]  # "relu" | "sigmoid" | "tanh" | "softmax" | "linear" | None
_Quant = Optional[str]  # "fp32" | "w8a8" | "int8" | "w4a8" | "w4a4" | "w2a2" | "ternary" | "binary" | "binary-all"

class Layer:
    input_shape: Optional[Tuple[int, ...]]
    name: Optional[str]
    def get_config(self) -> Dict[str, Any]: ...

class InputLayer(Layer):
    def __init__(self, shape: Optional[Sequence[int]] = ..., name: Optional[str] = ..., input_shape: Optional[Sequence[int]] = ...) -> None: ...

def Input(shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> InputLayer: ...

class Dense(Layer):
    units: int
    activation: str
    def __init__(self, units: int, activation: _Act = ..., input_shape: Optional[Sequence[int]] = ..., quant: Optional[Mapping[str, Any]] = ..., name: Optional[str] = ..., use_bias: bool = ...) -> None: ...

class Conv2D(Layer):
    def __init__(self, filters: int, kernel_size: _Pair, strides: _Pair = ..., padding: str = ..., dilation_rate: _Pair = ..., groups: int = ..., activation: _Act = ..., input_shape: Optional[Sequence[int]] = ..., quant: Optional[Mapping[str, Any]] = ..., name: Optional[str] = ...) -> None: ...

class MaxPooling2D(Layer):
    def __init__(self, pool_size: _Pair = ..., strides: Optional[_Pair] = ..., padding: str = ..., input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class AveragePooling2D(MaxPooling2D): ...
class GlobalAveragePooling2D(Layer):
    def __init__(self, input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class BatchNormalization(Layer):
    def __init__(self, momentum: float = ..., epsilon: float = ..., input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class Flatten(Layer):
    def __init__(self, input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class Dropout(Layer):
    def __init__(self, rate: float, input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class Activation(Layer):
    def __init__(self, activation: _Act, input_shape: Optional[Sequence[int]] = ..., name: Optional[str] = ...) -> None: ...

class _Layers:
    Layer = Layer
    Input = Input
    InputLayer = InputLayer
    Dense = Dense
    Conv2D = Conv2D
    MaxPooling2D = MaxPooling2D
    MaxPool2D = MaxPooling2D
    AveragePooling2D = AveragePooling2D
    AvgPool2D = AveragePooling2D
    GlobalAveragePooling2D = GlobalAveragePooling2D
    BatchNormalization = BatchNormalization
    Flatten = Flatten
    Dropout = Dropout
    Activation = Activation

layers: _Layers

class Optimizer:
    def get_config(self) -> Dict[str, Any]: ...

class SGD(Optimizer):
    learning_rate: float
    momentum: float
    nesterov: bool
    def __init__(self, learning_rate: float = ..., momentum: float = ..., nesterov: bool = ..., weight_decay: Optional[float] = ..., clipnorm: Optional[float] = ..., clipvalue: Optional[float] = ..., global_clipnorm: Optional[float] = ...) -> None: ...

class Momentum(Optimizer):
    lr: float
    momentum: float
    nesterov: bool
    convention: str
    @property
    def learning_rate(self) -> float: ...
    def __init__(self, lr: float = ..., momentum: float = ..., nesterov: bool = ..., convention: str = ..., dampening: float = ..., weight_decay: float = ..., decoupled: bool = ..., learning_rate: Optional[float] = ...) -> None: ...

class _Optimizers:
    Optimizer = Optimizer
    SGD = SGD
    Momentum = Momentum

optimizers: _Optimizers

class Callback:
    model: Optional["Sequential"]
    params: Dict[str, Any]
    def set_model(self, model: "Sequential") -> None: ...
    def set_params(self, params: Dict[str, Any]) -> None: ...
    def on_train_begin(self, logs: Optional[Dict[str, float]] = ...) -> None: ...
    def on_train_end(self, logs: Optional[Dict[str, float]] = ...) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, float]] = ...) -> None: ...
    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = ...) -> None: ...

class LambdaCallback(Callback):
    def __init__(self, on_epoch_begin: Optional[Callable[..., None]] = ..., on_epoch_end: Optional[Callable[..., None]] = ..., on_train_begin: Optional[Callable[..., None]] = ..., on_train_end: Optional[Callable[..., None]] = ...) -> None: ...

class History(Callback):
    history: Dict[str, List[float]]
    epoch: List[int]
    seconds: List[float]

class _Callbacks:
    Callback = Callback
    LambdaCallback = LambdaCallback
    History = History

callbacks: _Callbacks

class Sequential:
    name: str
    layers: List[Layer]
    quant: Optional[str]
    stop_training: bool
    history: Optional[History]
    optimizer: Optimizer
    def __init__(self, layers: Optional[Sequence[Layer]] = ..., name: Optional[str] = ..., quant: _Quant = ...) -> None: ...
    def add(self, layer: Layer) -> None: ...
    @property
    def input_shape(self) -> Tuple[Optional[int], ...]: ...
    def compile(self, optimizer: Union[Optimizer, str] = ..., loss: Any = ..., metrics: Optional[Sequence[str]] = ..., quant: _Quant = ..., seed: Optional[int] = ...) -> None: ...
    def fit(self, x: npt.ArrayLike = ..., y: npt.ArrayLike = ..., batch_size: Optional[int] = ..., epochs: int = ..., verbose: Union[int, str] = ..., callbacks: Optional[Sequence[Callback]] = ..., validation_split: float = ..., validation_data: Optional[Tuple[npt.ArrayLike, npt.ArrayLike]] = ..., shuffle: bool = ..., initial_epoch: int = ...) -> History: ...
    def evaluate(self, x: npt.ArrayLike = ..., y: npt.ArrayLike = ..., batch_size: Optional[int] = ..., verbose: Union[int, str] = ..., return_dict: bool = ...) -> Union[float, List[float], Dict[str, float]]: ...
    def predict(self, x: npt.ArrayLike, batch_size: Optional[int] = ..., verbose: Union[int, str] = ...) -> npt.NDArray[np.float32]: ...
    def quantize(self, mode: str = ..., x: Optional[npt.ArrayLike] = ..., calibration: str = ..., batches: int = ..., batch_size: int = ...) -> None: ...
    def export(self, filepath: _Path) -> int: ...
    def save(self, filepath: _Path) -> None: ...
    def get_weights(self) -> List[npt.NDArray[np.float32]]: ...
    def weight_names(self) -> List[str]: ...
    def set_weights(self, weights: Sequence[npt.ArrayLike]) -> None: ...
    def count_params(self) -> int: ...
    def summary(self, print_fn: Optional[Callable[[str], Any]] = ...) -> None: ...

def load_model(filepath: _Path) -> Sequential: ...

class _Models:
    Sequential = Sequential
    load_model = load_model

models: _Models

class _Utils:
    @staticmethod
    def set_random_seed(seed: int) -> None: ...

utils: _Utils
