"""The napari plugin (npe2 manifest ``napari.yaml``): reader, 'Find defects' widget, ROI
writer, sample data.

Layer 14 of the data flow; may import ``util`` to ``service``.
"""
