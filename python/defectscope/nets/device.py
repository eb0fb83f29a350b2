"""Device."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from defectscope.util.system import isa_caps


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX).

    A cap on oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA``, as set to run the
    AVX2 code paths on a newer CPU) without BF16 or AMX counts as no bf16: oneDNN
    would emulate it, far slower than fp32.
    """
    caps = isa_caps()
    cap = caps.get("ONEDNN_MAX_CPU_ISA", caps.get("DNNL_MAX_CPU_ISA", "")).upper()
    if cap and cap not in ("ALL", "DEFAULT") and not any(k in cap for k in ("BF16", "AMX")):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_device(device: str = "auto") -> torch.device:
    """The device ``auto``, ``cpu`` or ``cuda`` names here (auto: a CUDA GPU if any)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: PyTorch sees no CUDA GPU here")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def device_name(device: str = "auto") -> str:
    """``cpu``, or the name of the CUDA GPU that ``device`` trains on."""
    resolved = training_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"


def autocast_dtype(precision: str, device_type: str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on this machine's CPU (or GPU), or None for fp32.

    ``auto`` is bf16 where the hardware has native bf16 arithmetic: CPUs with AVX-512
    BF16 or AMX, CUDA GPUs that support it (Ampere and later).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "fp32":
        return None
    # Emulated bf16 (pre-Ampere GPUs) is slower than fp32: native only.
    native = (
        torch.cuda.is_bf16_supported(including_emulation=False)
        if device_type == "cuda"
        else cpu_has_bf16()
    )
    if precision == "bf16" or native:
        return torch.bfloat16
    return None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
