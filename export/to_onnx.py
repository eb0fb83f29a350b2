"""Export a model directory to ONNX (and optionally static INT8).

Same as ``defectscope export MODEL_DIR --format onnx [--int8 --calib DATA]``::

    python export/to_onnx.py runs/cdte/model --int8 --calib "path/to/DataSet_CdTe"
"""

import sys

from defectscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:], "--format", "onnx"]))
