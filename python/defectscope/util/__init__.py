"""Process utilities every layer may use: the CPU's description and instruction-set caps, step
timing and progress.

Layer 0 of the data flow; may import nothing else of defectscope.
"""
