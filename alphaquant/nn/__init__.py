from .quant_embedding import QuantEmbedding, TiedQuantLinear
from .quant_linear import QuantLinear

__all__ = ["QuantEmbedding", "QuantLinear", "TiedQuantLinear"]
