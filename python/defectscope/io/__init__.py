"""Reading what the microscope wrote and writing results safely: frames from
.npy/TIFF/DM/TIA/MRC/Velox files with their calibration, patch datasets, atomic writes and
file hashes.

Layer 1 of the data flow; may import ``util``.
"""
