"""A stand-in for TensorRT and cuda-python that runs engines with ONNX Runtime on the CPU.

It lets the tests drive defectscope's TensorRT code (profiles, buffer sizes, shapes,
copies, tiling) where no GPU is present. "Device memory" is host memory, a "serialized
engine" is the ONNX model with its optimization profile, and execution is ONNX Runtime
in float32. It refuses what real TensorRT and CUDA refuse: an input shape outside the
profile, a tensor the network does not have, an unbound tensor, a copy past the end of a
buffer. It says nothing about TensorRT's own numerics (FP16, INT8 kernels): the GPU run
checks those.
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np
import onnxruntime as ort

HEADER = b"FAKE-TRT\n"


class FakeCudart:
    """The part of ``cuda.bindings.runtime`` defectscope calls."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.buffers: dict[int, ctypes.Array] = {}

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetErrorString(self, err):
        return 0, f"fake CUDA error {int(err)}"

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        buffer = ctypes.create_string_buffer(int(nbytes))
        address = ctypes.addressof(buffer)
        self.buffers[address] = buffer
        return 0, address

    def cudaFree(self, address):
        self.buffers.pop(address, None)
        return (0,)

    def fits(self, address: int, nbytes: int) -> bool:
        return any(
            start <= address and address + nbytes <= start + len(buffer)
            for start, buffer in self.buffers.items()
        )

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if not self.fits(int(device), int(nbytes)):
            return (1,)  # an illegal address, as CUDA would say
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (0,)


class _Network:
    onnx: bytes | None = None


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, smallest, typical, largest):
        self.shapes[name] = (tuple(smallest), tuple(typical), tuple(largest))


class _Config:
    def __init__(self):
        self.flags: set[str] = set()
        self.profiles: list[_Profile] = []

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


class _Parser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse(self, data: bytes) -> bool:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # raises if not ONNX
        self.network.onnx = bytes(data)
        return True

    def get_error(self, index):
        return ""


class _Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        (profile,) = config.profiles
        header = {"profile": profile.shapes, "flags": sorted(config.flags)}
        return HEADER + json.dumps(header).encode() + b"\n" + network.onnx


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape) -> bool:
        smallest, _, largest = self.engine.profile[name]
        shape = tuple(int(v) for v in shape)
        if len(shape) != len(smallest) or not all(
            lo <= v <= hi for lo, v, hi in zip(smallest, shape, largest, strict=True)
        ):
            return False
        self.shapes[name] = shape
        self.engine.seen_shapes.append(shape)
        return True

    def _outputs_for(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        key = tuple(sorted(shapes.items()))
        if key not in self.engine.output_shapes:
            zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
            values = self.engine.session.run(None, zeros)
            self.engine.output_shapes[key] = {
                n: v.shape for n, v in zip(self.engine.outputs, values, strict=True)
            }
        return self.engine.output_shapes[key]

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes[name]
        return self._outputs_for(self.shapes)[name]

    def set_tensor_address(self, name, address) -> bool:
        if name not in self.engine.inputs + self.engine.outputs:
            return False
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream) -> bool:
        cudart = self.engine.cudart
        feeds = {}
        for name in self.engine.inputs:
            shape = self.shapes[name]
            nbytes = int(np.prod(shape)) * 4
            if name not in self.addresses or not cudart.fits(self.addresses[name], nbytes):
                return False
            raw = (ctypes.c_char * nbytes).from_address(self.addresses[name])
            feeds[name] = np.frombuffer(raw, np.float32).reshape(shape).copy()
        values = self.engine.session.run(None, feeds)
        for name, value in zip(self.engine.outputs, values, strict=True):
            value = np.ascontiguousarray(value, np.float32)
            if name not in self.addresses or not cudart.fits(self.addresses[name], value.nbytes):
                return False
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class _Engine:
    def __init__(self, data: bytes, cudart: FakeCudart):
        header, onnx_bytes = data[len(HEADER) :].split(b"\n", 1)
        meta = json.loads(header)
        self.profile = {n: tuple(tuple(s) for s in v) for n, v in meta["profile"].items()}
        self.flags = meta["flags"]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cudart = cudart
        self.output_shapes: dict = {}
        self.seen_shapes: list[tuple] = []

    def create_execution_context(self):
        return _Context(self)


def fake_tensorrt(cudart: FakeCudart) -> types.ModuleType:
    """A ``tensorrt`` module whose engines run on ``cudart``'s host "device"."""
    module = types.ModuleType("tensorrt")
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    module.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    module.Builder = _Builder
    module.OnnxParser = _Parser
    module.engines: list[_Engine] = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            if not data.startswith(HEADER):
                return None
            engine = _Engine(data, cudart)
            module.engines.append(engine)
            return engine

    module.Runtime = Runtime
    return module
