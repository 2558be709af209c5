"""onnx2torch converters for the reductions opset 18 changed: ReduceMean, ReduceMax, ReduceMin, ReduceProd,
ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp and ReduceSumSquare take their axes as an input instead of an
attribute. onnx2torch 1.5.15 has no converter for them, so a plain `torch.onnx.export` at opset 18 of a network whose
head pools with `x.mean((2, 3))` could not be converted at all. Constant axes only, the way onnx2torch's own
ReduceSum-13 converter reads them, into its own OnnxReduceStaticAxes module; `register` adds them once."""

from __future__ import annotations

REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSumSquare")
OPSET = 18


def register() -> None:
    """Add the opset-18 converters onnx2torch lacks (those it has stay its own)."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

    for operation in REDUCTIONS:
        if OperationDescription("", operation, OPSET) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=operation, version=OPSET)(_constant_axes)


def _constant_axes(node, graph):
    """A reduction whose axes input is a constant (or absent: every axis) as OnnxReduceStaticAxes."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    keepdims = node.attributes.get("keepdims", 1)
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(axis) for axis in get_const_value(node.input_values[1], graph).tolist()]
        except KeyError as exc:
            raise NotImplementedError(f"{node.operation_type} at opset {OPSET} with axes computed while the model "
                                      "runs: only constant axes convert") from exc
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        raise NotImplementedError(f"{node.operation_type} at opset {OPSET} with noop_with_empty_axes and no axes")
    return OperationConverterResult(torch_module=OnnxReduceStaticAxes(node.operation_type, axes or None, keepdims),
                                    onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                             outputs=node.output_values))
