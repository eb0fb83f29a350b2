"""PyTorch only, imported lazily: the VGG-16 defect network, its checkpoints, the device and
autocast choice.

Layer 4 of the data flow; may import ``util``, ``io``, ``tiling``, ``artifacts``.
"""
