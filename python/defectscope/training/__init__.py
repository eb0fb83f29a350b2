"""Training in PyTorch: the training configuration and augmentation (both importable without
PyTorch), the training loop and density fitting.

Layer 10 of the data flow; may import ``util`` to ``simulate``.
"""
