"""Load and check an FP32 ONNX image classifier, and convert it to PyTorch with onnx2torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ModelError

NHWC = "NHWC"
NCHW = "NCHW"
IMAGE_HW = (32, 32)
CHANNELS = 3


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str  # NHWC or NCHW
    batch_size: int | None  # None when the batch dimension is dynamic

    @property
    def shape_text(self) -> str:
        n = "N" if self.batch_size is None else str(self.batch_size)
        return f"[{n},32,32,3]" if self.layout == NHWC else f"[{n},3,32,32]"


@dataclass(frozen=True)
class OnnxClassifier:
    path: Path
    proto: "object"  # onnx.ModelProto; typed loosely so importing this module stays cheap
    input: InputSpec
    output_name: str
    sha256: str
    size_bytes: int


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _dims(value_info) -> list[int | None]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    return dims


def read_input_spec(proto, path: Path) -> InputSpec:
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs; ptqflow needs a classifier with one image input")
    value_info = inputs[0]
    if value_info.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise ModelError(f"{path}: input '{value_info.name}' must be float32 for an FP32 classifier")
    dims = _dims(value_info)
    if len(dims) != 4:
        raise ModelError(f"{path}: input '{value_info.name}' has rank {len(dims)}; expected an image batch "
                         "[N,32,32,3] (NHWC) or [N,3,32,32] (NCHW)")
    batch, *rest = dims
    if rest == [32, 32, 3]:
        layout = NHWC
    elif rest == [3, 32, 32]:
        layout = NCHW
    else:
        shown = ",".join("?" if d is None else str(d) for d in dims)
        raise ModelError(f"{path}: input '{value_info.name}' is [{shown}]; ptqflow handles 32x32 RGB images, "
                         "[N,32,32,3] (NHWC) or [N,3,32,32] (NCHW)")
    return InputSpec(name=value_info.name, layout=layout, batch_size=batch)


def load_classifier(path: Path | str) -> OnnxClassifier:
    """Parse, check and describe the model; any problem is one ModelError line."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} not found: put the ONNX model there or pass --model")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on damage
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                         "pass an .onnx file exported from your framework") from exc
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} fails the ONNX checker: {first_line}") from exc
    if len(proto.graph.output) != 1:
        raise ModelError(f"{path} has {len(proto.graph.output)} outputs; expected one class-score output")
    return OnnxClassifier(
        path=path,
        proto=proto,
        input=read_input_spec(proto, path),
        output_name=proto.graph.output[0].name,
        sha256=file_sha256(path),
        size_bytes=path.stat().st_size,
    )


def to_torch(model: OnnxClassifier):
    """onnx2torch conversion; returns an eval-mode torch.fx.GraphModule."""
    import onnx2torch

    try:
        module = onnx2torch.convert(model.proto)
    except Exception as exc:
        raise ModelError(f"onnx2torch cannot convert {model.path}: {exc}") from exc
    return module.eval()
