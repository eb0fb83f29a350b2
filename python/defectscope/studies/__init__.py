"""Experiments over datasets: the grouped study, the main job, scoring on simulated frames.

Layer 12 of the data flow; may import ``util`` to ``export``.
"""
