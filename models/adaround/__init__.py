"""AdaRound: weight rounding optimised before quantization, for ONNX models and the torch graphs made from them.

Main entry point: :func:`ptqflow.models.adaround.onnx.adaround_onnx` -- AdaRound (Nagel et al. 2020) layer-wise
rounding optimisation of every Conv / MatMul / Gemm weight of an ONNX model, computed with torch on the onnx2torch
conversion and written back into the ONNX initializers as FP32 values that lie *exactly* on the target int8 grid.
A later quantizer with the matching scheme (per-channel symmetric int8 for onnxruntime per_channel=True / torch
``PerChannelMinMaxObserver(qint8, per_channel_symmetric, quant_min=-127, quant_max=127)``; per-tensor asymmetric
uint8 for onnxruntime QUInt8 weights) then reproduces the optimised integers bit-exactly, so the same corrected FP32
ONNX file improves both the onnxruntime and the torch.ao FX variants.

Schemes (``scheme=``):
* ``"per_channel_sym_int8"``: scale_c = max|w_c| / 127, q in [-127, 127]
  (the channel's max-|w| element is kept fixed so re-quantization finds the same scale).
* ``"per_tensor_asym_uint8"``: onnxruntime's uint8 MinMax weight quantization,
  rmin = min(w, 0), rmax = max(w, 0), scale = (rmax - rmin) / 255,
  zp = round(-rmin / scale); min and max elements are snapped to q=0 / q=255.
* ``"per_tensor_sym_int8"``: scale = max|w| / 127.

Modules, bottom first: ``grids`` (the schemes' grids, :func:`~ptqflow.models.adaround.grids.quantize_weights_like`:
plain round-to-nearest snapping onto a scheme's grid), ``quadratic`` (a layer's output and the quadratic form of its
reconstruction error), ``optimize`` (one layer's rounding problem and its optimisation), ``walk`` (the whole torch
model, layer by layer) and ``onnx`` (ONNX models in and out).
"""
