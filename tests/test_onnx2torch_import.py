"""onnx2torch imported with torchvision deferred, and FX tracing without stack traces: a classifier converts, is
quantized and diagnosed without importing torchvision or torch._dynamo (2 s of imports), and the converters that do
use torchvision still run the real one, with onnxruntime's results. Each check runs in a fresh interpreter: this
one may have imported torchvision already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_converting_quantizing_and_diagnosing_a_classifier_import_neither_torchvision_nor_dynamo(tmp_path):
    out = _run(f"""
        import sys
        sys.path.insert(0, "tests")
        from pathlib import Path
        import numpy as np, onnx
        from onnx_fixture import tiny_cnn
        from ptqflow.models.backends.base import FloatModel
        from ptqflow.models.diagnosis.fx import diagnose_fx
        from ptqflow.models.graph.onnx_model import load_classifier
        from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize
        onnx.save(tiny_cnn(), "{tmp_path}/tiny.onnx")
        model = FloatModel.for_runtimes(load_classifier("{tmp_path}/tiny.onnx"), Path("{tmp_path}"))
        model = model.for_quantization()
        images = np.random.default_rng(0).uniform(0, 255, (40, 32, 32, 3)).astype(np.float32)
        config = PytorchFxConfig(backend="x86", weight_rounding="nearest")
        quantize(model, config, images[:20], Path("{tmp_path}/out"))
        diagnosis = diagnose_fx(model, model, config, images[:20], images[20:])
        assert diagnosis.layers
        print("torchvision" in sys.modules, "torch._dynamo" in sys.modules)
    """)
    assert out.split() == ["False", "False"]


def test_roialign_and_nms_converters_run_the_real_torchvision():
    out = _run("""
        import sys
        import numpy as np, onnx, onnxruntime as ort, torch
        from onnx import TensorProto, helper
        from ptqflow.models.graph.onnx2torch_import import import_onnx2torch
        onnx2torch = import_onnx2torch()
        assert "torchvision" not in sys.modules

        roi = helper.make_graph(
            [helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], output_height=2, output_width=2,
                              sampling_ratio=2, spatial_scale=1.0, coordinate_transformation_mode="half_pixel")],
            "roi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
                    helper.make_tensor_value_info("rois", TensorProto.FLOAT, [2, 4]),
                    helper.make_tensor_value_info("batch", TensorProto.INT64, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 2, 2])])
        nms = helper.make_graph(
            [helper.make_node("NonMaxSuppression", ["boxes", "scores", "k", "iou"], ["selected"])],
            "nms", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
                    helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
            [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
            initializer=[helper.make_tensor("k", TensorProto.INT64, [1], [3]),
                         helper.make_tensor("iou", TensorProto.FLOAT, [1], [0.5])])
        rng = np.random.default_rng(0)
        feeds = {
            "roi": {"x": rng.normal(size=(1, 2, 8, 8)).astype(np.float32),
                    "rois": np.array([[0, 0, 4, 4], [1, 2, 7, 6]], np.float32), "batch": np.zeros(2, np.int64)},
            "nms": {"boxes": np.array([[[0, 0, 1, 1], [0, 0.05, 1, 1.05], [2, 2, 3, 3], [0, 0, 0.5, 0.5]]],
                                      np.float32),
                    "scores": np.array([[[0.9, 0.8, 0.7, 0.6]]], np.float32)}}
        for graph in (roi, nms):
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
            model.ir_version = 8
            expected = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"]).run(None, feeds[graph.name])[0]
            module = onnx2torch.convert(model)
            got = module(*[torch.from_numpy(v) for v in feeds[graph.name].values()])
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
        import torchvision
        print(type(torchvision).__name__, hasattr(torchvision, "__version__"), len(expected))
    """)
    # the real torchvision module after the calls, and NMS kept 3 of the 4 boxes (one overlaps the first)
    assert out.split() == ["module", "True", "3"]


def test_an_opset_18_export_with_reductions_converts_and_its_mean_head_stays_float(tmp_path):
    """torch.onnx.export at opset 18 writes ReduceMean/ReduceMax with their axes as an input, which onnx2torch
    1.5.15 cannot convert (the whole sweep stopped on such a model); ptqflow registers converters for constant axes.
    The converted module computes what onnxruntime does, and the mean that pools for the head is the head's."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from torch import nn

    from ptqflow.models.graph.fx_prep import classifier_head, prepare_graph
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.dense = nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, 4)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            features = features * features.amax(dim=1, keepdim=True).sigmoid()  # a ReduceMax on the way
            return self.dense(features.mean((2, 3)))

    path = tmp_path / "opset18.onnx"
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, 16, 16), str(path), opset_version=18, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    proto = onnx.load(str(path))
    reductions = {node.op_type: len(node.input) for node in proto.graph.node if node.op_type.startswith("Reduce")}
    assert reductions == {"ReduceMean": 2, "ReduceMax": 2}  # the opset-18 form: axes as an input
    module = import_onnx2torch().convert(proto).eval()
    images = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": images})[0]
    with torch.no_grad():
        assert np.allclose(module(torch.from_numpy(images)).numpy(), expected, atol=1e-5)
    gm = prepare_graph(module)
    assert any(getattr(gm.get_submodule(name), "fn", None) is torch.mean for name in classifier_head(gm))
