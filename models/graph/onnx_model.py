"""Load and check an FP32 ONNX image classifier, and convert it to PyTorch with onnx2torch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ptqflow.common.errors import ModelError, first_line
from ptqflow.common.files import file_sha256

NHWC = "NHWC"
NCHW = "NCHW"
IMAGE_CHANNELS = (1, 3)  # greyscale or RGB


@dataclass(frozen=True)
class InputSpec:
    """The model's image input as its shape declares it. `layout` is None when the shape does not tell NHWC from
    NCHW (both candidate channel dimensions are 1 or 3, or neither is fixed); the caller then decides
    (with_layout). Height, width and channels are None where the shape leaves them dynamic."""

    name: str
    layout: str | None  # NHWC or NCHW
    batch_size: int | None  # None when the batch dimension is dynamic
    dims: tuple[int | None, ...]  # the three non-batch dimensions as declared (None: dynamic)

    def with_layout(self, layout: str) -> "InputSpec":
        return replace(self, layout=layout)

    @property
    def channels(self) -> int | None:
        return None if self.layout is None else self.dims[2] if self.layout == NHWC else self.dims[0]

    @property
    def height(self) -> int | None:
        return None if self.layout is None else self.dims[0] if self.layout == NHWC else self.dims[1]

    @property
    def width(self) -> int | None:
        return None if self.layout is None else self.dims[1] if self.layout == NHWC else self.dims[2]

    @property
    def shape_text(self) -> str:
        n = "N" if self.batch_size is None else str(self.batch_size)
        return "[" + ",".join([n, *("?" if d is None else str(d) for d in self.dims)]) + "]"


@dataclass(frozen=True)
class OnnxClassifier:
    path: Path
    proto: "object"  # onnx.ModelProto; typed loosely so importing this module stays cheap
    input: InputSpec
    output_name: str
    sha256: str  # of the .onnx file and, when it has any, its external data files
    size_bytes: int
    external_files: tuple[Path, ...] = ()  # external data files, relative to the model's folder


def model_sha256(path: Path, external_files: tuple[Path, ...] = ()) -> str:
    """The .onnx file's SHA-256, or, for a model with external data, one SHA-256 over the .onnx file and each data
    file (by relative name), so a changed weights file gives a different digest too."""
    if not external_files:
        return file_sha256(path)
    sha = hashlib.sha256(file_sha256(path).encode())
    for relative in sorted(external_files):
        sha.update(f"\0{relative.as_posix()}\0{file_sha256(path.parent / relative)}".encode())
    return sha.hexdigest()


def graph_digest(proto) -> str:
    """SHA-256 of what an ONNX model computes, blind to names and to the order its independent nodes are stored in:
    each value is named by how it is made (a graph input by position and type, an initializer by its content, a
    node's output by the node's op, domain, attributes and the values it reads, recursively), and the digest is that
    of the opsets and the graph outputs' values. Two models with one digest run the same ops on the same constants
    for every output, so one runtime gives them the same outputs. Names inside subgraphs only make digests differ.
    A node with subgraphs (If, Loop, Scan) also hashes the values its subgraphs read from the outer scope, by how
    they are made, and the model-local functions (their whole protos) are part of the digest: both decide what the
    graph computes without appearing in a node's own inputs."""
    graph = proto.graph
    source: dict[str, str] = {}
    for tensor in list(graph.initializer) + [s.values for s in graph.sparse_initializer]:
        source[tensor.name] = "const:" + _tensor_sha256(tensor)
    for position, value in enumerate(v for v in graph.input if v.name not in source):
        source[value.name] = "input:" + hashlib.sha256(f"{position}:".encode() + value.type.SerializeToString()
                                                       ).hexdigest()
    for node in graph.node:  # stored in topological order, as ONNX requires
        sha = hashlib.sha256(f"{node.domain}:{node.op_type}".encode())
        for attribute in sorted(node.attribute, key=lambda a: a.name):
            sha.update(attribute.SerializeToString())
        sha.update(repr([source.get(name, f"name:{name}") if name else "" for name in node.input]).encode())
        outer = sorted(_outer_scope_reads(node))  # named in the subgraph: hashed with their names
        sha.update(repr([(name, source.get(name, f"name:{name}")) for name in outer]).encode())
        made = sha.hexdigest()
        for slot, name in enumerate(node.output):
            if name:
                source[name] = f"node:{made}:{slot}"
    opsets = sorted((o.domain, o.version) for o in proto.opset_import)
    # Every local function, called or not (an unused one only makes digests differ), names and all.
    functions = sorted(hashlib.sha256(f.SerializeToString(deterministic=True)).hexdigest() for f in proto.functions)
    outputs = [source.get(v.name, f"name:{v.name}") for v in graph.output]
    return hashlib.sha256(repr((opsets, outputs, functions)).encode()).hexdigest()


def _outer_scope_reads(node) -> set[str]:
    """Names the subgraphs of `node` (at any depth) read without defining them: values of the enclosing graph."""
    return set().union(*(_free_names(subgraph) for subgraph in _subgraphs(node)))


def _free_names(graph) -> set[str]:
    """Names `graph` reads (its nodes, its nested subgraphs, its outputs) that it does not define itself."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} \
        | {t.values.name for t in graph.sparse_initializer}
    reads = {v.name for v in graph.output}
    for inner in graph.node:
        reads.update(name for name in inner.input if name)
        defined.update(name for name in inner.output if name)
        for subgraph in _subgraphs(inner):
            reads.update(_free_names(subgraph))
    return reads - defined


def _subgraphs(node) -> list:
    from onnx import AttributeProto

    found = []
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def _tensor_sha256(tensor) -> str:
    from onnx import numpy_helper

    from ptqflow.common.files import array_sha256

    return array_sha256(numpy_helper.to_array(tensor))


def _dims(value_info) -> list[int | None]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    return dims


def read_input_spec(proto, path: Path) -> InputSpec:
    """The image input of `proto`: rank 4, float32, with a channel dimension of 1 or 3 first (NCHW) or last (NHWC).
    The layout is NCHW when dimension 1 is 1 or 3 and dimension 3 is not, NHWC the other way round; when both or
    neither are (and one is dynamic) it is left undecided (None) for --input-layout to settle."""
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs; ptqflow needs a classifier with one image input")
    value_info = inputs[0]
    if value_info.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise ModelError(f"{path}: input '{value_info.name}' must be float32 for an FP32 classifier")
    dims = _dims(value_info)
    shown = ",".join(("N" if i == 0 else "?") if d is None else str(d) for i, d in enumerate(dims))
    if len(dims) != 4:
        raise ModelError(f"{path}: input '{value_info.name}' has rank {len(dims)} ([{shown}]); expected an image "
                         "batch [N,H,W,C] (NHWC) or [N,C,H,W] (NCHW) with 1 or 3 channels")
    batch, *rest = dims
    first, last = rest[0] in IMAGE_CHANNELS, rest[2] in IMAGE_CHANNELS
    if first != last:
        layout = NCHW if first else NHWC
    elif first or None in (rest[0], rest[2]):
        layout = None  # [N,3,32,3], or a dynamic channel dimension: --input-layout decides
    else:
        raise ModelError(f"{path}: input '{value_info.name}' is [{shown}]; ptqflow handles images with 1 or 3 "
                         "channels, [N,H,W,C] (NHWC) or [N,C,H,W] (NCHW)")
    return InputSpec(name=value_info.name, layout=layout, batch_size=batch, dims=tuple(rest))


def output_width(proto) -> int | None:
    """How many class scores the model's output holds per image (its non-batch dimensions multiplied), or None
    when the declared shape leaves one of them dynamic or declares none."""
    if len(proto.graph.output) != 1 or not proto.graph.output[0].type.tensor_type.HasField("shape"):
        return None
    dims = _dims(proto.graph.output[0])
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        return None
    width = 1
    for d in dims[1:]:
        width *= d
    return width


def _subgraph_tensors(attribute) -> Iterator:
    """Every TensorProto held by one node attribute, including those inside its subgraphs."""
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    if attribute.HasField("sparse_tensor"):
        yield attribute.sparse_tensor.values
        yield attribute.sparse_tensor.indices
    for sparse in attribute.sparse_tensors:
        yield sparse.values
        yield sparse.indices
    if attribute.HasField("g"):
        yield from _graph_tensors(attribute.g)
    for graph in attribute.graphs:
        yield from _graph_tensors(graph)


def _graph_tensors(graph) -> Iterator:
    """Every TensorProto of a GraphProto or FunctionProto: initializers, sparse initializers and node attributes,
    recursively through subgraphs (If/Loop/Scan bodies)."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from _subgraph_tensors(attribute)


def all_tensors(proto) -> Iterator:
    """Every TensorProto of a ModelProto, in its graph (with subgraphs) and its local functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _graph_tensors(function)


def _uses_external_data(tensor) -> bool:
    return tensor.data_location == 1  # onnx.TensorProto.EXTERNAL


def _one_line(text: str, limit: int = 200) -> str:
    """A location as it may be shown in a one-line message: escaped, shortened."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def check_external_data(proto, path: Path) -> None:
    """Refuse external data that lives anywhere but inside the model file's own folder, before reading any of it.

    Each external tensor's `location` is resolved (following symlinks, `..` and absolute paths) against the
    folder of `path` and must name an existing regular file inside that folder; `offset` and `length` must be
    non-negative integers within that file.
    """
    base = path.parent.resolve()
    for tensor in all_tensors(proto):
        if not _uses_external_data(tensor):
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        name = _one_line(tensor.name)
        if not location:
            raise ModelError(f"{path}: tensor {name} is stored externally but names no location; "
                             "pass a self-contained ONNX file or keep its data file next to it")
        try:
            target = (base / location).resolve()
            inside = target != base and target.is_relative_to(base)
            is_file = inside and target.is_file()
        except (OSError, ValueError, RuntimeError) as exc:  # embedded NUL, symlink loop, name too long
            raise ModelError(f"{path}: tensor {name} has an unusable external data location "
                             f"{_one_line(location)} ({type(exc).__name__})") from exc
        if not inside:
            raise ModelError(f"{path}: tensor {name} reads external data from {_one_line(location)}, which is "
                             f"outside the model's folder {base}; refusing to load it (keep external data files "
                             "next to the model, without symlinks out of its folder)")
        if not is_file:
            raise ModelError(f"{path}: external data file {_one_line(location)} of tensor {name} is missing or "
                             "not a regular file; keep the model's data files next to it")
        size = target.stat().st_size
        numbers = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is None:
                continue
            if not text.isascii() or not text.isdigit():
                raise ModelError(f"{path}: tensor {name} has external data {key} {_one_line(text)}, "
                                 "not a non-negative integer")
            numbers[key] = int(text)
        offset = numbers.get("offset", 0)
        if offset > size or offset + numbers.get("length", 0) > size:
            raise ModelError(f"{path}: tensor {name} claims bytes beyond the end of its external data file "
                             f"{_one_line(location)} ({size} bytes); the model or its data file is truncated")


def load_classifier(path: Path | str) -> OnnxClassifier:
    """Parse, check and describe the model; any problem is one ModelError line.

    External data (weights in separate files, as for models over 2 GB) is read only after every tensor's location
    was checked to stay inside the model's folder, so a hostile model cannot make ptqflow read other files.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} not found: put the ONNX model there or pass --model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on damage
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                         "pass an .onnx file exported from your framework") from exc
    check_external_data(proto, path)
    # check_external_data made sure every external tensor names a location.
    external_files = tuple(sorted({Path(entry.value) for tensor in all_tensors(proto) if _uses_external_data(tensor)
                                   for entry in tensor.external_data if entry.key == "location"}))
    if external_files:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:  # onnx's own location checks, or a file that changed under us
            raise ModelError(f"{path}: cannot load its external data ({type(exc).__name__}: "
                             f"{first_line(exc)})") from exc
        if any(_uses_external_data(tensor) for tensor in all_tensors(proto)):
            raise ModelError(f"{path} keeps sparse or function tensors in external data, which ptqflow does not "
                             "load; save the model with its data embedded")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{path} fails the ONNX checker: {first_line(exc)}") from exc
    if len(proto.graph.output) != 1:
        raise ModelError(f"{path} has {len(proto.graph.output)} outputs; expected one class-score output")
    return OnnxClassifier(
        path=path,
        proto=proto,
        input=read_input_spec(proto, path),
        output_name=proto.graph.output[0].name,
        sha256=model_sha256(path, external_files),
        size_bytes=path.stat().st_size + sum((path.parent / f).stat().st_size for f in external_files),
        external_files=external_files,
    )


def to_torch(model: OnnxClassifier):
    """onnx2torch conversion; returns an eval-mode torch.fx.GraphModule."""
    from ptqflow.models.graph.onnx2torch_import import convert

    try:
        module = convert(model.proto)
    except Exception as exc:
        raise ModelError(f"onnx2torch cannot convert {model.path}: {exc}") from exc
    return module.eval()
