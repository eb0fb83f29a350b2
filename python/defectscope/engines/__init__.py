"""Running a model on batches of windows: the Engine interface and its ONNX Runtime, TensorRT
and PyTorch implementations, and the dense (one trunk pass per frame) engines. Importing
this package needs no PyTorch; the PyTorch engine imports ``nets`` when it is built.

Layer 5 of the data flow; may import ``util``, ``io``, ``tiling``, ``artifacts``, ``nets``
(lazily).
"""
