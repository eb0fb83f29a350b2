"""Simulated STEM frames with known defects: ``specimen`` (crystals via ASE, zone axes,
the cut field), ``defects`` (what to place, placing it), ``renderers`` (incoherent and
multislice), ``instrument`` (scan distortions and noise), ``dataset`` (settings, frames,
patches, the folder ``train`` reads), ``truth`` (reading and matching the truth), and
``lattice``, the one synthetic-lattice generator the tests, benchmarks and the Nion loop
use.

Layer 9 of the data flow; may import ``util`` to ``outputs``.
"""
