"""Cutting frames into windows: the C++ extension ``defectscope._tiling`` (zero-copy strided
tiling and z-score normalization), its numpy reference, window origins and
``patches_to_inputs``; lattice periods from power spectra (``lattice``) and resampling a
frame to a model's scale (``resample``).

Layer 2 of the data flow; may import ``util``, ``io``.
"""
