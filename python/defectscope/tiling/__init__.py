"""Cutting frames into windows: the C++ extension ``defectscope._tiling`` (zero-copy strided
tiling and z-score normalization), its numpy reference, window origins and
``patches_to_inputs``.

Layer 2 of the data flow; may import ``util``, ``io``.
"""
