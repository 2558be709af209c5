"""AdaRound for ONNX models: the rounded torch weights written back into the ONNX initializers (`adaround_onnx`,
`adaround_onnx_schemes`), and the classifier-head nodes onnxruntime's recipe keeps in float."""
from __future__ import annotations

import copy
from typing import List, Sequence

import numpy as np
import torch

from ptqflow.models.adaround.walk import ROUNDED_LAYERS, adaround_schemes


def replace_initializers(onnx_model, changes, biases=None) -> "onnx.ModelProto":
    """Write torch weights back into the ONNX initializers, matched by value (W or W^T). `biases` ({module name: new
    bias}, for modules of `changes`): written into the bias input of the node that reads the matched weight."""
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(onnx_model)
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {n: numpy_helper.to_array(i) for n, i in inits.items()}
    for name, (old, new) in changes.items():
        old_np, new_np = old.numpy(), new.numpy()
        matched = []
        for iname, arr in arrays.items():
            if arr.dtype != np.float32:
                continue
            if arr.shape == old_np.shape and np.array_equal(arr, old_np):
                rep = new_np
            elif arr.ndim == 2 and arr.shape == old_np.T.shape and np.array_equal(arr, old_np.T):
                rep = np.ascontiguousarray(new_np.T)
            else:
                continue
            inits[iname].CopyFrom(numpy_helper.from_array(rep.astype(np.float32), iname))
            matched.append(iname)
        if not matched:
            raise RuntimeError(f"could not find the ONNX initializer of {name}")
        if biases and name in biases:
            _replace_bias(model, inits, matched, biases[name].numpy())
    return model


def _replace_bias(model, inits, weights: List[str], bias: np.ndarray) -> None:
    """The bias initializer of the one Conv/Gemm reading one of `weights` set to `bias`; nothing written when there is
    no such initializer of its own (the layer keeps its bias uncorrected; bias_correction.corrected_bias_count counts
    what was written)."""
    from onnx import numpy_helper

    readers = [node for node in model.graph.node if node.op_type in ("Conv", "Gemm") and len(node.input) > 2
               and node.input[1] in weights and node.input[2] in inits]
    shared = readers and sum(readers[0].input[2] in node.input for node in model.graph.node) > 1
    if len(readers) != 1 or shared or inits[readers[0].input[2]].dims != list(bias.shape):
        return
    bias_name = readers[0].input[2]
    inits[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_name))


def adaround_onnx(onnx_model, calib: np.ndarray, scheme: str = "per_channel_sym_int8", *,
                  round_head: bool = True, **kw):
    """AdaRound the weights of ``onnx_model`` (onnx.ModelProto) on ``calib`` (model-input layout,
    e.g. NHWC float32 0..255); returns a new ModelProto whose Conv/MatMul/Gemm weight
    initializers lie on ``scheme``'s grid.  ``round_head=False`` leaves the classifier head's
    weights in FP32 (for backends that keep the head float: a grid only adds error there).
    kwargs go to :func:`adaround_schemes`."""
    return adaround_onnx_schemes(onnx_model, calib, [scheme], round_head=round_head, **kw)[scheme]


def adaround_onnx_schemes(onnx_model, calib: np.ndarray, schemes: Sequence[str], *, round_head: bool = True, **kw):
    """:func:`adaround_onnx` for several schemes at once (one FP32 pass, the schemes' problems solved side by side):
    returns {scheme: ModelProto}, each the same as :func:`adaround_onnx` gives for that scheme alone."""
    from ptqflow.models.graph.fx_prep import classifier_head, prepare_graph
    from ptqflow.models.graph.onnx2torch_import import convert

    gm = prepare_graph(convert(onnx_model), fold_pad=False)
    if not round_head:
        head = set(classifier_head(gm, include_pool=False))
        kw["layers"] = [name for name, m in gm.named_modules()
                        if isinstance(m, ROUNDED_LAYERS) and name not in head]
    return {scheme: replace_initializers(onnx_model, changes, _corrected_biases(gm, rounded, changes))
            for scheme, (rounded, changes) in adaround_schemes(gm, calib, schemes, **kw).items()}


def _corrected_biases(source, rounded, changes) -> dict:
    """{module name: bias} of the rounded modules whose bias bias correction changed."""
    out = {}
    for name in changes:
        before, after = source.get_submodule(name).bias, rounded.get_submodule(name).bias
        if before is not None and not torch.equal(before, after):
            out[name] = after.detach()
    return out


# --------------------------------------------------------------------------- onnxruntime recipe helpers
def onnx_classifier_head_nodes(onnx_model) -> List[str]:
    """Names of the ONNX nodes of the classifier head, to pass as ``nodes_to_exclude`` to
    ``quantize_static`` (compute them on the model actually quantized, i.e. *after*
    ``quant_pre_process``, which renames/fuses e.g. MatMul+Add -> Gemm 'MatMulAddFusion').

    Walks back from the graph outputs through Softmax/Reshape/Flatten/... to the first
    MatMul/Gemm/Conv (included) and on through the pooling / reshape nodes feeding it
    (GlobalAveragePool, AveragePool, ReduceMean, Reshape, Flatten, Squeeze, Transpose).
    Keeping these in float (weights already on the int8 grid via :func:`adaround_onnx`)
    avoids 8-bit logits (ties under argmax) and re-quantization of the pooled features.

    Raises ValueError when a head node has no name: ``nodes_to_exclude`` matches by name, and an empty name would
    exclude every unnamed node of the model (name them first with
    :func:`ptqflow.models.graph.rewrites.name_unnamed_nodes`)."""
    nodes = list(onnx_model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    compute = {"MatMul", "Gemm", "Conv"}
    passthrough = {"Softmax", "LogSoftmax", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Add",
                   "Transpose", "Cast"}
    pools = {"GlobalAveragePool", "AveragePool", "ReduceMean", "Reshape", "Flatten", "Squeeze", "Transpose"}
    out: List[str] = []
    todo = [producer[o.name] for o in onnx_model.graph.output if o.name in producer]
    seen = set()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type in compute:
            out.append(n.name)
            up = [producer[i] for i in n.input[:1] if i in producer]
            while up:
                u = up.pop()
                if u.op_type in pools:
                    out.append(u.name)
                    up.extend(producer[i] for i in u.input[:1] if i in producer)
            continue
        if n.op_type in passthrough:
            out.append(n.name)
            todo.extend(producer[i] for i in n.input if i in producer)
    if "" in out:
        raise ValueError("the classifier head has unnamed nodes, which nodes_to_exclude cannot select; "
                         "name them first (ptqflow.models.graph.rewrites.name_unnamed_nodes)")
    return out
