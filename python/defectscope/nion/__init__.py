"""The closed loop with Nion Swift: acquire, map, steer the probe.

Layer 14 of the data flow; may import ``util`` to ``service``.
"""
