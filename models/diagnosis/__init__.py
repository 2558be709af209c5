"""Per-layer diagnosis of a quantized model: where does quantization lose the signal, and what would help.

Each row is one layer of the FP32 ONNX model (ptqflow.models.graph.layer_map: a Conv/Gemm/MatMul or residual Add
with the Relu fused into it), named by its ONNX node, with

- `mac_share`: the layer's share of the model's multiply-accumulates (ONNX shape inference);
- `weight_sqnr_db`: FP32 weights vs the quantized model's (dequantized) weights;
- `local_sqnr_db`: this layer's quantization alone: the quantized layer fed the FP32 model's own input to it,
  against the FP32 layer's output;
- `accumulated_sqnr_db`: the FP32 model vs the quantized model at the layer's output tensor, every error upstream
  included;
- `input_range_ratio` / `outlier_channel`: how far the largest channel of the layer's input (max |x| per channel
  over the images) is above the median channel, the sign that one channel sets a per-tensor activation scale;
- `hint`: one line on what to try when the layer is bad (see `records.hint_for`).

SQNR is 20 log10(||x|| / ||x - y||) over all images (the definition of torch.ao.ns.fx.utils.compute_sqnr and of
onnxruntime's compute_signal_to_quantization_noice_ratio), accumulated batch by batch so memory stays bounded.

The libraries' own tools do the matching and logging:

- PyTorch FX (`fx.diagnose_fx`): `torch.ao.ns._numeric_suite_fx` `extract_weights` (weights), `add_loggers`
  (accumulated) and `add_shadow_loggers` (local: each quantized layer shadows the FP32 one on its input);
- onnxruntime QDQ (`ort.diagnose_ort`): `onnxruntime.quantization.qdq_loss_debug`
  `modify_model_output_intermediate_tensors` on both models, their intermediate tensors collected as
  `collect_activations` collects them (one session per model, run batch by batch), `create_activation_matching`
  (accumulated), `create_weight_matching` (weights); local: each layer's Q/DQ subgraph of the QDQ model, run on the
  FP32 model's activations. QOperator models have no Q/DQ pairs to match, so `ort.diagnose_ort_config` diagnoses their
  QDQ twin (the same config with quant_format QDQ) and says so in `Diagnosis.method`.

The reference is the FP32 model the quantizer started from before AdaRound (equalized when the config equalizes:
equalization keeps the model's function but rescales its channels, so tensors compare only against the equalized
model). Nothing here logs anywhere; ptqflow.pipelines.repair.diagnose does.

Modules: `records` (the rows, the table, thresholds and hints), `sqnr` (SQNR accumulated batch by batch),
`activations` (an ONNX model's float activations batch by batch, input channel ranges), `ort` (onnxruntime) and `fx`
(PyTorch FX).
"""
