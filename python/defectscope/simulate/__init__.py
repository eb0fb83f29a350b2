"""Simulated STEM frames with known defects: specimens (ASE), defects, incoherent and
multislice renderers, the instrument, datasets with truth, and the small synthetic lattices
tests and benchmarks use.

Layer 9 of the data flow; may import ``util`` to ``outputs``.
"""
