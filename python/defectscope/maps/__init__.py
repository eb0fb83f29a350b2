"""From a frame to results: ``MapResult``, regions, the ``Detector``, ROI ranking with the
unknown policy, and clustering of embeddings.

Layer 6 of the data flow; may import everything below: ``util`` to ``engines``.
"""
