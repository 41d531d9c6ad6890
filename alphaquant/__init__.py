"""AlphaQuant: low-bit quantization for PyTorch with real packed storage and native kernels."""
from . import ops  # noqa: F401  (loads the native library and registers the ops)
from ._logging import logger  # noqa: F401
from .formats import ALL_FORMATS, CODEBOOK_FORMATS, FLOAT_FORMATS, INT_FORMATS  # noqa: F401

__version__ = "0.1.0"
