"""vit_vq: discrete image tokenizers (ViT encoder; VQ, FSQ or LFQ quantizer; ViT decoder).

`import vit_vq` is light: transformers, accelerate and triton are imported only where used.
"""

__version__ = "0.2.0"

from .config import PRESETS, ViTVQConfig
from .fsq import FiniteScalarQuantizer
from .lfq import LookupFreeQuantizer
from .quantizer import QuantizerOutput, VectorQuantizer
from .tokenizer import EncodeOutput, TokenizerOutput, ViTVQTokenizer

__all__ = [
    "__version__",
    "ViTVQConfig",
    "PRESETS",
    "ViTVQTokenizer",
    "TokenizerOutput",
    "EncodeOutput",
    "VectorQuantizer",
    "FiniteScalarQuantizer",
    "LookupFreeQuantizer",
    "QuantizerOutput",
]
