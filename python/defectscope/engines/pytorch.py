"""Pytorch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from defectscope.artifacts.metadata import (
    META_FILE,
    ArtifactMetadata,
)
from defectscope.engines.base import Engine, EngineError


class TorchEngine(Engine):
    """PyTorch on the CPU (bf16 autocast optional) or CUDA; needs the ``train`` extra.

    Thread counts are left to the process (``torch.set_num_threads`` is global
    state, which a library constructor must not change).
    """

    name = "torch"

    def __init__(self, model_dir: str | os.PathLike, precision: str = "fp32"):
        try:
            import torch
        except ImportError as exc:
            raise EngineError(
                f"{model_dir}: running a model directory needs PyTorch (pip install "
                "'defectscope[train]'); or export it to ONNX and load model.onnx"
            ) from exc
        from defectscope.nets.checkpoint import load_checkpoint
        from defectscope.nets.device import autocast_dtype

        model, _, record = load_checkpoint(model_dir)
        metadata = ArtifactMetadata.from_record(record, str(Path(model_dir) / META_FILE))
        # load_checkpoint refused a model.json written for other weights; the hash here is
        # of the weights loaded.
        super().__init__(**self.fields_of(metadata))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.precision = precision
        self._autocast = autocast_dtype(precision) if self.device.type == "cpu" else None

    @property
    def precision_used(self) -> str:
        """``bf16`` when this engine runs under bf16 autocast, else ``fp32``."""
        return "bf16" if self._autocast is not None else "fp32"

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        dtype = self._autocast
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            with torch.autocast(
                self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
            ):
                logits, embedding = self.model.forward_with_embedding(x)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
        return probabilities.cpu().numpy(), embedding.float().cpu().numpy()
