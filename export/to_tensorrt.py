"""Build a TensorRT engine (needs TensorRT and a CUDA GPU) from an exported ONNX model.

Same as ``defectscope export MODEL_DIR --format tensorrt --precision fp16|int8``::

    python export/to_tensorrt.py runs/cdte/model --precision fp16
"""

import sys

from defectscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:], "--format", "tensorrt"]))
