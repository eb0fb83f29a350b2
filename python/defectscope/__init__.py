"""defectscope: find defects in atomic-resolution STEM images, fast."""

from defectscope.tiling import Normalization, tile, window_origins

__version__ = "0.1.0"
__all__ = ["Normalization", "__version__", "tile", "window_origins"]
