"""The share of a model's multiply-accumulates (MACs) a backend config runs in 8-bit integer arithmetic.

Read from the config and the FP32 model it quantizes (its layer table, ptqflow.models.graph.layer_map): a layer runs
in 8 bits unless the config keeps it in FP32 (the float classifier head, `fp32_nodes` / `fp32_modules`, which is how
a `-mixed` variant's upgraded layers are made, and the convolutions an onnxruntime config's speed check keeps in
FP32, and those an FX config's speed check keeps, passed in) or feeds it a 16-bit activation (`activation_16bit_tensors`). Both
backends quantize every other Conv, Gemm and MatMul, so the share is what the recipe runs, without running it.
"""

from __future__ import annotations

import math

import onnx

from ptqflow.models.graph.layer_map import activation_inputs, layer_table, node_for_name

SHARE_DECIMALS = 4  # as recorded: truncated, so a model with any layer out of 8 bits never reads as 1


class MacTable:
    """One FP32 model's layers and MACs, asked for the 8-bit share of any number of configs."""

    def __init__(self, model: onnx.ModelProto):
        from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes

        self.model = model
        self.layers = layer_table(model)
        self.total = sum(layer.macs for layer in self.layers)
        self.node_names = [node.name for node in model.graph.node]
        self.inputs = activation_inputs(model, self.layers)
        try:
            self.head = set(onnx_classifier_head_nodes(model))
        except ValueError:  # an unnamed head node: the backends refuse to quantize such a model anyway
            self.head = None

    def share(self, config, float_layers=()) -> float | None:
        """The share of MACs `config` (PytorchFxConfig or OrtStaticConfig) runs in 8-bit integers, truncated to
        SHARE_DECIMALS; None when the model's MACs or its head are unknown. `float_layers`: layers (ONNX node or FX
        module names) the backend keeps in FP32 beyond what the config names (an FX speed check's)."""
        if not self.total or (getattr(config, "float_head", False) and self.head is None):
            return None
        from ptqflow.models.backends.ort import OrtStaticConfig
        from ptqflow.models.backends.speed_check import slow_int8_layers

        slow = slow_int8_layers(self.model, config) if isinstance(config, OrtStaticConfig) else []  # onnxruntime's
        named = (tuple(getattr(config, "fp32_nodes", ())) + tuple(getattr(config, "fp32_modules", ()))
                 + tuple(layer.node for layer in slow) + tuple(float_layers))
        fp32 = {name if name in self.node_names else node_for_name(name, self.node_names) for name in named}
        if getattr(config, "float_head", False):
            fp32 |= self.head
        wide = set(getattr(config, "activation_16bit_tensors", ()))
        not_8bit = sum(layer.macs for layer in self.layers
                       if layer.name in fp32 or wide.intersection(self.inputs[layer.name]))
        scale = 10 ** SHARE_DECIMALS
        return math.floor(scale * (self.total - not_8bit) / self.total) / scale
