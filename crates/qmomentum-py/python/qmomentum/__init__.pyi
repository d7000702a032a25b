from . import datasets as datasets
from . import keras as keras
from .runtime import Runtime as Runtime

__version__: str
