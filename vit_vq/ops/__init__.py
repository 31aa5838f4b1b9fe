"""Numerical kernels: nearest-code search and codebook statistics.

`nearest_code` is the one entry point for every nearest-code search in the package.
"""

from .ema import codebook_statistics
from .nearest import NearestCodeResult, nearest_code

__all__ = ["nearest_code", "NearestCodeResult", "codebook_statistics"]
