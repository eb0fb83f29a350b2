"""Serving maps: the ZeroMQ service and its client, the live detector, batch mapping of
archives on Dask.

Layer 13 of the data flow; may import ``util`` to ``studies``.
"""
