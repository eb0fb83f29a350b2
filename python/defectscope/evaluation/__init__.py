"""Scoring without a framework: classification metrics and calibration, random and grouped
splits, crop grouping and provenance of patches in a frame.

Layer 7 of the data flow; may import ``util`` to ``maps``.
"""
