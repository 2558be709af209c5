"""The default sweep on one model of each small-classifier family (issue 24), trained here on real CIFAR-10 training
images: a MobileNetV1-style opset-11 export with a fixed batch of 1 (NHWC), a MobileNetV2-style opset-12 export
(ReLU6 as Clip), a MobileNetV3-style opset-13 export (HardSwish, squeeze-excitation), the same with its activations
written out as Keras and PyTorch ports write them, and a plain opset-17
`torch.onnx.export` of a greyscale CNN, and a model shaped like the public MobileNetV1 0.25 of the issue
(benchmarks/vww_shaped.py: 96x96, two classes, Keras-style padding and head, dead channels; swept with `--resize` on
the 32x32 images). For each int8 variant: agreement with FP32 on the test images with the
default recipe (AdaRound checked against nearest on held-out training images), with `--weight-rounding nearest`,
what the held-out images chose and their numbers; then, as peers on the same calibration images, onnxruntime's
`quantize_static` with its own defaults (QDQ, int8 weights per tensor, uint8 activations, MinMax) and NNCF's
`quantize` with its defaults when NNCF is installed (`pip install nncf`; not a dependency of ptqflow).

    python benchmarks/families.py --data-dir ../shared/data/cifar-10-batches-py [--train-images 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixture builders the tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402


def _families(cifar, train_images: int, work: Path):
    """(name, model file, dataset path, preprocessing, sweep options) of each family, trained on the first training
    images."""
    from cifar_fixture import write_npz
    from exporter_fixture import mobilenet_v1_opset11, mobilenet_v2_style, mobilenet_v3_style, plain_export_cnn
    from vww_shaped import two_classes, vww_shaped

    images, labels = cifar.train.images[:train_images].astype(np.float32), cifar.train.labels[:train_images]
    grey = lambda x: x.mean(axis=1, keepdims=True).round().astype(np.uint8)  # noqa: E731
    grey_data = write_npz(work / "grey.npz", (grey(cifar.train.images), cifar.train.labels),
                          (grey(cifar.test.images), cifar.test.labels), list(cifar.class_names))
    two_class_data = write_npz(work / "vehicle-animal.npz", (cifar.train.images, two_classes(cifar.train.labels)),
                               (cifar.test.images, two_classes(cifar.test.labels)), ["vehicle", "animal"])
    return [
        ("mobilenet-v1 (opset 11, batch 1, NHWC)",
         mobilenet_v1_opset11(work / "v1.onnx", images.transpose(0, 2, 3, 1), labels, 10), None, "unit", {}),
        ("mobilenet-v2 (opset 12, ReLU6 as Clip)", mobilenet_v2_style(work / "v2.onnx", images, labels, 10), None,
         "unit", {}),
        ("mobilenet-v3 (opset 13, HardSwish, SE)", mobilenet_v3_style(work / "v3.onnx", images, labels, 10), None,
         "unit", {}),
        ("mobilenet-v3, activations written out (Keras's relu6(x + 3) * (1/6), x * relu6(x + 3) / 6)",
         mobilenet_v3_style(work / "v3-decomposed.onnx", images, labels, 10, decomposed=True), None, "unit", {}),
        ("plain export (opset 17, greyscale)",
         plain_export_cnn(work / "plain.onnx", grey(cifar.train.images[:train_images]).astype(np.float32), labels, 10),
         grey_data, "raw", {}),
        ("mobilenet-v1 0.25 96x96, 2 classes (VWW-shaped, opset 11, batch 1, Keras-style pads and head)",
         vww_shaped(work / "vww.onnx", cifar.train.images[:train_images], two_classes(labels)), two_class_data,
         "unit", {"resize": True}),
    ]


def _sweep(model: Path, data: Path, preprocessing: str, test_limit: int, **options):
    """Each variant's report with its MLflow run (for the held-out choice it records)."""
    from mlflow.tracking import MlflowClient

    from ptqflow import quantize

    results = quantize(model, data, preprocessing=preprocessing, test_limit=test_limit, register=False,
                       diagnose=False, bench=options.pop("bench", False), **options)
    client = MlflowClient()
    return {report.name: (report, client.get_run(report.run_id) if report.run_id else None) for report in results}


def _scores(model: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime's scores of model-ready `images`, in batches the model's input takes (a fixed batch of 1 too)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else 64
    return np.concatenate([session.run(None, {name: images[i:i + step]})[0] for i in range(0, len(images), step)])


def _peer_agreements(model: Path, data: Path, preprocessing: str, test_limit: int, work: Path,
                     **options) -> dict[str, str]:
    """Agreement with FP32 of each peer with its own defaults, calibrated on ptqflow's calibration images and
    measured on the sweeps' test images: onnxruntime's quantize_static, and NNCF's quantize when it is installed
    (`pip install nncf`: a peer, not a dependency)."""
    from ptqflow.pipelines.sweep.inputs import prepare_inputs
    from ptqflow.pipelines.sweep.options import SweepOptions

    inputs = prepare_inputs(SweepOptions(model_path=model, data_dir=data, preprocessing=preprocessing,
                                         test_limit=test_limit, fetch_missing=False, **options))
    test = inputs.transform(inputs.test.images)
    step = inputs.model.input.batch_size or 64
    batches = [inputs.calibration[i:i + step] for i in range(0, len(inputs.calibration), step)]
    reference = _scores(model, test).argmax(1)

    def agreement(quantized: Path) -> str:
        return f"{100 * float((_scores(quantized, test).argmax(1) == reference).mean()):.2f}"

    found = {"onnxruntime quantize_static defaults": agreement(_ort_defaults(model, batches, inputs, work))}
    from importlib.util import find_spec

    found["NNCF quantize defaults"] = (agreement(_nncf_defaults(model, batches, inputs, work)) if find_spec("nncf")
                                       else "not installed")
    return found


def _ort_defaults(model: Path, batches: list, inputs, work: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{inputs.model.input.name: batch} for batch in batches])

        def get_next(self):
            return next(self.batches, None)

    prepared, quantized = work / "peer-pre.onnx", work / "peer-int8.onnx"
    quant_pre_process(str(model), str(prepared))
    quantize_static(str(prepared), str(quantized), Reader())
    return quantized


def _nncf_defaults(model: Path, batches: list, inputs, work: Path) -> Path:
    import nncf
    import onnx

    dataset = nncf.Dataset(batches, lambda batch: {inputs.model.input.name: batch})
    quantized = nncf.quantize(onnx.load(str(model)), dataset, subset_size=len(inputs.calibration))
    path = work / "peer-nncf.onnx"
    onnx.save(quantized, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=3000, help="training images each fixture learns from")
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--bench", action="store_true", help="also time batch 1 (slower)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from ptqflow.pipelines.data.cifar import load_cifar10

    cifar = load_cifar10(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="ptqflow-families-") as scratch:
        work = Path(scratch)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        lines = []
        for family, model, data, preprocessing, options in _families(cifar, args.train_images, work):
            started = time.perf_counter()
            default = _sweep(model, data or args.data_dir, preprocessing, args.test_limit, bench=args.bench, **options)
            nearest = _sweep(model, data or args.data_dir, preprocessing, args.test_limit, weight_rounding="nearest",
                             **options)
            fp32 = default["fp32"][0]
            lines.append(f"\n**{family}**: FP32 accuracy {100 * fp32.accuracy:.2f}% "
                         f"({time.perf_counter() - started:.0f} s for both sweeps)\n")
            lines.append("| variant | default % | nearest % | held-out choice: equalization, rounding (AdaRound / "
                         "nearest %) | batch-1 latency vs FP32 |")
            lines.append("|---|---|---|---|---|")
            for name, (report, run) in default.items():
                if name == "fp32":
                    continue
                if report.status != "ok":
                    lines.append(f"| {name} | {report.status}: {report.reason[:80]} | | | |")
                    continue
                metrics, params = run.data.metrics, run.data.params
                kept = params.get("weight_rounding_kept", params.get("weight_rounding", ""))
                if "equalization_kept" in params:
                    kept = f"CLE {params['equalization_kept']}, {kept}"
                choice = (f"{kept} ({100 * metrics['validation_agreement_adaround']:.2f} / "
                          f"{100 * metrics['validation_agreement_nearest']:.2f})"
                          if "validation_agreement_adaround" in metrics else kept)
                latency = (f"{report.latency_ms / fp32.latency_ms:.2f}x" if report.latency_ms and fp32.latency_ms
                           else "")
                near = nearest[name][0]
                lines.append(f"| {name} | {100 * report.agreement:.2f} | "
                             f"{100 * near.agreement:.2f} | {choice} | {latency} |" if near.agreement is not None
                             else f"| {name} | {100 * report.agreement:.2f} | {near.status} | {choice} | {latency} |")
            for peer, agreement in _peer_agreements(model, data or args.data_dir, preprocessing, args.test_limit,
                                                    work, **options).items():
                lines.append(f"| {peer} (peer) | {agreement} | | | |")
        print(f"\n{machine_line()}; agreement with FP32 on the first {args.test_limit} CIFAR-10 test images")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
