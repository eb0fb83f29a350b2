"""Writing what a map found: map files (windows.csv, regions.json, rois.json), figures,
clustering files and the HTML report.

Layer 8 of the data flow; may import ``util`` to ``evaluation``.
"""
