"""What machine a result was measured on: CPU model, cores and the flags that matter."""

from __future__ import annotations

import os
from pathlib import Path

# Instruction sets that change inference and training speed (and INT8/BF16 paths).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """``"<model>; <n> cores; flags: avx2, ..."`` from ``/proc/cpuinfo`` (Linux)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = ", ".join(f for f in NOTABLE_FLAGS if f in flags) or "none of note"
    text = f"{model}; {len(os.sched_getaffinity(0))} cores; flags: {shown}"
    caps = [f"{name}={value}" for name, value in isa_caps().items()]
    return text + (f"; capped: {', '.join(caps)}" if caps else "")


# Environment variables that hold PyTorch's kernels below the CPU's own instruction set
# (how the AVX2 code paths are run on a newer CPU); DNNL_ is oneDNN's older spelling.
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in the environment, by variable name."""
    return {name: os.environ[name] for name in ISA_CAP_VARIABLES if os.environ.get(name)}
