"""Run a model file with its own runtime: an onnxruntime session or a TorchScript module.

Both expose `predict(batch) -> np.ndarray` on model-ready float32 input, so evaluation and benchmarking do not
care which framework produced a variant.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path

import numpy as np

from ptqflow.models.runtime import allocator

# torch deprecates TorchScript and quantized tensors, and ptqflow's int8 models are TorchScript files with quantized
# weights: loading one prints notices a user of ptqflow cannot act on. Only these messages are silenced.
JIT_DEPRECATION = r"`torch\.jit\.[a-z_]+` is deprecated"
QUANTIZED_TENSOR_DEPRECATION = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OrtRunner:
    def __init__(self, model: Path | bytes, threads: int | None = None, optimized_copy: Path | None = None):
        """`optimized_copy`: where onnxruntime writes the graph this session runs, after its graph optimizations
        (for this machine only: it may hold CPU-specific ops)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the quantizer's shape warnings are noise to users
        if optimized_copy is not None:
            options.optimized_model_filepath = str(optimized_copy)
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def set_quantized_engine(engine: str | None) -> None:
    """Make `engine` (fbgemm, x86, ...) torch's quantized engine for this process. TorchScript int8 modules repack
    their weights for the engine that is current when they are loaded, so it must be set before `torch.jit.load`,
    and kept while they run. None leaves the engine as it is."""
    if not engine:
        return
    import torch

    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantized engine {engine!r} is not available here "
                         f"(supported: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine


@cache
def _consume_quantized_tensor_notice() -> None:
    """torch warns once per process, from C++, that quantized tensors are deprecated. Raised inside `torch.jit.load`
    the warning never reaches Python's warnings module (the loader runs without torch's Python warning handler):
    c10 prints it straight to stderr, and its only switch, TORCH_CPP_LOG_LEVEL, is read once when torch is imported
    and would hide every other C++ warning too. So one quantized tensor is created from Python first: the once-only
    warning fires there, as a Python UserWarning that is ignored by its message, and later loads print nothing."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUANTIZED_TENSOR_DEPRECATION, category=UserWarning)
        try:
            torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
        except RuntimeError:  # a torch without quantized CPU kernels: nothing to consume, loading fails on its own
            pass


class TorchRunner:
    def __init__(self, module, engine: str | None = None):
        import torch

        allocator.reuse_freed_memory()  # a torch batch's activations are large: keep them for the next call
        self._torch = torch
        self.engine = engine
        self.module = module.eval()

    @classmethod
    def from_torchscript(cls, path: Path, engine: str | None = None) -> "TorchRunner":
        """Load a TorchScript file under `engine` (the one it was quantized for; None: the current engine)."""
        import torch

        set_quantized_engine(engine)
        _consume_quantized_tensor_notice()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        return cls(module, engine)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        set_quantized_engine(self.engine)  # another runner in this process may have switched it
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(batch))
        return out.float().numpy() if not out.is_quantized else out.dequantize().numpy()


def load_runner(path: Path, threads: int | None = None, engine: str | None = None):
    """Pick the runtime by file type: .onnx → onnxruntime (with `threads`), anything else → TorchScript loaded under
    its quantized `engine`."""
    return OrtRunner(path, threads) if path.suffix == ".onnx" else TorchRunner.from_torchscript(path, engine)
