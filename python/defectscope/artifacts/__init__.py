"""What a trained model is on disk, without any framework: ``model.json``/ONNX metadata
(classes, normalization, temperature, calibration) and the feature density fitted on its
embeddings.

Layer 3 of the data flow; may import ``util``, ``io``, ``tiling``.
"""
