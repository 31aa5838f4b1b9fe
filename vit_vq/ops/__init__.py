"""Numerical kernels: nearest-code search and codebook statistics.

`nearest_code` is the one entry point for every nearest-code search in the package.
"""

from .nearest import LookupPrecision, Metric, NearestCodeResult, nearest_code
from .stats import codebook_statistics

__all__ = ["nearest_code", "NearestCodeResult", "codebook_statistics", "Metric", "LookupPrecision"]
