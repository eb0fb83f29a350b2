"""Exporting trained models: ONNX, INT8, TensorRT engines and the dense graphs.

Layer 11 of the data flow; may import ``util`` to ``training``.
"""
