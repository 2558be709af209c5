"""onnx2torch converters for the op versions newer than onnx2torch 1.5.15 knows, and for GlobalMaxPool.

onnx2torch looks a converter up by the version of the op's schema at the model's opset, and has none past the
version it was written for: a plain `torch.onnx.export` at opset 18 failed at its first Pad ("Converter is not
implemented (... 'Pad', version=18)"), at 19 at Reshape, at 22 at Conv. Most later versions only add tensor types
(bfloat16, float8, int4) or an input or attribute that a classifier's export leaves out. `register` maps each such
version to the converter of the newest version onnx2torch has, behind a check that the node uses nothing that
version lacks: an input past the old schema's, or an attribute the old schema lacks set to other than its default.
A node that does gets onnx2torch's own "not implemented" error, naming what it uses."""

from __future__ import annotations

import functools

import torch
from torch import nn

# (op, attribute) values the old converters compute like their default: AveragePool-19's dilations of 1
_NEUTRAL = {("AveragePool", "dilations"): lambda value: all(int(d) == 1 for d in value)}


def register() -> None:
    """Add a converter for every newer version of an op onnx2torch converts (its own converters stay), and one
    for GlobalMaxPool."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

    newest: dict[str, int] = {}
    for description in list(_CONVERTER_REGISTRY):
        if description.domain in ("", "ai.onnx"):
            newest[description.operation_type] = max(newest.get(description.operation_type, 0), description.version)
    top = defs.onnx_opset_version()
    for operation, known in newest.items():
        converter = _CONVERTER_REGISTRY[OperationDescription(defs.ONNX_DOMAIN, operation, known)]
        for opset in range(known + 1, top + 1):
            version = defs.get_schema(operation, max_inclusive_version=opset).since_version
            if OperationDescription(defs.ONNX_DOMAIN, operation, version) not in _CONVERTER_REGISTRY:
                add_converter(operation_type=operation, version=version)(
                    functools.partial(_checked, converter=converter, known=known, version=version))
    for version in (1, 22):
        if OperationDescription(defs.ONNX_DOMAIN, "GlobalMaxPool", version) not in _CONVERTER_REGISTRY:
            add_converter(operation_type="GlobalMaxPool", version=version)(_global_max_pool)


def _checked(node, graph, *, converter, known: int, version: int):
    """`converter` (for version `known` of the node's op) when the node uses nothing version `known` lacks."""
    from onnx import defs, helper

    operation = node.operation_type
    old = defs.get_schema(operation, max_inclusive_version=known)
    new = defs.get_schema(operation, max_inclusive_version=version)
    used_inputs = [name for name in node.proto.input]
    while used_inputs and not used_inputs[-1]:
        used_inputs.pop()
    if len(used_inputs) > old.max_input:
        extra = [spec.name for spec in new.inputs[old.max_input:len(used_inputs)]]
        raise NotImplementedError(f"{operation}-{version} with input {', '.join(extra)} (onnx2torch converts it "
                                  f"as {operation}-{known}, which has no such input)")
    for attribute in node.proto.attribute:
        if attribute.name in old.attributes:
            continue
        value = helper.get_attribute_value(attribute)
        schema = new.attributes.get(attribute.name)
        default = (helper.get_attribute_value(schema.default_value)
                   if schema is not None and schema.default_value.name else None)
        neutral = _NEUTRAL.get((operation, attribute.name), lambda v: False)
        if value != default and not neutral(value):
            raise NotImplementedError(f"{operation}-{version} with {attribute.name}={value!r} (onnx2torch converts "
                                      f"it as {operation}-{known}, which has no such attribute)")
    return converter(node, graph)


def _global_max_pool(node, graph):
    """GlobalMaxPool as the maximum over every spatial position: AdaptiveMaxPool2d for an input known to be 4-D
    (which FX quantizes like the other pools), else the maximum over every axis after the channels."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    name = node.input_values[0]
    info = graph.value_info.get(name) or next((v for v in graph.proto.input if v.name == name), None)
    rank = len(info.type.tensor_type.shape.dim) if info is not None and info.type.HasField("tensor_type") else 0
    module = nn.AdaptiveMaxPool2d(1) if rank == 4 else GlobalMax()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class GlobalMax(nn.Module):
    """The maximum over every axis after the channels (GlobalMaxPool of any rank)."""

    def forward(self, x):
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)
