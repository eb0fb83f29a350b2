"""What a trained model is on disk, without any framework: ``model.json``/ONNX metadata
(classes, normalization, temperature, calibration), the feature density fitted on its
embeddings, and the weights each artifact was made from (``provenance``).

Layer 3 of the data flow; may import ``util``, ``io``, ``tiling``.
"""
