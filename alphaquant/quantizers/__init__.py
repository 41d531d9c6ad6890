"""Quantizers, their configs and observers: the public quantization API."""
from .base import BaseQuantizer, QuantizerConfig
from .codebook import CodebookConfig, CodebookQuantizer
from .fp4 import FP4Config, FP4Quantizer
from .fp8 import FP8Config, FP8Quantizer
from .int_quantizers import (
    INT2Config,
    INT2Quantizer,
    INT3Config,
    INT3Quantizer,
    INT4Config,
    INT4Quantizer,
    INT5Config,
    INT5Quantizer,
    INT6Config,
    INT6Quantizer,
    INT8Config,
    INT8Quantizer,
    IntConfig,
    IntQuantizer,
)
from .mx import (MXConfig, MXFP4Config, MXFP4Quantizer, MXFP6Config, MXFP6Quantizer, MXFP8Config, MXFP8Quantizer,
                 MXINT8Config, MXINT8Quantizer, MXQuantizer)
from .nf4 import NF4Config, NF4Quantizer
from .nvfp4 import NVFP4Config, NVFP4Quantizer
from .observers import MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, ObserverBase, PercentileObserver

__all__ = [
    "BaseQuantizer", "QuantizerConfig", "IntConfig", "IntQuantizer",
    "INT2Quantizer", "INT2Config", "INT3Quantizer", "INT3Config", "INT4Quantizer", "INT4Config",
    "INT5Quantizer", "INT5Config", "INT6Quantizer", "INT6Config",
    "INT8Quantizer", "INT8Config", "FP4Quantizer", "FP4Config", "FP8Quantizer", "FP8Config",
    "NF4Quantizer", "NF4Config", "CodebookQuantizer", "CodebookConfig",
    "MXQuantizer", "MXConfig", "MXFP4Quantizer", "MXFP4Config", "MXFP6Quantizer", "MXFP6Config",
    "MXFP8Quantizer", "MXFP8Config", "MXINT8Quantizer", "MXINT8Config", "NVFP4Quantizer", "NVFP4Config",
    "ObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
]
