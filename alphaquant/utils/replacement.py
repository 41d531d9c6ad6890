"""Import path of the quantizer registry named in the original documentation; the registry
itself lives in alphaquant.quantizers.registry."""
from ..quantizers.registry import (FLOAT_NAMES, QUANTIZER_REGISTRY, create_quantizer_from_scheme,  # noqa: F401
                                   lookup, register_quantizer)
